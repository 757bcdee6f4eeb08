"""Class-level co-localization (DDT, issue 18): statistics against a NumPy reference, the sign rule,
the projection, storage in the model folder, and the ddt / cam+ddt methods."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from weakloc.errors import CheckpointError, WeaklocError
from weakloc.explain import explain, normalize_minmax
from weakloc.explain.ddt import fit_directions, project
from weakloc.explain.layers import activation_grid
from weakloc.data.labels import load_labels
from weakloc.models import load_model, save_model
from weakloc.models.colocalization import FILE, Directions, load_directions, save_directions


def _model(**extra):
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", classes=["star", "square", "triangle"], input_size=64, output_stride=8, drop_rate=0.0,
                      **extra)
    return WeaklocNet(cfg, pretrained="none").eval()


@pytest.fixture(scope="module")
def labeled(synth_single):
    from weakloc.data.labels import load_labels, resolve_split

    return resolve_split(load_labels(synth_single), "train")[0]


def _reference(model, labeled):
    """Every descriptor of each class's images, pooled in NumPy: mean, covariance, top eigenvector."""
    from weakloc.data.dataset import eval_transform
    from weakloc.data.images import read_image

    tf = eval_transform(64, model.config.mean, model.config.std)
    x = torch.stack([tf(read_image(p)) for p in labeled.paths])
    feats, _ = activation_grid(model, x, None)
    out = {}
    for k in range(len(model.config.classes)):
        rows = feats[labeled.targets == k].double().permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).numpy()
        mean = rows.mean(0)
        cov = np.cov(rows.T, bias=True)
        values, vectors = np.linalg.eigh(cov)
        out[k] = (mean, vectors[:, -1], values[-1], len(rows))
    return out, x


def test_statistics_equal_a_pooled_numpy_reference(labeled):
    model = _model()
    stats = fit_directions(model, labeled, batch_size=5)  # batches cut across classes
    ref, _ = _reference(model, labeled)
    for k, (mean, vec, value, n) in ref.items():
        assert np.allclose(stats.mean[k].numpy(), mean, atol=1e-5)
        assert abs(abs(float(stats.direction[k].double() @ torch.from_numpy(vec))) - 1) < 1e-4  # the same axis
        assert float(stats.eigenvalue[k]) == pytest.approx(value, rel=1e-4) and int(stats.positions[k]) == n
        assert float(stats.direction[k].norm()) == pytest.approx(1, abs=1e-5)


def test_sign_follows_the_cam_and_projection_is_the_formula(labeled):
    model = _model()
    stats = fit_directions(model, labeled)
    ref, x = _reference(model, labeled)
    feats, _ = activation_grid(model, x, None)
    targets = labeled.targets[:, None]
    got = project(feats, stats, targets)
    for i in range(3):
        k = int(targets[i, 0])
        want = torch.einsum("c,chw->hw", stats.direction[k], feats[i] - stats.mean[k][:, None, None])
        assert torch.allclose(got[i, 0], want, atol=1e-4)
    # the sign: the CAM-weighted mean descriptor of a class lies on the positive side of its axis
    from weakloc.explain.maps import normalize_minmax

    cams = normalize_minmax(model.forward_maps(x).class_maps.detach().double().clamp_min(0))
    checked = 0
    for k in range(3):
        sel = labeled.targets == k
        w = cams[sel, k]
        if float(w.sum()) == 0:
            continue
        focus = (feats[sel].double() * w[:, None]).sum((0, 2, 3)) / w.sum()
        assert float(stats.direction[k].double() @ (focus - stats.mean[k].double())) >= 0
        checked += 1
    assert checked


def test_stored_in_the_model_folder_and_checked(labeled, tmp_path):
    model = _model()
    folder = save_model(model, tmp_path / "m")
    assert load_model(folder).colocalization is None and not (folder / FILE).exists()
    model.colocalization = fit_directions(model, labeled)
    save_model(model, folder)
    loaded = load_model(folder).colocalization
    assert torch.equal(loaded.direction, model.colocalization.direction) and loaded.layer is None
    maps = explain(load_model(folder), torch.randn(2, 3, 64, 64), "ddt", target="all")
    assert maps.raw.shape == (2, 3, 64, 64) and torch.isfinite(maps.normalized).all()
    save_model(_model(), folder)  # another model into the same folder: the old statistics are not its own
    assert not (folder / FILE).exists() and load_model(folder).colocalization is None
    save_directions(Directions(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2), torch.zeros(2)), folder)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_model(folder)
    (folder / FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not weakloc co-localization statistics"):
        load_directions(folder, 3)
    bad = Directions(torch.full((3, 4), float("nan")), torch.zeros(3, 4), torch.zeros(3), torch.zeros(3))
    save_directions(bad, folder)
    with pytest.raises(CheckpointError, match="NaN"):
        load_directions(folder, 3)


def test_methods_need_statistics_and_blend_in_range(labeled):
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(WeaklocError, match="weakloc ddt MODEL DATA"):
        explain(model, x, "ddt")
    model.colocalization = fit_directions(model, labeled)
    native = {"target": "all", "size": "native"}
    cam = explain(model, x, "cam", **native).raw
    d = explain(model, x, "ddt", **native).raw
    assert torch.allclose(explain(model, x, "cam+ddt", weight=0.0, **native).raw, normalize_minmax(cam.clamp_min(0)), atol=1e-5)
    assert torch.allclose(explain(model, x, "cam+ddt", weight=1.0, **native).raw, normalize_minmax(d.clamp_min(0)), atol=1e-5)
    half = explain(model, x, "cam+ddt", **native).raw
    assert torch.allclose(half, (normalize_minmax(cam.clamp_min(0)) + normalize_minmax(d.clamp_min(0))) / 2, atol=1e-5)
    full = explain(model, x, "cam+ddt", target="all")
    assert full.raw.shape == (2, 3, 64, 64) and float(full.normalized.min()) >= 0 and float(full.normalized.max()) <= 1
    with pytest.raises(WeaklocError, match="weight"):
        explain(model, x, "cam+ddt", weight=2.0)


def test_command_writes_the_statistics(synth_single, tmp_path):
    folder = save_model(_model(), tmp_path / "m")
    run = subprocess.run([sys.executable, "-m", "weakloc", "ddt", str(folder), str(synth_single), "--batch-size", "8"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (folder / FILE).is_file() and "co-localization statistics of 36 image(s) (train)".replace("36", str(sum(1 for s in load_labels(synth_single).splits if s == "train"))) in run.stdout
    assert load_model(folder).colocalization.mean.shape[0] == 3


def test_statistics_saved_into_a_new_folder(tmp_path):
    stats = Directions(torch.ones(2, 5), torch.ones(2, 5), torch.ones(2), torch.ones(2))
    path = save_directions(stats, tmp_path / "new" / "ddt")  # a folder of its own, as benchmarks keep them
    assert path == tmp_path / "new" / "ddt" / FILE and torch.equal(load_directions(path.parent, 2).direction, stats.direction)
    assert [p.name for p in path.parent.iterdir()] == [FILE]
