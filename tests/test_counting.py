"""Counting: labels and their errors, metrics on hand-checked cases, peaks, loss terms, end to end."""

import math

import pytest
import torch

from weakloc.data.counts import load_count_labels, read_counts_csv
from weakloc.errors import LabelError
from weakloc.evaluate.counting import count_metrics, match_instances, prf
from weakloc.localize.instances import find_peaks, instance_boxes, instances, sized_boxes
from weakloc.config import TrainConfig
from weakloc.train.module import counting_loss, crop_consistency_loss, gather_penalty, random_crop_box, total_variation


def _csv(tmp_path, text):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    p = tmp_path / "counts.csv"
    p.write_text(text)
    return p


def test_counts_csv_and_its_errors(tmp_path):
    lab = read_counts_csv(_csv(tmp_path, "path,rbc,wbc,split\na.png,3,0,train\nb.png,0,2,val\n"))
    assert lab.classes == ["rbc", "wbc"] and lab.task == "multi"
    assert lab.counts.tolist() == [[3, 0], [0, 2]] and lab.targets.tolist() == [[1, 0], [0, 1]]
    assert lab.subset([1]).counts.tolist() == [[0, 2]]
    for cell, message in [("-1", "negative"), ("1.5", "not a whole number"), ("nan", "is nan"), ("x", "not a number")]:
        with pytest.raises(LabelError, match=f"row 2: count of 'rbc' .*{message}|row 2: count of 'rbc' is {message}"):
            read_counts_csv(_csv(tmp_path, f"path,rbc\na.png,{cell}\n"))
    with pytest.raises(LabelError, match=r"unknown class column\(s\) \['dog'\]"):
        read_counts_csv(_csv(tmp_path, "path,rbc,dog\na.png,1,1\n"), classes=["rbc", "wbc"])
    with pytest.raises(LabelError, match="header"):
        read_counts_csv(_csv(tmp_path, "a.png,1\n"))


def test_counts_from_annotations_equal_the_synthetic_counts(tmp_path):
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    d = write_synthetic(tmp_path / "s", SyntheticConfig(n_images=12, size=64, mode="multi", max_instances=3, seed=4))
    assert torch.equal(load_count_labels(d).counts, load_count_labels(d, annotations=d / "annotations.json").counts)


def test_count_metrics_on_a_hand_checked_case():
    gt = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    pred = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    m = count_metrics(pred, gt, ["a", "b"])
    # class a: errors 1, -2 -> MAE 1.5, RMSE sqrt(2.5); rel sqrt((1/1 + 4/4)/2) = 1; nz: only image 2: 2, rel sqrt(4/4)=1
    # class b: errors 0, 1 -> MAE .5, RMSE sqrt(.5); rel sqrt((0 + 1/1)/2); nz: image 1: 0
    assert m["per_class"]["a"] == pytest.approx({"MAE": 1.5, "RMSE": math.sqrt(2.5)})
    assert m["mRMSE"] == pytest.approx((math.sqrt(2.5) + math.sqrt(0.5)) / 2)
    assert m["mRMSE-nz"] == pytest.approx((2.0 + 0.0) / 2)
    assert m["m-relRMSE"] == pytest.approx((1.0 + math.sqrt(0.5)) / 2)
    assert m["m-relRMSE-nz"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["MAE"] == pytest.approx(1.0)


def test_whole_counts_are_rounded_and_gated_by_presence():
    from types import SimpleNamespace

    from weakloc.localize.instances import predicted_counts

    out = SimpleNamespace(counts=torch.tensor([[2.4, 0.6, 3.7, -0.2]]), logits=torch.tensor([[1.0, 0.5, -1.0, 2.0]]))
    assert predicted_counts(out).tolist() == [[2.0, 1.0, 0.0, 0.0]]  # the third is called absent by its logit
    assert predicted_counts(out, task="single").tolist() == [[2.0, 1.0, 4.0, 0.0]]


def test_point_and_box_matching_is_one_to_one():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    pts = torch.tensor([[5.0, 5.0], [6.0, 6.0], [25.0, 25.0], [50.0, 50.0]])
    assert match_instances(pts, torch.tensor([0.9, 0.8, 0.7, 0.6]), gt) == (2, 2, 0)  # two points in one box count once
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 26.0, 30.0]])  # IoU 1 and 0.6
    assert match_instances(pts[:2], torch.tensor([0.5, 0.4]), gt, boxes, iou=0.5) == (2, 0, 0)
    assert match_instances(pts[:2], torch.tensor([0.5, 0.4]), gt, boxes, iou=0.7) == (1, 1, 1)
    assert prf(2, 2, 0) == pytest.approx({"precision": 0.5, "recall": 1.0, "F1": 2 / 3, "tp": 2, "fp": 2, "fn": 0})


def test_peaks_are_local_maxima_top_count_and_boxes_surround_them():
    m = torch.zeros(1, 2, 12, 12)
    m[0, 0, 2, 3] = 1.0
    m[0, 0, 2, 4] = 0.6  # neighbour of a peak: suppressed
    m[0, 0, 8, 9] = 0.8
    m[0, 0, 8, 8] = 0.5
    m[0, 0, 10, 1] = 0.3
    counts = torch.tensor([[2.2, 0.4]])
    pts, scores, valid = find_peaks(m, counts, kernel=3, max_instances=3)
    assert valid.tolist() == [[[True, True, False], [False, False, False]]]
    assert pts[0, 0, :2].tolist() == [[3.0, 2.0], [9.0, 8.0]] and scores[0, 0, :2].tolist() == pytest.approx([1.0, 0.8])
    boxes = instance_boxes(m, pts, scores, valid, fraction=0.5)
    assert boxes[0, 0, 0].tolist() == [3.0, 2.0, 4.0, 2.0]  # the peak and its 0.6 neighbour
    assert boxes[0, 0, 1].tolist() == [8.0, 8.0, 9.0, 8.0]
    assert boxes[0, 1].abs().sum() == 0
    found = instances(m, counts)
    assert found.valid.sum() == 2
    wide = instance_boxes(m, pts, scores, valid, fraction=0.5, scale=2.0)
    assert wide[0, 0, 0].tolist() == [2.0, 1.5, 5.0, 2.5]  # centre (4, 2.5) in continuous pixels, twice 2 x 1 pixels
    assert wide[0, 1].abs().sum() == 0


def test_sized_boxes_centre_each_class_size_on_its_peaks():
    points = torch.tensor([[[[3.0, 2.0], [0.0, 0.0]], [[9.0, 8.0], [5.0, 5.0]]]])  # (1, 2 classes, 2 peaks, 2)
    valid = torch.tensor([[[True, True], [True, False]]])
    sizes = torch.tensor([[4.0, 2.0], [3.0, 3.0]])  # class 0: 4 wide, 2 tall; class 1: 3 x 3
    boxes = sized_boxes(points, valid, sizes, 12, 12)
    assert boxes[0, 0, 0].tolist() == [1.5, 1.5, 4.5, 2.5]  # centre (3.5, 2.5): x 1.5..5.5, y 1.5..3.5 continuous
    assert boxes[0, 0, 1].tolist() == [0.0, 0.0, 1.5, 0.5]  # cut at the map's corner
    assert boxes[0, 1, 0].tolist() == [8.0, 7.0, 10.0, 9.0]
    assert boxes[0, 1, 1].tolist() == [0.0, 0.0, 0.0, 0.0]  # not a kept peak
    found = instances(torch.zeros(1, 2, 12, 12).index_put_((torch.tensor([0]), torch.tensor([1]), torch.tensor([8]), torch.tensor([9])),
                                                           torch.tensor(1.0)), torch.tensor([[0.0, 1.0]]), sizes=sizes)
    assert found.boxes[0, 1, 0].tolist() == [8.0, 7.0, 10.0, 9.0]

    from weakloc.localize.instances import output_instances
    from weakloc.models import ModelOutput

    density = torch.zeros(1, 2, 4, 4)
    density[0, 0, 1, 2] = 1.0
    out = ModelOutput(logits=torch.ones(1, 2), features=None, class_maps=None, counts=torch.tensor([[1.0, 0.0]]), density=density)
    _, found = output_instances(out, 16, box_sizes=[[0.5, 0.25], [0.1, 0.1]])
    x, y = found.points[0, 0, 0].tolist()
    assert found.boxes[0, 0, 0].tolist() == [x + 0.5 - 4, y + 0.5 - 2, x + 0.5 + 3, y + 0.5 + 1]  # 8 x 4 pixels of 16 x 16


def test_box_sizes_are_calibrated_from_a_few_annotated_images(tmp_path):
    from weakloc.data.annotations import read_annotations
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic
    from weakloc.errors import WeaklocError
    from weakloc.evaluate.calibrate import calibrate_box_sizes, few_box_subset
    from weakloc.models import ModelConfig, WeaklocNet

    d = write_synthetic(tmp_path / "s", SyntheticConfig(n_images=16, size=64, mode="multi", max_instances=3, seed=2))
    net = WeaklocNet(ModelConfig(backbone="test_resnet", classes=["triangle", "square", "star"], task="multi", input_size=64,
                                 counting="density", density_stage=-1, density_hidden=8), pretrained="none")
    assert net.config.instance_box_sizes() is None
    net.config.maps.box_sizes = {"triangle": [0.1, 0.1]}
    with pytest.raises(WeaklocError, match="square, star"):
        net.config.instance_box_sizes()
    res = calibrate_box_sizes(net, d, d / "annotations.json", per_class=2, split="train")
    labels, gt = load_count_labels(d), read_annotations(d / "annotations.json")
    train = labels.subset([i for i, s in enumerate(labels.splits) if s == "train"])
    chosen = few_box_subset(train, gt, net.config.classes, 2, 0)
    assert res["images"] == res.images == len(chosen) <= 6
    assert net.config.maps.sources["box_sizes"] == {"by": "calibrate", "split": "train", "images": len(chosen), "per_class": 2, "seed": 0}
    assert set(res.to_dict()) == {"box_sizes", "boxes", "images"}
    for k, cname in enumerate(net.config.classes):
        boxes = torch.cat([gt.find(train.paths[i]).boxes_of(cname) for i in chosen])
        wh = (boxes[:, 2:] - boxes[:, :2]) / 64  # the synthetic images are 64 x 64
        assert res["boxes"][cname] == len(wh)
        assert net.config.instance_box_sizes()[k] == pytest.approx(wh.median(0).values.tolist(), abs=1e-4)
    stored = net.config.maps.box_sizes
    with pytest.raises(WeaklocError, match="split"):
        calibrate_box_sizes(net, d, d / "annotations.json", split="nope")
    assert net.config.maps.box_sizes == stored
    with pytest.raises(WeaklocError, match="no counting head"):
        calibrate_box_sizes(WeaklocNet(ModelConfig(backbone="test_resnet", classes=["a", "b"], input_size=64), pretrained="none"),
                            d, d / "annotations.json")


def test_counting_loss_terms():
    from weakloc.models import ModelOutput

    density = torch.zeros(1, 1, 2, 2)
    density[0, 0, 0, 0] = 2.0
    out = ModelOutput(torch.zeros(1, 1), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), (), density.sum((2, 3)), density, None)
    assert total_variation(density) == pytest.approx(2 * 2 / 2)  # |dx| mean 1, |dy| mean 1
    only_count = counting_loss(out, torch.tensor([[2.0]]), TrainConfig(density_l1=0, density_tv=0))
    assert only_count == pytest.approx(2 - 2 * math.log(2), abs=1e-5)  # Poisson NLL: pred - target * log(pred)
    full = counting_loss(out, torch.tensor([[2.0]]), TrainConfig(density_l1=0.5, density_tv=0.25))
    assert full == pytest.approx(float(only_count) + 0.5 * 0.5 + 0.25 * 2, abs=1e-5)
    huber = counting_loss(out, torch.tensor([[4.0]]), TrainConfig(count_loss="huber", density_l1=0, density_tv=0))
    assert huber == pytest.approx(1.5)
    gathered = counting_loss(out, torch.tensor([[2.0]]), TrainConfig(density_gather=0.5))
    assert gathered == pytest.approx(float(only_count) + 0.5 * float(gather_penalty(density)), abs=1e-6)


def test_gather_penalty_prefers_peaks_to_spread():
    spread = torch.full((1, 1, 4, 4), 1 / 16)  # one object spread over 16 cells
    peak = torch.zeros(1, 1, 4, 4)
    peak[..., 1, 2] = 1.0  # the same object in one cell
    eps = 0.016
    e = eps / 16
    # 16 cells of sqrt(1/16 + e) - sqrt(e), over sqrt(16)
    assert float(gather_penalty(spread, eps)) == pytest.approx(16 * (math.sqrt(1 / 16 + e) - math.sqrt(e)) / 4, rel=1e-5)
    assert float(gather_penalty(peak, eps)) == pytest.approx((math.sqrt(1 + e) - math.sqrt(e)) / 4, rel=1e-5)
    assert gather_penalty(peak, eps) < 0.3 * gather_penalty(spread, eps)
    big = torch.full((1, 1, 32, 32), 1 / 1024)  # even spread on a larger grid: still far above a blob of 4x4 cells
    blob = torch.zeros(1, 1, 32, 32)
    blob[..., 8:12, 20:24] = 1 / 16
    assert gather_penalty(big) > 0.8 and float(gather_penalty(big)) > 5 * float(gather_penalty(blob))
    assert float(gather_penalty(torch.zeros(2, 3, 4, 4))) == pytest.approx(0, abs=1e-6)
    # its gradient moves mass towards the larger cell: the weak cell is pushed down harder
    two = torch.tensor([[[[0.9, 0.1]]]], requires_grad=True)
    gather_penalty(two).backward()
    assert two.grad[0, 0, 0, 1] > two.grad[0, 0, 0, 0] > 0


def test_crop_box_and_crop_consistency():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        top, left, h, w = random_crop_box((256, 320), align=32, generator=g)
        assert h == w and h in (128, 160, 192) and top % 32 == 0 and left % 32 == 0
        assert top + h <= 256 and left + w <= 320
    with pytest.raises(ValueError, match="too small"):
        random_crop_box((16, 16), align=32)
    full = torch.zeros(2, 1, 8, 8)  # stride 4: 32x32-px images
    full[0, 0, 1, 1] = 1.0  # an object inside the crop below
    full[0, 0, 6, 6] = 1.0  # and one outside it
    full[1, 0, 7, 7] = 2.0  # parked in the corner, outside the crop
    box = (0, 0, 16, 16)  # pixels: cells 0..3
    agree = torch.zeros(2, 1, 4, 4)
    agree[0, 0, 1, 1] = 1.0
    assert crop_consistency_loss(full, agree, box, stride=4) == 0
    corner = agree.clone()
    corner[1, 0, 3, 3] = 2.0  # the crop's own corner: the whole map has nothing there
    assert float(crop_consistency_loss(full, corner, box, stride=4)) == pytest.approx(1.5 / 2)  # Huber(2) = 1.5, mean of 2 maps
    with pytest.raises(ValueError, match="density is"):
        crop_consistency_loss(full, torch.zeros(2, 1, 3, 3), box, stride=4)


def test_count_training_and_evaluation_end_to_end(tmp_path):
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic
    from weakloc.errors import WeaklocError
    from weakloc.evaluate.counting import evaluate_counts
    from weakloc.train import fine_tune

    d = write_synthetic(tmp_path / "s", SyntheticConfig(n_images=32, size=64, mode="multi", max_instances=3, seed=5, val_fraction=0.25))
    res = fine_tune(load_count_labels(d), tmp_path / "run", backbone="test_resnet", pretrained="none", input_size=64, output_stride=8,
                    epochs=2, batch_size=8, progress=False, counting="both")
    assert res.model.config.counting == "both" and "val_count_mae" in res.metrics
    rep = evaluate_counts(res.model, d, d / "annotations.json")
    assert rep["split"] == "val" and rep["images"] == sum(s == "val" for s in load_count_labels(d).splits)
    for key in ("MAE", "mRMSE", "mRMSE-nz", "m-relRMSE", "m-relRMSE-nz"):
        assert rep["counting"][key] >= 0 and rep["baseline"][key] >= 0
    assert 0 <= rep["points"]["F1"] <= 1 and set(rep["boxes"]["per_class"]) == {"triangle", "square", "star"}
    assert res.model.config.maps.count_views == "flip" and rep.count_views == rep["tta"] == "flip"  # trained with left-right flips only

    from weakloc.localize.instances import _view, counting_forward

    m = torch.arange(2 * 5 * 5.0).view(1, 2, 5, 5)
    assert len({tuple(_view(m, i).flatten().tolist()) for i in range(8)}) == 8  # the 8 orientations, each once
    x = torch.rand(2, 3, 64, 64)
    model = res.model.eval()
    with torch.no_grad():
        single, tta = counting_forward(model, x), counting_forward(model, x, "dihedral")
        views = [model.forward_maps(_view(x, i)) for i in range(8)]
    assert torch.allclose(single.counts, views[0].counts)
    assert torch.allclose(tta.counts, torch.stack([v.counts for v in views]).mean(0), atol=1e-5)
    assert torch.allclose(tta.logits, torch.stack([v.logits for v in views]).mean(0), atol=1e-5)
    assert torch.allclose(tta.density, views[0].density)  # the maps stay the first view's
    with pytest.raises(WeaklocError, match="dihedral"):
        counting_forward(model, x, "rot45")


def test_counting_training_refuses_random_crops_and_takes_dihedral_flips(tmp_path):
    from weakloc.data.dataset import train_transform
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic
    from weakloc.errors import WeaklocError
    from weakloc.train import fine_tune

    d = write_synthetic(tmp_path / "s", SyntheticConfig(n_images=8, size=48, mode="multi", max_instances=2, seed=1))
    with pytest.raises(WeaklocError, match="crop_scale"):  # a crop would drop objects its counts still hold
        fine_tune(load_count_labels(d), tmp_path / "run", backbone="test_resnet", pretrained="none", input_size=48,
                  epochs=1, progress=False, crop_scale=(0.5, 1.0))
    tf = train_transform(5, mean=(0, 0, 0), std=(1, 1, 1), crop_scale=(1.0, 1.0))
    tf.transforms = [t for t in tf.transforms if type(t).__name__ not in ("ColorJitter", "ToDtype", "Normalize", "RandomResizedCrop")]
    dihedral = train_transform(5, crop_scale=(1.0, 1.0), dihedral=True)
    dihedral.transforms = [t for t in dihedral.transforms if type(t).__name__ not in ("ColorJitter", "ToDtype", "Normalize", "RandomResizedCrop")]
    square = torch.arange(25, dtype=torch.uint8).view(1, 5, 5).repeat(3, 1, 1)
    torch.manual_seed(0)
    seen = {tuple(dihedral(square)[0].flatten().tolist()) for _ in range(200)}
    plain = {tuple(tf(square)[0].flatten().tolist()) for _ in range(50)}
    assert len(seen) == 8 and len(plain) == 2  # all right-angle orientations vs the horizontal flip alone
    assert all(sorted(o) == sorted(square[0].flatten().tolist()) for o in seen)


def test_cli_counts_train_localize_evaluate(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from weakloc import cli
    from weakloc.cli import app
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    monkeypatch.setattr(cli.console, "width", 200)
    d = write_synthetic(tmp_path / "s", SyntheticConfig(n_images=24, size=64, mode="multi", max_instances=3, seed=6))
    run = CliRunner()
    r = run.invoke(app, ["train", str(d), "--counts", "-o", str(tmp_path / "run"), "--backbone", "test_resnet", "--pretrained", "none",
                         "--input-size", "64", "--output-stride", "8", "--epochs", "1", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    model = tmp_path / "run" / "model"
    r = run.invoke(app, ["evaluate", str(model), str(d), "-a", str(d / "annotations.json"), "--split", "all", "-o", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "mean-count baseline" in r.output and "m-relRMSE-nz" in r.output
    assert "counting" in json.loads((tmp_path / "r.json").read_text())
    few = [str(p) for p in sorted((d / "images").iterdir())[:3]]
    r = run.invoke(app, ["localize", str(model), *few, "-o", str(tmp_path / "loc")])
    assert r.exit_code == 0, r.output
    det = json.loads((tmp_path / "loc" / "detections.json").read_text())
    assert set(det["images"][0]["counts"]) == {"triangle", "square", "star"}
    assert all("point" in a and "instance" in a for a in det["annotations"])
    assert len(list((tmp_path / "loc" / "overlays").glob("*.png"))) == 3
    import csv

    with open(tmp_path / "loc" / "counts.csv", newline="", encoding="utf-8") as f:  # the spreadsheet summary
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [i["file_name"] for i in det["images"]]
    assert all({c: int(r[c]) for c in ("triangle", "square", "star")} == i["counts"] for r, i in zip(rows, det["images"]))
    r = run.invoke(app, ["calibrate", str(model), str(d), "-a", str(d / "annotations.json"), "--per-class", "2"])
    assert r.exit_code == 0, r.output
    assert "instance box sizes" in r.output
    r = run.invoke(app, ["calibrate", str(model), str(d), "-a", str(d / "annotations.json"), "--methods", "gradcam"])
    assert r.exit_code != 0 and "box sizes only" in str(r.exception)
    sizes = json.loads((model / "config.json").read_text())["maps"]["box_sizes"]
    assert set(sizes) == {"triangle", "square", "star"}
    r = run.invoke(app, ["localize", str(model), *few, "-o", str(tmp_path / "loc2")])
    assert r.exit_code == 0, r.output
    det = json.loads((tmp_path / "loc2" / "detections.json").read_text())
    for a in det["annotations"]:  # each box has its class's calibrated size, unless cut by the image border
        w, h = sizes[a["label"]]
        assert a["bbox"][2] <= w * 64 + 0.2 and a["bbox"][3] <= h * 64 + 0.2
    # counts derived from annotations for a labels source
    r = run.invoke(app, ["train", str(d / "labels.csv"), "--counts-from", str(d / "annotations.json"), "-o", str(tmp_path / "run2"),
                         "--backbone", "test_resnet", "--pretrained", "none", "--input-size", "64", "--epochs", "1", "--batch-size", "8",
                         "--counting", "count"])
    assert r.exit_code == 0, r.output


def test_training_history_holds_each_epochs_own_metrics(tmp_path):
    import csv

    from weakloc.data.counts import load_count_labels
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic
    from weakloc.train import fine_tune

    d = write_synthetic(tmp_path / "s", SyntheticConfig(n_images=24, size=64, mode="multi", max_instances=2, seed=3, val_fraction=0.25))
    res = fine_tune(load_count_labels(d), tmp_path / "run", backbone="test_resnet", pretrained="none", input_size=64, output_stride=8,
                    epochs=2, batch_size=8, progress=False, counting="density")
    assert [h["epoch"] for h in res.history] == [0, 1]
    logged = [r for r in csv.DictReader(open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv")) if r.get("val_count_mae")]
    for h, row in zip(res.history, logged):  # the epoch's own validation figures, as the CSV log has them
        assert int(row["epoch"]) == h["epoch"]
        assert h["val_count_mae"] == pytest.approx(float(row["val_count_mae"]), rel=1e-5)


def test_training_step_adds_crop_consistency_and_gather_terms():
    from weakloc.models import ModelConfig, WeaklocNet
    from weakloc.train.module import ClassifierModule

    cfg = ModelConfig(backbone="test_resnet", classes=["a", "b"], task="multi", input_size=64, counting="density", density_stage=-2,
                      density_hidden=8, density_context=True)
    model = WeaklocNet(cfg, pretrained="none").eval()  # eval: the same BatchNorm statistics for every forward pass
    batch = {"image": torch.randn(2, 3, 64, 64), "target": torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 3.0]])}

    def step(training=True, **weights):
        return ClassifierModule(model, TrainConfig(**weights))._step(batch, training=training)[0]

    plain = step().item()
    density = model.forward_maps(batch["image"]).density
    assert float(step(density_gather=1.0)) == pytest.approx(plain + float(gather_penalty(density)), rel=1e-5)
    torch.manual_seed(0)
    with_crop = step(crop_consistency=1.0)
    torch.manual_seed(0)
    top, left, h, w = random_crop_box((64, 64), align=32)
    crop = model.forward_maps(batch["image"][..., top:top + h, left:left + w]).density
    expected = crop_consistency_loss(density, crop, (top, left, h, w), 64 // density.shape[-1])
    assert float(with_crop) == pytest.approx(plain + float(expected), rel=1e-5) and float(expected) > 0
    with_crop.backward()  # the crop's own forward pass is trained too
    assert model.counting_head.context.weight.grad.abs().sum() > 0
    assert float(step(training=False, crop_consistency=1.0)) == pytest.approx(plain, rel=1e-5)  # validation: no crop


def test_density_priors_need_a_density_head(tmp_path):
    from weakloc.data.counts import load_count_labels
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic
    from weakloc.errors import WeaklocError
    from weakloc.train import fine_tune

    d = write_synthetic(tmp_path / "s", SyntheticConfig(n_images=8, size=32, mode="multi", max_instances=2, seed=1))
    for kw in ({"crop_consistency": 1.0}, {"density_gather": 0.3}):
        with pytest.raises(WeaklocError, match="act on density maps"):
            fine_tune(load_count_labels(d), tmp_path / "run", backbone="test_resnet", pretrained="none", input_size=32, epochs=1,
                      progress=False, counting="count", **kw)


def test_density_head_learns_synthetic_counts_on_a_small_budget(tmp_path):
    """Regression guard for counting as a whole (labels, density head, loss, schedule, rounding,
    peaks): the offline ImageNet Lite0 trained on 58 images of 0-3 squares for 6 epochs at 96 px
    (about a minute on 2 cores) counts its training images clearly better than the mean count and
    puts points on the squares (one class, so it also covers single-label validation metrics). The benchmark's targets (MAE <= 0.15, point F1 >= 0.85) need
    2,000 images and 20 epochs (docs/results.md, fourth round); measured margins: docs/results.md,
    eighth round."""
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic
    from weakloc.evaluate.counting import evaluate_counts
    from weakloc.train import fine_tune

    torch.manual_seed(0)
    d = write_synthetic(tmp_path / "s", SyntheticConfig(n_images=96, size=96, mode="multi", classes=("square",), max_instances=3,
                                                        radius=(0.1, 0.14), distractors=(0, 2), val_fraction=0.2, test_fraction=0.2, seed=0))
    labels = load_count_labels(d)
    res = fine_tune(labels, tmp_path / "run", backbone="tf_efficientnet_lite0", input_size=96, output_stride=8, epochs=6, batch_size=16,
                    progress=False, counting="density", monitor="val_count_mae", seed=0)
    rep = evaluate_counts(res.model, labels, d / "annotations.json", split="train", count_views="none")
    assert rep.counting.mae <= 0.75 * rep.baseline.mae, (rep.counting.mae, rep.baseline.mae)
    assert rep.points.f1 >= 0.45, rep.points.f1
