"""Reports: overlays, drawn boxes, HTML galleries and metrics pages."""

from weakloc.report.html import gallery_cards, metrics_table, write_page
from weakloc.report.overlay import blend, colorize, draw_detections, save_png

__all__ = ["blend", "colorize", "draw_detections", "gallery_cards", "metrics_table", "save_png", "write_page"]
