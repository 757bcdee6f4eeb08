"""weakloc: where is it, and how many? Weakly-supervised localization from image-level labels.

>>> from weakloc import fine_tune, load_model, explain, localize, evaluate, calibrate
>>> result = fine_tune("data/shapes", "runs/shapes", input_size=160, epochs=8)
>>> maps = explain(result.model, images, "gradcam")           # (B, T, H, W) maps on the images' device
>>> detections = localize(result.model, "photos/", "out/")     # boxes, masks, overlays, detections.json
>>> report = evaluate(result.model, "data/shapes", "data/shapes/annotations.json")
>>> report.localization.max_box_acc_v2, report.to_dict()

The names below load on first use, so ``import weakloc`` (and the command line) stays quick; the
stages are also usable one by one from their packages (``weakloc.data``, ``weakloc.models``,
``weakloc.explain``, ``weakloc.localize``, ``weakloc.evaluate``, ``weakloc.train``,
``weakloc.report``; docs/architecture.md). ``weakloc.explain``, ``weakloc.localize`` and
``weakloc.evaluate`` are both: the packages (``import weakloc.localize.regions``,
``from weakloc.evaluate import calibrate``) and, called, the functions of the same name.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types

from weakloc._version import __version__

#: the subpackages that are also the API's functions when called: name -> (module, function)
CALLABLE_PACKAGES: dict[str, tuple[str, str]] = {
    "explain": ("weakloc.explain", "explain"),
    "localize": ("weakloc.report.localization", "localize_images"),
    "evaluate": ("weakloc.evaluate.run", "evaluate_model"),
}

#: the public API: name -> (module, attribute)
API: dict[str, tuple[str, str]] = {
    # configuration
    "ModelConfig": ("weakloc.config", "ModelConfig"),
    "TrainConfig": ("weakloc.config", "TrainConfig"),
    "MapConfig": ("weakloc.config", "MapConfig"),
    # data
    "load_labels": ("weakloc.data.labels", "load_labels"),
    "load_count_labels": ("weakloc.data.counts", "load_count_labels"),
    "read_annotations": ("weakloc.data.annotations", "read_annotations"),
    "SyntheticConfig": ("weakloc.data.synthetic", "SyntheticConfig"),
    "write_synthetic": ("weakloc.data.synthetic", "write_synthetic"),
    # models
    "load_model": ("weakloc.models.checkpoint", "load_model"),
    "save_model": ("weakloc.models.checkpoint", "save_model"),
    "load_model_spec": ("weakloc.models.external", "load_model_spec"),
    "WeaklocNet": ("weakloc.models.classifier", "WeaklocNet"),
    # training
    "fine_tune": ("weakloc.train.fit", "fine_tune"),
    "TrainResult": ("weakloc.train.fit", "TrainResult"),
    # maps
    "METHODS": ("weakloc.explain.registry", "METHODS"),
    "map_settings": ("weakloc.explain.pipeline", "map_settings"),
    "explain_images": ("weakloc.report.explanation", "explain_images"),
    # localization and counting
    "LocalizationResult": ("weakloc.localize.run", "LocalizationResult"),
    # evaluation and calibration
    "EvaluationReport": ("weakloc.evaluate.run", "EvaluationReport"),
    "calibrate": ("weakloc.evaluate.calibrate", "calibrate"),
    "CalibrationResult": ("weakloc.evaluate.calibrate", "CalibrationResult"),
    "calibrate_box_sizes": ("weakloc.evaluate.calibrate", "calibrate_box_sizes"),
    "evaluate_counts": ("weakloc.evaluate.counting", "evaluate_counts"),
    "CountingReport": ("weakloc.evaluate.counting", "CountingReport"),
    "explain_eval": ("weakloc.evaluate.explain_eval", "explain_eval"),
    "top_losses": ("weakloc.report.interpretation", "top_losses"),
    # the offline demo
    "run_demo": ("weakloc.demo", "run_demo"),
}

__all__ = ["__version__", *CALLABLE_PACKAGES, *API]


class _CallablePackage(types.ModuleType):
    """A subpackage that is also a function: ``weakloc.localize(model, images)`` calls
    :func:`weakloc.report.localization.localize_images`, while ``import weakloc.localize.regions``
    and ``from weakloc.localize import region_boxes`` work as for any package."""

    def __call__(self, *args, **kwargs):
        return self.__function__(*args, **kwargs)

    @property
    def __function__(self):
        module, attribute = CALLABLE_PACKAGES[self.__name__.rpartition(".")[2]]
        return getattr(importlib.import_module(module), attribute)

    @functools.cached_property
    def __signature__(self):
        return inspect.signature(self.__function__)


class _Package(types.ModuleType):
    """``weakloc`` itself: the API names load on first use; ``explain``, ``localize`` and
    ``evaluate`` are their subpackages, made callable (:class:`_CallablePackage`) however they were
    first imported."""

    def __getattr__(self, name: str):
        if name in CALLABLE_PACKAGES:
            return importlib.import_module(f"{__name__}.{name}")  # the import sets the attribute (__setattr__)
        if name not in API:
            raise AttributeError(f"module 'weakloc' has no attribute {name!r}")
        module, attribute = API[name]
        value = getattr(importlib.import_module(module), attribute)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if name in CALLABLE_PACKAGES and type(value) is types.ModuleType:
            value.__class__ = _CallablePackage
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(API) | set(CALLABLE_PACKAGES))


sys.modules[__name__].__class__ = _Package
