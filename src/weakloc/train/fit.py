"""``fine_tune``: train a weakly-supervised classifier from image-level labels, the fast.ai way.

Lightning runs the loop (devices, mixed precision, checkpointing, progress, logging); the result
is a checkpoint folder (``model.safetensors`` + ``config.json``) of the best validation epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, WeightedRandomSampler

from weakloc.data.dataset import ImageDataset, SkipLog, collate_skip_bad, eval_transform, train_transform
from weakloc.data.labels import LabeledImages, load_labels, split_train_val, with_positive
from weakloc.checks import check_choice, check_device, check_float, check_int, check_output_folder
from weakloc.errors import CheckpointError, OptionError, WeaklocError
from weakloc.models.backbone import DEFAULT_BACKBONE
from weakloc.models.checkpoint import atomic_write, load_model, save_model
from weakloc.models.classifier import ModelConfig, WeaklocNet
from weakloc.train.module import ClassifierModule, FreezeBackbone, OptimConfig, choose_decision_threshold


@dataclass
class TrainResult:
    """What :func:`fine_tune` returns.

    Attributes:
        model: the best model (eval mode, on the CPU).
        model_dir: its checkpoint folder.
        metrics: validation metrics of the best epoch (``best_epoch``: its number), and
            ``skipped_images``: how many images could not be decoded.
        history: per-epoch validation metrics, every epoch of the run once, resumes included.
        skipped: those images, each with why (also in ``skipped.txt`` beside ``model/``).
    """

    model: WeaklocNet
    model_dir: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)
    skipped: SkipLog = field(default_factory=SkipLog)


def default_workers() -> int:
    """DataLoader workers: none on a 2-core machine (decoding would steal the model's cores)."""
    n = os.cpu_count() or 1
    return 0 if n <= 2 else min(8, n - 1)


def _progress_bar():
    try:
        import rich  # noqa: F401

        return RichProgressBar(leave=True)
    except ImportError:  # rich is a dependency, but keep training usable without it
        return TQDMProgressBar()


def balanced_sampler(labeled: LabeledImages, seed: int = 0) -> WeightedRandomSampler:
    """Sample images with weight 1 / (images of their class); a multi-label image takes its rarest
    label's weight, and images without any label count as one more class. With counts, the groups
    are each class's count values, weighted 1 / sqrt(images in the group) (rare counts drawn more
    often, yet an image whose count no other image has is not drawn dozens of times per epoch), and
    an image takes its rarest group's weight. As many draws per epoch as images, with replacement."""
    t = labeled.targets
    if labeled.counts is not None:
        weights = torch.zeros(len(labeled.counts))
        for column in labeled.counts.long().T:
            _, group, size = torch.unique(column, return_inverse=True, return_counts=True)
            weights = torch.maximum(weights, size[group].float().rsqrt())
    elif labeled.task == "single":
        counts = torch.bincount(t, minlength=len(labeled.classes)).clamp_min(1).float()
        weights = 1.0 / counts[t]
    else:
        counts = t.sum(0).clamp_min(1)
        per = torch.where(t > 0, 1.0 / counts, torch.zeros_like(t))
        empty = per.amax(1) == 0  # images with no label form a group of their own
        weights = torch.where(empty, torch.full((len(t),), 1.0 / max(1, int(empty.sum()))), per.amax(1))
    return WeightedRandomSampler(weights.double(), num_samples=len(labeled), replacement=True,
                                 generator=torch.Generator().manual_seed(seed))


def validation_threshold(model: WeaklocNet, loader: DataLoader, positive: int) -> float | None:
    """The positive-class probability cut with the best F1 on ``loader``'s images (CPU model)."""
    probs, targets = [], []
    with torch.no_grad():
        for batch in loader:
            if batch["image"] is None:
                continue
            probs.append(model.probabilities(model(batch["image"]))[:, positive])
            targets.append(batch["target"] == positive)
    if not probs:
        return None
    return choose_decision_threshold(torch.cat(probs), torch.cat(targets))


#: explain options ``fine_tune`` stores with every model (method -> options); see ``map_options``
DEFAULT_MAP_OPTIONS: dict[str, dict] = {"cam": {"positive_weights": True}}


# --- crash-safe training state -------------------------------------------------------------------

#: suffix of the temporary file :func:`atomic_write` renames over its target
TMP_SUFFIX = ".tmp"
#: the file beside ``model/`` listing the images training skipped: path, a tab, why
SKIPPED_FILE = "skipped.txt"
#: what a checkpoint must hold for Lightning to resume training from it
RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "epoch", "global_step")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed :func:`~weakloc.models.checkpoint.atomic_write` calls
    left in ``folder``."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()] if Path(folder).is_dir() else []
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through :func:`atomic_write`: a run killed while it writes
    ``last.ckpt`` leaves the previous ``last.ckpt`` whole, not a 0-byte or half-written one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def _load_problem(path: Path, error: Exception) -> str:
    """Why ``path`` did not load, in a few words."""
    if path.stat().st_size == 0:
        return "empty (0 bytes; an interrupted write?)"
    first = (str(error).strip().splitlines() or [""])[0][:160]
    return f"truncated or corrupt ({type(error).__name__}: {first})"


def resume_checkpoint(folder: str | Path) -> tuple[Path, dict]:
    """The checkpoint to resume from: the newest ``*.ckpt`` of ``folder`` (by training step; at a tie,
    ``last.ckpt``) that loads completely with ``torch.load(weights_only=True)`` and holds a training
    state. Broken files are skipped with a warning that names them.

    Returns:
        its path and ``{"epoch", "global_step", "shapes"}`` (``shapes``: of its ``state_dict``'s
        tensors, for :func:`check_resumable`).

    Raises:
        CheckpointError: no checkpoint, or none usable (every file named with its problem).
    """
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.ckpt") if p.is_file()) if folder.is_dir() else []
    if not files:
        raise CheckpointError(f"cannot resume: no checkpoint (*.ckpt) in {folder}; train without --resume first")
    usable, broken = [], []
    for path in files:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's zip reader and unpickler raise many kinds
            broken.append(f"{path.name}: {_load_problem(path, e)}")
            continue
        missing = [k for k in RESUME_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(RESUME_KEYS)
        if missing:
            broken.append(f"{path.name}: not a training checkpoint (no {', '.join(missing)})")
            continue
        info = {"epoch": int(ckpt["epoch"]), "global_step": int(ckpt["global_step"]),
                "shapes": {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}}
        usable.append(((info["global_step"], info["epoch"], path.name == "last.ckpt"), path, info))
        del ckpt
    if not usable:
        raise CheckpointError(f"cannot resume: no usable checkpoint in {folder} ({'; '.join(broken)})")
    _, path, info = max(usable, key=lambda u: u[0])
    if broken:
        warnings.warn(f"resuming from {path.name}; skipped broken checkpoint(s) in {folder}: {'; '.join(broken)}", stacklevel=2)
    return path, info


def check_resumable(module: pl.LightningModule, path: Path, shapes: dict[str, tuple]) -> None:
    """Refuse to resume ``module``'s training from a checkpoint of another model (other backbone,
    head, classes or options), which Lightning would stop at with a long state-dict traceback.

    Args:
        shapes: the checkpoint's tensor shapes by name (:func:`resume_checkpoint`'s ``shapes``).
    """
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, extra = sorted(own.keys() - shapes.keys()), sorted(shapes.keys() - own.keys())
    differ = sorted(k for k in own.keys() & shapes.keys() if own[k] != shapes[k])
    if missing or extra or differ:
        what = (f"{differ[0]} is {shapes[differ[0]]} there, {own[differ[0]]} here" if differ else
                f"it lacks {missing[0]}" if missing else f"it has {extra[0]}, which this model lacks")
        raise CheckpointError(f"cannot resume from {path}: it holds another model ({what}); resume with the options "
                              "of the interrupted run, or train without --resume")


class TrainingHistory(pl.Callback):
    """Every validated epoch's metrics, stored in the checkpoints so they survive a resume (and the
    best checkpoint holds its own epoch's metrics)."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []

    @property
    def state_key(self) -> str:
        return "weakloc_history"

    # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the
    # module's, so metrics the module logs at epoch end (val_acc, val_map, val_count_mae) would be
    # the previous epoch's there. Checkpoint callbacks run after this one, so an epoch's checkpoint
    # holds its own entry.
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry = {"epoch": trainer.current_epoch, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
        self.epochs = [h for h in self.epochs if h["epoch"] < entry["epoch"]] + [entry]  # a re-run epoch replaces its entry

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.epochs]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = [dict(h) for h in state_dict.get("history", [])]


class TrainingInterrupted(WeaklocError):
    """Training stopped by SIGTERM or SIGINT; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal(pl.Callback):
    """SIGTERM (what a scheduler or ``timeout`` sends) and SIGINT (Ctrl+C) stop training between two
    batches with a resumable checkpoint at ``path``.

    Lightning's own SIGTERM handler only sets a flag its loops stop at, by raising
    ``SIGTERMException`` -- a ``SystemExit`` with status 0, so a terminated run used to end quietly,
    as if it had succeeded. Here its state is saved (through the trainer, so atomically) when the
    stop comes between training batches; a stop during validation keeps the previous epoch's
    checkpoint. Ctrl+C goes through the same flag, so it never lands inside an optimiser step;
    a second Ctrl+C stops at once.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.signal: signal.Signals | None = None
        self.saved = False
        self.epochs_done = 0

    def record(self, signum, frame=None) -> None:
        """A signal handler: remember the first signal."""
        if self.signal is None:
            self.signal = signal.Signals(signum)

    def _on_sigint(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.record(signum)
        lightning_handler = signal.getsignal(signal.SIGTERM)
        if callable(lightning_handler):
            lightning_handler(signum, frame)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installs its SIGTERM handler just before the loops start (and puts the previous
        # handlers back after them, SIGINT's included)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._on_sigint)
        if self.signal is not None:  # came while Lightning was setting up, before its handler was there
            raise SIGTERMException

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.record(signal.SIGINT)
        if not isinstance(exception, SIGTERMException):
            return
        self.record(signal.SIGTERM)
        self.epochs_done = trainer.current_epoch
        if trainer.state.stage == RunningStage.TRAINING:  # between two training batches, or after an epoch's end
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved = True

    def error(self, epochs: int) -> TrainingInterrupted:
        """The one-line error for an interrupted run of ``epochs`` epochs."""
        head = f"training interrupted by {self.signal.name} after {self.epochs_done} of {epochs} epoch(s)"
        if self.saved:
            tail = f"its state was saved to {self.path}: run the same command with --resume to continue"
        elif self.path.is_file():
            tail = f"{self.path} holds the last validated epoch: run the same command with --resume to continue from it"
        else:
            tail = "before any checkpoint was written, so there is nothing to resume: run it again"
        return TrainingInterrupted(f"{head}; {tail}", int(self.signal))


@contextlib.contextmanager
def _signals_to(stopper: StopOnSignal):
    """SIGTERM recorded by ``stopper`` for the duration (Lightning's handler, installed when its
    loops start, calls it after its own); SIGTERM's and SIGINT's handlers put back after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, stopper.record)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


# --- argument checks -----------------------------------------------------------------------------

#: ``weakloc train``'s spelling of the :func:`fine_tune` arguments not spelt ``--`` + name with '-' for '_'
CLI_NAMES = {"hide_prob": "--hide-and-seek", "cutmix_alpha": "--cutmix", "align_weight": "--align",
             "consistency_weight": "--consistency", "num_workers": "--workers", "cbam_stages": "--cbam",
             "adl_stages": "--adl", "val_data": "--val"}
#: :func:`fine_tune` arguments the command line does not have
#: what ``monitor`` may name: the validation metrics the training module logs
MONITORS = ("val_loss", "val_acc", "val_auroc", "val_prauc", "val_map", "val_count_mae")

PYTHON_ONLY = frozenset({"backbone_lr", "weight_decay", "hide_grid", "limit_batches", "monitor", "map_options", "progress"})
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def option_name(name: str) -> str:
    """How an error names :func:`fine_tune`'s argument ``name``: its ``weakloc train`` option, with the
    Python name beside it where the two differ in more than '-' for '_'."""
    if name in PYTHON_ONLY:
        return name
    if name in CLI_NAMES:
        return f"{CLI_NAMES[name]} ({name})"
    return "--" + name.replace("_", "-")


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


def check_hardware(accelerator: str, devices) -> None:
    """Refuse an accelerator this machine lacks, and more devices than it has. Several devices on a
    machine without a GPU would start that many CPU processes, each training the whole model and
    writing the same output folder."""
    check_choice("--accelerator", accelerator, ACCELERATORS)
    if accelerator in ("gpu", "cuda"):
        check_device("--accelerator", "cuda")
    elif accelerator == "mps":
        check_device("--accelerator", "mps")
    gpus = torch.cuda.device_count() if accelerator != "mps" and accelerator != "cpu" and torch.cuda.is_available() else 0
    shown = repr(devices) if isinstance(devices, str) else str(devices)
    if isinstance(devices, str) and devices != "auto":
        try:
            parts = [int(p) for p in devices.split(",") if p.strip()]
        except ValueError:
            raise OptionError(f"--devices: {shown} is not auto, a number of devices or a comma-separated list of GPU indices") from None
        devices = parts if "," in devices else (parts[0] if parts else devices)
    if devices == "auto":
        return
    if isinstance(devices, (list, tuple)):
        if not devices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in devices):
            raise OptionError(f"--devices: {shown} is not a list of GPU indices")
        if not gpus:
            raise OptionError(f"--devices: {shown} names GPUs, but no CUDA GPU is used on this machine (use --devices 1 or auto)")
        if max(devices) >= gpus:
            raise OptionError(f"--devices: GPU {max(devices)} asked for, but this machine has {gpus} CUDA GPU(s) (indices 0..{gpus - 1})")
        return
    n = check_int("--devices", devices, -1)
    if n == 0:
        raise OptionError("--devices: 0 is not a number of devices (use auto, a count >= 1, or -1 for every GPU)")
    if not gpus and n != 1:
        count = "one per CPU core" if n == -1 else str(n)
        raise OptionError(f"--devices: {shown} would start {count} CPU training processes, each training the whole model "
                          "and writing the same output folder; without a GPU use --devices 1 (or auto)")
    if gpus and n > gpus:
        raise OptionError(f"--devices: {n} GPUs asked for, but this machine has {gpus}")


def check_train_options(args: dict) -> None:
    """Refuse out-of-range, unknown or impossible :func:`fine_tune` arguments before any work starts.

    Args:
        args: :func:`fine_tune`'s arguments by name.

    Raises:
        OptionError: naming the option (its ``weakloc train`` spelling) and the allowed values.
    """
    from weakloc.models.classifier import INPUT_SIZES
    from weakloc.models.heads import COUNTING, HEADS

    a, o = args, option_name
    check_int(o("epochs"), a["epochs"], 1)
    check_int(o("freeze_epochs"), a["freeze_epochs"], 0)
    check_int(o("batch_size"), a["batch_size"], 1)
    check_float(o("lr"), a["lr"], 0, low_open=True)
    check_float(o("weight_decay"), a["weight_decay"], 0)
    if a["backbone_lr"] is not None:
        _check_pair(o("backbone_lr"), a["backbone_lr"], 0, None, low_open=True)
    check_choice(o("schedule"), a["schedule"], ("onecycle", "cosine"))
    check_int(o("image_size"), a["image_size"], 32, 4096)
    check_int(o("output_stride"), a["output_stride"], allow_none=True)
    check_choice(o("output_stride"), a["output_stride"], (8, 16, 32), allow_none=True)
    if a["crop_scale"] is not None:
        _check_pair(o("crop_scale"), a["crop_scale"], 0, 1, low_open=True)
    check_float(o("val_fraction"), a["val_fraction"], 0, 1, low_open=True, high_open=True)
    check_int(o("seed"), a["seed"], 0, 2**32 - 1)
    check_choice(o("precision"), a["precision"], lightning_precisions(), allow_none=True)
    check_hardware(a["accelerator"], a["devices"])
    check_int(o("num_workers"), a["num_workers"], 0, allow_none=True)
    if a["limit_batches"] is not None:
        if isinstance(a["limit_batches"], float):
            check_float(o("limit_batches"), a["limit_batches"], 0, 1, low_open=True)
        else:
            check_int(o("limit_batches"), a["limit_batches"], 1)
    check_choice(o("head"), a["head"], HEADS)
    check_choice(o("attention_norm"), a["attention_norm"], ("softmax", "sigmoid"))
    check_float(o("tap_threshold"), a["tap_threshold"], 0, 1)
    check_choice(o("loss"), a["loss"], ("ce", "focal"))
    check_float(o("focal_gamma"), a["focal_gamma"], 0)
    check_choice(o("counting"), a["counting"], COUNTING, allow_none=True)
    check_choice(o("count_loss"), a["count_loss"], ("poisson", "huber"))
    for weight in ("count_weight", "density_l1", "density_tv", "density_gather", "crop_consistency", "cutmix_alpha",
                   "align_weight", "consistency_weight"):
        check_float(o(weight), a[weight], 0)
    check_int(o("density_stage"), a["density_stage"], allow_none=True)
    check_int(o("density_hidden"), a["density_hidden"], 0, 4096)
    check_float(o("hide_prob"), a["hide_prob"], 0, 1)
    check_int(o("hide_grid"), a["hide_grid"], 1)
    check_float(o("ema_decay"), a["ema_decay"], 0, 1, high_open=True)
    check_float(o("teacher_threshold"), a["teacher_threshold"], 0, 1, allow_none=True)
    from weakloc.explain.registry import METHODS

    if a["teacher_method"] is not None:
        check_choice(o("teacher_method"), a["teacher_method"], sorted(METHODS))
    if a["map_options"] is not None:
        if not isinstance(a["map_options"], dict) or not all(isinstance(v, dict) for v in a["map_options"].values()):
            raise OptionError("map_options: expected {method: {option: value}}")
        for name in a["map_options"]:
            check_choice("map_options", name, sorted(METHODS))
    check_choice(o("monitor"), a["monitor"], MONITORS)
    check_output_folder("--out (out)", a["out"])
    scale = check_float(o("test_scale"), a["test_scale"], 0, low_open=True)
    size = max(32, int(round(a["image_size"] * scale / 32)) * 32)
    if size > INPUT_SIZES[1]:
        raise OptionError(f"{o('test_scale')}: {scale:g} times the {a['image_size']}-px training size gives {size}-px inputs, "
                          f"above the largest, {INPUT_SIZES[1]}")


def fine_tune(
    data: str | Path | LabeledImages,
    out: str | Path = "runs/weakloc",
    *,
    backbone: str = DEFAULT_BACKBONE,
    pretrained: str = "imagenet",
    val_data: str | Path | LabeledImages | None = None,
    image_size: int = 224,
    output_stride: int | None = None,
    epochs: int = 5,
    freeze_epochs: int = 1,
    batch_size: int = 32,
    lr: float = 2e-3,
    backbone_lr: tuple[float, float] | None = None,
    weight_decay: float = 0.01,
    schedule: str = "onecycle",
    val_fraction: float = 0.2,
    seed: int = 0,
    precision: str | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    num_workers: int | None = None,
    resume: bool = False,
    progress: bool = True,
    crop_scale: tuple[float, float] | None = None,
    dihedral: bool = False,
    monitor: str = "val_loss",
    limit_batches: float | int | None = None,
    head: str = "cam",
    attention_stages: list[int] | None = None,
    attention_norm: str = "softmax",
    cbam_stages: list[int] | None = None,
    adl_stages: list[int] | None = None,
    tap_threshold: float = 0.1,
    loss: str = "ce",
    focal_gamma: float = 2.0,
    balanced: bool = False,
    counting: str | None = None,
    count_loss: str = "poisson",
    count_weight: float = 1.0,
    density_l1: float = 0.0,
    density_tv: float = 0.0,
    density_gather: float = 0.0,
    crop_consistency: float = 0.0,
    density_stage: int | None = -3,
    density_hidden: int = 64,
    density_context: bool = True,
    hide_prob: float = 0.0,
    hide_grid: int = 4,
    cutmix_alpha: float = 0.0,
    ema_decay: float = 0.0,
    align_weight: float = 0.0,
    consistency_weight: float = 0.0,
    teacher: str | Path | WeaklocNet | None = None,
    teacher_method: str | None = None,
    teacher_threshold: float | None = None,
    test_scale: float = 2.0,
    map_options: dict | None = None,
    positive: str | None = None,
) -> TrainResult:
    """Fine-tune a pretrained timm backbone on image-level labels.

    The backbone is frozen for ``freeze_epochs`` (head warm-up), then everything trains with
    layer-wise learning rates; AdamW with a one-cycle (or cosine) schedule; random resized crop,
    flip and light colour jitter; mixed precision on a GPU. The best epoch by ``monitor`` is kept.

    Args:
        data: a labels CSV, a folder holding ``labels.csv``, a folder-per-class tree, or
            :class:`LabeledImages`. Its own split (CSV ``split`` column, ``train/``/``val/`` folders)
            is used; otherwise a seeded split of ``val_fraction``.
        out: output folder: ``model/`` (best checkpoint), ``checkpoints/`` (``best.ckpt``, and
            ``last.ckpt`` of every epoch; written atomically, so a killed run leaves them whole),
            ``logs/``, ``metrics.json`` (the best epoch and every epoch's metrics), ``skipped.txt``
            (images that could not be decoded, if any). A fresh run deletes an older run's checkpoints.
        backbone_lr: (earliest, latest) multipliers of ``lr`` for the backbone's layer groups
            (default: (0.01, 0.3); (0.3, 1.0) with counting, whose early layers must learn to tell
            single objects apart -- on synthetic counting it lowered the validation MAE from 1.57
            to 1.41 in the same budget).
        resume: continue after an interruption, from the newest checkpoint in ``out/checkpoints``
            that loads completely (a broken one is named in a warning and skipped). SIGTERM or
            Ctrl+C stop training between two batches with a resumable ``last.ckpt`` and raise
            :class:`TrainingInterrupted`; the history and the best epoch carry over.
        limit_batches: cap batches per epoch (for smoke tests).
        crop_scale: random resized crop area range (default (0.35, 1.0); (1.0, 1.0) -- no crop -- with
            counting labels, where a crop would change the counts, so a smaller value is refused).
        dihedral: also flip vertically and transpose (all 8 right-angle orientations) -- for
            top-down images (microscopy, aerial, documents) whose labels do not depend on orientation.
            A counting model stores the test-time views it was trained to treat alike
            (``localization["count_tta"]``: ``dihedral``, else ``flip``); evaluate and localize
            average its counts over them.
        head, attention_stages, attention_norm, cbam_stages, adl_stages, tap_threshold: the model's
            head and attention / dropout blocks (see :class:`~weakloc.models.ModelConfig`).
        loss, focal_gamma: ``ce`` or ``focal`` (see :class:`~weakloc.train.module.OptimConfig`).
        counting: ``density``, ``count`` or ``both`` to train a counting head; ``data`` must then
            carry counts (:func:`weakloc.data.counts.load_count_labels`); default: ``density`` when
            it does.
        count_loss, count_weight, density_l1, density_tv, density_gather, crop_consistency: the counting loss (see
            :class:`~weakloc.train.module.OptimConfig`).
        density_stage, density_hidden, density_context: the stage the density head reads, its 3x3
            width and whether it also reads the last map (see :class:`~weakloc.models.ModelConfig`).
        hide_prob, hide_grid: Hide-and-Seek (hide each of ``hide_grid``² patches with this probability).
        cutmix_alpha: CutMix with Beta(alpha, alpha) areas (0: off; not with counts).
        ema_decay: keep a moving average of the weights with this decay per step (timm's
            ``ModelEmaV3`` with warm-up; 0: off, e.g. 0.99 for a few hundred steps, 0.9998 for
            long runs); validation scores it, and the model kept is the average.
        align_weight, consistency_weight: feature–class-weight alignment and attentive-dropout
            consistency losses (Kim et al. 2022; see :mod:`weakloc.train.alignment`; 0: off).
        teacher: a first-stage model (or its folder): trains a second stage whose localizer head
            learns the teacher's maps on the training images, thresholded at ``teacher_threshold``,
            as object masks (PSOL's idea; no human boxes). ``teacher_method`` and the threshold
            default to the teacher's calibrated ones (``weakloc calibrate``), else ``cam`` and 0.2.
        balanced: draw training images with probability inversely proportional to their class's
            frequency (rare positives seen as often as negatives); with counts, rare counts drawn
            more often (see :func:`balanced_sampler`).

        test_scale: maps, boxes and predictions of the trained model are made on inputs this many
            times the training size (stored as ``localization["input_size"]``, a multiple of 32;
            1: the training size). Denser maps from the same model: on the synthetic demo data CAM's
            MaxBoxAccV2 goes from 43.0 to 70.4 at 2x, on Aquarium from 8.4 to 13.7 (docs/results.md).
            Not for counting models (counts are learnt at the training scale), the attention head
            (its stage -3 maps are dense already; on BCCD platelets 2x took it from 28.2 to 14.5)
            nor transformers (their position embeddings fix the input size).
        map_options: default explain options per map method, stored in the model
            (``localization["options"]``) and used by localize / evaluate / explain / calibrate
            unless overridden; default :data:`DEFAULT_MAP_OPTIONS` (CAM with negative class weights
            clamped: +3.0 MaxBoxAccV2 on the demo data, +1.2 to +3.6 on Aquarium; docs/results.md).
            ``{}`` stores none.
        positive: the "yes" class of a two-class task (``--positive``), stored in the model as
            ``positive_class``; by default two classes are yes/no only when one is a 'no' word
            (``LabeledImages.task_description`` says which and why).

    For a yes/no task the decision threshold that maximises the positive class's F1 on the
    validation images is stored in the checkpoint (``decision_threshold``).

    Returns:
        :class:`TrainResult` with the best model.
    """
    check_train_options(dict(locals()))  # first: before any data is read or model built
    out = Path(out)
    resume_from, resume_info = resume_checkpoint(out / "checkpoints") if resume else (None, None)
    labeled = with_positive(data, positive) if isinstance(data, LabeledImages) else load_labels(data, positive=positive)
    if val_data is not None:
        train_set = labeled
        if isinstance(val_data, LabeledImages):
            val_set = val_data
        elif labeled.counts is not None:
            from weakloc.data.counts import load_count_labels

            val_set = load_count_labels(val_data, classes=labeled.classes)
        else:
            val_set = load_labels(val_data, classes=labeled.classes)
        if (labeled.counts is None) != (val_set.counts is None):
            raise WeaklocError("training and validation labels must both have counts, or neither")
    else:
        train_set, val_set = split_train_val(labeled, val_fraction, seed)
    if len(labeled.classes) < 2 and labeled.task == "single":
        raise WeaklocError(f"single-label training needs at least 2 classes, found {labeled.classes}")
    if labeled.counts is not None and counting is None:
        counting = "density"
    if counting is not None and labeled.counts is None:
        raise WeaklocError("a counting head needs counting labels: a counts CSV (path,<class>,...) or --counts-from ANNOTATIONS")
    if (density_gather or crop_consistency) and counting not in ("density", "both"):
        raise WeaklocError("density_gather and crop_consistency act on density maps: train with counting labels and "
                           "counting='density' or 'both'")
    if cutmix_alpha and labeled.counts is not None:
        raise WeaklocError("CutMix changes how many objects an image holds: it cannot be used with counting labels")
    if crop_scale is None:
        crop_scale = (1.0, 1.0) if labeled.counts is not None else (0.35, 1.0)
    if labeled.counts is not None and min(crop_scale) < 1:
        raise WeaklocError(f"random crops (crop_scale {tuple(crop_scale)}) cut objects out of the image, so its counts would be "
                           "wrong: use crop_scale (1.0, 1.0) with counting labels")
    if freeze_epochs >= epochs:
        freeze_epochs = max(0, epochs - 1)
    pl.seed_everything(seed, workers=True, verbose=False)
    config = ModelConfig(
        backbone=backbone, classes=list(labeled.classes), task=labeled.task, input_size=image_size,
        output_stride=output_stride, positive_class=labeled.positive_index, head=head,
        attention_stages=list(attention_stages) if attention_stages else [-3, -2], attention_norm=attention_norm,
        cbam_stages=list(cbam_stages or []), adl_stages=list(adl_stages or []), tap_threshold=tap_threshold, counting=counting,
        density_stage=density_stage if counting in ("density", "both") else None,
        density_hidden=density_hidden if counting in ("density", "both") else 0,
        density_context=bool(density_context and density_hidden and density_stage is not None and counting in ("density", "both")),
    )
    teacher_model = None
    if teacher is not None:
        teacher_model = teacher if isinstance(teacher, WeaklocNet) else load_model(teacher)
        if teacher_model.config.classes != config.classes:
            raise WeaklocError(f"the teacher's classes {teacher_model.config.classes} differ from the data's {config.classes}")
        calibrated = teacher_model.config.maps
        teacher_method = teacher_method or calibrated.method or "cam"
        teacher_threshold = teacher_threshold if teacher_threshold is not None else (calibrated.threshold if calibrated.threshold is not None else 0.2)
        config.localizer = True
    model = WeaklocNet(config, pretrained=pretrained)
    if teacher_model is not None and (tuple(teacher_model.config.mean) != tuple(config.mean) or tuple(teacher_model.config.std) != tuple(config.std)):
        raise WeaklocError("the teacher normalises its input differently from this backbone; use the same backbone family")
    workers = default_workers() if num_workers is None else num_workers
    loader_kw = {"num_workers": workers, "collate_fn": collate_skip_bad, "persistent_workers": workers > 0}
    sampler = balanced_sampler(train_set, seed) if balanced else None
    train_loader = DataLoader(ImageDataset.from_labels(train_set, train_transform(image_size, config.mean, config.std, crop_scale, dihedral)),
                              batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=len(train_set) > batch_size,
                              **loader_kw)
    val_loader = DataLoader(ImageDataset.from_labels(val_set, eval_transform(image_size, config.mean, config.std)),
                            batch_size=batch_size, shuffle=False, **loader_kw)
    if backbone_lr is None:
        backbone_lr = (0.3, 1.0) if counting else (0.01, 0.3)
    optim = OptimConfig(lr=lr, backbone_lr=tuple(backbone_lr), weight_decay=weight_decay, freeze_epochs=freeze_epochs, epochs=epochs, schedule=schedule,
                        loss=loss, focal_gamma=focal_gamma, count_loss=count_loss, count_weight=count_weight,
                        density_l1=density_l1, density_tv=density_tv, density_gather=density_gather, crop_consistency=crop_consistency, hide_prob=hide_prob, hide_grid=hide_grid,
                        cutmix_alpha=cutmix_alpha, ema_decay=ema_decay, align_weight=align_weight, consistency_weight=consistency_weight)
    module = ClassifierModule(model, optim, teacher_model, teacher_method or "cam", 0.2 if teacher_threshold is None else teacher_threshold)
    if resume_from is not None:
        check_resumable(module, resume_from, resume_info["shapes"])
    mode = "min" if monitor.endswith(("loss", "mae", "rmse")) else "max"
    checkpoints = out / "checkpoints"
    # fixed names, no best-v1.ckpt beside an older run's best.ckpt: the folder holds one run's state.
    # last.ckpt from a checkpoint callback of its own, written every epoch: Lightning's save_last
    # writes it only in epochs that improved the best one, so a resume would redo the others.
    ckpt = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor=monitor, mode=mode, enable_version_counter=False)
    every_epoch = ModelCheckpoint(dirpath=checkpoints, filename="last", enable_version_counter=False)
    last = checkpoints / "last.ckpt"
    history, stopper = TrainingHistory(), StopOnSignal(last)
    if precision is None:
        precision = "16-mixed" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "32-true"
    callbacks = [ckpt, every_epoch, FreezeBackbone(freeze_epochs), history, stopper]  # best.ckpt written before last.ckpt
    if progress:
        callbacks.append(_progress_bar())
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=accelerator, devices=devices, precision=precision,
        callbacks=callbacks, logger=CSVLogger(out, name="logs"), enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=max(1, min(5, len(train_loader))), num_sanity_val_steps=0,
        limit_train_batches=limit_batches, limit_val_batches=limit_batches, deterministic=False,
        plugins=[AtomicCheckpointIO()],
    )
    remove_stale_temporaries(checkpoints)
    remove_stale_temporaries(out)
    if resume_from is None:  # a fresh run: an older run's checkpoints must be neither resumed later nor taken as its best
        for old in [*checkpoints.glob("*.ckpt"), out / SKIPPED_FILE]:
            old.unlink(missing_ok=True)
    elif progress:
        print(f"resuming from {resume_from} (epoch {resume_info['epoch']}, step {resume_info['global_step']})", file=sys.stderr)
    with warnings.catch_warnings(), _signals_to(stopper):
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        # resuming a run stopped by SIGTERM within an epoch: the epoch's remaining steps come from a
        # fresh shuffle, which is what the warning is about, and is fine
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # resuming: it should be
        try:
            trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from, weights_only=True)
        except (SystemExit, KeyboardInterrupt):  # Lightning's SIGTERMException is a SystemExit; Ctrl+C ends in sys.exit(1)
            if stopper.signal is None:
                raise
            raise stopper.error(epochs) from None
    best_path = ckpt.best_model_path or str(last)
    best_ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best_ckpt["state_dict"])
    best = module.evaluated_model.cpu().eval()
    if config.positive_class is not None:
        best.config.decision_threshold = validation_threshold(best, val_loader, config.positive_class)
    is_transformer = hasattr(best.backbone, "patch_embed")  # ViT, DeiT, Swin, ...: fixed position embeddings
    if test_scale != 1 and config.counting is None and config.head != "attention" and not is_transformer:
        best.config.maps.test_size = max(32, int(round(image_size * test_scale / 32)) * 32)
    if config.counting is not None:  # average the counts over the views training made equivalent (docs/counting.md)
        best.config.maps.count_views = "dihedral" if dihedral else "flip"
    stored = DEFAULT_MAP_OPTIONS if map_options is None else map_options
    if stored:
        best.config.maps.options = {m: dict(o) for m, o in stored.items()}
    model_dir = save_model(best, out / "model")
    # the best epoch and its metrics as the checkpoint the model comes from recorded them, so they
    # are the saved model's whatever resumes came in between
    best_history = best_ckpt.get("callbacks", {}).get(history.state_key, {}).get("history", [])
    best_epoch = next((h for h in best_history if h["epoch"] == best_ckpt["epoch"]), {})
    metrics = {"best_epoch": best_epoch.get("epoch"), **{k: v for k, v in best_epoch.items() if k.startswith("val_")},
               "skipped_images": module.skipped, "train_images": len(train_set), "val_images": len(val_set)}
    if module.skip_log:
        listing = "".join(line + "\n" for line in module.skip_log.lines())
        atomic_write(out / SKIPPED_FILE, lambda f: f.write(listing.encode("utf-8")))
    report = json.dumps({"best": metrics, "history": history.epochs}, indent=2)
    atomic_write(out / "metrics.json", lambda f: f.write(report.encode()))
    return TrainResult(load_model(model_dir), model_dir, metrics, history.epochs, module.skip_log)
