"""The one map pipeline: every command that draws or scores a map (``explain``, ``localize``,
``evaluate``, ``calibrate``, ``explain-eval``, counting evaluation) makes it here.

1. :func:`map_settings` resolves the model's stored :class:`~weakloc.config.MapConfig` plus the
   caller's overrides (:func:`~weakloc.config.resolve_maps`) and checks the result before any
   image is read;
2. images are loaded at ``settings.test_size`` (the same side for every command);
3. :func:`make_maps` runs :func:`~weakloc.explain.explain` with exactly those settings.

So for one model and one set of options the maps behind all the commands are the same tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from weakloc.config import COUNT_VIEWS, FUSIONS, MapConfig, resolve_maps
from weakloc.errors import OptionError, WeaklocError
from weakloc.explain import Heatmaps, _method_options, explain
from weakloc.explain.maps import normalize_maps, parse_refine
from weakloc.explain.registry import get_method

#: ``MapConfig.dtype`` -> the autocast dtype (``--dtype`` also takes the long spellings)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "float32": None, "fp16": torch.float16, "float16": torch.float16,
                                                  "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def check_map_settings(settings: MapConfig, where: str = "") -> MapConfig:
    """``settings`` unchanged if every field is usable; else an :class:`~weakloc.errors.OptionError`
    naming the field (prefixed by ``where``, e.g. ``"--"`` for the command line)."""
    def name(field: str) -> str:
        return where + (field.replace("_", "-") if where.startswith("--") else field)

    try:
        method = get_method(settings.method)
    except WeaklocError as e:
        raise OptionError(f"{name('method')}: {e}") from None
    try:  # an unknown method option fails here, before any image is read
        _method_options(method, settings.method_options())
    except WeaklocError as e:
        raise OptionError(f"{name('option')}: {e}") from None
    if settings.fusion not in FUSIONS:
        raise OptionError(f"{name('fusion')}: {settings.fusion!r} is not one of {', '.join(FUSIONS)}")
    if settings.dtype is not None and settings.dtype not in AUTOCAST_DTYPES:
        raise OptionError(f"{name('dtype')}: {settings.dtype!r}: use fp32, fp16 or bf16")
    if settings.count_views not in COUNT_VIEWS:
        raise OptionError(f"{name('count_views')}: {settings.count_views!r} is not one of {', '.join(COUNT_VIEWS)}")
    for flag in ("tta", "eigen_smooth"):
        if not isinstance(getattr(settings, flag), bool):
            raise OptionError(f"{name(flag)}: expected true or false, got {getattr(settings, flag)!r}")
    try:
        normalize_maps(torch.zeros(1, 2, 2), settings.normalization)  # the parser itself, on a dummy map
    except (ValueError, TypeError) as e:
        raise OptionError(f"{name('normalization')}: {e}") from None
    try:
        parse_refine(settings.refine)
    except ValueError as e:
        raise OptionError(f"{name('refine')}: {e}") from None
    if isinstance(settings.test_size, bool) or not isinstance(settings.test_size, int) or not 16 <= settings.test_size <= 8192:
        raise OptionError(f"{name('test_size')}: expected a whole number of pixels in 16..8192, got {settings.test_size!r}")
    return settings


def map_settings(model, overrides: MapConfig | dict | None = None, **given: Any) -> MapConfig:
    """The checked settings ``model``'s maps are made with: the caller's ``overrides`` (a
    :class:`~weakloc.config.MapConfig` or a flat dict of settings and method options) and keyword
    settings (``None``: not given), over the model's stored ones, over the defaults."""
    return check_map_settings(resolve_maps(model.config, overrides, **given))


def explain_arguments(settings: MapConfig) -> dict:
    """:func:`~weakloc.explain.explain`'s keyword arguments for ``settings`` (but ``target``)."""
    layer = settings.layer
    if layer is not None and "," in layer:
        layer = [v.strip() for v in layer.split(",") if v.strip()]
    return {"method": settings.method, "layer": layer, "fusion": settings.fusion, "tta": settings.tta,
            "eigen_smooth": settings.eigen_smooth, "dtype": AUTOCAST_DTYPES[settings.dtype] if settings.dtype else None,
            "normalization": settings.normalization, "refine": settings.refine, **settings.method_options()}


def make_maps(model, images: torch.Tensor, settings: MapConfig, target="predicted", **extra: Any) -> Heatmaps:
    """Maps of ``images`` ``(B, 3, S, S)`` -- normalised at ``settings.test_size`` -- made with
    ``settings`` (from :func:`map_settings`) for ``target``; ``extra`` goes to
    :func:`~weakloc.explain.explain` as well (``size``, ``relu``, ``differentiable``)."""
    return explain(model, images, target=target, **explain_arguments(settings), **extra)
