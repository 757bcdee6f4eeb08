"""Second stage on pseudo-labels (the idea of PSOL, Zhang et al. CVPR 2020): a first-stage model's maps
on the training images become object masks that train a localizer head, and object boxes that train a
class-agnostic box regressor, still with no human boxes.

The targets are made on the fly, in the training step, from the very batch the student sees (after
its augmentation), so crops and flips need no separate pipeline and nothing leaves the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from weakloc.errors import WeaklocError


def teacher_maps(teacher, images: torch.Tensor, method: str = "cam", refine: str | None = None,
                 options: dict | None = None) -> torch.Tensor:
    """A first-stage model's min-max normalised maps of every class at the images' size.

    Args:
        teacher: the first-stage :class:`~weakloc.models.WeaklocNet` (eval mode).
        images: ``(B, 3, H, W)`` normalised as the teacher expects.
        method: the teacher's map method (any registered one).
        refine: the teacher's map refinement (``none`` | ``guided[:R[,EPS]]``).
        options: further :func:`~weakloc.explain.explain` keyword arguments.

    Returns:
        ``(B, K, H, W)`` maps in ``[0, 1]``.
    """
    from weakloc.explain import explain

    return explain(teacher, images, method, target="all", refine=refine or "none", **(options or {})).normalized


def teacher_size_and_refine(teacher, method: str) -> tuple[int, str]:
    """The input side and refinement ``teacher``'s ``method`` maps are made with by every command
    (:func:`~weakloc.explain.pipeline.map_settings`: its stored test size and ``refine``; the
    training size and none for a box method)."""
    from weakloc.explain.pipeline import map_settings

    settings = map_settings(teacher, method=method)
    return settings.test_size, settings.refine


def pseudo_masks(maps: torch.Tensor, size: tuple[int, int], threshold: float = 0.2) -> torch.Tensor:
    """Object masks of every class on the student's map grid.

    Args:
        maps: ``(B, K, H, W)`` normalised teacher maps (:func:`teacher_maps`).
        size: ``(h, w)`` of the masks (the student's map grid); the maps are area-averaged onto it.
        threshold: a position is object where the averaged map is at least this.

    Returns:
        ``(B, K, h, w)`` float masks in {0, 1}.
    """
    return (F.adaptive_avg_pool2d(maps.float(), size) >= threshold).float()


def pseudo_boxes(maps: torch.Tensor, present: torch.Tensor, threshold: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """One class-agnostic box per image: the extent of every present class's foreground.

    Args:
        maps: ``(B, K, H, W)`` normalised teacher maps.
        present: ``(B, K)`` bool, the classes in each image.
        threshold: foreground is where a present class's map is at least this.

    Returns:
        ``(B, 4)`` boxes ``x0, y0, x1, y1`` in ``[0, 1]`` image coordinates (continuous: a
        foreground pixel ``i`` spans ``[i, i + 1) / size``), and ``(B,)`` bool, whether an image has
        any foreground (the others have no box to learn).
    """
    if maps.ndim != 4 or present.shape != maps.shape[:2]:
        raise WeaklocError(f"pseudo_boxes: maps {tuple(maps.shape)} and present {tuple(present.shape)} must be (B, K, H, W) and (B, K)")
    h, w = maps.shape[-2:]
    fg = ((maps >= threshold) & present[..., None, None].bool()).any(1)  # (B, H, W)
    rows, cols = fg.any(2), fg.any(1)  # (B, H), (B, W)
    valid = rows.any(1)

    def extent(line: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = line.shape[1]
        idx = torch.arange(n, device=line.device)
        first = torch.where(line, idx, n).amin(1)
        last = torch.where(line, idx, -1).amax(1)
        return first.float() / n, (last + 1).float() / n

    x0, x1 = extent(cols)
    y0, y1 = extent(rows)
    boxes = torch.stack([x0, y0, x1, y1], 1)
    return torch.where(valid[:, None], boxes, torch.tensor([0.0, 0.0, 1.0, 1.0], device=maps.device)), valid


def box_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Generalised IoU loss plus L1 (as DETR trains its boxes) of ``(B, 4)`` predicted against ``(B, 4)``
    pseudo-boxes, both ``[0, 1]`` ``x0, y0, x1, y1``, over the ``valid`` images; 0 when none is."""
    if pred.shape != target.shape:
        raise WeaklocError(f"predicted boxes {tuple(pred.shape)} and pseudo-boxes {tuple(target.shape)} differ in shape")
    if not valid.any():  # zero, but on the graph: the batch's only trainable term may be this one
        return pred.sum() * 0
    p, t = pred[valid].float(), target[valid].float()
    # a predicted box may be inverted early in training; the GIoU loss needs x0 <= x1
    p = torch.cat([torch.minimum(p[:, :2], p[:, 2:]), torch.maximum(p[:, :2], p[:, 2:])], 1)
    return generalized_box_iou_loss(p, t, reduction="mean") + F.l1_loss(p, t)


def localizer_loss(logits: torch.Tensor, masks: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Binary cross entropy of the localizer's ``(B, K, h, w)`` logits against ``(B, K, h, w)`` masks,
    over the classes present in each image (``(B, K)`` bool); 0 when none is."""
    if logits.shape != masks.shape:
        raise WeaklocError(f"localizer maps {tuple(logits.shape)} and pseudo-masks {tuple(masks.shape)} differ in shape")
    if not present.any():  # zero, but on the graph (see box_loss)
        return logits.sum() * 0
    per_map = F.binary_cross_entropy_with_logits(logits.float(), masks, reduction="none").flatten(2).mean(-1)  # (B, K)
    return per_map[present].mean()
