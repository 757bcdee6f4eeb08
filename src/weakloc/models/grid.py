"""Layer outputs as spatial grids, read from the model's own description of itself.

Channels-last outputs (``output_fmt == "NHWC"``, e.g. Swin) are permuted; token sequences
``(B, N, C)`` (ViT, DeiT, models with register tokens) lose their ``num_prefix_tokens`` and are laid
out on the patch grid of ``patch_embed`` (recomputed from the input size when it differs).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from weakloc.errors import WeaklocError


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm network inside ``model`` (a WeaklocNet's ``backbone``, else the model itself)."""
    return getattr(model, "backbone", model)


def _patch_grid(backbone: nn.Module, n_tokens: int, image_hw: tuple[int, int] | None) -> tuple[int, int]:
    pe = getattr(backbone, "patch_embed", None)
    if pe is not None:
        grid = tuple(getattr(pe, "grid_size", ()) or ())
        patch = getattr(pe, "patch_size", None)
        if image_hw is not None and patch is not None:
            ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
            from_size = (image_hw[0] // ph, image_hw[1] // pw)
            if from_size[0] * from_size[1] == n_tokens:
                return from_size
        if len(grid) == 2 and grid[0] * grid[1] == n_tokens:
            return grid
    side = math.isqrt(n_tokens)
    if side * side == n_tokens:
        return side, side
    raise WeaklocError(f"cannot lay {n_tokens} tokens out on a 2-D grid; choose a layer with a spatial output")


def to_grid(x: torch.Tensor, model: nn.Module, image_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """A layer output as a channels-first grid.

    Args:
        x: ``(B, C, h, w)``, channels-last ``(B, h, w, C)`` (when the model's ``output_fmt`` is
            ``"NHWC"``), or tokens ``(B, P + h*w, C)`` with ``P`` prefix (class, distillation,
            register) tokens.
        model: the model (or its backbone) the output came from.
        image_hw: the input's ``(H, W)``, for models that take any input size.

    Returns:
        ``(B, C, h, w)``, a view where possible.
    """
    bb = backbone_of(model)
    if x.ndim == 4:
        return x.permute(0, 3, 1, 2) if getattr(bb, "output_fmt", "NCHW") == "NHWC" else x
    if x.ndim == 3:
        prefix = int(getattr(bb, "num_prefix_tokens", 0) or 0)
        tokens = x[:, prefix:]
        gh, gw = _patch_grid(bb, tokens.shape[1], image_hw)
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)
    raise WeaklocError(f"a layer output of shape {tuple(x.shape)} has no spatial layout")


def channel_dim(x: torch.Tensor, model: nn.Module) -> int:
    """The channel axis of a raw layer output (see :func:`to_grid`)."""
    if x.ndim == 3 or (x.ndim == 4 and getattr(backbone_of(model), "output_fmt", "NCHW") == "NHWC"):
        return x.ndim - 1
    return 1
