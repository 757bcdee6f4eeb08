"""Evaluation: the WSOL protocol's metrics (MaxBoxAcc, MaxBoxAccV2, GT-known/Top-1 Loc, PxAP) and the
faithfulness of heatmaps (deletion / insertion AUC, Average Drop, Increase in Confidence)."""

from weakloc.evaluate.boxes import box_iou_inclusive, boxes_at_thresholds, contour_boxes
from weakloc.evaluate.explain_eval import explain_eval
from weakloc.evaluate.faithfulness import average_drop_increase, compare_methods, deletion_insertion, explanation_quality
from weakloc.evaluate.run import evaluate_model, summary_rows
from weakloc.evaluate.wsol import BoxSweep, PxAPAccumulator, box_sweep, gt_known_loc, pxap, threshold_list, wsol_box_metrics

__all__ = [
    "BoxSweep", "PxAPAccumulator", "average_drop_increase", "box_iou_inclusive", "box_sweep", "boxes_at_thresholds",
    "compare_methods", "contour_boxes", "deletion_insertion", "evaluate_model", "explain_eval", "explanation_quality", "gt_known_loc", "pxap", "summary_rows", "threshold_list", "wsol_box_metrics",
]
