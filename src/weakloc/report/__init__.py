"""Reports: overlays, drawn boxes, HTML galleries and metrics pages."""

from weakloc.report.html import gallery_cards, metrics_table, write_page
from weakloc.report.interpretation import top_losses
from weakloc.report.overlay import blend, colorize, draw_detections, save_png
from weakloc.report.paths import OutputFolder, inside, page_link, safe_component

__all__ = ["OutputFolder", "blend", "colorize", "draw_detections", "gallery_cards", "inside", "metrics_table", "page_link",
           "safe_component", "save_png", "top_losses", "write_page"]
