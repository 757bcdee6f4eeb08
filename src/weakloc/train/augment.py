"""Batch augmentations that spread evidence over the whole object: Hide-and-Seek and CutMix.

Both work on a normalised batch on its device, so the hidden value 0 is the dataset's mean colour.
"""

from __future__ import annotations

import torch


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
