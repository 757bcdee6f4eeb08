"""Batch augmentations: Hide-and-Seek and CutMix (they spread evidence over the whole object) and the
count mosaic (it makes counts add up).

All work on a normalised batch on its device, so the hidden value 0 is the dataset's mean colour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hide_patches(images: torch.Tensor, grid: int = 4, prob: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hide-and-Seek (Singh & Lee, ICCV 2017): split each image into ``grid × grid`` patches and hide each
    with probability ``prob`` (set to 0, the mean colour of normalised inputs), so the classifier
    cannot rely on the most discriminative part alone.

    Args:
        images: ``(B, C, H, W)`` normalised.

    Returns:
        ``(B, C, H, W)``, a new tensor.
    """
    b, _, h, w = images.shape
    keep = torch.rand(b, 1, grid, grid, device=images.device, generator=generator) >= prob
    mask = torch.nn.functional.interpolate(keep.float(), size=(h, w), mode="nearest")
    return images * mask.to(images.dtype)


def cutmix(images: torch.Tensor, targets: torch.Tensor, num_classes: int, task: str, alpha: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al., ICCV 2019): paste a random box from another image of the batch; the labels mix
    in proportion to the pasted area.

    Args:
        images: ``(B, C, H, W)``; targets: ``(B,)`` class indices (``single``) or ``(B, K)`` multi-hot.
        alpha: Beta(alpha, alpha) draws the kept area fraction.

    Returns:
        mixed images ``(B, C, H, W)`` and soft targets ``(B, K)`` (probabilities for ``single``,
        mixed presence for ``multi``).
    """
    b, _, h, w = images.shape
    dev = images.device
    lam = torch.distributions.Beta(alpha, alpha).sample().item() if generator is None else float(
        torch.distributions.Beta(alpha, alpha).sample(torch.Size([1]))[0])
    perm = torch.randperm(b, device=dev, generator=generator)
    cut = (1 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (1,), generator=generator, device=dev))
    cx = int(torch.randint(w, (1,), generator=generator, device=dev))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
    kept = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    soft = torch.nn.functional.one_hot(targets, num_classes).float() if task == "single" else targets.float()
    return mixed, kept * soft + (1 - kept) * soft[perm]


def count_mosaic(images: torch.Tensor, targets: torch.Tensor, num_classes: int, prob: float = 0.5,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a random ``prob`` of the batch by 2x2 mosaics of four whole images of the batch (the
    image itself and three random others), each shrunk to half size. Nothing is cut, so the labels
    stay exact: counts add up and presence is the union.

    Why: when nearly every image holds the same count (BCCD: one white cell in 344 of 364 images),
    a density map spread evenly over the image already scores well, and the head never learns where
    the objects are. In a mosaic four images share one image's area, so only mass on the objects
    gives the right sum.

    Args:
        images: ``(B, C, H, W)``; targets: ``(B, K)`` multi-hot presence, or ``(B, 2K)`` presence
            followed by counts.
        num_classes: ``K``.

    Returns:
        images ``(B, C, H, W)`` and targets (same shape, float).
    """
    b, _, h, w = images.shape
    dev = images.device
    chosen = torch.rand(b, device=dev, generator=generator) < prob
    order = [torch.arange(b, device=dev)] + [torch.randperm(b, device=dev, generator=generator) for _ in range(3)]
    idx = torch.stack(order, 1)  # (B, 4): top-left, top-right, bottom-left, bottom-right
    small = F.interpolate(images, size=(h // 2, w // 2), mode="bilinear", antialias=True, align_corners=False)[idx]
    mosaic = torch.cat([torch.cat([small[:, 0], small[:, 1]], -1), torch.cat([small[:, 2], small[:, 3]], -1)], -2)
    if mosaic.shape[-2:] != (h, w):  # odd sides
        mosaic = F.interpolate(mosaic, size=(h, w), mode="bilinear", align_corners=False)
    t = targets.float()[idx]  # (B, 4, K or 2K)
    k = num_classes
    mixed = torch.cat([t[..., :k].amax(1), t[..., k:].sum(1)], -1)
    return torch.where(chosen[:, None, None, None], mosaic.to(images.dtype), images), torch.where(chosen[:, None], mixed, targets.float())
