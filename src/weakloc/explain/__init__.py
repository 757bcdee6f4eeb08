"""Heatmaps: where the model found the evidence.

>>> maps = explain(model, images, method="cam", target="predicted")
>>> maps.normalized.shape   # (B, T, H, W), on the images' device
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch

from weakloc.checks import check_choice, check_float, check_int
from weakloc.errors import OptionError, WeaklocError
from weakloc.explain.maps import centre_gaussian, normalize_maps, normalize_minmax, parse_refine, reduce_maps, refine_maps, upsample
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


# Range of the methods' shared option names; a method that takes one of them gets it checked here,
# once, instead of failing deep inside (a chunk of 0 never ends, num_samples=0 divides by zero).
_OPTION_RANGES = {
    "chunk": ("int", 1, None), "num_samples": ("int", 1, None), "n_compare": ("int", 1, None), "seed": ("int", 0, None),
    "std": ("float", 0.0, None), "alpha": ("float", None, None), "discard_ratio": ("float", 0.0, 1.0),
    "differentiable": ("bool",), "positive_weights": ("bool",), "eigen_smooth": ("bool",), "aperture": ("float", 0.0, None),
}


def _method_options(m: ExplainMethod, options: dict) -> dict:
    accepted = inspect.signature(m.fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            allowed = [n for n, p in accepted.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
            raise WeaklocError(f"method {m.name!r} takes no option(s) {unknown}; its options: {allowed or 'none'}")
    for name, value in options.items():
        rule = _OPTION_RANGES.get(name)
        if rule is None:
            continue
        if rule[0] == "bool":
            if not isinstance(value, bool):
                raise OptionError(f"option {name}: expected true or false, got {value!r}")
        elif rule[0] == "int":
            check_int(f"option {name}", value, rule[1], rule[2])
        else:
            check_float(f"option {name}", value, rule[1], rule[2])
    return options


def _check_inputs(model, images, size, fusion, dtype, target) -> None:
    """Refuse arguments that would fail deep inside a method, or give maps of the wrong thing."""
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"model: expected a torch module (a weakloc model or a timm classifier), got {type(model).__name__}; "
                          "load a model folder with weakloc.load_model(PATH)")
    if not isinstance(images, torch.Tensor):
        raise OptionError(f"images: expected a (B, 3, H, W) float tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise OptionError(f"images: expected a (B, C, H, W) batch, got shape {tuple(images.shape)} "
                          "(add a batch dimension with images[None])")
    if not images.is_floating_point():
        raise OptionError(f"images: expected normalised float images, got {images.dtype} "
                          "(convert with the model's transform, e.g. weakloc.data.dataset.eval_transform)")
    if images.shape[0] == 0 or images.shape[-1] == 0 or images.shape[-2] == 0:
        raise OptionError(f"images: empty batch or zero-size images, shape {tuple(images.shape)}")
    want = _in_channels(model)
    if want is not None and images.shape[1] != want:
        raise OptionError(f"images: the model takes {want}-channel images, got {images.shape[1]} channel(s)")
    if size is not None and size != "native":
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
            raise OptionError(f"size: expected (H, W) with both >= 1, or 'native', got {size!r}")
    if fusion not in ("mean", "max", "product"):
        raise OptionError(f"unknown fusion {fusion!r}: use mean, max or product")
    check_choice("dtype", dtype, (None, torch.float16, torch.bfloat16, torch.float32))
    if isinstance(target, (bool, float)) or (isinstance(target, torch.Tensor) and target.is_floating_point()):
        raise OptionError(f"target: expected 'predicted', 'all', 'topK', a class name or index, or integer tensors, got {target!r}")
    if isinstance(target, (list, tuple)) and any(isinstance(t, (bool, float)) for t in target):
        raise OptionError("target: per-image targets must be class names or integer indices")


def _in_channels(model) -> int | None:
    """Input channels of the model's first convolution (None when it has none)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            return mod.in_channels
    return None


def _layers(layer) -> list[str | None]:
    if layer is None:
        return [None]
    if isinstance(layer, str):
        return [part.strip() for part in layer.split(",") if part.strip()] or [None]
    return list(layer)


def _one_pass(m: ExplainMethod, model, images, targets_fn, layers, size, relu, fusion, options):
    """Maps of every layer at ``size``, fused: ``(B, T, H, W)`` raw (one layer) or fused normalised maps."""
    maps, targets, logits = [], None, None
    for lay in layers:
        raw, targets, logits = m.fn(model, images, targets_fn, lay, **options)
        targets_fn = _fixed(targets)  # every layer explains the same targets
        maps.append(raw.float() if size == "native" else upsample(raw.float(), size))
    if len(maps) == 1:
        return maps[0], targets, logits
    normed = torch.stack([normalize_minmax(x, relu=relu) for x in maps])
    if fusion not in ("mean", "max", "product"):
        raise WeaklocError(f"unknown fusion {fusion!r}: use mean, max or product")
    return reduce_maps(normed, fusion), targets, logits


def _fixed(targets: torch.Tensor):
    return lambda _logits: targets


def explain(
    model,
    images: torch.Tensor,
    method: str = "cam",
    target: TargetSpec = "predicted",
    layer: str | Sequence[str] | None = None,
    size: tuple[int, int] | str | None = None,
    relu: bool | None = None,
    *,
    fusion: str = "mean",
    tta: bool = False,
    eigen_smooth: bool = False,
    dtype: torch.dtype | None = None,
    differentiable: bool = False,
    normalization: str = "minmax",
    refine: str = "none",
    **options,
) -> Heatmaps:
    """Heatmaps of ``method`` for a batch of normalised images ``(B, 3, H, W)``.

    Args:
        model: a :class:`~weakloc.models.WeaklocNet`, or any timm classifier (in eval mode).
        method: a name from :data:`METHODS` (``weakloc methods`` lists them).
        target: see :func:`resolve_targets` -- ``"predicted"``, ``"all"``, ``"top3"``, a class
            name or index, or a per-image list.
        layer: target layer name (default: the last feature map, chosen per architecture); several
            names (a list or ``"a,b"``) give one map per layer, normalised and fused.
        size: output ``(H, W)``; default the input's size. Upsampling is bicubic. ``"native"``
            keeps each layer's own resolution (one layer only), e.g. for all-class CAMs of a
            1,000-class model, which would not fit in memory at the input's size.
        relu: clamp negatives before normalising (default: the method's convention).
        fusion: how several layers' maps combine: ``mean``, ``max`` or ``product``.
        tta: test-time augmentation smoothing -- the mean of the normalised maps of the input
            flipped or not and scaled by 0.9, 1 and 1.1 (pytorch-grad-cam's ``aug_smooth``), all
            for the clean input's targets.
        eigen_smooth: the first principal component of the weighted activations instead of their
            sum (channel-weighted methods).
        dtype: ``torch.float16`` or ``torch.bfloat16`` to run the model under autocast; maps come
            back in float32.
        differentiable: keep the autograd graph (CAM and gradient methods), so the maps can be
            part of a training loss.
        normalization: how ``normalized`` is made: ``minmax``, ``max``, ``pas[:Q]`` (Bae et al.
            2020) or ``ivr[:Q]`` (Kim et al. 2021); see :func:`normalize_maps`.
        refine: ``none`` or ``guided[:R[,EPS]]``: the maps (at ``size``) smoothed by a guided filter
            with the image as guide, so their edges follow the image's (see
            :func:`~weakloc.explain.maps.refine_maps`); not with ``size="native"``.
        **options: method-specific settings, e.g. ``num_samples``, ``std``, ``chunk``, ``alpha``.

    Returns:
        :class:`Heatmaps` on the images' device: raw and normalised maps ``(B, T, H, W)``, targets
        ``(B, T)``, logits ``(B, K)``. A multi-layer or ``tta`` result's ``raw`` is the fused
        normalised map.
    """
    m = get_method(method)
    _check_inputs(model, images, size, fusion, dtype, target)
    if relu is not None and not isinstance(relu, bool):
        raise OptionError(f"relu: expected True, False or None, got {relu!r}")
    if images.dtype == torch.float64:  # the models' weights are float32; a float64 batch is the same images
        images = images.float()
    relu = m.relu if relu is None else relu
    options = dict(options)
    if eigen_smooth:
        options["eigen_smooth"] = True
    if differentiable:
        options["differentiable"] = True
    options = _method_options(m, options)
    classes = getattr(getattr(model, "config", None), "classes", None)
    size = size or tuple(images.shape[-2:])
    layers = _layers(layer)
    if size == "native" and (len(layers) > 1 or tta):
        raise WeaklocError('size="native" keeps a layer\'s own resolution: it cannot fuse several layers or average TTA views')
    try:
        refining = parse_refine(refine)[0] != "none"
    except ValueError as e:
        raise OptionError(str(e)) from None
    if size == "native" and refining:
        raise WeaklocError('size="native" keeps a layer\'s own resolution: the maps cannot be refined with the image')
    autocast = torch.autocast(images.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        raw, targets, logits = _one_pass(m, model, images, lambda lg: resolve_targets(target, lg, classes or [str(i) for i in range(lg.shape[1])]),
                                         layers, size, relu, fusion, options)
        if tta:
            acc = normalize_minmax(raw, relu=relu)
            views = [(flip, scale) for flip in (False, True) for scale in (0.9, 1.0, 1.1) if (flip, scale) != (False, 1.0)]
            for flip, scale in views:
                x = images * scale
                x = x.flip(-1) if flip else x
                r, _, _ = _one_pass(m, model, x, _fixed(targets), layers, size, relu, fusion, options)
                acc = acc + normalize_minmax(r.flip(-1) if flip else r, relu=relu)
            raw = acc / (len(views) + 1)
    raw = raw.float()
    if refining:
        raw = refine_maps(raw.clamp_min(0) if relu else raw, images, refine)
    try:
        normalized = normalize_maps(raw, normalization, relu=relu)
    except ValueError as e:
        raise WeaklocError(str(e)) from None
    return Heatmaps(raw, normalized, targets, logits.float())


__all__ = [
    "METHODS", "ExplainMethod", "Heatmaps", "centre_gaussian", "explain", "get_method", "normalize_maps", "normalize_minmax",
    "register", "resolve_targets", "upsample",
]
