"""Heatmaps: CAM and Grad-CAM agree where the maths says so; targets; no leaks; no NaN."""

import pytest
import torch

from weakloc.errors import WeaklocError
from weakloc.explain import METHODS, explain, normalize_minmax, resolve_targets


def test_cam_equals_last_layer_gradcam_normalised(tiny_model):
    x = torch.randn(4, 3, 64, 64)
    for relu in (False, True):
        c = explain(tiny_model, x, "cam", target="all", relu=relu)
        g = explain(tiny_model, x, "gradcam", target="all", relu=relu)
        assert torch.allclose(c.normalized, g.normalized, atol=1e-4)
        assert torch.equal(c.targets, g.targets)


def test_cam_raw_is_classifier_weights_times_features(tiny_model):
    x = torch.randn(2, 3, 64, 64)
    out = tiny_model.forward_maps(x)
    h = explain(tiny_model, x, "cam", target=1, size=(8, 8))
    w = tiny_model.classifier.weight[1, :, 0, 0]
    want = torch.einsum("c,bchw->bhw", w, out.features)
    assert torch.allclose(h.raw[:, 0], want, atol=1e-4)


def test_maps_shapes_device_and_range(tiny_model):
    x = torch.randn(3, 3, 64, 64)
    for name in METHODS:
        if name in ("attention", "localizer", "box", "rollout", "grad-rollout", "ddt", "cam+ddt"):  # own head, transformer, statistics: own tests
            continue
        h = explain(tiny_model, x, name, target="top2")
        assert h.raw.shape == h.normalized.shape == (3, 2, 64, 64)
        assert h.normalized.min() >= 0 and h.normalized.max() <= 1 and not torch.isnan(h.normalized).any()


def test_gradcam_intermediate_layer_and_param_flags_restored(tiny_model):
    tiny_model.backbone.conv1[0].weight.requires_grad_(False)
    before = [p.requires_grad for p in tiny_model.parameters()]
    layer = "backbone.layer2"
    h = explain(tiny_model, torch.randn(2, 3, 64, 64), "gradcam", layer=layer)
    assert h.raw.shape == (2, 1, 64, 64)
    assert [p.requires_grad for p in tiny_model.parameters()] == before
    assert all(p.grad is None for p in tiny_model.parameters())  # no parameter gradient was computed


def test_hooks_are_removed_even_on_error(tiny_model):
    layer = "backbone.layer2"
    module = dict(tiny_model.named_modules())[layer]
    explain(tiny_model, torch.randn(1, 3, 64, 64), "gradcam", layer=layer)
    with pytest.raises(WeaklocError):
        explain(tiny_model, torch.randn(2, 3, 64, 64), "gradcam", layer=layer, target=["a"])
    assert not module._forward_hooks


def test_targets():
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 1.0]])
    classes = ["a", "b", "c"]
    assert resolve_targets("predicted", logits, classes).tolist() == [[1], [0]]
    assert resolve_targets("all", logits, classes).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert resolve_targets("top2", logits, classes).tolist() == [[1, 2], [0, 2]]
    assert resolve_targets("c", logits, classes).tolist() == [[2], [2]]
    assert resolve_targets(["a", 2], logits, classes).tolist() == [[0], [2]]
    with pytest.raises(WeaklocError, match="1 targets given for a batch of 2"):
        resolve_targets(["a"], logits, classes)
    with pytest.raises(WeaklocError, match="unknown class 'zebra'"):
        resolve_targets("zebra", logits, classes)
    with pytest.raises(WeaklocError, match="does not match a batch"):
        resolve_targets(torch.tensor([0, 1, 2]), logits, classes)
    with pytest.raises(WeaklocError, match="out of range"):
        resolve_targets(5, logits, classes)


def test_constant_and_nan_maps_normalise_to_zeros():
    m = torch.stack([torch.full((4, 4), 3.0), torch.full((4, 4), float("nan")), torch.arange(16.0).reshape(4, 4)])
    n = normalize_minmax(m)
    assert n[0].abs().sum() == 0 and n[1].abs().sum() == 0
    assert n[2].min() == 0 and n[2].max() == 1


def test_unknown_method_lists_known():
    with pytest.raises(WeaklocError, match="unknown explanation method 'nope'; known: ablationcam, attention, box, cam, "):
        from weakloc.explain import get_method
        get_method("nope")


def _direct_act_grad(model, x, cls):
    """Activation of the last feature map and d(logit_cls)/d(activation), by plain autograd."""
    feats = model.features(x).detach().requires_grad_(True)
    logits = model.classifier(feats).mean(dim=(2, 3))
    (g,) = torch.autograd.grad(logits[:, cls].sum(), feats)
    return feats.detach().double(), g.double()


@pytest.mark.parametrize("name, formula", [
    ("gradcam", lambda a, g: (g.mean((2, 3), keepdim=True) * a).sum(1)),
    ("hirescam", lambda a, g: (g * a).sum(1)),
    ("gradcam-elementwise", lambda a, g: (g * a).clamp_min(0).sum(1)),
    ("xgradcam", lambda a, g: ((g * a / (a.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3), keepdim=True) * a).sum(1)),
    ("layercam", lambda a, g: (g.clamp_min(0) * a).sum(1)),
    ("gradcam++", lambda a, g: ((g.clamp_min(0) * torch.where(
        g != 0, g**2 / (2 * g**2 + a.sum((2, 3), keepdim=True) * g**3 + 1e-6), torch.zeros_like(g))).sum((2, 3), keepdim=True) * a).sum(1)),
])
def test_gradient_methods_match_direct_computation(tiny_model, name, formula):
    x = torch.randn(3, 3, 64, 64)
    a, g = _direct_act_grad(tiny_model, x, 2)
    h = explain(tiny_model, x, name, target=2, size=(8, 8))
    assert torch.allclose(h.raw[:, 0].double(), formula(a, g), rtol=1e-4, atol=1e-6)


def test_eigencam_is_the_first_principal_component_with_a_fixed_sign(tiny_model):
    x = torch.randn(2, 3, 64, 64)
    h = explain(tiny_model, x, "eigencam", target="all", size=(8, 8))
    assert torch.equal(h.raw[:, 0], h.raw[:, 1])  # class-agnostic
    feats = tiny_model.features(x).detach().double()
    for i in range(2):
        m = feats[i].flatten(1).T
        m = m - m.mean(0)
        _, _, vh = torch.linalg.svd(m, full_matrices=False)
        proj = (m @ vh[0]).reshape(8, 8)
        ours = h.raw[i, 0].double()
        assert torch.allclose(ours.abs(), proj.abs(), rtol=1e-3, atol=1e-5)
        centred_sum = feats[i].sum(0) - feats[i].sum(0).mean()
        assert (ours * centred_sum).sum() >= 0  # sign chosen to agree with the activation mass


def test_baselines_are_model_free(tiny_model):
    x = torch.zeros(2, 3, 64, 64)
    x[:, :, 20:40, 20:40] = 1.0
    sob = explain(tiny_model, x, "sobel", size=(64, 64))
    assert sob.raw[0, 0, 30, 30] == 0 and sob.raw[0, 0, 20, 30] > 0
    r1 = explain(tiny_model, x, "random").raw
    assert torch.equal(r1, explain(tiny_model, x, "random").raw)
