"""Localization: thresholds, masks and boxes from normalised heatmaps."""

from weakloc.localize.regions import Detection, binarize, region_boxes, scale_boxes
from weakloc.localize.threshold import otsu_threshold, parse_threshold, percentile_threshold, thresholds_for

__all__ = ["Detection", "binarize", "otsu_threshold", "parse_threshold", "percentile_threshold", "region_boxes", "scale_boxes", "thresholds_for"]
