""":func:`~weakloc.train.fine_tune`'s settings: keywords routed onto :class:`~weakloc.config.ModelConfig`
and :class:`~weakloc.config.TrainConfig`, the old keyword spellings, and the checks that run before
any data is read.

One name per setting: the Python keyword is the config field's name, the ``weakloc train`` option
is ``--`` + that name with ``-`` for ``_``, and an error names the option that way.
"""

from __future__ import annotations

import copy
import difflib
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from weakloc.checks import check_choice, check_device, check_float, check_int, check_output_folder
from weakloc.config import COUNTING, FORMAT_VERSION, HEADS, INPUT_SIZES, MapConfig, ModelConfig, TrainConfig, validate_config
from weakloc.errors import CheckpointError, OptionError

#: :class:`ModelConfig` fields a caller sets; the others come from the data, the teacher or training
MODEL_SETTINGS = ("backbone", "input_size", "output_stride", "drop_rate", "head", "attention_stages", "attention_norm",
                  "cbam_stages", "adl_stages", "tap_threshold", "counting", "density_stage", "density_hidden",
                  "density_context", "box_backbone")
#: :class:`TrainConfig` fields, each a keyword of :func:`~weakloc.train.fine_tune` too
TRAIN_SETTINGS = tuple(f.name for f in fields(TrainConfig))
#: :class:`ModelConfig` fields :func:`~weakloc.train.fine_tune` sets itself, and from what
SET_BY_TRAINING = {"classes": "the data's classes", "task": "the data's labels", "positive_class": "positive=",
                   "decision_threshold": "the validation images", "localizer": "teacher=", "box_head": "teacher=", "maps": "maps=", "train": "train="}
#: old keyword -> the setting it became (kept with a DeprecationWarning)
DEPRECATED = {"image_size": "input_size", "num_workers": "workers", "val_data": "val", "map_options": "maps"}
#: the density head of a counting model trained without a ModelConfig: the 3x3 head on stage -3
#: that also reads the last feature map (docs/counting.md); a ModelConfig is used as given
TRAINING_DENSITY = {"density_stage": -3, "density_hidden": 64, "density_context": True}
#: map options :func:`~weakloc.train.fine_tune` stores with a model unless the caller gives some:
#: CAM with negative class weights clamped (docs/results.md, the demo and Aquarium sections)
DEFAULT_MAP_OPTIONS: dict[str, dict] = {"cam": {"positive_weights": True}}
#: the map refinement a trained classifier stores (docs/models.md, "Default map options"): maps smoothed
#: along the image's edges before boxes are taken
DEFAULT_REFINE = "guided"
#: what ``monitor`` may name: the validation metrics the training module logs
MONITORS = ("val_loss", "val_acc", "val_auroc", "val_prauc", "val_map", "val_count_mae")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: fine_tune's own named parameters (for the close-match hint of an unknown keyword)
PARAMETERS = ("model", "train", "maps", "val", "teacher", "resume", "progress", "positive")


@dataclass
class TrainSettings:
    """:func:`~weakloc.train.fine_tune`'s arguments, settled into configurations.

    Attributes:
        model, train, maps: the configurations (``model.maps`` and ``model.train`` left empty: the
            separate ``maps`` and ``train`` travel until the model is saved).
        val: the validation data, or None.
        spelled: setting -> the old keyword the caller gave it as (errors name both).
        options_given: the caller chose the map options (else :data:`DEFAULT_MAP_OPTIONS`).
    """

    model: ModelConfig
    train: TrainConfig
    maps: MapConfig
    val: Any = None
    spelled: dict[str, str] = field(default_factory=dict)
    options_given: bool = False


def _unknown(name: str) -> OptionError:
    if name in SET_BY_TRAINING:
        return OptionError(f"fine_tune: {name!r} is not a setting; it comes from {SET_BY_TRAINING[name]}")
    known = [*MODEL_SETTINGS, *TRAIN_SETTINGS, *PARAMETERS]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return OptionError(f"fine_tune: unknown setting {name!r}{hint}; settings are ModelConfig's {', '.join(MODEL_SETTINGS)} "
                       "and TrainConfig's fields")


def _take_deprecated(settings: dict, val, maps, stacklevel: int) -> tuple[Any, Any, dict[str, str]]:
    """``settings`` with each old keyword moved onto its new name (a warning each); the validation
    data and maps they give; setting -> old keyword."""
    spelled: dict[str, str] = {}
    for old, new in DEPRECATED.items():
        if old not in settings:
            continue
        value = settings.pop(old)
        use = "maps=MapConfig(options=...)" if old == "map_options" else f"{new}=..."
        warnings.warn(f"fine_tune({old}=...) is deprecated: use {use}", DeprecationWarning, stacklevel=stacklevel)
        if old == "val_data":
            if val is not None:
                raise OptionError("val_data: the old name of val, and val is given too; give val only")
            val = value
        elif old == "map_options":
            if maps is not None:
                raise OptionError("map_options: the old form of maps=MapConfig(options=...), and maps is given too; give maps only")
            if value is not None:  # None was the default: the default options
                maps = MapConfig(options=value)
                spelled["options"] = old
        else:
            if new in settings:
                raise OptionError(f"{old}: the old name of {new}, and {new} is given too; give {new} only")
            settings[new] = value
            spelled[new] = old
    return val, maps, spelled


def _refuse_twice(given: dict, where: str, spelled: dict[str, str]) -> None:
    if given:
        name = next(iter(given))
        raise OptionError(f"{spelled.get(name, name)}: given both as a keyword and in {where}; set it in one place "
                          f"(e.g. dataclasses.replace(config, {name}=...))")


def _expect(name: str, value, kind: type) -> None:
    if value is not None and not isinstance(value, kind):
        raise OptionError(f"{name}: expected a {kind.__name__}, got {type(value).__name__}")


def settle_settings(model: ModelConfig | None = None, train: TrainConfig | None = None, maps: MapConfig | None = None,
                    val=None, settings: dict | None = None, *, stacklevel: int = 2) -> TrainSettings:
    """:func:`~weakloc.train.fine_tune`'s configurations from its config objects and keywords.

    Each keyword goes to the config that has the field (:data:`MODEL_SETTINGS`, :data:`TRAIN_SETTINGS`);
    old keywords (:data:`DEPRECATED`) still work, with a :class:`DeprecationWarning`. Without a
    ``model`` object, the density head takes :data:`TRAINING_DENSITY` where no keyword sets it. The
    caller's objects are copied, never changed. Values are checked by :func:`check_train_options`.
    ``stacklevel``: the deprecation warnings' (2: the caller of this function).

    Raises:
        OptionError: an unknown keyword (with a close match, if any), or a setting given twice (as
            a keyword and in a config object, or under its old and new names).
    """
    for name, value, kind in (("model", model, ModelConfig), ("train", train, TrainConfig), ("maps", maps, MapConfig)):
        _expect(name, value, kind)
    settings = dict(settings or {})
    val, maps, spelled = _take_deprecated(settings, val, maps, stacklevel + 1)
    for name in settings:
        if name not in MODEL_SETTINGS and name not in TRAIN_SETTINGS:
            raise _unknown(name)
    model_kw = {k: v for k, v in settings.items() if k in MODEL_SETTINGS}
    train_kw = {k: v for k, v in settings.items() if k in TRAIN_SETTINGS}
    if model is not None and model.train is not None:
        if train is not None:
            raise OptionError("train: given both as train= and as model=ModelConfig(train=...); give it once")
        train = model.train
    if model is not None and model.maps != MapConfig():
        if maps is not None:
            raise OptionError("maps: given both as maps= and as model=ModelConfig(maps=...); give it once")
        maps = model.maps
    if model is not None:
        _refuse_twice(model_kw, "model=ModelConfig(...)", spelled)
    if train is not None:
        _refuse_twice(train_kw, "train=TrainConfig(...)", spelled)
    if model is None:
        model_kw = {k: v for k, v in model_kw.items() if not (v is None and k.endswith("_stages"))}  # None: the default stages
        model = ModelConfig(**{**TRAINING_DENSITY, **model_kw})
    else:
        model = copy.deepcopy(model)
    model.maps, model.train = MapConfig(), None
    train = copy.deepcopy(train) if train is not None else TrainConfig(**train_kw)
    if isinstance(train.pretrained, os.PathLike):
        train.pretrained = str(train.pretrained)
    options_given = maps is not None and (bool(maps.options) or "options" in spelled)
    maps = copy.deepcopy(maps) if maps is not None else MapConfig()
    return TrainSettings(model, train, maps, val, spelled, options_given)


# --- checks --------------------------------------------------------------------------------------

def option_name(name: str, spelled: dict[str, str] | None = None) -> str:
    """How an error names setting ``name``: its ``weakloc train`` option, with the old keyword the
    caller used beside it."""
    old = (spelled or {}).get(name)
    option = "--" + name.replace("_", "-")
    return f"{option} ({old})" if old else option


def lightning_precisions() -> tuple:
    """The values ``Trainer(precision=)`` accepts, read from Lightning's own type."""
    import typing

    try:
        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    except ImportError:  # moved in another Lightning version: the 2.x values
        return (64, 32, 16, "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16")

    def flat(t) -> list:
        args = typing.get_args(t)
        return list(args) if typing.get_origin(t) is typing.Literal else [v for a in args for v in flat(a)]

    return tuple(flat(_PRECISION_INPUT))


def _check_pair(name: str, value, low: float, high: float | None, low_open: bool) -> tuple[float, float]:
    """``value`` as ``(a, b)`` with ``a <= b``, both in the range."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise OptionError(f"{name}: expected two numbers MIN MAX, got {value!r}")
    lo, hi = (check_float(name, v, low, high, low_open=low_open) for v in value)
    if lo > hi:
        raise OptionError(f"{name}: the minimum {lo:g} is above the maximum {hi:g} (give MIN MAX with MIN <= MAX)")
    return lo, hi


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"{name}: expected true or false, got {value!r}")


def _check_stages(name: str, value) -> None:
    if value is None:  # the default stages
        return
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise OptionError(f"{name}: expected a list of stage indices, got {value!r}")


#: ``--strategy``: Lightning's names for one process per device (``auto``: ``ddp`` for several)
STRATEGIES = ("auto", "ddp", "ddp_spawn")


def parse_devices(devices):
    """``devices`` as Lightning takes it: ``auto``, a count, or a list of GPU indices (from
    ``"0,1"``); anything else is returned unchanged, for the checks to name."""
    if isinstance(devices, str) and devices != "auto":
        try:
            parts = [int(p) for p in devices.split(",") if p.strip()]
        except ValueError:
            raise OptionError(f"--devices: {devices!r} is not auto, a number of devices or a comma-separated list of GPU "
                              "indices") from None
        return parts if "," in devices else (parts[0] if parts else devices)
    return devices


def torchrun_processes() -> tuple[int, int] | None:
    """``(processes per node, nodes)`` when torchrun (torch.distributed.elastic) started this
    process -- Lightning's ``TorchElasticEnvironment`` then takes the ranks from its environment --
    else None."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    if not TorchElasticEnvironment.detect():
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return per_node, max(1, world // max(1, per_node))


def process_layout(devices, num_nodes: int | None) -> tuple:
    """The ``(devices, num_nodes)`` to give Lightning's Trainer: as given, ``num_nodes`` None
    meaning 1; under torchrun, ``auto`` and None become what torchrun started, and a count
    that differs from it is refused (Lightning would stop with a ValueError about world sizes).

    Raises:
        OptionError: ``--devices`` or ``--num-nodes`` disagrees with torchrun's
            ``--nproc-per-node`` or ``--nnodes``.
    """
    devices = parse_devices(devices)
    started = torchrun_processes()
    if started is None:
        return devices, 1 if num_nodes is None else num_nodes
    per_node, nodes = started
    count = len(devices) if isinstance(devices, (list, tuple)) else devices
    if count != "auto" and count != per_node:
        raise OptionError(f"--devices: {count} per node, but torchrun started {per_node} process(es) per node "
                          f"(--nproc-per-node); give --devices {per_node} or auto")
    if num_nodes is not None and num_nodes != nodes:
        raise OptionError(f"--num-nodes: {num_nodes}, but torchrun started {nodes} node(s) (--nnodes); give "
                          f"--num-nodes {nodes} or leave it out")
    return (per_node if count == "auto" else devices), nodes


def check_hardware(accelerator: str, devices, strategy: str = "auto", num_nodes: int | None = None) -> None:
    """Refuse an accelerator this machine lacks, more GPUs than it has, an unknown strategy and a
    process layout torchrun's contradicts. Several processes on the CPU (gloo) need
    ``--accelerator cpu`` said outright: ``--devices 3`` alone on a machine without a GPU more
    likely meant GPUs."""
    check_choice("--accelerator", accelerator, ACCELERATORS)
    check_choice("--strategy", strategy, STRATEGIES)
    check_int("--num-nodes", num_nodes, 1, allow_none=True)
    if accelerator in ("gpu", "cuda"):
        check_device("--accelerator", "cuda")
    elif accelerator == "mps":
        check_device("--accelerator", "mps")
    gpus = torch.cuda.device_count() if accelerator != "mps" and accelerator != "cpu" and torch.cuda.is_available() else 0
    shown = repr(devices) if isinstance(devices, str) else str(devices)
    devices = parse_devices(devices)
    if strategy == "ddp_spawn" and torchrun_processes() is not None:
        raise OptionError("--strategy: ddp_spawn starts processes itself, but torchrun started this one; use ddp or auto")
    if devices == "auto":
        process_layout(devices, num_nodes)
        return
    if isinstance(devices, (list, tuple)):
        if not devices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in devices):
            raise OptionError(f"--devices: {shown} is not a list of GPU indices")
        if not gpus:
            raise OptionError(f"--devices: {shown} names GPUs, but no CUDA GPU is used on this machine (use --devices 1 or auto)")
        if max(devices) >= gpus:
            raise OptionError(f"--devices: GPU {max(devices)} asked for, but this machine has {gpus} CUDA GPU(s) (indices 0..{gpus - 1})")
        process_layout(devices, num_nodes)
        return
    n = check_int("--devices", devices, -1)
    if n == 0:
        raise OptionError("--devices: 0 is not a number of devices (use auto, a count >= 1, or -1 for every GPU)")
    if not gpus and n == -1:
        raise OptionError(f"--devices: {shown} means every GPU, but no CUDA GPU is used on this machine; for several CPU "
                          "processes give their number with --accelerator cpu")
    if not gpus and n > 1 and accelerator != "cpu":
        raise OptionError(f"--devices: {shown} asks for {n} GPUs, but no CUDA GPU is used on this machine; to train {n} CPU "
                          "processes (gloo) say --accelerator cpu, else use --devices 1 or auto")
    if gpus and n > gpus:
        raise OptionError(f"--devices: {n} GPUs asked for, but this machine has {gpus}")
    process_layout(n, num_nodes)


def scaled_size(input_size: int, test_scale: float) -> int:
    """The side maps are made on for ``test_scale`` times the training size: a multiple of 32."""
    return max(32, int(round(input_size * test_scale / 32)) * 32)


def check_model_settings(model: ModelConfig, spelled: dict[str, str] | None = None) -> None:
    """Refuse out-of-range or unknown :data:`MODEL_SETTINGS` values (:class:`OptionError` naming the option)."""
    def o(name: str) -> str:
        return option_name(name, spelled)

    if not isinstance(model.backbone, str) or not model.backbone.strip():
        raise OptionError(f"{o('backbone')}: expected a timm model name, got {model.backbone!r}")
    if model.box_backbone is not None:
        import timm

        if not isinstance(model.box_backbone, str) or not timm.is_model(model.box_backbone):
            raise OptionError(f"{o('box_backbone')}: {model.box_backbone!r} is not a timm model name (see timm.list_models())")
    check_int(o("input_size"), model.input_size, 32, 4096)
    check_int(o("output_stride"), model.output_stride, allow_none=True)
    check_choice(o("output_stride"), model.output_stride, (8, 16, 32), allow_none=True)
    check_float(o("drop_rate"), model.drop_rate, 0, 1, high_open=True)
    check_choice(o("head"), model.head, HEADS)
    for name in ("attention_stages", "cbam_stages", "adl_stages"):
        _check_stages(o(name), getattr(model, name))
    check_choice(o("attention_norm"), model.attention_norm, ("softmax", "sigmoid"))
    check_float(o("tap_threshold"), model.tap_threshold, 0, 1)
    check_choice(o("counting"), model.counting, COUNTING, allow_none=True)
    check_int(o("density_stage"), model.density_stage, allow_none=True)
    check_int(o("density_hidden"), model.density_hidden, 0, 4096)
    _check_bool(o("density_context"), model.density_context)


def check_training(train: TrainConfig, spelled: dict[str, str] | None = None) -> None:
    """Refuse out-of-range or unknown :class:`TrainConfig` values (:class:`OptionError` naming the option)."""
    from weakloc.explain.registry import METHODS

    def o(name: str) -> str:
        return option_name(name, spelled)

    if not isinstance(train.pretrained, str) or not train.pretrained.strip():
        raise OptionError(f"{o('pretrained')}: expected imagenet, none or a weights file, got {train.pretrained!r}")
    check_int(o("epochs"), train.epochs, 1)
    check_int(o("freeze_epochs"), train.freeze_epochs, 0)
    check_int(o("frozen_stages"), train.frozen_stages, 0)
    check_int(o("batch_size"), train.batch_size, 1)
    check_float(o("lr"), train.lr, 0, low_open=True)
    if train.backbone_lr is not None:
        _check_pair(o("backbone_lr"), train.backbone_lr, 0, None, low_open=True)
    check_float(o("weight_decay"), train.weight_decay, 0)
    check_choice(o("schedule"), train.schedule, ("onecycle", "cosine"))
    check_float(o("label_smoothing"), train.label_smoothing, 0, 1, high_open=True)
    check_float(o("val_fraction"), train.val_fraction, 0, 1, low_open=True, high_open=True)
    check_int(o("seed"), train.seed, 0, 2**32 - 1)
    check_choice(o("precision"), train.precision, lightning_precisions(), allow_none=True)
    check_hardware(train.accelerator, train.devices, train.strategy, train.num_nodes)
    check_int(o("workers"), train.workers, 0, allow_none=True)
    if train.crop_scale is not None:
        _check_pair(o("crop_scale"), train.crop_scale, 0, 1, low_open=True)
    for flag in ("dihedral", "balanced"):
        _check_bool(o(flag), getattr(train, flag))
    check_choice(o("monitor"), train.monitor, MONITORS)
    if train.limit_batches is not None:
        if isinstance(train.limit_batches, float):
            check_float(o("limit_batches"), train.limit_batches, 0, 1, low_open=True)
        else:
            check_int(o("limit_batches"), train.limit_batches, 1)
    check_choice(o("loss"), train.loss, ("ce", "focal"))
    check_float(o("focal_gamma"), train.focal_gamma, 0)
    check_choice(o("count_loss"), train.count_loss, ("poisson", "huber"))
    for weight in ("count_weight", "density_l1", "density_tv", "density_gather", "crop_consistency", "cutmix_alpha",
                   "align_weight", "consistency_weight"):
        check_float(o(weight), getattr(train, weight), 0)
    check_float(o("hide_prob"), train.hide_prob, 0, 1)
    check_int(o("hide_grid"), train.hide_grid, 1)
    check_float(o("ema_decay"), train.ema_decay, 0, 1, high_open=True)
    check_float(o("swa"), train.swa, 0, 1, high_open=True)
    if train.swa and train.ema_decay:
        raise OptionError(f"{o('swa')} and {o('ema_decay')} both average the weights: give one")
    if train.teacher_method is not None:
        check_choice(o("teacher_method"), train.teacher_method, sorted(METHODS))
    check_float(o("teacher_threshold"), train.teacher_threshold, 0, 1, allow_none=True)
    check_float(o("test_scale"), train.test_scale, 0, low_open=True)


def check_map_defaults(maps: MapConfig, input_size: int, spelled: dict[str, str] | None = None) -> None:
    """Refuse map settings a model could not be stored with: unknown methods in ``options``, a value
    ``config.json``'s reader refuses, or a setting :func:`~weakloc.explain.pipeline.check_map_settings`
    refuses (named ``maps.<field>``)."""
    from weakloc.config import resolve_maps
    from weakloc.explain.pipeline import check_map_settings
    from weakloc.explain.registry import METHODS

    where = (spelled or {}).get("options", "maps.options")
    if not isinstance(maps.options, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in maps.options.items()):
        raise OptionError(f"{where}: expected {{method: {{option: value}}}}, got {maps.options!r}")
    for method in maps.options:
        check_choice(where, method, sorted(METHODS))
    try:  # what config.json's reader would refuse, so the trained model could not be loaded
        validate_config({"classes": ["a"], "format_version": FORMAT_VERSION, "maps": asdict(maps)}, "maps")
    except CheckpointError as e:
        raise OptionError(str(e)) from None
    check_map_settings(resolve_maps(ModelConfig(input_size=input_size, maps=maps)), "maps.")


def check_train_options(model: ModelConfig, train: TrainConfig, out: str | Path | None = None, *, maps: MapConfig | None = None,
                        spelled: dict[str, str] | None = None, teacher: bool = False) -> None:
    """Refuse out-of-range, unknown or impossible :func:`~weakloc.train.fine_tune` settings before
    any work starts (the CLI calls it before it reads the labels).

    Args:
        model, train: the configurations (see :func:`settle_settings`).
        out: the output folder (``--out``), or None to leave it unchecked.
        maps: the map settings to store with the model, if any.
        spelled: setting -> an old keyword the caller gave it as (named beside the option).
        teacher: whether a first-stage model was given (a separate box network needs one).

    Raises:
        OptionError: naming the option (``--input-size``; ``--input-size (image_size)`` when given
            by its old name) and the allowed values.
    """
    check_model_settings(model, spelled)
    if model.box_backbone is not None and not teacher:
        raise OptionError(f"{option_name('box_backbone', spelled)}: a separate box network learns a first-stage model's boxes: "
                          "give that model too (--teacher, teacher=)")
    check_training(train, spelled)
    if maps is not None:
        check_map_defaults(maps, model.input_size, spelled)
    if out is not None:
        check_output_folder("--out", out)
    if maps is None or maps.test_size is None:
        size = scaled_size(model.input_size, train.test_scale)
        if size > INPUT_SIZES[1]:
            raise OptionError(f"{option_name('test_scale')}: {train.test_scale:g} times the {model.input_size}-px training size "
                              f"gives {size}-px inputs, above the largest, {INPUT_SIZES[1]}")

