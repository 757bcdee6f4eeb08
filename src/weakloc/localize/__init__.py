"""Localization: thresholds, masks and boxes from normalised heatmaps, and whole runs over image
files (:func:`localize`, :func:`localize_batches`; the files are written by
:func:`weakloc.report.localization.localize_images`)."""

from weakloc.localize.regions import Detection, binarize, region_boxes, scale_boxes
from weakloc.localize.run import LocalizationResult, LocalizedBox, LocalizedImage, localize, localize_batches
from weakloc.localize.threshold import otsu_threshold, parse_threshold, percentile_threshold, thresholds_for

__all__ = ["Detection", "LocalizationResult", "LocalizedBox", "LocalizedImage", "binarize", "localize", "localize_batches",
           "otsu_threshold", "parse_threshold", "percentile_threshold", "region_boxes", "scale_boxes", "thresholds_for"]
