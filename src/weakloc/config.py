"""The typed configuration: what a model *is*, how it was *trained*, and how its maps are *made*.

Three dataclasses, one name per setting in the CLI (``--name-with-dashes``), the Python API
(keyword ``name_with_underscores``) and ``config.json`` (key ``name_with_underscores``):

- :class:`ModelConfig` -- backbone, head, classes, input size, normalisation; enough to rebuild
  the network.
- :class:`TrainConfig` -- optimiser, schedule, augmentation, losses and their weights; what
  :func:`~weakloc.train.fine_tune` ran with (kept in ``config.json`` for the record).
- :class:`MapConfig` -- method, layer(s), fusion, options, normalisation, test-time input size,
  box threshold, counting views, instance box sizes, and where each calibrated value came from
  (``sources``). Stored in the model; every command that draws or scores a map resolves the
  stored settings plus the caller's overrides with :func:`resolve_maps`.

``config.json`` holds the model's fields at the top level, ``maps`` and ``train`` as objects and
``format_version`` :data:`FORMAT_VERSION`. Folders written before the typed configuration
(``format_version`` 1, with a free-form ``localization`` object) still load: :func:`upgrade_v1`
maps every old key onto :class:`MapConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from weakloc.text import class_name_problem
from weakloc.errors import CheckpointError, OptionError

#: timm name of the backbone used when none is given (offline ImageNet weights ship with weakloc)
DEFAULT_BACKBONE = "tf_efficientnet_lite0"
TASKS = ("single", "multi")
HEADS = ("cam", "attention", "tap")
COUNTING = ("density", "count", "both")
#: the ``format_version`` this weakloc writes
FORMAT_VERSION = 2
#: ``format_version`` values this weakloc reads; a config.json from a newer weakloc may mean other things
FORMAT_VERSIONS = (1, 2)
#: sides of a square input (pixels) a config may ask for; larger ones would exhaust memory, not run
INPUT_SIZES = (16, 8192)
#: fusions of several layers' maps (see :func:`weakloc.explain.explain`)
FUSIONS = ("mean", "max", "product")
#: test-time views a counting model's counts are averaged over
COUNT_VIEWS = ("none", "flip", "dihedral")
#: ``MapConfig.dtype`` spellings
DTYPES = ("fp32", "fp16", "bf16")
#: box threshold of a model that was never calibrated (``localize``'s ``auto``)
DEFAULT_BOX_THRESHOLD = 0.3
#: fixed threshold of GT-known / Top-1 Loc for a model that was never calibrated (the CAM paper's)
DEFAULT_GT_KNOWN_THRESHOLD = 0.2
#: both of them for maps refined with the image (``refine`` other than none): a refined map's edges are
#: the image's while its flat surroundings keep a spread of the map, so the customary fractions of
#: the maximum cut far outside the object (docs/models.md, "Default map options")
REFINED_THRESHOLD = 0.5


def fallback_threshold(refine: str | None, default: float) -> float:
    """The box threshold of a never-calibrated model: ``default`` for plain maps,
    :data:`REFINED_THRESHOLD` for maps refined with the image."""
    return default if refine in (None, "none") else REFINED_THRESHOLD

# timm names, with an optional ".tag"; no "hf-hub:" names or paths, which make timm fetch or read files
_BACKBONE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


@dataclass
class MapConfig:
    """How a model's maps are made, and where each stored value came from.

    Every field may be stored in the model (``config.json``'s ``maps``) and overridden per call
    (:func:`resolve_maps`). ``None`` means "not set": the model's value, else the default.

    Attributes:
        method: heatmap method (``weakloc methods``).
        layer: target layer(s), comma-separated for fusion (None: the last feature map).
        fusion: how several layers' maps combine: ``mean``, ``max`` or ``product``.
        tta: smooth maps over flips and scales 0.9/1/1.1.
        eigen_smooth: first principal component of the weighted activations instead of their sum.
        dtype: ``fp16`` or ``bf16`` autocast for the model (maps stay fp32); ``fp32``/None: none.
        normalization: how maps go to [0, 1]: ``minmax``, ``max``, ``pas[:Q]`` or ``ivr[:Q]``.
        refine: ``none`` or ``guided[:R[,EPS]]``: maps smoothed along the image's edges before
            normalisation (a guided filter with the image as guide).
        options: further options per method (``{"cam": {"positive_weights": true}}``).
        test_size: side of the input maps, boxes and predictions are made on (None: the training
            size; a fully convolutional model run on a larger input gives denser maps).
        threshold: the box threshold (a fraction of each map's range) chosen by calibration.
        count_views: counting models: test-time views counts are averaged over (``none``,
            ``flip``, ``dihedral``).
        box_sizes: counting models: each class's instance box ``[width, height]`` as fractions
            of the image, chosen by calibration.
        sources: where stored values came from: setting name -> ``{"by": ..., ...}`` (e.g. the
            split, images per class and seed of a calibration).
    """

    method: str | None = None
    layer: str | None = None
    fusion: str | None = None
    tta: bool | None = None
    eigen_smooth: bool | None = None
    dtype: str | None = None
    normalization: str | None = None
    refine: str | None = None
    options: dict[str, dict] = field(default_factory=dict)
    test_size: int | None = None
    threshold: float | None = None
    count_views: str | None = None
    box_sizes: dict[str, list[float]] | None = None
    sources: dict[str, dict] = field(default_factory=dict)

    def method_options(self, method: str | None = None) -> dict:
        """The extra options stored for ``method`` (default: this config's method, else ``cam``)."""
        return dict(self.options.get(method or self.method or "cam", {}))

    def to_dict(self) -> dict:
        return asdict(self)


#: map methods that draw a regressed box, not evidence: the second stage's box regressor. Unless the
#: caller asks otherwise they run at the model's training size whatever test size is stored (the
#: regressor learnt the sides' distances at that scale, and a test-size input resized down to it is
#: blurred out of what it learnt), and unrefined (the stored refine is the classifier's maps'; a
#: guided filter only blurs a 0/1 rectangle) -- docs/results.md, whole objects, ninth round
BOX_METHODS = frozenset({"box"})
#: :class:`MapConfig` fields that are map-making settings (the rest are calibration results and notes)
MAP_SETTINGS = ("method", "layer", "fusion", "tta", "eigen_smooth", "dtype", "normalization", "refine", "test_size", "count_views")
#: defaults of the settings when neither the model nor the caller sets them
MAP_DEFAULTS = {"method": "cam", "fusion": "mean", "tta": False, "eigen_smooth": False, "normalization": "minmax", "refine": "none",
                "count_views": "none"}


@dataclass
class TrainConfig:
    """How a model is trained (:func:`~weakloc.train.fine_tune`); the CLI's ``weakloc train`` options.

    Attributes:
        pretrained: ``imagenet`` (offline for EfficientNet-Lite0, else timm's download), ``none``
            (random initialisation) or a backbone weights file (safetensors, or a tensors-only ``.pth``).
        epochs, freeze_epochs: epochs in all, and with the backbone frozen first (head warm-up).
        frozen_stages: the stem and this many first stages of the backbone (``feature_info``
            order; Detectron2's ``FREEZE_AT``) never train: their generic low-level filters stay
            ImageNet's, and backpropagation stops above them, which saves a large share of each
            step on the CPU (0: every layer trains after the warm-up).
        batch_size, lr: batch size and the head's peak learning rate.
        backbone_lr: (earliest, latest) multipliers of ``lr`` for the backbone's layer groups
            (None: (0.01, 0.3); (0.3, 1.0) with counting, whose early layers must learn to tell
            single objects apart).
        weight_decay, schedule, label_smoothing: AdamW's decay, ``onecycle`` or ``cosine``, and
            single-label cross entropy's smoothing.
        val_fraction, seed: the seeded validation split (when the data has none) and the seed.
        precision, accelerator, devices, workers: Lightning's precision (None: ``16-mixed`` on a
            GPU, ``32-true`` on the CPU), accelerator, devices per node and DataLoader workers
            (None: none on a 2-core machine). Several devices train one process each (PyTorch's
            distributed data parallel); on the CPU only with ``accelerator`` ``cpu`` said outright.
        strategy: Lightning's strategy: ``auto`` (one process per device; ``ddp`` for several),
            ``ddp`` (this command started again once per extra device, or the processes torchrun
            started) or ``ddp_spawn`` (processes spawned from this one).
        num_nodes: machines training together (None: 1, or as many as torchrun's ``--nnodes``).
            ``batch_size`` is per process: the effective batch is ``batch_size`` times the number
            of processes; ``lr`` is used as given, never scaled with it.
        crop_scale: random resized crop area range (None: (0.35, 1.0); (1.0, 1.0) with counts).
        dihedral: also flip vertically and rotate by right angles (top-down images).
        monitor: the validation metric that picks the best epoch.
        limit_batches: cap batches per epoch (smoke tests).
        loss, focal_gamma: ``ce`` or ``focal`` and its focusing parameter.
        balanced: class-balanced sampling (rare positives; rare counts with counting labels).
        count_loss, count_weight: ``poisson`` or ``huber`` on counts, and its weight.
        density_l1, density_tv, density_gather, crop_consistency: density-map losses' weights.
        hide_prob, hide_grid: Hide-and-Seek (each of ``hide_grid``² patches hidden with this probability).
        cutmix_alpha: CutMix with Beta(alpha, alpha) areas (0: off; not with counts).
        ema_decay: a moving average of the weights with this decay per step (0: off).
        swa: stochastic weight averaging (Izmailov et al. 2018) over this last fraction of the run's
            steps (0: off): the learning rate is held where the fraction starts and the weights
            seen there are averaged uniformly; the average is validated and the last epoch's kept
            (not the best epoch's). Not with ``ema_decay``.
        align_weight, consistency_weight: feature-class-weight alignment and attentive-dropout
            consistency losses (Kim et al. 2022; 0: off).
        teacher_method, teacher_threshold: second stage (a ``teacher`` model given): its map method
            and pseudo-mask threshold (None: the teacher's calibrated ones, else ``cam`` and 0.2).
        test_scale: maps and boxes of the trained model are made on inputs this many times the
            training size (stored as ``MapConfig.test_size``; 1: the training size; not for
            counting models, the attention head or transformers).
    """

    pretrained: str = "imagenet"
    epochs: int = 5
    freeze_epochs: int = 1
    frozen_stages: int = 0
    batch_size: int = 32
    lr: float = 2e-3
    backbone_lr: tuple[float, float] | None = None
    weight_decay: float = 0.01
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    val_fraction: float = 0.2
    seed: int = 0
    precision: str | None = None
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int | None = None
    workers: int | None = None
    crop_scale: tuple[float, float] | None = None
    dihedral: bool = False
    monitor: str = "val_loss"
    limit_batches: float | int | None = None
    loss: str = "ce"
    focal_gamma: float = 2.0
    balanced: bool = False
    count_loss: str = "poisson"
    count_weight: float = 1.0
    density_l1: float = 0.0
    density_tv: float = 0.0
    density_gather: float = 0.0
    crop_consistency: float = 0.0
    hide_prob: float = 0.0
    hide_grid: int = 4
    cutmix_alpha: float = 0.0
    ema_decay: float = 0.0
    swa: float = 0.0
    align_weight: float = 0.0
    consistency_weight: float = 0.0
    teacher_method: str | None = None
    teacher_threshold: float | None = None
    test_scale: float = 2.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelConfig:
    """What a model is: everything needed to rebuild it, stored as ``config.json`` beside the weights.

    Attributes:
        backbone: timm model name.
        classes: class names in output order.
        task: ``single`` (softmax) or ``multi`` (sigmoid per class).
        input_size: side of the square training input.
        mean, std: input normalisation (None: the backbone's own, from timm's pretrained config).
        output_stride: timm ``output_stride`` (16 or 8 dilate the last stages; None = native 32).
        drop_rate: channel dropout before the classifier during training.
        head: ``cam`` (1x1 classifier + global average pooling), ``attention`` (trainable attention
            on ``attention_stages``, see :class:`~weakloc.models.heads.AttentionHead`) or ``tap``
            (thresholded average pooling at ``tap_threshold``).
        attention_stages: ``feature_info`` indices of the stages the attention head attends.
        attention_norm: ``softmax`` or ``sigmoid`` attention.
        cbam_stages: ``feature_info`` indices of stages followed by a CBAM block.
        adl_stages: ``feature_info`` indices of stages followed by an attention-based dropout layer
            (training only; erases the most discriminative region so evidence spreads).
        tap_threshold: TAP's fraction of each channel's maximum.
        positive_class: the "yes" class of a two-class task, else None.
        decision_threshold: probability above which the positive class is predicted (chosen on
            validation for yes/no tasks; None: the arg-max).
        counting: a counting head beside the classifier: ``density``, ``count`` or ``both``
            (see :class:`~weakloc.models.heads.CountingHead`), or None.
        density_stage: ``feature_info`` index of the stage the density head reads (None: the last
            feature map). An earlier stage has a receptive field near an object's size, so its
            density must come from each object's own pixels and peaks on the instances.
        density_hidden: channels of the density head's 3x3 convolution (0: a 1x1 convolution alone).
        density_context: the density head also reads the last feature map, upsampled onto the
            stage's grid (needs ``density_stage`` and ``density_hidden``).
        localizer: a second-stage localizer head trained on a first-stage model's pseudo-masks
            (PSOL's idea; see ``fine_tune(teacher=)``); its maps are the method ``localizer``.
        box_head: a second-stage class-agnostic box regressor trained on the first-stage model's
            pseudo-boxes (:class:`~weakloc.models.heads.BoxHead`); its box is the method ``box``.
        box_backbone: the box head's own network, a timm backbone name (PSOL's separate light
            localizer): the box head reads its features, not the classifier's, and the classifier
            is the teacher's, kept frozen (``fine_tune(teacher=)``). None: one shared backbone.
        maps: how the model's maps are made (:class:`MapConfig`).
        train: how the model was trained (:class:`TrainConfig`), None when unknown.
        format_version: the ``config.json`` format (:data:`FORMAT_VERSION`).
    """

    backbone: str = DEFAULT_BACKBONE
    classes: list[str] = field(default_factory=list)
    task: str = "single"
    input_size: int = 224
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output_stride: int | None = None
    drop_rate: float = 0.2
    head: str = "cam"
    attention_stages: list[int] = field(default_factory=lambda: [-3, -2])
    attention_norm: str = "softmax"
    cbam_stages: list[int] = field(default_factory=list)
    adl_stages: list[int] = field(default_factory=list)
    tap_threshold: float = 0.1
    positive_class: int | None = None
    decision_threshold: float | None = None
    counting: str | None = None
    density_stage: int | None = None
    density_hidden: int = 0
    density_context: bool = False
    localizer: bool = False
    box_head: bool = False
    box_backbone: str | None = None
    maps: MapConfig = field(default_factory=MapConfig)
    train: TrainConfig | None = None
    format_version: int = FORMAT_VERSION

    def inference_size(self, method: str | None = None) -> int:
        """Side of the input for maps, boxes and predictions: ``maps.test_size``, else the training
        size (always the training size for ``method`` in :data:`BOX_METHODS`)."""
        if self.maps.test_size is None or method in BOX_METHODS:
            return int(self.input_size)
        return int(self.maps.test_size)

    def instance_box_sizes(self) -> list[list[float]] | None:
        """Counting models: each class's instance box ``[width, height]`` (fractions of the image) in
        class order, as calibration stored them; None when not calibrated."""
        stored = self.maps.box_sizes
        if not stored:
            return None
        missing = [c for c in self.classes if c not in stored]
        if missing:
            raise CheckpointError(f"maps.box_sizes in the model's config.json has no size for {', '.join(missing)}: "
                                  "run weakloc calibrate again")
        return [list(map(float, stored[c])) for c in self.classes]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["format_version"] = FORMAT_VERSION
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "config") -> ModelConfig:
        """The config in ``text`` (config.json, format 1 or 2), checked field by field.

        Raises:
            CheckpointError: not JSON, not an object, or a field of the wrong type or value; the
                message names ``where`` and the field.
        """
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError; too many digits; nesting too deep
            raise CheckpointError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(raw, where)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "config") -> ModelConfig:
        """:meth:`from_json` for decoded JSON."""
        validate_config(raw, where)
        raw = dict(raw)
        if raw.get("format_version", 1) == 1:
            raw = upgrade_v1(raw)
        maps = MapConfig(**raw.pop("maps", {}) or {})
        train_raw = raw.pop("train", None)
        train = TrainConfig(**{**train_raw, **_pairs(train_raw)}) if train_raw is not None else None
        values = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                  for f in fields(cls) if f.name not in ("maps", "train")}
        values.update(raw)
        values["mean"] = tuple(values["mean"] or IMAGENET_DEFAULT_MEAN)
        values["std"] = tuple(values["std"] or IMAGENET_DEFAULT_STD)
        values["format_version"] = FORMAT_VERSION
        return cls(**values, maps=maps, train=train)


def _pairs(raw: dict) -> dict:
    """JSON lists of TrainConfig's pairs back as tuples."""
    return {k: tuple(raw[k]) for k in ("backbone_lr", "crop_scale") if isinstance(raw.get(k), list)}


# --- reading format 1 ----------------------------------------------------------------------------

#: format 1's ``localization`` keys and the :class:`MapConfig` field each became
V1_LOCALIZATION = {"threshold": "threshold", "method": "method", "input_size": "test_size", "options": "options",
                   "count_tta": "count_views", "box_sizes": "box_sizes"}


def upgrade_v1(raw: dict) -> dict:
    """A format-1 config (its ``localization`` a free-form dict) as a format-2 one: each known key on
    its :class:`MapConfig` field (a calibrated normalisation stays the option of its method, as
    before), and the notes (``calibrated_on``, ``per_class``, ``box_sizes_from``, ``note``, ...) in ``sources``."""
    out = {k: v for k, v in raw.items() if k != "localization"}
    loc = dict(raw.get("localization") or {})
    maps: dict = {V1_LOCALIZATION[k]: loc.pop(k) for k in list(loc) if k in V1_LOCALIZATION}
    sources: dict[str, dict] = {}
    calibrated = {k: loc.pop(k) for k in ("calibrated_on", "per_class") if k in loc}
    if calibrated:
        note = {"by": "calibration (format 1)", **({"images": calibrated["calibrated_on"]} if "calibrated_on" in calibrated else {}),
                **({"per_class": calibrated["per_class"]} if "per_class" in calibrated else {})}
        for key in ("threshold", "method", "test_size"):
            if key in maps:
                sources[key] = dict(note)
    if "box_sizes_from" in loc:
        sources["box_sizes"] = {"by": "calibration (format 1)", "images": loc.pop("box_sizes_from")}
    if loc:  # free notes, kept as they were
        sources["localization"] = {"by": "format 1 notes", **loc}
    if sources:
        maps["sources"] = sources
    out["maps"] = maps
    out["format_version"] = FORMAT_VERSION
    return out


# --- validation of decoded JSON ------------------------------------------------------------------

def _show(value: Any, limit: int = 80) -> str:
    """``value`` as JSON on one printable line, shortened to about ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# bool is refused where numbers are meant (JSON true is not 1), and numbers must be finite (Python's
# json reads NaN and Infinity).
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer beyond any float
        return False


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _is_backbone_name(v: Any) -> bool:
    return isinstance(v, str) and bool(_BACKBONE_NAME.fullmatch(v))


def _int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and lo <= v <= hi


def _number_in(lo: float, hi: float, *, open_low: bool = False) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and (lo < v if open_low else lo <= v) and v <= hi


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    # same type as well as equal: 8.0 is not the output stride 8, nor true the version 1
    return lambda v: any(type(v) is type(c) and v == c for c in choices)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _list_of(check: Callable[[Any], bool], length: int | None = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and (length is None or len(v) == length) and all(check(x) for x in v)


def _dict_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(check(x) for x in v.values())


_Rule = tuple[Callable[[Any], bool], str]
_SIZE_RULE: _Rule = (_int_in(*INPUT_SIZES), f"a whole number of pixels in {INPUT_SIZES[0]}..{INPUT_SIZES[1]}")
_OBJECT: _Rule = (lambda v: isinstance(v, dict), "an object")

#: config.json's model fields: a check of the JSON value and what the field must be (the error's words)
CONFIG_SCHEMA: dict[str, _Rule] = {
    "backbone": (_is_backbone_name, "a timm model name (letters, digits, '_', '-', '.')"),
    "classes": (_list_of(lambda v: isinstance(v, str)), "a list of class names"),
    "task": (_one_of(*TASKS), " or ".join(map(repr, TASKS))),
    "input_size": _SIZE_RULE,
    "mean": (_optional(_list_of(_is_number, 3)), "3 finite numbers"),
    "std": (_optional(_list_of(_number_in(0, math.inf, open_low=True), 3)), "3 positive numbers"),
    "output_stride": (_one_of(None, 8, 16, 32), "null, 8, 16 or 32"),
    "drop_rate": (_number_in(0, 1), "a number in [0, 1]"),
    "head": (_one_of(*HEADS), ", ".join(map(repr, HEADS))),
    "attention_stages": (_list_of(_is_int), "a list of stage indices"),
    "attention_norm": (_one_of("softmax", "sigmoid"), "'softmax' or 'sigmoid'"),
    "cbam_stages": (_list_of(_is_int), "a list of stage indices"),
    "adl_stages": (_list_of(_is_int), "a list of stage indices"),
    "tap_threshold": (_number_in(0, 1), "a number in [0, 1]"),
    "positive_class": (_optional(_is_int), "null or a class index"),
    "decision_threshold": (_optional(_number_in(0, 1)), "null or a probability in [0, 1]"),
    "counting": (_one_of(None, *COUNTING), "null, " + ", ".join(map(repr, COUNTING))),
    "density_stage": (_optional(_is_int), "null or a stage index"),
    "density_hidden": (_int_in(0, 4096), "a whole number of channels in 0..4096"),
    "density_context": (_is_bool, "true or false"),
    "localizer": (_is_bool, "true or false"),
    "box_head": (_is_bool, "true or false"),
    "box_backbone": (_optional(_is_backbone_name), "null or a timm model name (letters, digits, '_', '-', '.')"),
    "maps": _OBJECT,
    "train": (lambda v: v is None or isinstance(v, dict), "null or an object"),
    "localization": _OBJECT,  # format 1
    "format_version": (_one_of(*FORMAT_VERSIONS), f"one of {list(FORMAT_VERSIONS)} (a newer weakloc wrote this model?)"),
}

_BOX_SIZES: _Rule = (_dict_of(_list_of(_number_in(0, 1, open_low=True), 2)),
                     "an object of class -> [width, height], fractions of the image in (0, 1]")
_OPTIONS: _Rule = (_dict_of(lambda v: isinstance(v, dict)), "an object of method -> options object")

#: ``maps``'s fields (format 2); every key must be one of these
MAPS_SCHEMA: dict[str, _Rule] = {
    "method": (_optional(_is_name), "null or a heatmap method name"),
    "layer": (_optional(_is_name), "null or a layer name (comma-separated for several)"),
    "fusion": (_one_of(None, *FUSIONS), "null, " + ", ".join(map(repr, FUSIONS))),
    "tta": (_optional(_is_bool), "null, true or false"),
    "eigen_smooth": (_optional(_is_bool), "null, true or false"),
    "dtype": (_one_of(None, *DTYPES), "null, " + ", ".join(map(repr, DTYPES))),
    "normalization": (_optional(_is_name), "null or a normalisation (minmax, max, pas[:Q], ivr[:Q])"),
    "refine": (_optional(_is_name), "null or a refinement (none, guided[:R[,EPS]])"),
    "options": _OPTIONS,
    "test_size": (_optional(_SIZE_RULE[0]), "null or " + _SIZE_RULE[1]),
    "threshold": (_optional(_number_in(0, 1)), "null or a number in [0, 1]"),
    "count_views": (_one_of(None, *COUNT_VIEWS), "null, " + ", ".join(map(repr, COUNT_VIEWS))),
    "box_sizes": (_optional(_BOX_SIZES[0]), "null or " + _BOX_SIZES[1]),
    "sources": (_dict_of(lambda v: isinstance(v, dict)), "an object of setting -> source object"),
}

#: format 1's ``localization`` keys that weakloc reads; others (calibrated_on, note, ...) were notes
LOCALIZATION_SCHEMA: dict[str, _Rule] = {
    "threshold": (_number_in(0, 1), "a number in [0, 1]"),
    "method": (_is_name, "a heatmap method name"),
    "input_size": _SIZE_RULE,
    "options": _OPTIONS,
    "box_sizes": _BOX_SIZES,
    "count_tta": (_one_of(*COUNT_VIEWS), "'none', 'flip' or 'dihedral'"),
}


def _check_table(raw: dict, schema: dict[str, _Rule], where: str, prefix: str = "") -> None:
    for key, (check, must) in schema.items():
        if key in raw and not check(raw[key]):
            raise CheckpointError(f"{where}: '{prefix}{key}' must be {must}, got {_show(raw[key])}")


def validate_config(raw: Any, where: str = "config") -> None:
    """Check a decoded config.json (format 1 or 2) against :data:`CONFIG_SCHEMA` and
    :data:`MAPS_SCHEMA` (format 1: :data:`LOCALIZATION_SCHEMA`); missing keys take the defaults.

    Raises:
        CheckpointError: ``"<where>: '<field>' must be ..., got ..."`` for the first bad field.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: must be a JSON object of model settings, got {_show(raw, 40)}")
    unknown = sorted(set(raw) - set(CONFIG_SCHEMA))
    if unknown:
        raise CheckpointError(f"{where}: unknown config key(s) {unknown}")
    if "classes" not in raw:
        raise CheckpointError(f"{where}: config has no 'classes'")
    _check_table(raw, CONFIG_SCHEMA, where)
    version = raw.get("format_version", 1)
    if version == 1:
        if "maps" in raw or "train" in raw:
            raise CheckpointError(f"{where}: 'maps' and 'train' are format 2 keys, but 'format_version' is 1")
        _check_table(raw.get("localization", {}), LOCALIZATION_SCHEMA, where, "localization.")
    else:
        if "localization" in raw:
            raise CheckpointError(f"{where}: 'localization' is the format 1 key; format {version} keeps map settings in 'maps'")
        maps = raw.get("maps", {})
        unknown = sorted(set(maps) - set(MAPS_SCHEMA))
        if unknown:
            raise CheckpointError(f"{where}: unknown key(s) in 'maps': {unknown}")
        _check_table(maps, MAPS_SCHEMA, where, "maps.")
        train = raw.get("train") or {}
        names = {f.name for f in fields(TrainConfig)}
        if set(train) - names:
            raise CheckpointError(f"{where}: unknown key(s) in 'train': {sorted(set(train) - names)}")
    classes = raw["classes"]
    if not classes:
        raise CheckpointError(f"{where}: 'classes' must be a non-empty list of class names, got []")
    for name in classes:
        problem = class_name_problem(name)
        if problem:
            raise CheckpointError(f"{where}: 'classes' entry {_show(name)} {problem} (class names become file names)")
    twice = [c for c, n in Counter(classes).items() if n > 1]
    if twice:
        raise CheckpointError(f"{where}: 'classes' lists {_show(twice[0])} more than once")
    positive = raw.get("positive_class")
    if positive is not None and not (len(classes) == 2 and 0 <= positive < 2):
        raise CheckpointError(f"{where}: 'positive_class' must be null or 0 or 1 (a class of a two-class model), "
                              f"got {_show(positive)} with {len(classes)} classes")


# --- the one resolution of map settings ----------------------------------------------------------

def split_overrides(overrides: dict | None) -> tuple[dict, dict]:
    """A flat dict of map settings and method options (``{"fusion": "max", "num_samples": 8}``, the
    form ``explain()`` keywords take) as ``(MapConfig fields, method options)``."""
    if overrides is None:
        return {}, {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise OptionError(f"map options: expected a dict of settings and method options, got {overrides!r}")
    names = set(MAP_SETTINGS)
    settings = {k: v for k, v in overrides.items() if k in names}
    return settings, {k: v for k, v in overrides.items() if k not in names}


def resolve_maps(config: ModelConfig, overrides: MapConfig | dict | None = None, **given: Any) -> MapConfig:
    """The settings a map is made with: the caller's (``overrides`` -- a :class:`MapConfig`, or a
    flat dict of fields and method options -- and keyword fields, ``None`` meaning "not given"),
    else the model's stored ones (``config.maps``), else :data:`MAP_DEFAULTS`.

    Method options merge in that order too: the model's stored options for the resolved method,
    then the caller's. A ``normalization`` option of the method (where calibration stores the one
    it chose for that method) counts as the setting, over the model's method-independent one.
    The methods of :data:`BOX_METHODS` take the training size and no refinement unless asked.
    The result has every setting concrete (``test_size`` an int, ``count_views`` a name) and
    ``options`` holding the resolved method's options alone; calibration results (``threshold``,
    ``box_sizes``, ``sources``) are the model's.
    """
    if isinstance(overrides, MapConfig):
        asked = {k: getattr(overrides, k) for k in MAP_SETTINGS}
        asked_options = overrides.method_options(given.get("method") or overrides.method or config.maps.method)
    else:
        asked, asked_options = split_overrides(overrides)
    asked = {k: v for k, v in [*asked.items(), *given.items()] if v is not None}  # a keyword left None keeps the override
    unknown = set(asked) - set(MAP_SETTINGS)
    if unknown:
        raise OptionError(f"map settings: unknown {sorted(unknown)} (known: {', '.join(MAP_SETTINGS)})")
    stored = config.maps
    out = {k: asked.get(k, getattr(stored, k)) for k in MAP_SETTINGS}
    for k, v in MAP_DEFAULTS.items():
        if out[k] is None:
            out[k] = v
    options = stored.method_options(out["method"])
    stored_norm = options.pop("normalization", None)
    if stored_norm is not None and "normalization" not in asked:
        out["normalization"] = stored_norm
    options.update(asked_options)
    if "normalization" in options:  # the caller's option spelling of the setting
        out["normalization"] = options.pop("normalization")
    if "test_size" not in asked:  # not set by the caller: the stored one, else the training size
        out["test_size"] = config.inference_size(out["method"])
    if out["method"] in BOX_METHODS and "refine" not in asked:
        out["refine"] = "none"
    return MapConfig(**out, options={out["method"]: options} if options else {}, threshold=stored.threshold,
                     box_sizes=stored.box_sizes, sources=dict(stored.sources))
