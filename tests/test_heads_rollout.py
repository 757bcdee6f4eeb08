"""Issue 4's models that look: attention rollout against a direct computation, the attention head,
CBAM, TAP, and their use through the explanation engine."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from weakloc.errors import WeaklocError
from weakloc.explain import explain
from weakloc.explain.rollout import attention_rollout
from weakloc.models import ModelConfig, WeaklocNet
from weakloc.models.heads import CBAM, thresholded_average_pool


def _vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2, num_classes=4, **kw).eval()


def _direct_attention(vit, x):
    """Each block's attention probabilities computed by hand from the block's input."""
    probs = []
    h = vit.patch_embed(x)
    h = vit._pos_embed(h)
    h = vit.norm_pre(h)
    for blk in vit.blocks:
        a = blk.attn
        y = blk.norm1(h)
        b, n, c = y.shape
        qkv = a.qkv(y).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
        probs.append(((q * a.scale) @ k.transpose(-2, -1)).softmax(-1))
        h = blk(h)
    return probs


def _loop_rollout(probs, fusion, discard):
    """Rollout written out image by image, layer by layer, the way the papers describe it."""
    out = []
    for i in range(probs[0].shape[0]):
        n = probs[0].shape[-1]
        r = torch.eye(n)
        for p in probs:
            f = {"mean": p[i].mean(0), "max": p[i].max(0).values, "min": p[i].min(0).values}[fusion]
            flat = f.flatten().clone()
            k = int(flat.numel() * discard)
            for j in flat.argsort()[:k].tolist():
                if j != 0:
                    flat[j] = 0
            f = flat.view(n, n)
            a = (f + torch.eye(n)) / 2
            a = a / a.sum(1, keepdim=True)
            r = a @ r
        out.append(r)
    return torch.stack(out)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rollout_matches_a_direct_computation(fusion, discard):
    vit = _vit(reg_tokens=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        direct = _loop_rollout(_direct_attention(vit, x), fusion, discard)
    h = explain(vit, x, "rollout", size=(4, 4), head_fusion=fusion, discard_ratio=discard)
    expected = direct[:, 0, 3:].reshape(2, 4, 4)  # class token's row, past 1 class + 2 register tokens
    assert torch.allclose(h.raw[:, 0], expected, atol=1e-5)
    assert all(m.fused_attn == vit.blocks[0].attn.fused_attn for m in [b.attn for b in vit.blocks])  # restored


def test_rollout_rows_sum_to_one_and_order_matters():
    torch.manual_seed(0)
    a = [torch.rand(1, 2, 5, 5).softmax(-1) for _ in range(3)]
    r = attention_rollout(a, discard_ratio=0.0)
    assert torch.allclose(r.sum(-1), torch.ones(1, 5), atol=1e-5)
    assert not torch.allclose(r, attention_rollout(a[::-1], discard_ratio=0.0), atol=1e-4)


def test_grad_rollout_is_per_target_and_leaves_no_gradients():
    vit = _vit()
    x = torch.randn(2, 3, 32, 32)
    h = explain(vit, x, "grad-rollout", target="all", size=(4, 4), discard_ratio=0.0)
    assert h.raw.shape == (2, 4, 4, 4) and torch.isfinite(h.raw).all()
    assert not torch.allclose(h.raw[:, 0], h.raw[:, 1])
    assert all(p.grad is None for p in vit.parameters()) and all(p.requires_grad for p in vit.parameters())
    with pytest.raises(WeaklocError, match="no timm self-attention"):
        from weakloc.explain.rollout import rollout
        rollout(torch.nn.Conv2d(3, 4, 3), x, lambda lg: lg.argmax(-1, keepdim=True))


def _weakloc(head="cam", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", classes=["a", "b", "c"], input_size=64, output_stride=8, drop_rate=0.0, head=head, **kw)
    return WeaklocNet(cfg, pretrained="none").eval()


def test_attention_head_softmax_maps_sum_to_one_and_are_explainable():
    model = _weakloc("attention", attention_stages=[1, 3])
    x = torch.randn(2, 3, 64, 64)
    out = model.forward_maps(x)
    assert [tuple(a.shape) for a in out.attention] == [(2, 16, 16), (2, 8, 8)]
    for a in out.attention:
        assert torch.allclose(a.flatten(1).sum(1), torch.ones(2), atol=1e-5)
    h = explain(model, x, "attention", target="all")
    assert h.raw.shape == (2, 3, 64, 64) and torch.equal(h.raw[:, 0], h.raw[:, 2])
    assert explain(model, x, "attention", stage=1, size=(8, 8)).raw[:, 0].allclose(out.attention[1])
    # Grad-CAM on the global map still works and agrees with the head's own CAM part
    cam = explain(model, x, "cam", target=0).normalized
    assert cam.shape == (2, 1, 64, 64)
    sig = _weakloc("attention", attention_stages=[2], attention_norm="sigmoid").forward_maps(x).attention[0]
    assert ((sig > 0) & (sig < 1)).all()


def test_attention_head_logits_are_linear_in_the_concatenation():
    model = _weakloc("attention", attention_stages=[2])
    x = torch.randn(2, 3, 64, 64)
    out = model.forward_maps(x)
    local = model.backbone.forward_intermediates(x, indices=[2])[1][0]
    a = out.attention[0]
    pooled = torch.cat([out.features.mean((2, 3)), (a[:, None] * local).sum((2, 3))], 1)
    w = torch.cat([model.classifier.weight[:, :, 0, 0], model.attention_head.local_classifier.weight], 1)
    assert torch.allclose(out.logits, pooled @ w.T + model.classifier.bias, atol=1e-4)


def test_tap_pools_only_above_the_threshold():
    f = torch.zeros(1, 2, 2, 2)
    f[0, 0] = torch.tensor([[1.0, 0.05], [0.5, 0.0]])  # max 1 -> keep > 0.1: 1 and 0.5
    f[0, 1] = 0.0  # nothing above 0: pools to 0
    assert torch.allclose(thresholded_average_pool(f, 0.1), torch.tensor([[0.75, 0.0]]))
    model = _weakloc("tap", tap_threshold=0.2)
    x = torch.randn(2, 3, 64, 64)
    out = model.forward_maps(x)
    expected = thresholded_average_pool(out.features, 0.2) @ model.classifier.weight[:, :, 0, 0].T + model.classifier.bias
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.allclose(model.head_logits(out.features), out.logits, atol=1e-5)
    pos = explain(model, x, "cam", target=0, positive_weights=True, size=(8, 8)).raw[:, 0]
    w = model.classifier.weight[0, :, 0, 0].clamp_min(0)
    assert torch.allclose(pos, (w[None, :, None, None] * out.features).sum(1), atol=1e-5)


def test_cbam_after_chosen_stages_round_trips(tmp_path):
    from weakloc.models import load_model, save_model
    from weakloc.models.backbone import for_inference

    model = _weakloc(cbam_stages=[2, 3])
    assert sum(isinstance(m, CBAM) for m in model.modules()) == 2
    new = {id(p) for p in model.new_parameters()}
    assert all(id(p) in new for m in model.modules() if isinstance(m, CBAM) for p in m.parameters())
    assert not any(id(p) in new for p in model.pretrained_parameters())
    x = torch.randn(2, 3, 64, 64)
    again = load_model(save_model(model, tmp_path / "m"))
    assert torch.equal(again(x), for_inference(model)(x))  # load_model's layout, channels-last
    with pytest.raises(WeaklocError, match="stage 9 out of range"):
        _weakloc(cbam_stages=[9])


def test_weakloc_vit_trains_a_step_and_rolls_out():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", classes=["a", "b"], input_size=32, drop_rate=0.0)
    model = WeaklocNet(cfg, pretrained="none")
    assert model.backbone.patch_embed.img_size == (32, 32)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    model.eval()
    h = explain(model, x, "rollout", discard_ratio=0.5)
    assert h.raw.shape == (2, 1, 32, 32) and torch.isfinite(h.raw).all()
    assert explain(model, x, "gradcam").raw.shape == (2, 1, 32, 32)


def test_adl_erases_the_peak_in_training_and_is_identity_in_eval():
    from weakloc.models.heads import ADL

    x = torch.ones(4, 2, 4, 4)
    x[:, :, 1, 1] = 10.0  # the most discriminative position
    adl = ADL(drop_rate=1.0, drop_threshold=0.8).train()
    out = adl(x)
    assert (out[:, :, 1, 1] == 0).all() and (out[:, :, 0, 0] == 1).all()
    adl.drop_rate = 0.0
    assert torch.allclose(adl(x), x * torch.sigmoid(x.mean(1, keepdim=True)))
    assert torch.equal(adl.eval()(x), x)
    model = _weakloc(adl_stages=[-2])
    assert sum(isinstance(m, ADL) for m in model.modules()) == 1
    img = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(img), model(img))  # eval: deterministic
