"""Localize and explain as compute (typed results, no files) and writers (weakloc.report): the
records are the written JSON, compute writes nothing and imports no writer, and every map comes
from the one pipeline at ``settings.test_size``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from weakloc.config import DEFAULT_BOX_THRESHOLD, MapConfig
from weakloc.explain import pipeline
from weakloc.explain.run import ExplainedBatch, explain_batches
from weakloc.localize import localize
from weakloc.localize.run import CountBatch, LocalizedBatch, RegionBatch, localize_batches
from weakloc.report.explanation import explain_images
from weakloc.report.localization import localize_images


def _model(**extra):
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", classes=["a", "b", "c"], input_size=64, output_stride=8, drop_rate=0.0, **extra)
    return WeaklocNet(cfg, pretrained="none").eval()


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for k, (w, h) in enumerate([(48, 40), (80, 64), (30, 90)]):
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f"im{k}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return folder


def _tree(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("extra", [{}, {"task": "multi"}, {"task": "multi", "counting": "density"}], ids=["single", "multi", "counting"])
def test_records_are_the_written_json(images, tmp_path, extra):
    model = _model(**extra)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="1 image"):
        res = localize_images(model, images, out, threshold=0.3, batch_size=2)
    text = (out / "detections.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    assert doc == res.to_dict()
    assert [im.to_dict() for im in res.images] == doc["images"] and [a.to_dict() for a in res.annotations] == doc["annotations"]
    assert res["categories"] == doc["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    assert [s.to_dict() for s in res.skipped] == doc["skipped"] and res.skipped[0].file.endswith("broken.jpg")
    # ids are places in the sorted file list (broken.jpg, the first, has none), so a resumed or sharded run numbers alike
    assert [im.id for im in res.images] == [2, 3, 4] and [a.id for a in res.annotations] == list(range(1, len(res.annotations) + 1))
    first = res.images[0]
    assert (first.width, first.height) == (48, 40) and first.file_name == str(images / "im0.png")
    if "counting" in extra:
        assert first.predicted is None and set(first.counts) == {"a", "b", "c"} and "predicted" not in doc["images"][0]
        assert all(a.instance >= 1 and len(a.point) == 2 for a in res.annotations)
        assert sum(im.counts[a] for im in res.images for a in "abc") >= len(res.annotations)  # at most one box per counted instance
    else:
        assert first.predicted in "abc" and first.counts is None and "counts" not in doc["images"][0]
        assert all(a.instance is None and "instance" not in d for a, d in zip(res.annotations, doc["annotations"]))
        for im in res.images:  # mask files named in the records exist, at the original size
            for name in im.masks or {}:
                assert Image.open(out / im.masks[name]).size == (im.width, im.height)
    # the same records without an output folder, less the mask files the writer adds
    with pytest.warns(UserWarning):
        bare = localize_images(model, images, None, threshold=0.3, batch_size=2).to_dict()
    for im in doc["images"]:
        assert (out / im.pop("overlay")).is_file()
        im.pop("masks", None)
    assert bare == doc


def test_compute_writes_nothing(images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    model = _model()
    with pytest.warns(UserWarning, match="could not be read"):
        res = localize(model, images, threshold="otsu")
    batches = list(localize_batches(model, images, target="all", batch_size=1))  # broken.jpg sorts first
    explained = list(explain_batches(model, images, target="top2", batch_size=2))
    assert _tree(tmp_path) == before
    assert len(res.images) == 3 and all(im.masks is None for im in res.images)
    assert [type(b) for b in batches] == [LocalizedBatch, RegionBatch, RegionBatch, RegionBatch]
    assert len(batches[0].images) == 0 and len(batches[0].skipped) == 1
    b = batches[2]
    assert b.maps.shape == (1, 3, 64, 64) and b.masks.dtype == torch.bool and b.masks.shape == b.maps.shape
    assert b.present.all() and len(b.boxes) == 1 and len(b.boxes[0]) == 3 and b.images[0].id == 3
    assert all(a.image_id == 3 for a in b.annotations) and len(b.annotations) == sum(len(x) for x in b.boxes[0])
    assert [len(e.images) for e in explained] == [1, 2] and isinstance(explained[1], ExplainedBatch)
    assert explained[1].normalized.shape == (2, 2, 64, 64) and explained[1].targets.shape == (2, 2)
    assert explained[1].images[0].key is None and "key" not in explained[1].images[0].to_dict()


def test_counting_batches_hold_counts_and_instances(images):
    model = _model(task="multi", counting="density")
    batches = [b for b in localize_batches(model, images, batch_size=4) if b.images]
    assert len(batches) == 1 and isinstance(batches[0], CountBatch)
    b = batches[0]
    assert b.density.shape == (3, 64, 64) and b.counts.shape == (3, 3) and b.instances.valid.shape[:2] == (3, 3)
    assert int(b.instances.valid.sum()) == len(b.annotations)


def test_compute_does_not_import_the_writers():
    code = ("import sys, weakloc.localize, weakloc.localize.run, weakloc.explain, weakloc.explain.run; "
            "print(sorted(m for m in sys.modules if m.startswith('weakloc.report')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.fixture()
def spy(monkeypatch):
    """Every map_settings / make_maps call: the settings, and the input batch's shape."""
    calls = {"settings": [], "shapes": []}
    real_settings, real_maps = pipeline.map_settings, pipeline.make_maps

    def map_settings(*args, **kwargs):
        calls["settings"].append(real_settings(*args, **kwargs))
        return calls["settings"][-1]

    def make_maps(model, x, settings, *args, **kwargs):
        assert settings is calls["settings"][-1]
        calls["shapes"].append(tuple(x.shape))
        return real_maps(model, x, settings, *args, **kwargs)

    monkeypatch.setattr(pipeline, "map_settings", map_settings)
    monkeypatch.setattr(pipeline, "make_maps", make_maps)
    return calls


def test_maps_come_from_the_pipeline_at_the_test_size(images, tmp_path, spy):
    model = _model()
    model.config.maps = MapConfig(method="gradcam", test_size=96, options={"gradcam": {"normalization": "max"}})
    res = explain_images(model, images, tmp_path / "exp", batch_size=8)
    assert res.method == "gradcam"  # the model's stored method, not a fixed default
    assert spy["settings"][-1].normalization == "max" and spy["shapes"] == [(3, 3, 96, 96)]
    with pytest.warns(UserWarning):
        localize_images(model, images, None, maps={"test_size": 80, "fusion": "max"}, method="cam", batch_size=8)
    s = spy["settings"][-1]
    assert (s.method, s.test_size, s.fusion) == ("cam", 80, "max") and spy["shapes"][-1] == (3, 3, 80, 80)
    with pytest.warns(UserWarning):
        localize_images(model, images, None, maps=MapConfig(test_size=64, tta=True), batch_size=8)
    assert spy["settings"][-1].tta is True and spy["settings"][-1].method == "gradcam" and spy["shapes"][-1] == (3, 3, 64, 64)
    maps = json.loads((tmp_path / "exp" / "maps.json").read_text())
    assert maps["method"] == "gradcam" and maps == res.to_dict()
    assert _model().config.maps.method is None
    assert explain_images(_model(), images, tmp_path / "exp2").method == "cam"
    assert explain_images(_model(), images, tmp_path / "exp3", maps={"method": "gradcam", "layer": "backbone.layer2"}).method == "gradcam"
    assert spy["settings"][-1].layer == "backbone.layer2"
    assert localize_batches(_model(), images, maps={"method": "gradcam"}).method == "gradcam"


def test_auto_threshold_is_the_calibrated_one(images, tmp_path):
    model = _model()
    with pytest.warns(UserWarning):
        default = localize(model, images, threshold="auto").to_dict()
    with pytest.warns(UserWarning):
        assert default == localize(model, images, threshold=DEFAULT_BOX_THRESHOLD).to_dict()
    model.config.maps.threshold = 0.95
    assert localize_batches(model, images).threshold == "calibrated"
    with pytest.warns(UserWarning):
        high = localize_images(model, images, tmp_path / "out").to_dict()
    with pytest.warns(UserWarning):
        assert high["annotations"] == localize(model, images, threshold=0.95).to_dict()["annotations"] != default["annotations"]
    assert "threshold calibrated" in (tmp_path / "out" / "index.html").read_text(encoding="utf-8")


def test_counting_views_come_from_the_settings(images, monkeypatch):
    import weakloc.localize.run as run

    seen = []
    real = run.counting_forward
    monkeypatch.setattr(run, "counting_forward", lambda model, x, views: seen.append(views) or real(model, x, views))
    model = _model(task="multi", counting="density")
    model.config.maps.count_views = "dihedral"
    with pytest.warns(UserWarning):
        localize(model, images, batch_size=8)
    with pytest.warns(UserWarning):
        localize(model, images, batch_size=8, count_views="flip")
    with pytest.warns(UserWarning):
        localize(model, images, batch_size=8, maps={"count_views": "none"})
    assert seen == ["dihedral", "flip", "none"]


def test_counts_csv_escapes_formula_cells_and_lists_every_class():
    from weakloc.localize.run import LocalizationResult, LocalizedImage
    from weakloc.report.localization import counts_csv

    result = LocalizationResult(classes=["fish", "=shark"], images=[
        LocalizedImage(id=1, file_name="a.jpg", width=4, height=4, probabilities=[0.5, 0.5], counts={"fish": 3, "=shark": 0}),
        LocalizedImage(id=2, file_name="=b.jpg", width=4, height=4, probabilities=[0.5, 0.5], counts={"fish": 12, "=shark": 1}),
    ])
    assert counts_csv(result) == "path,fish,'=shark\na.jpg,3,0\n'=b.jpg,12,1\n"
