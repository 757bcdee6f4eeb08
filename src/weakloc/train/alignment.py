"""Feature–class-weight alignment and dropout consistency (after Kim et al., CVPR 2022, "Bridging the
Gap between Classification and Localization for WSOL"), written from the paper's idea.

A CAM value is ``w_c · f = |w_c| |f| cos(w_c, f)``: object parts that are less discriminative have
features pointing away from the class weight, so their CAM is low although they belong to the object.
The alignment loss pulls the direction of the features inside the current object region towards
``w_c`` (and keeps the background's away from it) and evens out the feature norms inside the region.
The consistency loss drops the most activated positions (attentive dropout) and asks the class score of
what is left to agree with the full score, so activation spreads over the whole object.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weakloc.explain.maps import normalize_minmax


def present_classes(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, K)`` bool of the classes present in each image: from ``(B,)`` indices, ``(B, K)``
    multi-hot or soft (CutMix) targets."""
    if target.dim() == 1:
        return F.one_hot(target.long(), num_classes).bool()
    return target[:, :num_classes] > 0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` per leading index ``(..., h, w) -> (...)`` (0 where empty)."""
    m = mask.float()
    return (values * m).flatten(-2).sum(-1) / m.flatten(-2).sum(-1).clamp_min(1.0)


def alignment_loss(features: torch.Tensor, class_maps: torch.Tensor, weight: torch.Tensor, present: torch.Tensor,
                   fg: float = 0.5, bg: float = 0.15, norm_weight: float = 1.0) -> torch.Tensor:
    """Direction alignment of object features with their class weight, and even feature norms.

    For each present class ``c`` of an image, the object region is where the min-max normalised CAM
    (detached) is at least ``fg``, the background where it is at most ``bg``. The loss is the mean
    over those pairs of ``mean_fg(1 - cos) + mean_bg(relu(cos)) + norm_weight * mean_fg(| |f| / m - 1 |)``
    with ``m`` the region's mean norm (detached).

    Args:
        features: ``(B, C, h, w)``; class_maps: ``(B, K, h, w)``; weight: ``(K, C)`` class weights;
        present: ``(B, K)`` bool.

    Returns:
        a scalar (0 when no class is present).
    """
    if not present.any():
        return features.new_zeros(())
    a = normalize_minmax(class_maps.detach().float())
    cos = torch.einsum("bchw,kc->bkhw", F.normalize(features.float(), dim=1), F.normalize(weight.float(), dim=1))
    fg_mask, bg_mask = a >= fg, a <= bg
    sim = _masked_mean(1 - cos, fg_mask) + _masked_mean(cos.clamp_min(0), bg_mask)  # (B, K)
    norms = features.float().norm(dim=1)[:, None].expand_as(a)  # (B, K, h, w)
    mean_norm = _masked_mean(norms, fg_mask).detach().clamp_min(1e-6)
    spread = _masked_mean((norms / mean_norm[..., None, None] - 1).abs(), fg_mask)
    per_pair = sim + norm_weight * spread
    return per_pair[present].mean()


def dropout_consistency_loss(class_maps: torch.Tensor, present: torch.Tensor, drop: float = 0.8) -> torch.Tensor:
    """Consistency of the class evidence after attentive dropout.

    Positions where any present class's normalised CAM reaches ``drop`` are dropped; for each
    present class the average CAM over the remaining positions should equal the average over all of
    them (the detached full score): the class must still be seen without its most discriminative
    part. (The head is a 1x1 classifier, so dropping its input features there is the same as dropping
    those CAM positions.)

    Args:
        class_maps: ``(B, K, h, w)``; present: ``(B, K)`` bool.
    """
    if not present.any():
        return class_maps.new_zeros(())
    maps = class_maps.float()
    a = normalize_minmax(maps.detach())
    top = torch.where(present[..., None, None], a, torch.zeros_like(a)).amax(1, keepdim=True) >= drop  # (B, 1, h, w)
    kept = (~top).expand_as(maps)
    full = maps.flatten(-2).mean(-1).detach()
    return (_masked_mean(maps, kept) - full).abs()[present].mean()
