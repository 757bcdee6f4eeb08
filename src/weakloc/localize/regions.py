"""From thresholded maps to masks and boxes.

Masks are computed for the whole batch on the device; regions are connected components found by
OpenCV on one host copy of the batch's masks (a single transfer), the box of each region kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch


@dataclass
class Detection:
    """Boxes found in one map.

    Attributes:
        boxes: ``(R, 4)`` float32 ``x0, y0, x1, y1`` (inclusive pixel corners, map pixels).
        scores: ``(R,)`` mean normalised map value inside each region, times the class probability.
        area: ``(R,)`` region pixel counts.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    area: torch.Tensor


def binarize(maps: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Foreground masks ``maps > threshold``: ``(..., H, W)`` bool; thresholds ``(...)``."""
    return maps > thresholds[..., None, None]


def region_boxes(masks: torch.Tensor, maps: torch.Tensor, keep: str = "largest", min_area: int = 1) -> list[Detection]:
    """Boxes of the connected regions (8-connectivity) of each mask.

    Args:
        masks: ``(N, H, W)`` bool.
        maps: ``(N, H, W)`` normalised maps (region scores are their mean inside a region).
        keep: ``largest`` (one box per map, the largest region) or ``all``.
        min_area: regions smaller than this many pixels are dropped (``all`` only).

    Returns:
        N :class:`Detection` (CPU tensors); a map with no foreground gives no box.
    """
    if keep not in ("largest", "all"):
        raise ValueError(f"keep must be 'largest' or 'all', got {keep!r}")
    masks_np = masks.to(torch.uint8).cpu().numpy()
    maps_np = maps.detach().float().cpu().numpy()
    out: list[Detection] = []
    for m, s in zip(masks_np, maps_np):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n <= 1:
            out.append(Detection(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0)))
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
        out.append(Detection(torch.from_numpy(boxes), torch.from_numpy((sums[order] / area[order]).astype(np.float32)),
                             torch.from_numpy(area[order].astype(np.float32))))
    return out


def scale_boxes(boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Rescale ``(R, 4)`` pixel boxes from an ``(H, W)`` map to an ``(H', W')`` image."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    b = boxes.clone().float()
    b[:, [0, 2]] = (b[:, [0, 2]] + torch.tensor([0.0, 1.0])) * sx - torch.tensor([0.0, 1.0])
    b[:, [1, 3]] = (b[:, [1, 3]] + torch.tensor([0.0, 1.0])) * sy - torch.tensor([0.0, 1.0])
    return b
