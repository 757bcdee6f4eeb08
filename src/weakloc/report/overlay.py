"""Pictures: heatmap colouring and blending on the device, boxes and labels drawn on images."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.ops import clip_boxes_to_image
from torchvision.utils import draw_bounding_boxes

from weakloc.report.paths import inside

PALETTE = ["#ff3b30", "#34c759", "#0a84ff", "#ffd60a", "#bf5af2", "#ff9f0a", "#64d2ff", "#ff375f"]


@lru_cache(maxsize=8)
def _turbo_lut(device: str) -> torch.Tensor:
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0, ::-1]  # BGR -> RGB
    return torch.from_numpy(lut.copy()).to(device)


def colorize(maps: torch.Tensor) -> torch.Tensor:
    """Turbo colour map of normalised maps ``(N, H, W)`` -> ``(N, 3, H, W)`` uint8, on their device."""
    idx = (maps.clamp(0, 1) * 255).round().long()
    return _turbo_lut(str(maps.device))[idx].permute(0, 3, 1, 2).contiguous()


def blend(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Heatmaps laid over images: ``(N, 3, H, W)`` uint8 images, ``(N, H, W)`` maps -> uint8 overlays.

    Maps of another size are resized (bilinear) to the images'.
    """
    if maps.shape[-2:] != images.shape[-2:]:
        maps = torch.nn.functional.interpolate(maps[:, None].float(), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    colour = colorize(maps).float()
    return (images.float() * (1 - alpha) + colour * alpha).round().clamp(0, 255).to(torch.uint8)


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: list[str], colors: list[str] | None = None, width: int = 2) -> torch.Tensor:
    """Draw ``(R, 4)`` boxes with captions on a ``(3, H, W)`` uint8 image (returns a new CPU image)."""
    if len(boxes) == 0:
        return image.cpu()
    # torchvision refuses inverted boxes with a ValueError; a box that reaches here inverted or outside
    # the picture is a rounding artefact of scaling, so it is ordered and clipped rather than allowed
    # to end a whole run after its work is done.
    b = boxes.detach().cpu().float().reshape(-1, 4).nan_to_num(0.0)
    b = torch.cat([torch.minimum(b[:, :2], b[:, 2:]), torch.maximum(b[:, :2], b[:, 2:])], 1)
    b = clip_boxes_to_image(b, (image.shape[-2] - 1, image.shape[-1] - 1))
    colors = colors or [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    return draw_bounding_boxes(image.cpu(), b, labels=labels, colors=colors, width=width)


def save_png(image: torch.Tensor, path: str | Path, root: str | Path | None = None) -> Path:
    """Write a ``(3, H, W)`` (colour) or ``(H, W)`` (grey) uint8 image as PNG.

    With ``root``, ``path`` must resolve inside it (else a :class:`~weakloc.errors.WeaklocError`,
    nothing written) and its missing folders are made; without, its folder must exist: a name
    made from data never creates folders of its own choosing.
    """
    path = Path(path)
    if root is not None:
        inside(root, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        inside(root, path)  # a folder that existed may be a symlink out
    arr = image.cpu().numpy() if image.ndim == 2 else image.permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path, format="PNG", optimize=False)
    return path
