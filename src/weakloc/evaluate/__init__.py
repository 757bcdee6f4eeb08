"""Evaluation: the WSOL protocol's metrics (MaxBoxAcc, MaxBoxAccV2, GT-known/Top-1 Loc, PxAP), counting
metrics, calibration from a few boxes, and the faithfulness of heatmaps (deletion / insertion AUC,
Average Drop, Increase in Confidence). Compute functions return typed results
(:class:`~weakloc.results.Result`); writing them is the caller's.

Imports go one way: this layer uses config, data, models, explain and localize, never training
(Lightning) or the report writers."""

from weakloc.evaluate.boxes import box_iou_inclusive, boxes_at_thresholds, contour_boxes
from weakloc.evaluate.calibrate import BoxSizeCalibration, CalibrationResult, calibrate, calibrate_box_sizes, calibrated_threshold
from weakloc.evaluate.classification import classification_metrics
from weakloc.evaluate.counting import CountingReport, CountMetrics, InstanceMetrics, count_metrics, evaluate_counts
from weakloc.evaluate.explain_eval import ExplainEvalReport, explain_eval
from weakloc.evaluate.faithfulness import (MethodQuality, average_drop_increase, compare_methods, deletion_insertion,
                                           explanation_quality)
from weakloc.evaluate.run import EvaluationReport, evaluate_model, summary_rows
from weakloc.evaluate.wsol import (BoxMetrics, BoxSweep, GTKnownLoc, PxAPAccumulator, WSOLMetrics, box_sweep, gt_known_loc, pxap,
                                   threshold_list, wsol_box_metrics)

__all__ = [
    "BoxMetrics", "BoxSizeCalibration", "BoxSweep", "CalibrationResult", "CountMetrics", "CountingReport", "EvaluationReport",
    "ExplainEvalReport", "GTKnownLoc", "InstanceMetrics", "MethodQuality", "PxAPAccumulator", "WSOLMetrics",
    "average_drop_increase", "box_iou_inclusive", "box_sweep", "boxes_at_thresholds", "calibrate", "calibrate_box_sizes",
    "calibrated_threshold", "classification_metrics", "compare_methods", "contour_boxes", "count_metrics", "deletion_insertion",
    "evaluate_counts", "evaluate_model", "explain_eval", "explanation_quality", "gt_known_loc", "pxap", "summary_rows",
    "threshold_list", "wsol_box_metrics",
]
