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
    with pytest.raises(WeaklocError, match="known: cam, gradcam"):
        from weakloc.explain import get_method
        get_method("nope")
