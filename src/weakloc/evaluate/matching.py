"""Instance matching: predicted points or boxes against ground-truth boxes, one to one, and the
precision / recall / F1 of the matches (counting's instances, and the instance boxes a
classifier's map splits into on crowded photos)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

from weakloc.localize.regions import PEAK_PROMINENCE, binarize, region_boxes
from weakloc.results import Result

#: inclusive pixel extents -> continuous box corners
PIXEL_EXTENT = torch.tensor([0.0, 0.0, 1.0, 1.0])


@dataclass
class InstanceMetrics(Result):
    """Instance matching scores: per class :func:`prf` (``precision``, ``recall``, ``F1``, ``tp``,
    ``fp``, ``fn``) and ``f1``, the mean F1 over the classes with an instance either way."""

    per_class: dict[str, dict]
    f1: float

    def to_dict(self) -> dict:
        return {"per_class": {c: dict(v) for c, v in self.per_class.items()}, "F1": self.f1}


def match_instances(pred_points: torch.Tensor, pred_scores: torch.Tensor, gt_boxes: torch.Tensor,
                    pred_boxes: torch.Tensor | None = None, iou: float = 0.5) -> tuple[int, int, int]:
    """Greedy one-to-one matching by descending score: a point matches an unmatched GT box that
    contains it (or, with ``pred_boxes``, a box matches an unmatched GT box with IoU >= ``iou``).

    Args:
        pred_points: ``(P, 2)``; pred_scores: ``(P,)``; gt_boxes: ``(G, 4)``; pred_boxes: ``(P, 4)``.

    Returns:
        ``(true positives, false positives, false negatives)``.
    """
    if len(pred_points) == 0 or len(gt_boxes) == 0:
        return 0, len(pred_points), len(gt_boxes)
    if pred_boxes is None:
        x, y = pred_points[:, 0:1], pred_points[:, 1:2]
        ok = (x >= gt_boxes[None, :, 0]) & (x <= gt_boxes[None, :, 2]) & (y >= gt_boxes[None, :, 1]) & (y <= gt_boxes[None, :, 3])
        quality = ok.float()
    else:
        quality = box_iou(pred_boxes.float(), gt_boxes.float()).nan_to_num(0.0)  # two empty boxes: no overlap
        ok = quality >= iou
    used = torch.zeros(len(gt_boxes), dtype=torch.bool)
    tp = 0
    for i in pred_scores.argsort(descending=True).tolist():
        cand = ok[i] & ~used
        if cand.any():
            j = int(torch.where(cand, quality[i], torch.full_like(quality[i], -1.0)).argmax())
            used[j] = True
            tp += 1
    return tp, len(pred_points) - tp, len(gt_boxes) - tp


def prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall and F1 (0 when undefined)."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "F1": 2 * p * r / (p + r) if p + r else 0.0, "tp": tp, "fp": fp, "fn": fn}


def instance_metrics(stats: dict[str, list[int]]) -> InstanceMetrics:
    """Per class ``[tp, fp, fn]`` -> :class:`InstanceMetrics`; a class with no instance either way
    is left out of the mean F1."""
    per = {c: prf(*v) for c, v in stats.items()}
    scored = [p["F1"] for c, p in per.items() if sum(stats[c])]
    return InstanceMetrics(per, sum(scored) / len(scored) if scored else 0.0)


def region_instances(maps: torch.Tensor, gt_boxes: list[torch.Tensor], threshold: float, iou: float = 0.5,
                     min_area: int = 1, keep: str = "all", prominence: float = PEAK_PROMINENCE) -> list[tuple[int, int, int]]:
    """Each connected region of each map above ``threshold`` (of at least ``min_area`` pixels) as one
    instance box, matched one to one with that map's ground-truth boxes at ``iou`` (regions by
    descending mean map value).

    Args:
        maps: ``(N, H, W)`` normalised maps.
        gt_boxes: N ``(M, 4)`` inclusive pixel boxes (the WSOL protocol's convention).
        keep: ``all`` (each connected region) or ``peaks`` (regions split at the map's peaks of at
            least ``prominence``, :func:`~weakloc.localize.regions.split_at_peaks`).

    Returns:
        N ``(true positives, false positives, false negatives)``.
    """
    regions = region_boxes(binarize(maps, torch.full(maps.shape[:1], float(threshold), device=maps.device)), maps, keep=keep,
                           min_area=min_area, prominence=prominence)
    out = []
    for found, gt in zip(regions, gt_boxes):
        boxes = found.boxes + PIXEL_EXTENT
        out.append(match_instances((boxes[:, :2] + boxes[:, 2:]) / 2, found.scores, gt.float().cpu() + PIXEL_EXTENT, boxes, iou))
    return out
