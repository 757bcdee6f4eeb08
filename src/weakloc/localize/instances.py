"""Counts and instances from counting models: test-time views, whole counts, peaks of density maps
(or CAMs) and one box per peak, batched on the device."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import clip_boxes_to_image

from weakloc.errors import WeaklocError
from weakloc.explain.maps import upsample

#: forward passes of each of :data:`~weakloc.config.COUNT_VIEWS`
COUNT_VIEW_PASSES = {"none": 1, "flip": 2, "dihedral": 8}


class Instances(NamedTuple):
    """Up to ``N`` instances per image and class.

    Attributes:
        points: ``(B, K, N, 2)`` peak positions ``x, y`` in map pixels.
        scores: ``(B, K, N)`` map value at each peak.
        boxes: ``(B, K, N, 4)`` ``x0, y0, x1, y1`` (inclusive pixel extents) of each instance's region.
        valid: ``(B, K, N)`` bool: the first ``round(count)`` peaks of each map.
    """

    points: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor


def find_peaks(maps: torch.Tensor, counts: torch.Tensor, kernel: int = 3, max_instances: int | None = None):
    """Local maxima by max-pool non-maximum suppression, the top ``round(count)`` kept per map.

    Args:
        maps: ``(B, K, H, W)``.
        counts: ``(B, K)`` predicted counts (rounded to the number of peaks kept).
        kernel: odd window of the suppression (a peak is the maximum of its window).
        max_instances: cap on peaks per map (default: the largest rounded count in the batch;
            finding it is the one host synchronisation).

    Returns:
        points ``(B, K, N, 2)`` as ``x, y``, scores ``(B, K, N)``, valid ``(B, K, N)``.
    """
    b, k, h, w = maps.shape
    keep_n = counts.round().clamp_min(0).long()
    n = max_instances if max_instances is not None else int(keep_n.max()) if keep_n.numel() else 0
    n = max(1, min(n, h * w))
    pooled = F.max_pool2d(maps.flatten(0, 1)[:, None], kernel, stride=1, padding=kernel // 2)[:, 0].view_as(maps)
    candidates = torch.where((maps == pooled) & (maps > 0), maps, torch.full_like(maps, -float("inf")))
    scores, idx = candidates.flatten(2).topk(n, dim=-1)  # (B, K, N)
    points = torch.stack([idx % w, idx // w], -1).float()
    valid = (torch.arange(n, device=maps.device) < keep_n[..., None]) & torch.isfinite(scores)
    return points, torch.where(valid, scores, torch.zeros_like(scores)), valid


def instance_boxes(maps: torch.Tensor, points: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                   fraction: float = 0.5, scale: float = 1.0) -> torch.Tensor:
    """One box per peak: the extent of the pixels that are nearest to that peak (among the map's valid
    peaks) and at least ``fraction`` of its value, widened ``scale`` times about its centre (and cut
    to the map).

    Args:
        maps: ``(B, K, H, W)``; points, scores, valid: from :func:`find_peaks`.
        scale: how many times wider and taller than that extent the box is.

    Returns:
        ``(B, K, N, 4)`` boxes ``x0, y0, x1, y1`` (zeros where not valid).
    """
    b, k, h, w = maps.shape
    ys = torch.arange(h, device=maps.device, dtype=torch.float32)
    xs = torch.arange(w, device=maps.device, dtype=torch.float32)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
    d2 = (gx[None, None, None] - points[..., 0, None, None]) ** 2 + (gy[None, None, None] - points[..., 1, None, None]) ** 2
    d2 = torch.where(valid[..., None, None], d2, torch.full_like(d2, float("inf")))  # (B, K, N, H, W)
    owner = d2.argmin(2)  # (B, K, H, W)
    n = points.shape[2]
    mine = owner[:, :, None] == torch.arange(n, device=maps.device)[None, None, :, None, None]
    region = mine & (maps[:, :, None] >= fraction * scores[..., None, None]) & valid[..., None, None]
    big = float(max(h, w))
    x0 = torch.where(region, gx, big).flatten(3).amin(-1)
    y0 = torch.where(region, gy, big).flatten(3).amin(-1)
    x1 = torch.where(region, gx, -1.0).flatten(3).amax(-1)
    y1 = torch.where(region, gy, -1.0).flatten(3).amax(-1)
    boxes = torch.stack([x0, y0, x1, y1], -1)
    if scale != 1:
        centre = (boxes[..., :2] + boxes[..., 2:] + 1) / 2  # continuous coordinates
        half = (boxes[..., 2:] - boxes[..., :2] + 1) / 2 * scale
        boxes = clip_boxes_to_image(torch.cat([centre - half, centre + half - 1], -1), (h - 1, w - 1))  # inclusive extents
    return torch.where(valid[..., None] & (x1 >= 0)[..., None], boxes, torch.zeros_like(boxes))


def sized_boxes(points: torch.Tensor, valid: torch.Tensor, sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One box of its class's size per peak, centred on the peak's pixel (cut to the map).

    Args:
        points: ``(B, K, N, 2)`` and valid ``(B, K, N)``: from :func:`find_peaks`.
        sizes: ``(K, 2)`` box width and height of each class, in map pixels.

    Returns:
        ``(B, K, N, 4)`` boxes ``x0, y0, x1, y1`` (inclusive pixel extents; zeros where not valid).
    """
    centre = points.float() + 0.5
    half = sizes.to(centre)[None, :, None, :] / 2
    boxes = clip_boxes_to_image(torch.cat([centre - half, centre + half - 1], -1), (height - 1, width - 1))  # inclusive extents
    return torch.where(valid[..., None], boxes, torch.zeros_like(boxes))


# A density peak's half-peak region spans about a cell or two of the map, whatever the object's size,
# so how much to widen it depends on how many cells an object covers; 2 was best on real data and
# close to the best on large synthetic shapes, but not on small ones, and sizes calibrated from a few
# boxes (:func:`~weakloc.evaluate.calibrate.calibrate_box_sizes`) beat every widening measured
# (docs/results.md, "Counting, seventh round").
REGION_BOX_SCALE = 2.0


def instances(maps: torch.Tensor, counts: torch.Tensor, kernel: int = 3, fraction: float = 0.5, scale: float = 1.0,
              sizes: torch.Tensor | None = None) -> Instances:
    """Peaks (:func:`find_peaks`) of ``(B, K, H, W)`` maps and their boxes: of the classes' ``sizes``
    ``(K, 2)`` (pixels; :func:`sized_boxes`) when given, else from the region around each peak
    (:func:`instance_boxes` with ``fraction`` and ``scale``)."""
    points, scores, valid = find_peaks(maps, counts, kernel)
    if sizes is not None:
        boxes = sized_boxes(points, valid, sizes, *maps.shape[-2:])
    else:
        boxes = instance_boxes(maps, points, scores, valid, fraction, scale)
    return Instances(points, scores, boxes, valid)


def _view(x: torch.Tensor, i: int) -> torch.Tensor:
    """View ``i`` of 8 (0-3: as is, flipped left-right, upside down, both; 4-7: the same after a transpose)."""
    x = x.transpose(-1, -2) if i >= 4 else x
    dims = {1: (-1,), 2: (-2,), 3: (-1, -2)}.get(i % 4)
    return x.flip(dims) if dims else x


def counting_forward(model, x: torch.Tensor, views: str = "none"):
    """A counting model's forward pass, averaged over test-time views.

    Counts do not change when an image is flipped (``flip``: left-right) or, for top-down images,
    turned by right angles (``dihedral``: all 8 orientations); averaging the views' counts and
    logits steadies the count before it is rounded. The maps stay the first view's: with the
    asymmetric 'same' padding of TF-style backbones a turned view's maps, turned back, sit a fraction
    of a cell off, and their average blurs the peaks that mark instances (docs/results.md,
    "Counting, fourth round").

    Args:
        model: a :class:`~weakloc.models.WeaklocNet` with a counting head; x: ``(B, 3, H, W)``.
        views: ``none``, ``flip`` or ``dihedral`` (:data:`~weakloc.config.COUNT_VIEWS`).

    Returns:
        a :class:`~weakloc.models.ModelOutput`: ``logits``, ``counts`` and ``head_counts`` averaged
        over the views, the rest the first view's.
    """
    if views not in COUNT_VIEW_PASSES:
        raise WeaklocError(f"unknown counting test-time views {views!r}: use one of {', '.join(COUNT_VIEW_PASSES)}")
    outs = [model.forward_maps(_view(x, i)) for i in range(COUNT_VIEW_PASSES[views])]
    if len(outs) == 1:
        return outs[0]
    mean = lambda name: None if getattr(outs[0], name) is None else torch.stack([getattr(o, name) for o in outs]).mean(0)  # noqa: E731
    return outs[0]._replace(logits=mean("logits"), counts=mean("counts"), head_counts=mean("head_counts"))


def predicted_counts(out, task: str = "multi") -> torch.Tensor:
    """Whole counts from a counting model's output, as ILC's evaluation makes them (Cholakkal et al.,
    CVPR 2019): the count rounded, and 0 for a class the classifier calls absent (``multi`` task:
    logit below 0), so a stray bit of density never counts an object the image does not hold.

    Args:
        out: a :class:`~weakloc.models.ModelOutput` with ``counts (B, K)`` and ``logits (B, K)``.
        task: the model's task; only ``multi`` (presence per class) gates the counts.

    Returns:
        ``(B, K)`` float tensor of whole counts, on the output's device.
    """
    counts = out.counts.float().clamp_min(0).round()
    return counts * (out.logits > 0).to(counts.dtype) if task == "multi" else counts


def output_instances(out, size: int, kernel: int | None = None, fraction: float = 0.5,
                     counts: torch.Tensor | None = None, box_sizes: torch.Tensor | None = None,
                     box_scale: float = REGION_BOX_SCALE) -> tuple[torch.Tensor, Instances]:
    """Instances of a counting model's forward pass at ``size × size`` pixels.

    Args:
        out: a :class:`~weakloc.models.ModelOutput` with ``counts``; peaks come from its density maps,
            or from the positive part of the CAMs for a model without a density head.
        kernel: suppression window (default: about a sixteenth of ``size``, odd, at least 3).
        counts: ``(B, K)`` whole counts, the number of instances kept per map (default
            :func:`predicted_counts` of ``out``).
        box_sizes: ``(K, 2)`` width and height of each class's boxes as fractions of the image
            (``ModelConfig.instance_box_sizes()``, from ``weakloc calibrate``); default: the
            half-peak region around each peak, widened ``box_scale`` times.

    Returns:
        the upsampled maps ``(B, K, size, size)`` and their :class:`Instances`.
    """
    maps = out.density if out.density is not None else out.class_maps.clamp_min(0)
    maps = upsample(maps.float(), (size, size))
    counts = predicted_counts(out) if counts is None else counts
    sizes = None if box_sizes is None else torch.as_tensor(box_sizes, dtype=torch.float32, device=maps.device) * size
    return maps, instances(maps, counts, kernel or max(3, size // 16 | 1), fraction, box_scale, sizes)
