"""Synthetic data: deterministic, exact ground truth, every mode."""

import csv
import json

import numpy as np
import pytest

from weakloc.data import load_labels, read_coco
from weakloc.data.synthetic import SyntheticConfig, render, write_synthetic
from weakloc.errors import WeaklocError


def test_render_is_deterministic_and_ground_truth_is_exact():
    cfg = SyntheticConfig(size=96, mode="multi", max_instances=3, seed=5)
    a_img, a_inst = render(cfg, 7)
    b_img, b_inst = render(cfg, 7)
    assert np.array_equal(a_img, b_img) and len(a_inst) == len(b_inst)
    assert not np.array_equal(a_img, render(cfg, 8)[0])
    for inst in a_inst:
        ys, xs = np.nonzero(inst["mask"])
        assert inst["box"] == [xs.min(), ys.min(), xs.max(), ys.max()]
        x, y = inst["point"]
        assert inst["box"][0] <= x <= inst["box"][2] and inst["box"][1] <= y <= inst["box"][3]
    masks = np.stack([i["mask"] for i in a_inst]) if a_inst else np.zeros((0, 96, 96))
    assert masks.sum(0).max(initial=0) <= 1  # instances never overlap


@pytest.mark.parametrize("mode", ["single", "binary", "multi"])
def test_written_dataset_is_consistent(tmp_path, mode):
    cfg = SyntheticConfig(n_images=30, size=64, mode=mode, max_instances=3, val_fraction=0.3, seed=2)
    root = write_synthetic(tmp_path, cfg)
    labels = load_labels(root)
    gt = read_coco(root / "annotations.json")
    counts = {r["path"]: r for r in csv.DictReader(open(root / "counts.csv"))}
    assert len(labels) == 30 and set(labels.splits) <= {"train", "val"}
    for path, target in zip(labels.paths, labels.targets):
        ann = gt.find(path)
        rel = f"images/{path.name}"
        per_class = {c: int(counts[rel][c]) for c in cfg.classes}
        assert per_class == {c: ann.labels.count(c) for c in cfg.classes}
        if mode == "single":
            assert set(ann.labels) == {labels.classes[int(target)]}
        elif mode == "binary":
            assert (labels.classes[int(target)] == "star") == ("star" in ann.labels)
        else:
            assert {c for c, t in zip(labels.classes, target.tolist()) if t} == set(ann.labels)
    assert json.loads((root / "synthetic.json").read_text())["mode"] == mode
    assert write_synthetic(tmp_path / "again", cfg) and (tmp_path / "again" / "labels.csv").read_text() == (root / "labels.csv").read_text()


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "pairs"}, "mode must be one of"),
    ({"classes": ("triangle", "blob")}, "distinct names"),
    ({"mode": "binary", "target": "cross"}, "not among classes"),
    ({"val_fraction": 0.7, "test_fraction": 0.4}, "below 1"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(WeaklocError, match=match):
        SyntheticConfig(**kwargs).check()
