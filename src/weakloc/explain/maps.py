"""Small pure functions on heatmap tensors: upsampling and normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize ``(..., h, w)`` maps to ``(..., H, W)`` (bicubic by default, as the WSOL protocol does)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode=mode, align_corners=False if mode in ("bilinear", "bicubic") else None)
    return out.reshape(*lead, *size)


def normalize_minmax(maps: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """Min-max normalise each ``(h, w)`` map of ``(..., h, w)`` to [0, 1].

    A map that is constant or holds a NaN becomes all zeros (never NaN). With ``relu`` negative
    values are clamped to 0 first (the Grad-CAM convention).
    """
    x = maps.float()
    if relu:
        x = x.clamp_min(0)
    flat = x.flatten(-2)
    bad = torch.isnan(flat).any(-1, keepdim=True) | torch.isinf(flat).any(-1, keepdim=True)
    flat = torch.where(bad, torch.zeros_like(flat), flat)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(x.shape)


def normalize_percentile(maps: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """Scale each map so its ``q``-quantile is 1 (min to 0), clipped to [0, 1]; robust to hot pixels."""
    x = maps.float()
    flat = x.flatten(-2)
    flat = torch.nan_to_num(flat, nan=0.0)
    lo = flat.amin(-1, keepdim=True)
    hi = torch.quantile(flat, q, dim=-1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, ((flat - lo) / span.clamp_min(1e-12)).clamp(0, 1), torch.zeros_like(flat))
    return out.reshape(x.shape)


def centre_gaussian(size: tuple[int, int], sigma: float = 0.25, device=None) -> torch.Tensor:
    """The centre baseline: an isotropic Gaussian at the image centre, ``(H, W)`` in [0, 1].

    ``sigma`` is a fraction of each side. The threshold sweep turns it into centred boxes of every
    size, so the exact sigma barely matters.
    """
    h, w = size
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w - 0.5
    g = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
    return normalize_minmax(g)


def reduce_maps(x: torch.Tensor, how: str, dim: int = 0) -> torch.Tensor:
    """Combine maps along ``dim`` by ``mean``, ``max``, ``min`` or ``product`` (layer fusion, head fusion).

    Raises:
        ValueError: another ``how``.
    """
    ops = {"mean": lambda t: t.mean(dim), "max": lambda t: t.amax(dim), "min": lambda t: t.amin(dim), "product": lambda t: t.prod(dim)}
    if how not in ops:
        raise ValueError(how)
    return ops[how](x)
