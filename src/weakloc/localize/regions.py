"""From thresholded maps to masks and boxes.

Masks are computed for the whole batch on the device; regions are connected components found by
OpenCV on one host copy of the batch's masks (a single transfer), the box of each region kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from weakloc.checks import check_choice, check_int
from weakloc.errors import OptionError


@dataclass
class Detection:
    """Boxes found in one map.

    Attributes:
        boxes: ``(R, 4)`` float32 ``x0, y0, x1, y1`` (inclusive pixel corners, map pixels).
        scores: ``(R,)`` mean normalised map value inside each region.
    """

    boxes: torch.Tensor
    scores: torch.Tensor


def binarize(maps: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Foreground masks ``maps > threshold``: ``(..., H, W)`` bool; thresholds ``(...)``."""
    if maps.ndim < 2 or thresholds.shape != maps.shape[:-2]:
        raise OptionError(f"binarize: thresholds of shape {tuple(thresholds.shape)} do not match maps of shape "
                          f"{tuple(maps.shape)} (one threshold per map: shape {tuple(maps.shape[:-2])})")
    return maps > thresholds[..., None, None]


def region_boxes(masks: torch.Tensor, maps: torch.Tensor, keep: str = "largest", min_area: int = 1) -> list[Detection]:
    """Boxes of the connected regions (8-connectivity) of each mask.

    Args:
        masks: ``(N, H, W)`` bool.
        maps: ``(N, H, W)`` normalised maps (region scores are their mean inside a region).
        keep: ``largest`` (one box per map, the largest region) or ``all``.
        min_area: regions smaller than this many pixels are dropped (``all`` only; 0 and 1 keep every region).

    Returns:
        N :class:`Detection` (CPU tensors); a map with no foreground gives no box.
    """
    check_choice("keep", keep, ("largest", "all"))
    check_int("min_area", min_area, 0)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise OptionError(f"region_boxes: masks {tuple(masks.shape)} and maps {tuple(maps.shape)} must both be (N, H, W)")
    masks_np = masks.to(torch.uint8).cpu().numpy()
    maps_np = maps.detach().float().cpu().numpy()
    out: list[Detection] = []
    for m, s in zip(masks_np, maps_np):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n <= 1:
            out.append(Detection(torch.zeros(0, 4), torch.zeros(0)))
            continue
        stats = stats[1:]
        sums = np.bincount(labels.ravel(), weights=s.ravel(), minlength=n)[1:]
        area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
        order = np.argsort(-area, kind="stable")
        if keep == "largest":
            order = order[:1]
        else:
            order = order[area[order] >= min_area]
        x0, y0 = stats[order, 0], stats[order, 1]
        x1 = x0 + stats[order, 2] - 1
        y1 = y0 + stats[order, 3] - 1
        boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
        out.append(Detection(torch.from_numpy(boxes), torch.from_numpy((sums[order] / area[order]).astype(np.float32))))
    return out


def scale_boxes(boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Rescale inclusive pixel boxes from an ``(H, W)`` map to an ``(H', W')`` image, up or down.

    A box ``x0..x1`` covers the continuous span ``[x0, x1 + 1)``; scaled, that span touches the
    target pixels ``floor(x0 * s) .. ceil((x1 + 1) * s) - 1``. Taking exactly those keeps the box
    the same region in any direction of scaling, never inverted (a one-pixel region shrunk by half
    is still one pixel, not ``[5, 5, 4.5, 4.5]``) and never outside the image.

    Args:
        boxes: ``(R, 4)`` ``x0, y0, x1, y1`` inclusive pixel corners in the map, ``x0 <= x1``, ``y0 <= y1``.
        from_size: the map's ``(H, W)``, both >= 1.
        to_size: the image's ``(H', W')``, both >= 1.

    Returns:
        ``(R, 4)`` float32 boxes of whole image pixels, ``0 <= x0' <= x1' <= W' - 1`` (likewise y),
        on the boxes' device.
    """
    (fh, fw), (th, tw) = (tuple(int(v) for v in from_size), tuple(int(v) for v in to_size))
    if min(fh, fw, th, tw) < 1:
        raise OptionError(f"scale_boxes: sizes must be positive, got from {from_size} to {to_size}")
    b = boxes.detach().to(torch.float64).reshape(-1, 4)
    s = torch.tensor([tw / fw, th / fh], dtype=torch.float64, device=b.device)
    # The tolerance absorbs float error in products such as 10 * 0.1, which would otherwise add a pixel.
    lo = torch.floor(b[:, :2] * s + 1e-6)
    hi = torch.ceil((b[:, 2:] + 1) * s - 1e-6) - 1
    top = torch.tensor([tw - 1, th - 1], dtype=torch.float64, device=b.device)
    lo = torch.minimum(lo.clamp_min(0), top)
    hi = torch.maximum(torch.minimum(hi, top), lo)
    return torch.cat([lo, hi], 1).to(torch.float32)
