"""Heatmaps: where the model found the evidence.

>>> maps = explain(model, images, method="cam", target="predicted")
>>> maps.normalized.shape   # (B, T, H, W), on the images' device
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from weakloc.explain.maps import centre_gaussian, normalize_minmax, normalize_percentile, upsample
from weakloc.explain.registry import METHODS, ExplainMethod, get_method, register
from weakloc.explain.targets import TargetSpec, resolve_targets


class Heatmaps(NamedTuple):
    """Maps for a batch, all on the model's device.

    Attributes:
        raw: ``(B, T, H, W)`` the method's values, upsampled, not normalised.
        normalized: ``(B, T, H, W)`` min-max normalised to [0, 1] per map (constant/NaN -> zeros).
        targets: ``(B, T)`` class index of each map.
        logits: ``(B, K)`` the model's logits for the batch.
    """

    raw: torch.Tensor
    normalized: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor


def explain(
    model,
    images: torch.Tensor,
    method: str = "cam",
    target: TargetSpec = "predicted",
    layer: str | None = None,
    size: tuple[int, int] | None = None,
    relu: bool | None = None,
) -> Heatmaps:
    """Heatmaps of ``method`` for a batch of normalised images ``(B, 3, H, W)``.

    Args:
        model: a :class:`~weakloc.models.WeaklocNet` (in eval mode).
        method: a name from :data:`METHODS` (``weakloc methods`` lists them).
        target: see :func:`resolve_targets` -- ``"predicted"``, ``"all"``, ``"top3"``, a class
            name or index, or a per-image list.
        layer: target layer name for gradient methods (default: the last feature map).
        size: output ``(H, W)``; default the input's size. Upsampling is bicubic.
        relu: clamp negatives before normalising (default: the method's convention).
    """
    m = get_method(method)
    classes = model.config.classes
    raw, targets, logits = m.fn(model, images, lambda lg: resolve_targets(target, lg, classes), layer)
    raw = upsample(raw, size or tuple(images.shape[-2:]))
    return Heatmaps(raw, normalize_minmax(raw, relu=m.relu if relu is None else relu), targets, logits)


__all__ = [
    "METHODS", "ExplainMethod", "Heatmaps", "centre_gaussian", "explain", "get_method", "normalize_minmax",
    "normalize_percentile", "register", "resolve_targets", "upsample",
]
