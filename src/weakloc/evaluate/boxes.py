"""Box primitives of the WSOL protocol (``../docs/metrics.md``): IoU and contour boxes.

Boxes are ``x0, y0, x1, y1`` with the inclusive pixel convention of Choe et al. (CVPR 2020).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


def box_iou_inclusive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair, inclusive pixels: area = (x1 - x0 + 1) * (y1 - y0 + 1).

    Args:
        a: ``(..., N, 4)``; b: ``(..., M, 4)`` (leading dims broadcast).

    Returns:
        ``(..., N, M)``; 0 where the union is not positive.
    """
    a = a.double()
    b = b.double()
    ix = (torch.minimum(a[..., :, None, 2], b[..., None, :, 2]) - torch.maximum(a[..., :, None, 0], b[..., None, :, 0]) + 1).clamp_min(0)
    iy = (torch.minimum(a[..., :, None, 3], b[..., None, :, 3]) - torch.maximum(a[..., :, None, 1], b[..., None, :, 1]) + 1).clamp_min(0)
    inter = ix * iy
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def contour_boxes(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes and areas of every contour of a binary map (OpenCV ``RETR_TREE``).

    Matches the protocol: ``x1 = x + w`` and ``y1 = y + h``, clipped to ``W - 1``, ``H - 1``;
    areas are ``cv2.contourArea`` values (shoelace formula on the contour polygon), computed for all
    contours at once.

    Args:
        binary: ``(H, W)`` uint8, nonzero = foreground.

    Returns:
        boxes ``(R, 4)`` int64 and areas ``(R,)`` float64; R = 0 when there is no contour.
    """
    h, w = binary.shape
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 4), np.int64), np.zeros(0)
    if len(contours) <= 16:  # few contours: OpenCV's own calls beat numpy's per-call overhead
        rects = np.array([cv2.boundingRect(c) for c in contours], dtype=np.int64)
        areas = np.array([cv2.contourArea(c) for c in contours])
        x1 = np.minimum(rects[:, 0] + rects[:, 2], w - 1)
        y1 = np.minimum(rects[:, 1] + rects[:, 3], h - 1)
        return np.stack([rects[:, 0], rects[:, 1], x1, y1], 1), areas
    lengths = np.fromiter((len(c) for c in contours), dtype=np.int64, count=len(contours))
    pts = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    x0 = np.minimum.reduceat(pts[:, 0], starts)
    y0 = np.minimum.reduceat(pts[:, 1], starts)
    x1 = np.minimum(np.maximum.reduceat(pts[:, 0], starts) + 1, w - 1)
    y1 = np.minimum(np.maximum.reduceat(pts[:, 1], starts) + 1, h - 1)
    nxt = np.arange(1, len(pts) + 1)
    nxt[np.cumsum(lengths) - 1] = starts  # each contour closes on its first point
    cross = pts[:, 0] * pts[nxt, 1] - pts[nxt, 0] * pts[:, 1]
    areas = np.abs(np.add.reduceat(cross, starts)) / 2.0
    return np.stack([x0, y0, x1, y1], 1), areas


def boxes_at_thresholds(score_map: torch.Tensor, thresholds, multi_contour: bool = False) -> list[np.ndarray]:
    """The protocol's boxes of one normalised map at each threshold (a plain, readable reference).

    The map becomes ``uint8(map * 255)`` and is binarised strictly above ``int(tau * max)``. Without
    ``multi_contour`` only the largest-area contour's box is kept (MaxBoxAcc V1); no contour gives
    ``[0, 0, 0, 0]``.

    Args:
        score_map: ``(H, W)`` in [0, 1]; a NaN is an error.

    Returns:
        per threshold an ``(R, 4)`` int64 array.
    """
    if torch.isnan(score_map).any():
        raise ValueError("score map holds NaN")
    u8 = (score_map.detach().double().cpu() * 255).to(torch.uint8).numpy()
    top = int(u8.max())
    out = []
    for tau in thresholds:
        binary = (u8 > int(float(tau) * top)).astype(np.uint8)
        boxes, areas = contour_boxes(binary)
        if len(boxes) == 0:
            boxes = np.zeros((1, 4), np.int64)
        elif not multi_contour:
            boxes = boxes[[int(np.argmax(areas))]]
        out.append(boxes)
    return out
