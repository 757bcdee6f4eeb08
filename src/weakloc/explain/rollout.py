"""Attention rollout (Abnar & Zuidema, ACL 2020) and its gradient-weighted form, for timm transformers.

timm's attention normally runs fused (``scaled_dot_product_attention``), which never materialises
the attention probabilities. While explaining, each attention module's ``fused_attn`` is switched
off and a hook on its ``attn_drop`` (applied right after the softmax) records the probabilities;
both are restored afterwards, even on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from weakloc.errors import WeaklocError
from weakloc.explain.maps import reduce_maps
from weakloc.explain.methods import TargetsFn, frozen_parameters
from weakloc.models.grid import _patch_grid, backbone_of

__all__ = ["attention_probabilities", "attention_rollout", "grad_rollout", "rollout", "rollout_to_grid"]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
            and hasattr(m, "qkv")]


@contextmanager
def attention_probabilities(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record every global self-attention's probabilities ``(B, heads, N, N)`` in call order.

    Raises:
        WeaklocError: the model has no timm self-attention (``qkv`` + ``attn_drop``) modules.
    """
    mods = _attention_modules(backbone_of(model))  # not a separate box network's blocks
    if not mods:
        raise WeaklocError(f"{type(backbone_of(model)).__name__} has no timm self-attention blocks to roll out (a ViT/DeiT is needed)")
    store: list[torch.Tensor] = []
    flags = [(m, m.fused_attn) for m in mods]
    handles = [m.attn_drop.register_forward_hook(lambda _m, _i, out: store.append(out)) for m in mods]
    for m in mods:
        m.fused_attn = False
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.fused_attn = flag


def attention_rollout(attentions: list[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.9,
                      gradients: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Roll attention out through the layers, first layer first: ``R = A'_L ... A'_2 A'_1``.

    Per layer the heads are fused (``mean``, ``max`` or ``min``; with ``gradients``, the mean of
    attention x gradient, negatives clamped, as in gradient-weighted rollout), the lowest
    ``discard_ratio`` of each image's fused entries are set to 0 (never the first token's own
    entry), the identity is added for the residual path, ``A' = (A + I) / 2``, and rows are
    re-normalised to sum to 1.

    Args:
        attentions: per layer ``(B, heads, N, N)``.
        gradients: per layer d score / d attention, same shapes (gradient-weighted rollout).

    Returns:
        ``(B, N, N)``: how much each output token draws on each input token.
    """
    b, _, n, _ = attentions[0].shape
    if any(a.ndim != 4 or a.shape[0] != b or a.shape[-2:] != (n, n) for a in attentions):
        raise WeaklocError("rollout needs global self-attention of the same tokens in every layer (a ViT/DeiT); "
                           f"got {[tuple(a.shape) for a in attentions[:3]]}... (windowed attention such as Swin's cannot be rolled out)")
    eye = torch.eye(n, device=attentions[0].device, dtype=torch.float32)
    result = eye.expand(b, n, n)
    for i, attn in enumerate(attentions):
        a = attn.float()
        if gradients is not None:
            fused = (a * gradients[i].float()).mean(1).clamp_min(0)
        elif head_fusion in ("mean", "max", "min"):
            fused = reduce_maps(a, head_fusion, dim=1)
        else:
            raise WeaklocError(f"unknown head fusion {head_fusion!r}: use mean, max or min")
        if discard_ratio > 0:
            flat = fused.flatten(1)
            k = int(flat.shape[1] * discard_ratio)
            if k:
                drop = torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.topk(k, dim=1, largest=False).indices, True)
                drop[:, 0] = False
                fused = flat.masked_fill(drop, 0).view_as(fused)
        a = (fused + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result


def rollout_to_grid(result: torch.Tensor, model: nn.Module, image_hw: tuple[int, int], query: str = "auto") -> torch.Tensor:
    """Patch-token relevance from a rollout ``(B, N, N)`` as maps ``(B, h, w)``.

    ``query``: ``cls`` reads the first (class) token's row; ``mean`` averages the patch tokens' rows
    (for heads that pool the patch tokens, like weakloc's); ``auto`` picks ``cls`` for class-token
    models whose head reads that token, else ``mean``.
    """
    bb = backbone_of(model)
    prefix = int(getattr(bb, "num_prefix_tokens", 0) or 0)
    if query == "auto":
        query = "cls" if prefix and getattr(bb, "global_pool", "token") == "token" and bb is model else "mean"
    if query == "cls":
        if not prefix:
            raise WeaklocError("this model has no class token: use query='mean'")
        rel = result[:, 0, prefix:]
    elif query == "mean":
        rel = result[:, prefix:, prefix:].mean(1)
    else:
        raise WeaklocError(f"unknown rollout query {query!r}: use cls, mean or auto")
    gh, gw = _patch_grid(bb, rel.shape[1], image_hw)
    return rel.reshape(-1, gh, gw)


def rollout(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *, head_fusion: str = "mean",
            discard_ratio: float = 0.9, query: str = "auto"):
    """Attention rollout maps (class-agnostic): one forward pass, batched on the device."""
    if layer is not None:
        raise WeaklocError("rollout reads every attention layer; it takes no layer")
    with torch.no_grad(), attention_probabilities(model) as attns:
        logits = model(images)
    if not attns:
        raise WeaklocError("no attention probabilities were recorded")
    maps = rollout_to_grid(attention_rollout(attns, head_fusion, discard_ratio), model, tuple(images.shape[-2:]), query)
    targets = targets_fn(logits)
    return maps[:, None].expand(-1, targets.shape[1], -1, -1).contiguous(), targets, logits


def grad_rollout(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *, discard_ratio: float = 0.9,
                 query: str = "auto"):
    """Gradient-weighted attention rollout, per target: each layer's heads fused as the mean of
    attention x d(target logit)/d(attention), negatives clamped (gradients reach only the attention
    probabilities: parameters stay frozen)."""
    if layer is not None:
        raise WeaklocError("rollout reads every attention layer; it takes no layer")
    x = images.detach().requires_grad_(True)  # so the attention probabilities join the graph
    with frozen_parameters(model), torch.enable_grad(), attention_probabilities(model) as attns:
        logits = model(x)
        targets = targets_fn(logits.detach())
        maps = []
        for t in range(targets.shape[1]):
            score = logits.gather(1, targets[:, t:t + 1]).sum()
            grads = torch.autograd.grad(score, attns, retain_graph=t + 1 < targets.shape[1])
            result = attention_rollout([a.detach() for a in attns], discard_ratio=discard_ratio, gradients=list(grads))
            maps.append(rollout_to_grid(result, model, tuple(images.shape[-2:]), query))
    return torch.stack(maps, 1), targets, logits.detach()
