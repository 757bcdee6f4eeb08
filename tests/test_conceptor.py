"""Conceptor-CAM: the conceptor algebra on hand-computed cases and its identities (Jaeger 2014), the
batched maps against a straightforward per-image reference, any layout, precision, bad options."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch

from weakloc.errors import OptionError, WeaklocError
from weakloc.explain import METHODS, explain
from weakloc.explain import conceptor as cc
from weakloc.explain.conceptor import conceptor, conceptor_and, conceptor_maps, conceptor_not, conceptor_or
from weakloc.explain.layers import activation_grid
from weakloc.explain.methods import activations_and_gradients

D = torch.float64


def diag(*v):
    return torch.diag(torch.tensor(v, dtype=D))


def close(a, b, atol=1e-10):
    return torch.allclose(a, b, atol=atol, rtol=0)


def random_conceptors(n=5, batch=4, seed=0):
    """A batch of conceptors with eigenvalues in [0, 1], some exactly 0 or 1 (singular NOT / singular C)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=D))
    e = torch.rand(batch, n, generator=g, dtype=D)
    e[0, :2] = 0.0   # singular
    e[1, 0] = 1.0    # NOT C singular
    e[2, 1], e[2, 3] = 0.0, 1.0
    return (q * e[:, None, :]) @ q.transpose(-1, -2)


# --- the algebra -------------------------------------------------------------------------------

def test_conceptor_of_a_diagonal_correlation_matrix():
    # aperture 2: alpha^-2 = 1/4, so each eigenvalue r becomes r / (r + 1/4)
    c = conceptor(diag(4.0, 1.0, 0.25, 0.0), 2.0)
    assert close(c, diag(16 / 17, 0.8, 0.5, 0.0))


def test_conceptor_follows_the_eigenvectors_of_a_rotated_correlation_matrix():
    theta = 0.3
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=D)
    r = rot @ diag(3.0, 0.5) @ rot.T
    want = rot @ diag(3 / 4, 0.5 / 1.5) @ rot.T  # aperture 1
    assert close(conceptor(r, 1.0), want)
    assert close(conceptor(r, 1.0), r @ torch.linalg.inv(r + torch.eye(2, dtype=D)))  # Jaeger's C = R (R + a^-2 I)^-1


def test_and_on_hand_computed_cases():
    # diagonal conceptors: eigenvalue-wise 1 / (1/c + 1/b - 1)
    assert close(conceptor_and(diag(0.5, 0.5), diag(0.5, 0.8)), diag(1 / 3, 1 / 2.25))
    # a singular one: nothing survives outside its range
    assert close(conceptor_and(diag(0.5, 0.0), diag(0.5, 0.8)), diag(1 / 3, 0.0))
    # projectors AND to the projector onto the intersection of their ranges
    assert close(conceptor_and(diag(1.0, 1.0, 0.0), diag(0.0, 1.0, 1.0)), diag(0.0, 1.0, 0.0))
    # ranges meeting only in 0: the zero conceptor
    u = torch.tensor([1.0, 1.0], dtype=D) / math.sqrt(2)
    assert close(conceptor_and(diag(0.5, 0.0), 0.5 * torch.outer(u, u)), torch.zeros(2, 2, dtype=D))
    # non-aligned, both invertible: the plain formula (C^-1 + B^-1 - I)^-1
    b = torch.tensor([[0.6, 0.2], [0.2, 0.5]], dtype=D)
    want = torch.linalg.inv(torch.linalg.inv(diag(0.9, 0.3)) + torch.linalg.inv(b) - torch.eye(2, dtype=D))
    assert close(conceptor_and(diag(0.9, 0.3), b), want)


def test_not_and_or_identities():
    c, b = random_conceptors(seed=0), random_conceptors(seed=1)
    eye, zero = torch.eye(5, dtype=D).expand_as(c), torch.zeros_like(c)
    assert close(conceptor_not(conceptor_not(c)), c)
    assert close(conceptor_and(c, eye), c, 1e-9)
    assert close(conceptor_and(eye, c), c, 1e-9)
    assert close(conceptor_or(c, zero), c, 1e-9)
    assert close(conceptor_and(c, zero), zero)
    assert close(conceptor_or(c, eye), eye, 1e-9)
    assert close(conceptor_and(c, b), conceptor_and(b, c), 1e-9)
    # de Morgan, both ways
    assert close(conceptor_not(conceptor_or(c, b)), conceptor_and(conceptor_not(c), conceptor_not(b)), 1e-9)
    assert close(conceptor_not(conceptor_and(c, b)), conceptor_or(conceptor_not(c), conceptor_not(b)), 1e-9)
    # AND shrinks: C - (C AND B) is positive semi-definite
    assert torch.linalg.eigvalsh(c - conceptor_and(c, b)).min() > -1e-9


def test_or_adds_and_and_harmonically_adds_correlation_matrices():
    """Jaeger 2014: for one aperture, C(R) OR C(Q) = C(R + Q) (also for singular R, Q) and
    C(R) AND C(Q) = C((R^-1 + Q^-1)^-1)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 4, 2, generator=g, dtype=D)
    r, q = a @ a.transpose(-1, -2), (a.flip(0) @ a.flip(0).transpose(-1, -2))  # rank 2 in 4 dimensions
    for aperture in (0.5, 3.0):
        assert close(conceptor_or(conceptor(r, aperture), conceptor(q, aperture)), conceptor(r + q, aperture), 1e-9)
    r, q = r + 0.3 * torch.eye(4, dtype=D), q + 0.1 * torch.eye(4, dtype=D)
    harmonic = torch.linalg.inv(torch.linalg.inv(r) + torch.linalg.inv(q))
    assert close(conceptor_and(conceptor(r, 2.0), conceptor(q, 2.0)), conceptor(harmonic, 2.0), 1e-9)


def test_the_algebra_is_batched_over_leading_dimensions():
    c, b = random_conceptors(batch=6, seed=4), random_conceptors(batch=6, seed=5)
    batched = conceptor_and(c.view(2, 3, 5, 5), b.view(2, 3, 5, 5)).reshape(6, 5, 5)
    assert close(batched, torch.stack([conceptor_and(c[i], b[i]) for i in range(6)]), 1e-12)


# --- the maps ----------------------------------------------------------------------------------

def reference_map(act: torch.Tensor, w: torch.Tensor, aperture: float = 10.0, evidence: str = "and-not") -> np.ndarray:
    """One image and target, in NumPy float64 with full (C, C) matrices and Jaeger's singular AND."""
    c, h, wd = act.shape
    x = act.double().numpy().reshape(c, h * wd)
    x = x / np.sqrt((x ** 2).sum(0).mean())
    w = w.double().numpy()
    s = w @ x
    p = (s - s.min()) / (s.max() - s.min())
    q = 1 - p
    lam, eye = aperture ** -2, np.eye(c)
    rp, rm = (x * (p / p.sum())) @ x.T, (x * (q / q.sum())) @ x.T
    cp = rp @ np.linalg.inv(rp + lam * eye)
    if evidence == "positive":
        k = cp
    else:
        not_cm = eye - rm @ np.linalg.inv(rm + lam * eye)  # invertible: eigenvalues lam / (r + lam) > 0
        e, v = np.linalg.eigh((cp + cp.T) / 2)
        basis = v[:, e > 1e-12]  # the range of C+ = its intersection with the range of NOT C-
        m = basis.T @ (np.linalg.pinv(cp, rcond=1e-12, hermitian=True) + np.linalg.inv(not_cm) - eye) @ basis
        k = basis @ np.linalg.inv(m) @ basis.T
    return (w @ k @ x).reshape(h, wd)


@pytest.fixture()
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("evidence", ["and-not", "positive"])
def test_maps_equal_a_per_image_reference(tiny_model, x, evidence):
    heat = explain(tiny_model, x, "conceptorcam", target="all", size="native", evidence=evidence, aperture=5.0)
    feats = tiny_model.features(x).detach()
    weights = tiny_model.classifier.weight[:, :, 0, 0].detach()
    assert feats.shape[1] > feats.shape[2] * feats.shape[3] - 1  # more channels than states: R+ is singular in (C, C)
    assert heat.raw.shape == (2, 3, 8, 8)
    for i in range(2):
        for t in range(3):
            want = torch.from_numpy(reference_map(feats[i], weights[t], 5.0, evidence)).float()
            assert torch.allclose(heat.raw[i, t], want, rtol=1e-4, atol=1e-6 * want.abs().max())
    # and the conceptor changed the map: it is not the plain CAM
    cam = explain(tiny_model, x, "cam", target="all", size="native").raw
    assert not torch.allclose(normalize(heat.raw), normalize(cam), atol=0.05)


def normalize(m):
    from weakloc.explain import normalize_minmax

    return normalize_minmax(m, relu=True)


def test_gradient_weights_give_cams_map_on_a_global_average_pooling_head(tiny_model, x):
    cam = explain(tiny_model, x, "conceptorcam", target="all", size="native").raw
    grad = explain(tiny_model, x, "conceptor-gradcam", target="all", size="native").raw
    assert torch.allclose(grad * 64, cam, rtol=1e-4, atol=1e-6 * cam.abs().max())  # Grad-CAM weights = CAM's / (h*w)


@pytest.mark.parametrize("method", ["conceptorcam", "conceptor-gradcam", "conceptor-gradcam++", "conceptor-scorecam"])
def test_maps_are_proper_finite_and_deterministic(tiny_model, x, method):
    a = explain(tiny_model, x, method, target="all")
    b = explain(tiny_model, x, method, target="all")
    assert a.raw.shape == a.normalized.shape == (2, 3, 64, 64) and a.targets.tolist() == [[0, 1, 2]] * 2
    assert torch.isfinite(a.raw).all() and a.normalized.min() >= 0 and a.normalized.max() <= 1
    assert (a.normalized.flatten(2).amax(-1) == 1).all()  # no map collapsed to zeros
    assert torch.equal(a.raw, b.raw)
    one = explain(tiny_model, x[1:], method, target=2).raw[0, 0]
    assert torch.allclose(one, a.raw[1, 2], rtol=1e-4, atol=1e-6 * one.abs().max())  # per image: the batch does not leak


def test_conceptor_gradcam_on_a_vit_token_grid():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    heat = explain(model, x, "conceptor-gradcam", target="top2", size="native")
    assert heat.raw.shape == (2, 2, 4, 4) and torch.isfinite(heat.raw).all()
    act, grads, targets, _ = activations_and_gradients(model, x, lambda lg: lg.topk(2, -1).indices, "blocks.5.norm1")
    assert torch.equal(targets, heat.targets)
    for i in range(2):
        for t in range(2):
            want = torch.from_numpy(reference_map(act[i], grads[i, t].mean((-2, -1)))).float()
            assert torch.allclose(heat.raw[i, t], want, rtol=1e-4, atol=1e-5 * want.abs().max())


def test_bf16_autocast_gives_the_fp32_maps_within_rounding(tiny_model, x):
    fp32 = explain(tiny_model, x, "conceptorcam", target="all").normalized
    bf16 = explain(tiny_model, x, "conceptorcam", target="all", dtype=torch.bfloat16)
    assert bf16.raw.dtype == torch.float32 and torch.isfinite(bf16.raw).all()
    assert (bf16.normalized - fp32).abs().mean() < 0.05


def test_all_class_targets_are_computed_in_chunks_with_the_same_result(tiny_model, x, monkeypatch):
    act, _ = activation_grid(tiny_model, x, None)
    weights = torch.randn(2, 7, act.shape[1])
    whole = conceptor_maps(act, weights)
    monkeypatch.setattr(cc, "_CHUNK_ELEMENTS", 1)  # one target per chunk
    assert torch.allclose(conceptor_maps(act, weights), whole, rtol=1e-6, atol=1e-9)


def test_non_finite_activations_give_nan_maps_for_that_image_only(tiny_model, x):
    act, _ = activation_grid(tiny_model, x, None)
    weights = torch.randn(2, 2, act.shape[1])
    good = conceptor_maps(act[1:], weights[1:])
    act[0, 3, 2, 2] = float("nan")
    out = conceptor_maps(act, weights)
    assert torch.isnan(out[0]).all() and torch.allclose(out[1], good[0], rtol=1e-6, atol=1e-9)
    assert torch.equal(conceptor_maps(act[1:], torch.zeros(1, 1, act.shape[1])), torch.zeros(1, 1, 8, 8))  # no evidence, zero map


@pytest.mark.parametrize("options, message", [
    ({"aperture": 0}, "option aperture"), ({"aperture": -1.0}, "option aperture"), ({"aperture": float("nan")}, "option aperture"),
    ({"aperture": "10"}, "option aperture"), ({"aperture": True}, "option aperture"), ({"evidence": "or"}, "option evidence"),
])
def test_bad_options_are_refused_before_any_forward(tiny_model, x, options, message):
    calls = []
    handle = tiny_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(OptionError, match=message):
            explain(tiny_model, x, "conceptorcam", **options)
        with pytest.raises(OptionError, match=message):
            explain(tiny_model, x, "conceptor-scorecam", **options)
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(WeaklocError, match="takes no option"):
        explain(tiny_model, x, "conceptorcam", num_samples=3)


def test_registered_for_every_command(tiny_model):
    from weakloc.config import MapConfig
    from weakloc.explain.pipeline import map_settings

    assert {"conceptorcam", "conceptor-gradcam", "conceptor-gradcam++", "conceptor-scorecam"} <= set(METHODS)
    assert all(METHODS[m].relu for m in METHODS if m.startswith("conceptor"))
    settings = map_settings(tiny_model, MapConfig(method="conceptor-gradcam", options={"conceptor-gradcam": {"aperture": 3.0}}))
    assert settings.method_options() == {"aperture": 3.0}


def test_explain_eval_compares_conceptorcam_from_the_command_line(synth_single, tmp_path):
    from typer.testing import CliRunner

    from weakloc.cli import app
    from weakloc.models import ModelConfig, WeaklocNet, save_model

    torch.manual_seed(0)
    net = WeaklocNet(ModelConfig(backbone="test_resnet", classes=["triangle", "square", "star"], input_size=32, output_stride=8,
                                 drop_rate=0.0), pretrained="none").eval()
    save_model(net, tmp_path / "model")
    r = CliRunner().invoke(app, ["explain-eval", str(tmp_path / "model"), str(synth_single), "--limit", "2", "--steps", "4",
                                 "--methods", "cam,gradcam,conceptorcam", "--batch-size", "2", "-o", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["cam", "gradcam", "conceptorcam"]
    assert all(0 <= row["insertion_auc"] <= 1 and math.isfinite(row["average_drop_pct"]) for row in rows)
