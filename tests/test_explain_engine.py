"""The explanation engine's rules: direct computations for the perturbation methods, batching of
targets, any timm layout, fusion and smoothing, precision, differentiability and hook hygiene."""

import gc
import warnings

import pytest
import timm
import torch

from weakloc.errors import WeaklocError
from weakloc.explain import explain, normalize_minmax
from weakloc.explain.layers import default_layer, to_grid
from weakloc.explain.methods import principal_projection


@pytest.fixture()
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def test_several_targets_share_one_backward_and_equal_single_target_maps(tiny_model, x):
    all_maps = explain(tiny_model, x, "gradcam", target="all", size=(8, 8)).raw
    for k in range(3):
        single = explain(tiny_model, x, "gradcam", target=k, size=(8, 8)).raw[:, 0]
        assert torch.allclose(all_maps[:, k], single, atol=1e-5)


def test_target_list_must_match_the_batch(tiny_model, x):
    with pytest.raises(WeaklocError, match="3 targets given for a batch of 2"):
        explain(tiny_model, x, "scorecam", target=[0, 1, 2])


def test_scorecam_is_the_softmax_of_masked_input_logits(tiny_model, x):
    feats = tiny_model.features(x).detach()  # (2, C, 8, 8)
    h = explain(tiny_model, x, "scorecam", target=1, size=(8, 8), chunk=7)  # odd chunk: crosses images
    for i in range(2):
        up = torch.nn.functional.interpolate(feats[i][:, None], size=(64, 64), mode="bilinear", align_corners=True)
        lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masks = (up - lo) / (hi - lo + 1e-8)
        with torch.no_grad():
            scores = torch.cat([tiny_model(x[i] * masks[c:c + 1]) for c in range(len(masks))])[:, 1]
        expected = (scores.softmax(0)[:, None, None] * feats[i]).sum(0)
        assert torch.allclose(h.raw[i, 0], expected, rtol=1e-4, atol=1e-5)


def test_score_variants_reduce_to_scorecam(tiny_model, x):
    ref = explain(tiny_model, x, "scorecam", target=0, size=(8, 8)).raw
    assert torch.allclose(explain(tiny_model, x, "sscam", target=0, size=(8, 8), std=0.0, num_samples=3).raw, ref, atol=1e-5)
    assert torch.allclose(explain(tiny_model, x, "iscam", target=0, size=(8, 8), num_samples=1).raw, ref, atol=1e-5)
    noisy = explain(tiny_model, x, "sscam", target=0, size=(8, 8), num_samples=2, std=0.5).raw
    assert not torch.allclose(noisy, ref) and torch.isfinite(noisy).all()


def test_ablationcam_on_the_head_is_the_closed_form_drop(tiny_model, x):
    feats = tiny_model.features(x).detach()
    w = tiny_model.classifier.weight[:, :, 0, 0].detach()
    with torch.no_grad():
        logits = tiny_model(x)
    drop = w[2][None] * feats.mean((2, 3))  # removing channel c (min is 0 after ReLU) lowers logit 2 by this
    zero_min = feats.flatten(1).amin(1) == 0
    assert zero_min.all()
    weights = drop / logits[:, 2:3]
    expected = (weights[:, :, None, None] * feats).sum(1)
    h = explain(tiny_model, x, "ablationcam", target=2, size=(8, 8), chunk=5)
    assert torch.allclose(h.raw[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_ablationcam_on_an_inner_layer_runs_only_the_rest_of_the_network(tiny_model, x):
    calls = []
    handle = tiny_model.backbone.conv1.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        h = explain(tiny_model, x, "ablationcam", layer="backbone.layer3", target=0, chunk=64)
    finally:
        handle.remove()
    assert h.raw.shape == (2, 1, 64, 64) and torch.isfinite(h.raw).all()
    assert max(calls) <= 2  # the stem only ever saw the real batch or one image, never the ablated copies


def test_smooth_gradcampp_without_noise_is_gradcampp(tiny_model, x):
    ref = explain(tiny_model, x, "gradcam++", target=1, size=(8, 8)).raw
    assert torch.allclose(explain(tiny_model, x, "smooth-gradcam++", target=1, size=(8, 8), std=0.0).raw, ref, rtol=1e-4, atol=1e-6)


def test_finercam_with_alpha_zero_is_gradcam(tiny_model, x):
    ref = explain(tiny_model, x, "gradcam", target="all", size=(8, 8)).raw
    assert torch.allclose(explain(tiny_model, x, "finercam", target="all", size=(8, 8), alpha=0.0).raw, ref, rtol=1e-4, atol=1e-6)
    finer = explain(tiny_model, x, "finercam", target="all", size=(8, 8), relu=False).normalized
    assert (finer - normalize_minmax(ref)).abs().max() > 0.05


def test_eigen_smooth_projects_the_weighted_activations(tiny_model, x):
    feats = tiny_model.features(x).detach().requires_grad_(True)
    logits = tiny_model.classifier(feats).mean((2, 3))
    (g,) = torch.autograd.grad(logits[:, 0].sum(), feats)
    weighted = g.mean((2, 3), keepdim=True) * feats.detach()
    h = explain(tiny_model, x, "gradcam", target=0, size=(8, 8), eigen_smooth=True)
    assert torch.allclose(h.raw[:, 0], principal_projection(weighted), rtol=1e-3, atol=1e-5)


def test_multi_layer_fusion(tiny_model, x):
    a = explain(tiny_model, x, "gradcam", layer="backbone.layer2", target=0).normalized
    b = explain(tiny_model, x, "gradcam", layer="backbone.layer3", target=0).normalized
    for fusion, expected in [("mean", (a + b) / 2), ("max", torch.maximum(a, b)), ("product", a * b)]:
        h = explain(tiny_model, x, "gradcam", layer="backbone.layer2,backbone.layer3", target=0, fusion=fusion)
        assert torch.allclose(h.raw, expected, atol=1e-5)
    with pytest.raises(WeaklocError, match="unknown fusion"):
        explain(tiny_model, x, "gradcam", layer=["backbone.layer2", "backbone.layer3"], fusion="median")


def test_tta_is_the_mean_over_flips_and_scales_for_the_clean_targets(tiny_model, x):
    h = explain(tiny_model, x, "gradcam", tta=True)
    acc = torch.zeros_like(h.raw)
    for flip in (False, True):
        for scale in (0.9, 1.0, 1.1):
            v = x * scale
            v = v.flip(-1) if flip else v
            m = explain(tiny_model, v, "gradcam", target=h.targets).raw
            acc += normalize_minmax(m.flip(-1) if flip else m, relu=True)
    assert torch.allclose(h.raw, acc / 6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["cam", "gradcam", "scorecam"])
def test_reduced_precision_maps_agree_with_fp32(tiny_model, x, dtype, method):
    ref = explain(tiny_model, x, method, target=0).normalized
    try:
        low = explain(tiny_model, x, method, target=0, dtype=dtype)
    except RuntimeError as e:  # pragma: no cover - a CPU build without fp16 kernels
        pytest.skip(f"{dtype} unsupported here: {e}")
    assert low.normalized.dtype == torch.float32 and torch.isfinite(low.normalized).all()
    assert (low.normalized - ref).abs().mean() < 0.05


def test_differentiable_maps_carry_gradients_to_the_parameters(tiny_model, x):
    for method in ("cam", "gradcam"):
        tiny_model.zero_grad()
        h = explain(tiny_model, x, method, target=0, differentiable=True)
        assert h.normalized.requires_grad
        h.normalized.mean().backward()
        assert tiny_model.classifier.weight.grad is not None
        assert tiny_model.backbone.conv1[0].weight.grad is not None and tiny_model.backbone.conv1[0].weight.grad.abs().sum() > 0
    h = explain(tiny_model, x, "gradcam", target=0)
    assert not h.raw.requires_grad
    with pytest.raises(WeaklocError, match="takes no option"):
        explain(tiny_model, x, "scorecam", differentiable=True)


def test_unknown_options_are_named(tiny_model, x):
    with pytest.raises(WeaklocError, match=r"method 'scorecam' takes no option\(s\) \['num_samples'\]"):
        explain(tiny_model, x, "scorecam", num_samples=3)


def test_memory_is_flat_and_hooks_removed_over_1000_calls(tiny_model):
    img = torch.randn(1, 3, 32, 32)
    layer = "backbone.layer2"
    module = dict(tiny_model.named_modules())[layer]

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some module proxies warn when inspected
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(20):
        explain(tiny_model, img, "gradcam", layer=layer)
    before = live_tensors()
    for i in range(1000):
        explain(tiny_model, img, ("gradcam", "cam", "eigencam", "layercam")[i % 4], layer=layer if i % 4 != 1 else None)
    assert live_tensors() - before <= 5
    assert not module._forward_hooks and not any(m._forward_hooks for m in tiny_model.modules())


def test_plain_timm_cnn_default_layer_and_swin_channels_last():
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", num_classes=4).eval()
    assert default_layer(resnet) == "layer4"
    h = explain(resnet, torch.randn(2, 3, 64, 64), "gradcam", target="top2")
    assert h.raw.shape == (2, 2, 64, 64)
    with pytest.raises(WeaklocError, match="CAM needs a weakloc model"):
        explain(resnet, torch.randn(1, 3, 64, 64), "cam")

    from timm.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=3).eval()
    assert default_layer(swin) == "layers.1"
    out = swin.forward_features(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 8, 8, 32) and to_grid(out, swin).shape == (1, 32, 8, 8)
    h = explain(swin, torch.randn(2, 3, 64, 64), "gradcam", target=1)
    assert h.raw.shape == (2, 1, 64, 64) and h.normalized.amax() == 1


def test_weakloc_model_on_a_vit_backbone_cam_equals_gradcam():
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", classes=["a", "b"], input_size=64, drop_rate=0.0)
    import timm.models.vision_transformer as vt  # noqa: F401 -- a small ViT: patch 16, 64 px -> 4x4 tokens

    model = WeaklocNet(cfg, pretrained="none").eval()
    model.backbone = vt.VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                                          global_pool="", reg_tokens=2)
    model.classifier = torch.nn.Conv2d(32, 2, 1)
    img = torch.randn(2, 3, 64, 64)
    assert model.features(img).shape == (2, 32, 4, 4)
    cam = explain(model, img, "cam", target="all").normalized
    grad = explain(model, img, "gradcam", target="all", relu=False).normalized
    assert torch.allclose(cam, grad, atol=1e-4)


def test_masked_scores_score_constant_channels_as_the_black_image(tiny_model, x):
    from weakloc.explain.perturbation import channel_masks, masked_scores

    act = torch.rand(2, 5, 8, 8)
    act[0, 1] = 0.0
    act[1, 3] = 2.5  # constant, not zero: also an all-zero mask
    targets = torch.tensor([[0, 2], [1, 1]])
    got = masked_scores(tiny_model, x, act, targets, chunk=3)
    with torch.no_grad():
        for i in range(2):
            logits = tiny_model(x[i] * channel_masks(act[i], (64, 64))[:, None])  # (5, K)
            assert torch.allclose(got[i], logits[:, targets[i]].T, atol=1e-5)


def test_native_size_skips_upsampling(tiny_model, x):
    h = explain(tiny_model, x, "cam", target="all", size="native")
    assert h.raw.shape == (2, 3, 8, 8)
    assert torch.allclose(h.raw, explain(tiny_model, x, "cam", target="all", size=(8, 8)).raw)
    with pytest.raises(WeaklocError, match="native"):
        explain(tiny_model, x, "gradcam", size="native", tta=True)


def test_wsol_normalisations_on_a_hand_case():
    from weakloc.explain.maps import normalize_maps

    m = torch.arange(10.0).view(1, 2, 5)  # 0..9
    assert torch.allclose(normalize_maps(m, "minmax"), m / 9)
    q90 = torch.quantile(torch.arange(10.0), 0.9)  # 8.1
    assert torch.allclose(normalize_maps(m, "pas"), (m / q90).clamp(max=1))
    q40 = torch.quantile(torch.arange(10.0), 0.4)  # 3.6
    assert torch.allclose(normalize_maps(m, "ivr:0.4"), (m - q40).clamp_min(0) / (9 - q40))
    assert torch.equal(normalize_maps(torch.full((1, 2, 2), 3.0), "ivr"), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError):
        normalize_maps(m, "zscore")


def test_rowwise_quantile_matches_torch_and_takes_large_batches():
    from weakloc.explain.maps import normalize_maps, rowwise_quantile

    x = torch.randn(3, 4, 101)
    for q in (0.0, 0.25, 0.4, 0.9, 0.99, 1.0):
        assert torch.allclose(rowwise_quantile(x, q), torch.quantile(x, q, dim=-1, keepdim=True), atol=1e-6)
    big = torch.rand(9, 1, 1400, 1400)  # 17.6M values: more than torch.quantile accepts
    out = normalize_maps(big, "pas")
    assert out.shape == big.shape and out.amax() == 1


def test_explain_takes_a_normalisation(tiny_model, x):
    h = explain(tiny_model, x, "cam", normalization="ivr:0.5")
    assert h.normalized.amax() <= 1 and (h.normalized == 0).float().mean() >= 0.45
    with pytest.raises(WeaklocError, match="unknown normalisation"):
        explain(tiny_model, x, "cam", normalization="zscore")


def test_ablationcam_inside_a_residual_block_treats_each_image_alone():
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=4).eval()
    imgs = torch.randn(3, 3, 64, 64)
    batch = explain(net, imgs, "ablationcam", layer="layer4.1.act1", target=[0, 1, 2], size=(2, 2)).raw
    for i in range(3):
        alone = explain(net, imgs[i:i + 1], "ablationcam", layer="layer4.1.act1", target=[i], size=(2, 2)).raw
        assert torch.allclose(batch[i], alone[0], rtol=1e-4, atol=1e-4)
    half = explain(net, imgs, "ablationcam", layer="layer4.1.act1", target=[0, 1, 2], dtype=torch.bfloat16)
    assert torch.isfinite(half.raw).all() and half.raw.abs().amax() > 0  # the 1e7 ablation value stays in fp32


def test_gradient_layer_followed_by_in_place_ops():
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=4).eval()
    h = explain(net, torch.randn(2, 3, 64, 64), "gradcam", layer="layer4.1.bn2")  # the block adds its shortcut in place
    assert torch.isfinite(h.raw).all()


def test_cli_option_normalization_reaches_explain():
    from weakloc.cli import map_overrides

    opts = map_overrides(option=["normalization=ivr:0.4", "chunk=32"])
    assert opts["normalization"] == "ivr:0.4" and opts["chunk"] == 32
    assert map_overrides(normalization="pas:0.9")["normalization"] == "pas:0.9"  # the --normalization option
