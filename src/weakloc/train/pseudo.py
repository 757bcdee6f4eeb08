"""Second stage on pseudo-labels (the idea of PSOL, Zhang et al. CVPR 2020): a first-stage model's maps
on the training images become object masks that train a localizer head, still with no human boxes.

The masks are made on the fly, in the training step, from the very batch the student sees (after
its augmentation), so crops and flips need no separate mask pipeline and nothing leaves the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weakloc.errors import WeaklocError


def pseudo_masks(teacher, images: torch.Tensor, size: tuple[int, int], method: str = "cam", threshold: float = 0.2,
                 options: dict | None = None) -> torch.Tensor:
    """Object masks of every class from a first-stage model's maps.

    Args:
        teacher: the first-stage :class:`~weakloc.models.WeaklocNet` (eval mode).
        images: ``(B, 3, H, W)`` normalised as the teacher expects.
        size: ``(h, w)`` of the masks (the student's map grid).
        method: the teacher's map method (any registered one).
        threshold: a position is object where the min-max normalised map is at least this.
        options: further :func:`~weakloc.explain.explain` keyword arguments.

    Returns:
        ``(B, K, h, w)`` float masks in {0, 1}.
    """
    from weakloc.explain import explain

    maps = explain(teacher, images, method, target="all", size=size, **(options or {})).normalized
    return (maps >= threshold).float()


def localizer_loss(logits: torch.Tensor, masks: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Binary cross entropy of the localizer's ``(B, K, h, w)`` logits against ``(B, K, h, w)`` masks,
    over the classes present in each image (``(B, K)`` bool); 0 when none is."""
    if logits.shape != masks.shape:
        raise WeaklocError(f"localizer maps {tuple(logits.shape)} and pseudo-masks {tuple(masks.shape)} differ in shape")
    if not present.any():
        return logits.new_zeros(())
    per_map = F.binary_cross_entropy_with_logits(logits.float(), masks, reduction="none").flatten(2).mean(-1)  # (B, K)
    return per_map[present].mean()
