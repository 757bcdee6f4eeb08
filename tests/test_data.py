"""Reading images, labels and annotations; every kind of bad input gets a clear error."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from weakloc.data import ImageDataset, collate_skip_bad, eval_transform, load_labels, read_annotations, read_image, split_train_val
from weakloc.data.annotations import decode_rle, read_coco, read_voc
from weakloc.data.labels import read_class_folders, read_labels_csv
from weakloc.errors import AnnotationError, ImageReadError, LabelError


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_every_image_mode_reads_as_rgb_uint8(tmp_path, mode):
    arr = (np.arange(12 * 10 * 3).reshape(12, 10, 3) % 256).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "I;16":
        img = Image.fromarray((np.arange(120).reshape(12, 10) * 500).astype(np.uint16))
    else:
        img = img.convert(mode)
    ext = "jpg" if mode == "CMYK" else "png"
    out = read_image(_save(img, tmp_path / f"x.{ext}"))
    assert out.dtype == torch.uint8 and out.shape == (3, 12, 10)


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    img = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert read_image(_save(img, tmp_path / "w.png")).min() == 255


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert read_image(_save(img, tmp_path / "t.png")).min() == 255


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    p = _save(img, tmp_path / "r.jpg", exif=exif.tobytes())
    assert read_image(p).shape == (3, 20, 10)


def test_cmyk_jpeg_colours(tmp_path):
    img = Image.new("RGB", (8, 8), (200, 30, 30)).convert("CMYK")
    out = read_image(_save(img, tmp_path / "c.jpg"))
    assert out[0].float().mean() > 150 and out[1].float().mean() < 90


@pytest.mark.parametrize("content, reason", [(None, "not found"), (b"", "empty"), (b"this is not an image", "cannot decode")])
def test_bad_image_files_name_the_file(tmp_path, content, reason):
    p = tmp_path / "bad.jpg"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as e:
        read_image(p)
    assert "bad.jpg" in str(e.value)


def test_truncated_jpeg_is_an_error(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "trunc.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="trunc.jpg"):
        read_image(p)


def test_dataset_skips_and_counts_undecodable_images(tmp_path):
    good = _save(Image.new("RGB", (16, 16)), tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    ds = ImageDataset([good, bad, good], torch.tensor([0, 1, 0]), eval_transform(16))
    batch = collate_skip_bad([ds[i] for i in range(3)])
    assert batch["skipped"] == 1 and batch["image"].shape == (2, 3, 16, 16)
    assert batch["index"].tolist() == [0, 2]
    assert collate_skip_bad([ds[1]])["image"] is None


@pytest.mark.parametrize("hw, want", [((1000, 500), (512, 256)), ((300, 400), (300, 400)), ((50, 100), (128, 256)), ((1, 4000), (1, 512))])
def test_fit_size_bounds_the_display_picture(hw, want):
    from weakloc.data.dataset import fit_size

    assert fit_size(*hw) == want


def test_predict_dataset_display_picture_and_imagenet_normalisation(tmp_path):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from weakloc.data.dataset import PredictDataset

    path = _save(Image.new("RGB", (100, 50), (255, 0, 0)), tmp_path / "red.png")
    i, x, hw, shown = PredictDataset([path], 32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)[0]
    assert (i, hw, tuple(shown.shape)) == (0, (50, 100), (3, 128, 256))
    assert torch.allclose(x[:, 0, 0], (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD))
    assert torch.allclose(eval_transform(32)(read_image(path)), x)  # the default normalisation is ImageNet's


def _tree(tmp_path, classes=("cat", "dog"), n=3):
    for c in classes:
        (tmp_path / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / c / f"{i}.png")
    return tmp_path


def test_class_folders_and_seeded_split(tmp_path):
    d = read_class_folders(_tree(tmp_path, n=5))
    assert d.classes == ["cat", "dog"] and d.task == "single" and len(d) == 10
    tr, va = split_train_val(d, 0.2, seed=3)
    tr2, va2 = split_train_val(d, 0.2, seed=3)
    assert [p.name for p in va.paths] == [p.name for p in va2.paths]
    assert sorted(va.targets.tolist()) == [0, 1]  # stratified


def test_class_folders_with_train_val(tmp_path):
    _tree(tmp_path / "train")
    _tree(tmp_path / "val", n=1)
    d = read_class_folders(tmp_path)
    tr, va = split_train_val(d)
    assert len(tr) == 6 and len(va) == 2


def test_empty_class_folder_is_an_error(tmp_path):
    _tree(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LabelError, match="empty.*no image"):
        read_class_folders(tmp_path)


def _csv(tmp_path, text):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    p = tmp_path / "labels.csv"
    p.write_text(text)
    return p


def test_csv_single_and_multi_label(tmp_path):
    d = read_labels_csv(_csv(tmp_path, "path,label\na.png,cat\nb.png,dog\n"))
    assert d.task == "single" and d.classes == ["cat", "dog"] and d.targets.tolist() == [0, 1]
    m = read_labels_csv(_csv(tmp_path, "a.png,cat;dog\nb.png,dog\nc.png,\n"))
    assert m.task == "multi" and m.targets.tolist() == [[1, 1], [0, 1], [0, 0]]


@pytest.mark.parametrize("text, match", [
    ("path,label\na.png\n", "row 2: expected 'path,label'"),
    ("path,label\nmissing.png,cat\n", "row 2: image file not found"),
    ("path,label\na.png,cat\n,dog\n", "row 3: empty image path"),
    ("path,label,split\na.png,cat,training\n", "row 2: split must be"),
])
def test_malformed_csv_rows_name_the_row(tmp_path, text, match):
    with pytest.raises(LabelError, match=match):
        read_labels_csv(_csv(tmp_path, text))


def test_unknown_class_is_an_error(tmp_path):
    with pytest.raises(LabelError, match="row 3: unknown class 'bird'"):
        read_labels_csv(_csv(tmp_path, "path,label\na.png,cat\nb.png,bird\n"), classes=["cat", "dog"])


def test_yes_no_positive_class():
    from weakloc.data.labels import positive_class_index
    assert positive_class_index(["Platelets", "none"]) == 0
    assert positive_class_index(["no", "yes"]) == 1


def _coco(tmp_path, doc):
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return p


def test_coco_boxes_masks_points_and_bad_boxes(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "sub/a.png", "width": 20, "height": 10}],
           "categories": [{"id": 7, "name": "cell"}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 4, 5], "segmentation": [[2, 3, 6, 3, 6, 8, 2, 8]], "point": [4, 5]},
               {"id": 2, "image_id": 1, "category_id": 7, "bbox": [5, 5, -3, 2]},  # inverted: dropped with a warning
               {"id": 3, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 0]},  # zero size: dropped with a warning
           ]}
    with pytest.warns(UserWarning) as caught:
        gt = read_coco(_coco(tmp_path, doc))
    messages = [str(w.message) for w in caught]
    assert any("1 invalid box" in m and "annotation 2" in m for m in messages)
    assert any("1 zero-size box(es) dropped" in m and "annotation 3" in m for m in messages)
    ann = gt.find("/data/sub/a.png")
    assert ann is gt.find("a.png")
    assert ann.boxes.tolist() == [[2, 3, 6, 8]]
    assert ann.points[0].tolist() == [4, 5]
    assert ann.has_masks("cell")
    mask = ann.mask_of("cell", (10, 20))
    assert mask.sum() > 0 and mask[5, 4] and not mask[0, 0]


@pytest.mark.parametrize("doc, match", [
    ("{not json", "not valid JSON"),
    ({"images": []}, "needs 'images' and 'categories'"),
    ({"images": [{"id": 1, "file_name": "a", "width": 1, "height": 1}], "categories": [{"id": 1, "name": "x"}],
      "annotations": [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]}, "unknown image_id 2"),
    ({"images": [{"id": 1, "file_name": "a", "width": 1, "height": 1}], "categories": [{"id": 1, "name": "x"}],
      "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0]}]}, "4-number bbox"),
])
def test_malformed_coco_is_an_error(tmp_path, doc, match):
    with pytest.raises(AnnotationError, match=match):
        read_coco(_coco(tmp_path, doc))


def test_voc_folder_and_malformed_xml(tmp_path):
    (tmp_path / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>640</width><height>480</height></size>"
        "<object><name>WBC</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>101</xmax><ymax>81</ymax></bndbox></object>"
        "<object><name>RBC</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>5</xmax><ymax>30</ymax></bndbox></object></annotation>")
    gt = read_voc(tmp_path)
    ann = gt.find("a.jpg")
    assert gt.classes == ["RBC", "WBC"] and ann.boxes_of("WBC").tolist() == [[10, 20, 100, 80]]
    assert ann.boxes_of("RBC").tolist() == [[4, 4, 4, 29]]  # one pixel wide: kept
    (tmp_path / "b.xml").write_text("<annotation><filename>b.jpg</filename>")
    with pytest.raises(AnnotationError, match="b.xml: not valid XML"):
        read_annotations(tmp_path)


def test_rle_uncompressed_and_compressed_agree():
    mask = np.zeros((5, 4), np.uint8)
    mask[1:4, 1:3] = 1
    flat = mask.T.ravel()  # column-major
    counts, val, run = [], 0, 0
    for v in flat:
        if v != val:
            counts.append(run)
            run, val = 0, v
        run += 1
    counts.append(run)
    assert np.array_equal(decode_rle({"size": [5, 4], "counts": counts}), mask)
    # the compressed string: 5-bit groups (+48), continuation bit 0x20, sign bit 0x10, deltas after the 2nd count
    s = ""
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = x != -1 if ch & 0x10 else x != 0
            s += chr((ch | 0x20 if more else ch) + 48)
    assert np.array_equal(decode_rle({"size": [5, 4], "counts": s}), mask)


def test_load_labels_dispatch(tmp_path, synth_single):
    d = load_labels(synth_single)
    assert d.splits is not None and d.task == "single"
    with pytest.raises(LabelError, match="no such file"):
        load_labels(tmp_path / "nothing")


# --- training draws fixed by (seed, epoch) ---------------------------------------------------------

def test_epoch_sampler_draws_are_fixed_by_seed_and_epoch():
    from weakloc.data.dataset import EpochSampler

    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)  # another instance, the same draws
    order, seeds = a.draws()
    assert sorted(order.tolist()) == list(range(10)) and len(set(seeds.tolist())) == 10  # a permutation, a seed per draw
    b.set_epoch(3)
    assert list(b) != list(a)
    assert list(EpochSampler(10, seed=4, epoch=2)) != list(a)


def test_epoch_sampler_shards_cover_the_order_padded_and_a_resumed_epoch_skips_what_was_drawn():
    from weakloc.data.dataset import EpochSampler

    whole = EpochSampler(10, seed=1, epoch=5)
    shards = [whole.shard(r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # every process makes as many steps
    drawn = [d for s in shards for d in s]
    assert {i for i, _ in drawn} == set(range(10)) and len(drawn) == 12  # each image, two drawn again as padding
    order = whole.draws()[0].tolist()
    assert [i for i, _ in shards[1]] == (order + order[:2])[1::3]
    resumed = EpochSampler(10, seed=1, epoch=5, skip=4)
    assert list(resumed) == list(whole)[4:]
    resumed.set_epoch(5)  # Lightning's call for the epoch being resumed keeps the skip
    assert list(resumed) == list(whole)[4:]
    resumed.set_epoch(6)
    assert len(list(resumed)) == 10


def test_dataset_item_augmentation_follows_its_draw_seed_and_leaves_the_caller_s_stream(tmp_path):
    from weakloc.data.dataset import train_transform

    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    ds = ImageDataset([path], torch.tensor([0]), train_transform(24))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first, again, other = ds[(0, 11)][0], ds[(0, 11)][0], ds[(0, 12)][0]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), before)
    assert ds[(0, 11)][2] == 0  # the item's index, not the pair


class _Draws(torch.utils.data.Dataset):
    """Each item is the ``(index, draw_seed)`` pair it was asked for."""

    def __len__(self):
        return 10

    def __getitem__(self, pair):
        return pair


def _draw_loader(**sampler) -> "EpochLoader":  # noqa: F821 -- imported inside
    from weakloc.data.dataset import EpochLoader, EpochSampler

    return EpochLoader(_Draws(), batch_size=3, sampler=EpochSampler(10, seed=0, **sampler), drop_last=True, collate_fn=list)


def test_epoch_loader_state_resumes_within_an_epoch_and_after_its_end():
    loader = _draw_loader(epoch=1)
    everything = list(loader)
    it = iter(loader)
    next(it)
    assert loader.state_dict() == {"epoch": 1, "batches": 1}
    resumed = _draw_loader()
    resumed.load_state_dict(loader.state_dict())
    assert len(resumed) == 3 and list(resumed) == everything[1:]  # the same draws, from the next batch
    assert resumed.state_dict() == {"epoch": 1, "batches": 3}
    after_end = _draw_loader()
    after_end.load_state_dict({"epoch": 1, "batches": 3})  # stopped after the epoch's last batch
    assert (after_end.sampler.epoch, after_end.sampler.skip) == (2, 0)
