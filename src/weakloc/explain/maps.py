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


def rowwise_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile of each row of ``(..., N)`` -> ``(..., 1)``, linear interpolation as
    ``torch.quantile``, which refuses inputs of more than 2^24 elements (a batch of all-class maps
    at 640 px has more)."""
    n = x.shape[-1]
    pos = q * (n - 1)
    lo, frac = int(pos), pos - int(pos)
    low = x.kthvalue(lo + 1, dim=-1, keepdim=True).values
    if frac == 0:
        return low
    high = x.kthvalue(min(lo + 2, n), dim=-1, keepdim=True).values
    return low + frac * (high - low)


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


def normalize_maps(maps: torch.Tensor, how: str = "minmax", relu: bool = False) -> torch.Tensor:
    """Normalise each ``(h, w)`` map of ``(..., h, w)`` to [0, 1] by one of the WSOL schemes.

    - ``minmax``: (x - min) / (max - min).
    - ``max``: ReLU(x) / max.
    - ``pas[:Q]`` (Bae, Noh & Kim, ECCV 2020, percentile-based): (x - min) divided by the Q-quantile
      (default 0.9) of (x - min), clipped to 1 -- a few hot pixels no longer squash the rest.
    - ``ivr[:Q]`` (Kim et al., ICCV 2021): the Q-quantile (default 0.4) is subtracted, negatives
      clipped, then divided by the maximum -- the low-activation mass no longer lifts the background.

    A constant or non-finite map gives zeros (never NaN).
    """
    if not isinstance(how, str):
        raise ValueError(f"normalization must be a string such as minmax or pas:0.9, got {how!r}")
    name, _, q = how.partition(":")
    if q:
        try:
            qv = float(q)
        except ValueError:
            qv = float("nan")
        if name not in ("pas", "ivr") or not 0 < qv < 1:  # NaN fails too
            raise ValueError(f"normalization {how!r}: only pas and ivr take a quantile, which must be in (0, 1), e.g. pas:0.9")
    if name == "minmax":
        return normalize_minmax(maps, relu=relu)
    x = maps.float().clamp_min(0) if relu else maps.float()
    flat = x.flatten(-2)
    bad = ~torch.isfinite(flat).all(-1, keepdim=True) | (flat.amax(-1, keepdim=True) == flat.amin(-1, keepdim=True))
    flat = torch.where(bad, torch.zeros_like(flat), flat)
    if name == "max":
        out = flat.clamp_min(0) / flat.amax(-1, keepdim=True).clamp_min(1e-12)
    elif name == "pas":
        shifted = flat - flat.amin(-1, keepdim=True)
        top = rowwise_quantile(shifted, float(q or 0.9))
        out = (shifted / top.clamp_min(1e-12)).clamp(max=1)
    elif name == "ivr":
        shifted = (flat - rowwise_quantile(flat, float(q or 0.4))).clamp_min(0)
        out = shifted / shifted.amax(-1, keepdim=True).clamp_min(1e-12)
    else:
        raise ValueError(f"unknown normalisation {how!r}: use minmax, max, pas[:Q] or ivr[:Q]")
    return torch.where(bad, torch.zeros_like(out), out).reshape(x.shape)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of each ``(2 radius + 1)``-square window of ``(..., H, W)``, the window cut at the borders
    (running sums: the cost does not grow with the radius)."""
    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        c = torch.cumsum(t, dim)
        c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim)
        i = torch.arange(n, device=t.device)
        hi, lo = (i + radius + 1).clamp(max=n), (i - radius).clamp(min=0)
        shape = [1] * t.ndim
        shape[dim] = n
        return (c.index_select(dim, hi) - c.index_select(dim, lo)) / (hi - lo).to(t.dtype).view(shape)

    return along(along(x, x.ndim - 2), x.ndim - 1)


def guided_filter(guide: torch.Tensor, maps: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Edge-aware smoothing of ``maps`` by a grey ``guide`` (He, Sun & Tang, ECCV 2010 / TPAMI 2013):
    in every window the output is a linear function of the guide fitted to the map, so the map's
    edges move onto the image's edges while flat image regions smooth it.

    Args:
        guide: ``(B, 1, H, W)`` in [0, 1].
        maps: ``(B, T, H, W)`` (any scale: the filter is linear in them).
        radius: window radius in pixels; ``eps``: the regulariser (a guide variance below it is
            treated as flat).

    Returns:
        ``(B, T, H, W)``.
    """
    m = maps.float()
    mean_i, mean_p = box_mean(guide, radius), box_mean(m, radius)
    var_i = box_mean(guide * guide, radius) - mean_i * mean_i
    a = (box_mean(guide * m, radius) - mean_i * mean_p) / (var_i + eps)
    b = mean_p - a * mean_i
    return box_mean(a, radius) * guide + box_mean(b, radius)


#: ``refine="guided"``'s defaults: the radius as a fraction of the shorter side, and eps on a [0, 1] guide
GUIDED_DEFAULTS = (0.1, 0.001)


def parse_refine(how: str | None) -> tuple[str, tuple[float, ...]]:
    """``"none"`` | ``"guided[:R[,EPS]]"`` -> (name, parameters).

    Raises:
        ValueError: another name, or parameters out of range.
    """
    if how is None or how == "none":
        return "none", ()
    if not isinstance(how, str):
        raise ValueError(f"refine must be none or guided[:R[,EPS]], got {how!r}")
    name, _, rest = how.partition(":")
    if name != "guided":
        raise ValueError(f"unknown refinement {how!r}: use none or guided[:R[,EPS]] (R: window radius as a fraction of the "
                         "image side, e.g. guided:0.1,0.001)")
    try:
        values = [float(v) for v in rest.split(",")] if rest else []
    except ValueError:
        values = [float("nan")]
    if len(values) > 2 or not all(0 < v < 1 for v in values):  # NaN fails too
        raise ValueError(f"refine {how!r}: R and EPS must be numbers in (0, 1), e.g. guided:0.1,0.001")
    return name, (*values, *GUIDED_DEFAULTS[len(values):])


def refine_maps(maps: torch.Tensor, images: torch.Tensor, how: str | None) -> torch.Tensor:
    """``maps`` ``(B, T, H, W)`` refined with the image evidence of ``images`` ``(B, C, h, w)``
    (normalised; resized to the maps' size as the guide) by ``how`` (:func:`parse_refine`)."""
    name, params = parse_refine(how)
    if name == "none":
        return maps
    grey = images.float().mean(1, keepdim=True)
    if grey.shape[-2:] != maps.shape[-2:]:
        grey = F.interpolate(grey, size=maps.shape[-2:], mode="bilinear", align_corners=False)
    grey = normalize_minmax(grey)  # the guide on [0, 1] per image, whatever the normalisation of the inputs
    radius = max(1, round(params[0] * min(maps.shape[-2:])))
    return guided_filter(grey, maps, radius, params[1])


def at_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 3, H, W)`` resized to ``size x size`` (bilinear, antialiased), or as they are.

    A second stage's teacher makes its targets at its own inference size (``maps.test_size``), where
    its maps were measured; the box regressor answers at the size it was trained at."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
