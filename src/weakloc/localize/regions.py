"""From thresholded maps to masks and boxes.

Masks are computed for the whole batch on the device; regions are connected components found by
OpenCV on one host copy of the batch's masks (a single transfer), the box of each region kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from weakloc.checks import check_choice, check_int
from weakloc.errors import OptionError

#: how regions become boxes: the largest region per map, every region, or every region split at its peaks
KEEP = ("largest", "all", "peaks")
#: ``keep="peaks"``: a peak splits its region when it rises at least this far (normalised map units) above
#: the saddle to any higher peak (its dynamic), so ripples of a smooth map do not split one object
PEAK_PROMINENCE = 0.1


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


def split_at_peaks(mask: np.ndarray, heat: np.ndarray, prominence: float = PEAK_PROMINENCE) -> np.ndarray:
    """Split the foreground of one map into one region per peak: the map's maxima whose dynamic is at
    least ``prominence`` seed a watershed of the inverted map inside ``mask``, so two touching objects
    with a dip between them become two regions; a connected region without such a peak stays whole.

    Args:
        mask: ``(H, W)`` uint8 foreground; heat: ``(H, W)`` float normalised map.

    Returns:
        ``(H, W)`` int32 labels, 0 background, 1..R regions.
    """
    whole, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return whole.astype(np.int32)
    seeds, found = ndimage.label(h_maxima(heat.astype(np.float64), prominence).astype(bool) & (mask > 0),
                                 structure=np.ones((3, 3)))
    split = watershed(-heat, seeds, mask=mask > 0) if found else np.zeros_like(whole)
    # regions the seeds did not reach (no peak of that dynamic inside) keep their own label
    return np.where(split > 0, split, np.where(whole > 0, whole + found, 0)).astype(np.int32)


def _label_stats(labels: np.ndarray, heat: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Labels ``0..n-1`` (0 background) -> (n, boxes ``(n-1, 4)`` inclusive x0 y0 x1 y1, areas, map sums),
    the way OpenCV's ``connectedComponentsWithStats`` gives them; labels without pixels get area 0."""
    n = int(labels.max()) + 1
    area = np.bincount(labels.ravel(), minlength=n)[1:].astype(np.float64)
    sums = np.bincount(labels.ravel(), weights=heat.ravel(), minlength=n)[1:]
    boxes = np.zeros((n - 1, 4), np.int64)
    for i, sl in enumerate(ndimage.find_objects(labels, max_label=n - 1)):
        if sl is not None:
            boxes[i] = (sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1)
    return n, boxes, area, sums


def region_boxes(masks: torch.Tensor, maps: torch.Tensor, keep: str = "largest", min_area: int = 1,
                 prominence: float = PEAK_PROMINENCE) -> list[Detection]:
    """Boxes of the connected regions (8-connectivity) of each mask.

    Args:
        masks: ``(N, H, W)`` bool.
        maps: ``(N, H, W)`` normalised maps (region scores are their mean inside a region).
        keep: ``largest`` (one box per map, the largest region), ``all``, or ``peaks`` (every region
            split at the map's peaks, :func:`split_at_peaks`: touching objects, schools of fish).
        min_area: regions smaller than this many pixels are dropped (``all`` and ``peaks``; 0 and 1
            keep every region).
        prominence: ``peaks``: the least dynamic of a peak that splits a region.

    Returns:
        N :class:`Detection` (CPU tensors); a map with no foreground gives no box.
    """
    check_choice("keep", keep, KEEP)
    check_int("min_area", min_area, 0)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise OptionError(f"region_boxes: masks {tuple(masks.shape)} and maps {tuple(maps.shape)} must both be (N, H, W)")
    masks_np = masks.to(torch.uint8).cpu().numpy()
    maps_np = maps.detach().float().cpu().numpy()
    out: list[Detection] = []
    for m, s in zip(masks_np, maps_np):
        if keep == "peaks":
            n, corners, area, sums = _label_stats(split_at_peaks(m, s, prominence), s)
        else:
            n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
            stats = stats[1:]
            sums = np.bincount(labels.ravel(), weights=s.ravel(), minlength=n)[1:]
            area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
            corners = np.concatenate([stats[:, :2], stats[:, :2] + stats[:, 2:4] - 1], 1)
        if n <= 1:
            out.append(Detection(torch.zeros(0, 4), torch.zeros(0)))
            continue
        order = np.argsort(-area, kind="stable")
        if keep == "largest":
            order = order[:1]
        else:
            order = order[area[order] >= max(min_area, 1)]
        boxes = corners[order].astype(np.float32).reshape(-1, 4)
        out.append(Detection(torch.from_numpy(boxes), torch.from_numpy((sums[order] / np.maximum(area[order], 1)).astype(np.float32))))
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
