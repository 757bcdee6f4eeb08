"""Evaluation: the WSOL protocol's metrics (MaxBoxAcc, MaxBoxAccV2, GT-known/Top-1 Loc, PxAP)."""

from weakloc.evaluate.boxes import box_iou_inclusive, boxes_at_thresholds, contour_boxes
from weakloc.evaluate.run import evaluate_model, summary_rows
from weakloc.evaluate.wsol import BoxSweep, PxAPAccumulator, box_sweep, gt_known_loc, pxap, threshold_list, wsol_box_metrics

__all__ = [
    "BoxSweep", "PxAPAccumulator", "box_iou_inclusive", "box_sweep", "boxes_at_thresholds", "contour_boxes",
    "evaluate_model", "gt_known_loc", "pxap", "summary_rows", "threshold_list", "wsol_box_metrics",
]
