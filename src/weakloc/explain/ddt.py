"""Class-level co-localization from the backbone: Deep Descriptor Transforming (Wei et al., IJCAI
2017), the pseudo-box source of PSOL (Zhang et al., CVPR 2020).

Over the training images of one class, the descriptors (the feature vector at every position of a
layer's map) are pooled; their first principal direction ``ξ`` separates what those images have in
common (the object) from the rest. Projected at each position of a new image, ``ξᵀ(x − μ)`` is a
class-specific objectness map whose positive region is the common object, however little of it the
classifier needed. The CAM says *which* object; the projection says *how far it extends*:
``cam+ddt`` blends the two.

:func:`fit_directions` computes ``μ`` and ``ξ`` per class in one batched pass (sums of descriptors and
of their outer products, in float64, on the device); :func:`save_directions` /
:func:`load_directions` keep them in the model folder as ``ddt.safetensors``, which
:func:`~weakloc.models.load_model` attaches to the model it loads. The sign of ``ξ`` is chosen so
that the class's CAM-weighted mean descriptor projects positively (PCA leaves it open).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform
from weakloc.errors import WeaklocError
from weakloc.explain.layers import activation_grid, maps_and_grid
from weakloc.explain.maps import normalize_minmax
from weakloc.models.colocalization import Directions


def project(features: torch.Tensor, stats: Directions, targets: torch.Tensor) -> torch.Tensor:
    """``ξ_kᵀ(x − μ_k)`` at every position for each target class.

    Args:
        features: ``(B, C, h, w)`` descriptors of the statistics' layer.
        targets: ``(B, T)`` class indices.

    Returns:
        ``(B, T, h, w)`` projections (positive: the class's common object).
    """
    d = stats.direction.to(features)[targets]  # (B, T, C)
    offset = (d * stats.mean.to(features)[targets]).sum(-1)  # (B, T)
    return torch.einsum("btc,bchw->bthw", d, features) - offset[..., None, None]


def _class_weights(targets: torch.Tensor, task: str, k: int) -> torch.Tensor:
    """``(B, K)`` which classes each image's descriptors count for (its label, or its present classes)."""
    if task == "single" or targets.ndim == 1:
        return torch.nn.functional.one_hot(targets.long(), k).double()
    return (targets[:, :k] > 0.5).double()


def fit_directions(model, data, *, layer: str | None = None, batch_size: int = 16, device=None, size: int | None = None,
                   progress=None) -> Directions:
    """Each class's mean descriptor and first principal direction over ``data``'s images.

    Args:
        model: a trained :class:`~weakloc.models.WeaklocNet`.
        data: :class:`~weakloc.data.labels.LabeledImages` (the training images: each counts for
            its class, or its present classes).
        layer: a module name; None: the classifier's feature map (the one CAM reads).
        size: the input size; None: the model's ``maps.test_size`` or training size.
        progress: optional callable ``(done, total)``.

    Raises:
        WeaklocError: no image could be read, or a class has no readable image.
    """
    cfg = model.config
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    size = size or cfg.maps.test_size or cfg.input_size
    k = len(cfg.classes)
    loader = DataLoader(ImageDataset.from_labels(data, eval_transform(size, cfg.mean, cfg.std)), batch_size=batch_size,
                        collate_fn=collate_skip_bad)
    s1 = s2 = cam_sum = None
    n = torch.zeros(k, dtype=torch.float64, device=device)
    cam_weight = torch.zeros(k, dtype=torch.float64, device=device)
    done = 0
    for batch in loader:
        done += (0 if batch["index"] is None else len(batch["index"])) + batch["skipped"]
        if batch["image"] is None:
            continue
        x = batch["image"].to(device)
        out, feats = maps_and_grid(model, x, layer)  # the class maps weigh the sign
        feats = feats.double()
        b, c, h, w = feats.shape
        if s1 is None:
            s1 = torch.zeros(k, c, dtype=torch.float64, device=device)
            s2 = torch.zeros(k, c, c, dtype=torch.float64, device=device)
            cam_sum = torch.zeros(k, c, dtype=torch.float64, device=device)
        weights = _class_weights(batch["target"].to(device), cfg.task, k)  # (B, K)
        flat = feats.flatten(2)  # (B, C, hw)
        s1 += weights.T @ flat.sum(2)
        s2 += torch.einsum("bk,bcd->kcd", weights, flat @ flat.transpose(1, 2))
        n += weights.sum(0) * h * w
        maps = out.class_maps.double()  # (B, K, h', w'): where each class's evidence is
        cam = normalize_minmax(torch.nn.functional.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False).clamp_min(0))
        cam = cam * weights[..., None, None]  # (B, K, h, w)
        cam_sum += torch.einsum("bkp,bcp->kc", cam.flatten(2), flat)
        cam_weight += cam.flatten(2).sum((0, 2))
        if progress is not None:
            progress(done, len(data))
    if s1 is None:
        raise WeaklocError("no image could be read to compute the co-localization statistics")
    empty = [cfg.classes[i] for i in torch.nonzero(n == 0)[:, 0].tolist()]
    if empty:
        raise WeaklocError(f"no readable image of class(es) {', '.join(empty)}: their co-localization statistics cannot be computed")
    mean = s1 / n[:, None]
    cov = s2 / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
    values, vectors = torch.linalg.eigh(cov)  # ascending
    direction, eigenvalue = vectors[:, :, -1], values[:, -1].clamp_min(0)
    focus = cam_sum / cam_weight.clamp_min(1e-12)[:, None] - mean  # the CAM-weighted descriptor, centred
    sign = torch.sign((direction * focus).sum(1))
    direction = direction * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
    return Directions(mean.float().cpu(), direction.float().cpu(), eigenvalue.float().cpu(), n.cpu(), layer)


def _stats(model, layer: str | None) -> Directions:
    stats = getattr(model, "colocalization", None)
    if stats is None:
        raise WeaklocError("this model has no co-localization statistics: compute them once with `weakloc ddt MODEL DATA` "
                           "(the training images)")
    if layer is not None and layer != stats.layer:
        raise WeaklocError(f"the co-localization statistics are of layer {stats.layer or 'the feature map'}, not {layer}; "
                           "recompute them with weakloc ddt --layer")
    return stats


def ddt(model, images: torch.Tensor, targets_fn, layer: str | None = None):
    """Each target class's co-localization map ``ξᵀ(x − μ)`` (one forward pass, no gradients).

    Returns:
        maps ``(B, T, h, w)``, targets ``(B, T)``, logits ``(B, K)``.
    """
    stats = _stats(model, layer)
    feats, logits = activation_grid(model, images, stats.layer)
    targets = targets_fn(logits)
    return project(feats.float(), stats, targets), targets, logits


def cam_ddt(model, images: torch.Tensor, targets_fn, layer: str | None = None, *, weight: float = 0.5):
    """CAM and the co-localization map blended: ``(1 − weight)·CAM + weight·DDT``, each clamped at 0
    and scaled to [0, 1] per map first (at the CAM's resolution), so the CAM picks the object and
    the projection extends it to the object's whole extent.

    Returns:
        maps ``(B, T, h, w)``, targets ``(B, T)``, logits ``(B, K)``.
    """
    if not 0 <= weight <= 1:
        raise WeaklocError(f"cam+ddt: weight {weight} is not in [0, 1]")
    stats = _stats(model, layer)
    from weakloc.explain.methods import cam

    out, feats = maps_and_grid(model, images, stats.layer)  # one pass feeds both maps
    cams, targets, logits = cam(model, images, targets_fn, output=out)
    proj = project(feats.float(), stats, targets)
    if proj.shape[-2:] != cams.shape[-2:]:
        proj = torch.nn.functional.interpolate(proj, size=cams.shape[-2:], mode="bilinear", align_corners=False)
    return (1 - weight) * normalize_minmax(cams.float().clamp_min(0)) + weight * normalize_minmax(proj.clamp_min(0)), targets, logits
