"""Per-map thresholds for normalised heatmaps, batched on the maps' device."""

from __future__ import annotations

import torch

from weakloc.errors import OptionError, WeaklocError
from weakloc.explain.maps import rowwise_quantile


NO_CALIBRATED_THRESHOLD = "this model has no calibrated threshold; run `weakloc calibrate` or pass a number"


def _check_maps(maps: torch.Tensor) -> None:
    if maps.ndim < 2 or maps.shape[-1] == 0 or maps.shape[-2] == 0:
        raise WeaklocError(f"thresholds need maps of shape (..., H, W) with H, W >= 1, got {tuple(maps.shape)}")


def otsu_threshold(maps: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each map: the cut maximising between-class variance.

    Args:
        maps: ``(..., H, W)`` values in [0, 1] (NaN counts as 0), H and W >= 1.

    Returns:
        ``(...)`` thresholds in [0, 1].
    """
    _check_maps(maps)
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).float().nan_to_num(0.0).clamp(0, 1)
    idx = (flat * (bins - 1)).round().long()
    hist = torch.zeros(flat.shape[0], bins, device=maps.device).scatter_add_(1, idx, torch.ones_like(flat))
    p = hist / hist.sum(1, keepdim=True)
    levels = torch.arange(bins, device=maps.device, dtype=torch.float32) / (bins - 1)
    w0 = p.cumsum(1)
    mu = (p * levels).cumsum(1)
    mu_t = mu[:, -1:]
    between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    between = torch.where((w0 > 0) & (w0 < 1), between, torch.full_like(between, -1.0))
    return levels[between.argmax(1)].reshape(lead)


def percentile_threshold(maps: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile (0..1) of each map's values: keeps the top ``1 - q`` of the pixels. ``(...)``."""
    if not 0 <= q <= 1:  # NaN fails this too
        raise WeaklocError(f"percentile must be in [0, 100], got {q * 100}")
    _check_maps(maps)
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).float().nan_to_num(0.0)
    return rowwise_quantile(flat, q).reshape(maps.shape[:-2])


def parse_threshold(spec: str | float) -> tuple[str, float]:
    """``0.3`` -> fixed; ``otsu``; ``percentile:90`` / ``p90``; ``calibrated``."""
    if isinstance(spec, bool) or not isinstance(spec, (str, int, float)):
        raise WeaklocError(f"threshold must be a number in [0, 1), 'otsu', 'percentile:Q' or 'calibrated'; got {spec!r}")
    s = str(spec).strip().lower()
    if s in ("otsu", "calibrated"):
        return s, 0.0
    for prefix in ("percentile:", "p"):
        if s.startswith(prefix) and s[len(prefix):].replace(".", "", 1).isdigit():
            q = float(s[len(prefix):])
            if not 0 <= q <= 100:
                raise WeaklocError(f"threshold {spec!r}: the percentile must be in [0, 100]")
            return "percentile", q / 100
    try:
        v = float(s)
    except ValueError:
        raise WeaklocError(f"threshold must be a number in [0, 1), 'otsu', 'percentile:Q' or 'calibrated'; got {spec!r}") from None
    if not 0 <= v < 1:  # NaN fails this too
        raise WeaklocError(f"a fixed threshold must be in [0, 1), got {v}")
    return "fixed", v


def thresholds_for(maps: torch.Tensor, spec: str | float, calibrated: float | None = None) -> torch.Tensor:
    """Thresholds ``(...)`` for normalised maps ``(..., H, W)`` following ``spec`` (see :func:`parse_threshold`).

    ``calibrated`` is the value stored in a model by evaluation/calibration; asking for it when
    there is none is an error.
    """
    kind, value = parse_threshold(spec)
    lead = maps.shape[:-2]
    if kind == "otsu":
        return otsu_threshold(maps)
    if kind == "percentile":
        return percentile_threshold(maps, value)
    if kind == "calibrated":
        if calibrated is None:
            raise WeaklocError(NO_CALIBRATED_THRESHOLD)
        value = calibrated
    return torch.full(lead, value, device=maps.device)


def check_threshold(threshold, calibrated: float | None = None) -> str | float:
    """``threshold`` (see :func:`parse_threshold`) if usable: a number in [0, 1), a percentile in
    [0, 100], ``otsu``, or ``calibrated`` only when the model has one (``calibrated`` not None);
    else an :class:`~weakloc.errors.OptionError`."""
    try:
        kind, _ = parse_threshold(threshold)
    except WeaklocError as e:
        raise OptionError(str(e) if "threshold" in str(e) else f"threshold: {e}") from None
    if kind == "calibrated" and calibrated is None:
        raise OptionError(f"threshold: {NO_CALIBRATED_THRESHOLD}")
    return threshold
