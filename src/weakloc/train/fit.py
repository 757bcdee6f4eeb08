"""``fine_tune``: train a weakly-supervised classifier from image-level labels, the fast.ai way.

Lightning runs the loop (devices, mixed precision, checkpointing, progress, logging); the result
is a checkpoint folder (``model.safetensors`` + ``config.json``) of the best validation epoch, whose
``config.json`` also records how it was trained (``train``) and how its maps are made (``maps``).

:func:`fine_tune` runs these steps, each a function of its own: settle and check the settings
(:mod:`weakloc.train.options`); read and split the labels; settle what depends on the data; build
the model (and load a teacher); make the loaders and the trainer; train; then choose the decision
threshold, store the map settings and save the best model.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from weakloc.config import MapConfig, ModelConfig, TrainConfig, fallback_threshold
from weakloc.data.dataset import EpochLoader, EpochSampler, ImageDataset, SkipLog, collate_skip_bad, eval_transform, train_transform
from weakloc.data.labels import LabeledImages, load_labels, split_train_val, with_positive
from weakloc.errors import OptionError, WeaklocError
from weakloc.models.backbone import for_inference
from weakloc.models.checkpoint import atomic_write, load_model, save_model
from weakloc.models.classifier import WeaklocNet
from weakloc.train.module import ClassifierModule, FreezeBackbone, choose_decision_threshold, default_backbone_lr
from weakloc.train.options import (DEFAULT_MAP_OPTIONS, DEFAULT_REFINE, TrainSettings, check_train_options, option_name, process_layout,  # noqa: F401 -- re-exported
                                   scaled_size, settle_settings)
from weakloc.train.state import (RESUME_KEYS, SKIPPED_FILE, TMP_SUFFIX, AtomicCheckpointIO, StopOnSignal,  # noqa: F401 -- re-exported
                                 TrainingHistory, TrainingInterrupted, check_resumable, lost_peer_message, peer_deaths_reported,
                                 remove_stale_temporaries, resume_checkpoint, signals_to)


@dataclass
class TrainResult:
    """What :func:`fine_tune` returns.

    Attributes:
        model: the best model (eval mode, on the CPU); the same weights and config as
            :func:`~weakloc.models.load_model` reads from ``model_dir``.
        model_dir: its checkpoint folder.
        metrics: validation metrics of the best epoch (``best_epoch``: its number), and
            ``skipped_images``: how many images could not be decoded.
        history: per-epoch validation metrics, every epoch of the run once, resumes included.
        skipped: those images, each with why (also in ``skipped.txt`` beside ``model/``).
        training: how the run was laid out (:func:`training_record`): processes, the effective
            batch size and the learning rate.
        rank: this process's global rank. Only rank zero writes (the model folder,
            ``metrics.json``, ``skipped.txt``); on the other ranks of a several-process run
            ``model`` is the weights training ended with (not the best epoch's), ``metrics`` is
            empty and ``model_dir`` is where rank zero saves the model.
    """

    model: WeaklocNet
    model_dir: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)
    skipped: SkipLog = field(default_factory=SkipLog)
    training: dict = field(default_factory=dict)
    rank: int = 0


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


def balanced_sampler(labeled: LabeledImages, seed: int = 0) -> EpochSampler:
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
    return EpochSampler(len(labeled), seed, weights=weights.double())


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



# --- the steps of fine_tune ----------------------------------------------------------------------

def load_training_data(data, val, positive: str | None, train: TrainConfig) -> tuple[LabeledImages, LabeledImages]:
    """The training and validation images: ``val`` when given (read with the training data's
    classes, counts when the training data has counts), else the data's own split or a seeded
    ``train.val_fraction`` split.

    Raises:
        WeaklocError: the two have counts and no counts; fewer than 2 classes for a single-label task.
    """
    labeled = with_positive(data, positive) if isinstance(data, LabeledImages) else load_labels(data, positive=positive)
    if val is None:
        train_set, val_set = split_train_val(labeled, train.val_fraction, train.seed)
    elif isinstance(val, LabeledImages):
        train_set, val_set = labeled, val
    elif labeled.counts is not None:
        from weakloc.data.counts import load_count_labels

        train_set, val_set = labeled, load_count_labels(val, classes=labeled.classes)
    else:
        train_set, val_set = labeled, load_labels(val, classes=labeled.classes)
    if (labeled.counts is None) != (val_set.counts is None):
        raise WeaklocError("training and validation labels must both have counts, or neither")
    if len(labeled.classes) < 2 and labeled.task == "single":
        raise WeaklocError(f"single-label training needs at least 2 classes, found {labeled.classes}")
    return train_set, val_set


def _stage_lists(model: ModelConfig) -> dict[str, list[int]]:
    """The model's stage lists as lists, None meaning the default (ModelConfig's)."""
    defaults = ModelConfig()
    return {name: list(getattr(defaults if getattr(model, name) is None else model, name))
            for name in ("attention_stages", "cbam_stages", "adl_stages")}


def settle_for_data(model: ModelConfig, train: TrainConfig, labeled: LabeledImages) -> tuple[ModelConfig, TrainConfig]:
    """The configurations with what depends on the data settled: classes, task and yes/no class;
    counting (``density`` when the labels carry counts and none is given; the density head's
    settings cleared unless it has one); the crop range (no crop with counts), the backbone's
    learning rates (:func:`~weakloc.train.module.default_backbone_lr`) and at most ``epochs - 1``
    frozen epochs.

    Raises:
        WeaklocError: a setting the data cannot train with (a counting head without counts, CutMix
            or random crops with counts, density priors without a density head, other classes).
    """
    if model.classes and list(model.classes) != list(labeled.classes):
        raise WeaklocError(f"the model's classes {model.classes} differ from the data's {labeled.classes}")
    has_counts = labeled.counts is not None
    counting = model.counting or ("density" if has_counts else None)
    if counting is not None and not has_counts:
        raise WeaklocError("a counting head needs counting labels: a counts CSV (path,<class>,...) or --counts-from ANNOTATIONS")
    density = counting in ("density", "both")
    if (train.density_gather or train.crop_consistency) and not density:
        raise WeaklocError("density_gather and crop_consistency act on density maps: train with counting labels and "
                           "counting='density' or 'both'")
    if train.cutmix_alpha and has_counts:
        raise WeaklocError("CutMix changes how many objects an image holds: it cannot be used with counting labels")
    crop_scale = tuple(map(float, train.crop_scale)) if train.crop_scale is not None else (1.0, 1.0) if has_counts else (0.35, 1.0)
    if has_counts and min(crop_scale) < 1:
        raise WeaklocError(f"random crops (crop_scale {crop_scale}) cut objects out of the image, so its counts would be "
                           "wrong: use crop_scale (1.0, 1.0) with counting labels")
    model = replace(model, classes=list(labeled.classes), task=labeled.task, positive_class=labeled.positive_index,
                    counting=counting, decision_threshold=None, localizer=False, **_stage_lists(model),
                    density_stage=model.density_stage if density else None,
                    density_hidden=model.density_hidden if density else 0,
                    density_context=bool(density and model.density_context and model.density_hidden and model.density_stage is not None))
    backbone_lr = tuple(map(float, train.backbone_lr)) if train.backbone_lr is not None else default_backbone_lr(counting)
    train = replace(train, crop_scale=crop_scale, backbone_lr=backbone_lr, freeze_epochs=min(train.freeze_epochs, max(0, train.epochs - 1)))
    return model, train


def load_teacher(teacher, model: ModelConfig, train: TrainConfig) -> tuple[WeaklocNet | None, ModelConfig, TrainConfig]:
    """The first-stage model (or None), the config with a localizer head to learn its maps and a box
    head to learn its boxes, and the teacher's map method and threshold settled: the given ones, else
    the teacher's calibrated ones, else ``cam`` and 0.2 (0.5 for refined maps)."""
    if teacher is None:
        return None, model, train
    net = teacher if isinstance(teacher, WeaklocNet) else load_model(teacher)
    if net.config.classes != model.classes:
        raise WeaklocError(f"the teacher's classes {net.config.classes} differ from the data's {model.classes}")
    stored = net.config.maps
    train = replace(train, teacher_method=train.teacher_method or stored.method or "cam",
                    teacher_threshold=next(t for t in (train.teacher_threshold, stored.threshold,
                                                       fallback_threshold(stored.refine, 0.2)) if t is not None))
    if model.box_backbone:  # the classifier is the teacher itself, so is its architecture
        for name in ("task", "counting", "positive_class"):
            if getattr(net.config, name) != getattr(model, name):
                raise WeaklocError(f"the teacher's {name} {getattr(net.config, name)!r} differs from the data's "
                                   f"{getattr(model, name)!r}: a separate box network keeps the teacher's classifier as it is")
        return net, replace(net.config, localizer=True, box_head=True, box_backbone=model.box_backbone, decision_threshold=None,
                            maps=MapConfig(), train=None), train
    return net, replace(model, localizer=True, box_head=True), train


def build_model(model: ModelConfig, train: TrainConfig, teacher: WeaklocNet | None) -> WeaklocNet:
    """The network to train, its backbone initialised from ``train.pretrained``; with a separate box
    network, everything else is a frozen copy of the teacher."""
    net = WeaklocNet(model, pretrained=train.pretrained)
    if teacher is not None and (tuple(teacher.config.mean) != tuple(net.config.mean) or tuple(teacher.config.std) != tuple(net.config.std)):
        raise WeaklocError("the teacher normalises its input differently from this backbone; use the same backbone family")
    if net.frozen_classifier:
        state = teacher.state_dict()
        if teacher.config.box_backbone != model.box_backbone:  # another box network (or none): only a like one carries over
            state = {k: v for k, v in state.items() if not k.startswith(("box_backbone.", "box_head."))}
        missing, unexpected = net.load_state_dict(state, strict=False)
        trained = {id(p) for p in net.new_parameters() + net.pretrained_parameters()}
        named = dict(net.named_parameters())
        if unexpected or any(id(named[k]) not in trained for k in missing if k in named):
            raise WeaklocError(f"the teacher's weights do not fit its own architecture: {unexpected or missing}")
        for p in net.parameters():
            p.requires_grad_(id(p) in trained)
        net.colocalization = teacher.colocalization  # the teacher's DDT statistics fit the copied backbone
    return net


def make_loaders(train_set: LabeledImages, val_set: LabeledImages, model: ModelConfig, train: TrainConfig) -> tuple[DataLoader, DataLoader]:
    """The training loader (augmented, shuffled or class-balanced, the last partial batch dropped)
    and the validation loader (resized, in order)."""
    workers = default_workers() if train.workers is None else train.workers
    common = {"num_workers": workers, "collate_fn": collate_skip_bad, "persistent_workers": workers > 0}
    sampler = balanced_sampler(train_set, train.seed) if train.balanced else EpochSampler(len(train_set), train.seed)
    augment = train_transform(model.input_size, model.mean, model.std, train.crop_scale, train.dihedral)
    train_loader = EpochLoader(ImageDataset.from_labels(train_set, augment), batch_size=train.batch_size, sampler=sampler,
                               drop_last=len(train_set) > train.batch_size, **common)
    val_loader = DataLoader(ImageDataset.from_labels(val_set, eval_transform(model.input_size, model.mean, model.std)),
                            batch_size=train.batch_size, shuffle=False, **common)
    return train_loader, val_loader


class SplitValidation(pl.LightningDataModule):
    """The training and validation loaders for Lightning, sharded here when several processes train
    (the trainer is told not to put its own samplers in): each training process takes its share of
    the epoch's :class:`EpochSampler` draws, and each validation image goes to exactly one process
    (Lightning's ``DistributedSampler`` would pad the validation shards to one size by repeating
    images, which the validation metrics would then count twice)."""

    def __init__(self, train_loader: DataLoader, val_loader: DataLoader):
        super().__init__()
        self.train_loader, self.val_loader = train_loader, val_loader

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size
        if world == 1:
            return self.train_loader
        return _resampled(self.train_loader, self.train_loader.sampler.shard(self.trainer.global_rank, world))

    def val_dataloader(self) -> DataLoader:
        world = self.trainer.world_size
        if world == 1:
            return self.val_loader
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        loader = self.val_loader
        return _resampled(loader, UnrepeatedDistributedSampler(loader.dataset, num_replicas=world, rank=self.trainer.global_rank,
                                                               shuffle=False))


def _resampled(loader: DataLoader, sampler) -> DataLoader:
    """``loader`` (of its class) with another sampler, its other settings kept."""
    return type(loader)(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, persistent_workers=loader.persistent_workers, drop_last=loader.drop_last)


@dataclass
class _Run:
    """A Lightning trainer and the callbacks :func:`fine_tune` reads after training."""

    trainer: pl.Trainer
    best: ModelCheckpoint
    last: Path
    history: TrainingHistory
    stopper: StopOnSignal


def make_trainer(out: Path, train: TrainConfig, steps_per_epoch: int, progress: bool) -> _Run:
    """The trainer: ``best.ckpt`` by ``train.monitor`` and ``last.ckpt`` every epoch (both written
    atomically), the frozen warm-up, the history and the signal handling, a CSV log in ``out/logs``."""
    checkpoints = out / "checkpoints"
    mode = "min" if train.monitor.endswith(("loss", "mae", "rmse")) else "max"
    # fixed names, no best-v1.ckpt beside an older run's best.ckpt: the folder holds one run's state.
    # last.ckpt from a checkpoint callback of its own, written every epoch: Lightning's save_last
    # writes it only in epochs that improved the best one, so a resume would redo the others.
    best = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor=train.monitor, mode=mode, enable_version_counter=False)
    every_epoch = ModelCheckpoint(dirpath=checkpoints, filename="last", enable_version_counter=False)
    last = checkpoints / "last.ckpt"
    history, stopper = TrainingHistory(), StopOnSignal(last)
    precision = train.precision
    if precision is None:
        precision = "16-mixed" if torch.cuda.is_available() and train.accelerator in ("auto", "gpu", "cuda") else "32-true"
    callbacks = [best, every_epoch, FreezeBackbone(train.freeze_epochs), history, stopper]  # best.ckpt written before last.ckpt
    if progress:
        callbacks.append(_progress_bar())
    devices, num_nodes = process_layout(train.devices, train.num_nodes)
    try:
        trainer = pl.Trainer(
            max_epochs=train.epochs, accelerator=train.accelerator, devices=devices, num_nodes=num_nodes,
            strategy=lightning_strategy(train.strategy, train.accelerator, devices, num_nodes), precision=precision,
            callbacks=callbacks, logger=CSVLogger(out, name="logs"),
            enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=max(1, min(5, steps_per_epoch)),
            num_sanity_val_steps=0, limit_train_batches=train.limit_batches, limit_val_batches=train.limit_batches,
            deterministic=False, plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,  # SplitValidation shards
        )
    except (MisconfigurationException, ValueError) as e:  # a layout Lightning cannot run: one line, not its traceback
        raise OptionError(f"--accelerator {train.accelerator} --devices {train.devices} --num-nodes {num_nodes} "
                          f"--strategy {train.strategy}: Lightning cannot run this layout: {first_line(e)}") from None
    return _Run(trainer, best, last, history, stopper)


def lightning_strategy(strategy: str, accelerator: str, devices, num_nodes: int) -> str:
    """Lightning's strategy for ``--strategy``: with several processes, DDP told that some
    parameters may get no gradient in a step -- the backbone's, frozen in the warm-up epochs
    (``FreezeBackbone``), which DDP would otherwise stop at in the next step."""
    if strategy == "auto":
        from lightning.fabric.utilities.imports import _IS_INTERACTIVE

        if isinstance(devices, (list, tuple)):
            count = len(devices)
        elif devices == "auto":
            count = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
        else:
            count = devices
        if count == 1 and num_nodes == 1:
            return "auto"
        strategy = "ddp_fork" if _IS_INTERACTIVE else "ddp"  # what Lightning's auto would choose
    return f"{strategy}_find_unused_parameters_true"


def training_record(trainer: pl.Trainer, train: TrainConfig) -> dict:
    """How a run is laid out: its processes (devices per node x nodes), the batch size of each and
    the effective one (x processes x gradient accumulation), and the learning rate, used as given
    (``lr_scaled`` False: weakloc never scales it with the effective batch)."""
    world, accumulate = int(trainer.world_size), int(trainer.accumulate_grad_batches)
    return {"processes": world, "num_nodes": int(trainer.num_nodes), "devices_per_node": int(trainer.num_devices),
            "strategy": type(trainer.strategy).__name__, "batch_size_per_process": train.batch_size,
            "accumulate_grad_batches": accumulate, "effective_batch_size": train.batch_size * world * accumulate,
            "lr": train.lr, "lr_scaled": False}


def describe_layout(record: dict) -> str:
    """The line training prints about :func:`training_record`."""
    r = record
    where = f"{r['processes']} process(es) ({r['devices_per_node']} per node x {r['num_nodes']} node(s), {r['strategy']})"
    return (f"training on {where}: effective batch size {r['effective_batch_size']} ({r['batch_size_per_process']} per "
            f"process x {r['processes']} x {r['accumulate_grad_batches']} accumulated), lr {r['lr']:g} (as given, not scaled)")


def clear_old_run(out: Path, resuming: bool) -> None:
    """Remove what killed writes left in ``out``; a fresh run also removes an older run's
    checkpoints and skipped list, which must be neither resumed later nor taken as its best."""
    checkpoints = out / "checkpoints"
    remove_stale_temporaries(checkpoints)
    remove_stale_temporaries(out)
    if not resuming:
        for old in [*checkpoints.glob("*.ckpt"), out / SKIPPED_FILE]:
            old.unlink(missing_ok=True)


def run_training(run: _Run, module: ClassifierModule, loaders: tuple[DataLoader, DataLoader], resume_from: Path | None,
                 epochs: int) -> None:
    """Train; SIGTERM or Ctrl+C end it with :class:`TrainingInterrupted` and a resumable state."""
    with warnings.catch_warnings(), signals_to(run.stopper), peer_deaths_reported(run.last, run.trainer.world_size):
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # resuming: it should be
        try:
            run.trainer.fit(module, datamodule=SplitValidation(*loaders), ckpt_path=resume_from, weights_only=True)
        except (SystemExit, KeyboardInterrupt):  # Lightning's SIGTERMException is a SystemExit; Ctrl+C ends in sys.exit(1)
            if run.stopper.signal is None:
                raise
            raise run.stopper.error(epochs) from None
        except RuntimeError as e:
            if run.trainer.world_size == 1 or not lost_peer(e):
                raise
            raise TrainingInterrupted(lost_peer_message(run.trainer.global_rank, run.trainer.world_size, first_line(e), run.last),
                                      signal.SIGTERM) from None


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is torch.distributed's (gloo's, NCCL's) report of a process that went away."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return any(word in text for word in ("gloo", "NCCL", "Connection reset", "Connection closed"))


def spawned_state(run: _Run, module: ClassifierModule) -> None:
    """After ``ddp_spawn`` trained in processes of its own: the history and the skipped images
    from their last checkpoint (Lightning brings only the weights and the best path back)."""
    checkpoint = torch.load(run.last, map_location="cpu", weights_only=True)
    run.history.load_state_dict(checkpoint.get("callbacks", {}).get(run.history.state_key, {}))
    module.on_load_checkpoint(checkpoint)


def best_model(module: ClassifierModule, path: Path) -> tuple[WeaklocNet, dict]:
    """The model of the checkpoint at ``path`` (the moving average, with one), on the CPU in eval
    mode, fp32 and channels-last as :func:`~weakloc.models.load_model` would give it; and the checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"])
    return for_inference(module.evaluated_model.float()).requires_grad_(True), checkpoint


def trained_maps(model: ModelConfig, train: TrainConfig, maps: MapConfig, *, options_given: bool, transformer: bool) -> MapConfig:
    """The map settings stored with a trained model: ``maps`` as given, plus -- where it leaves
    them unset -- the test-time size ``train.test_scale`` times the training size (not for counting
    models, whose counts are learnt at the training scale, the attention head, whose maps are dense
    already, nor transformers, whose position embeddings fix the input size), a counting model's
    count views (the views training made equivalent, docs/counting.md),
    :data:`~weakloc.train.options.DEFAULT_MAP_OPTIONS` and, for a classifier (not a counting model,
    whose instances come from its own peaks, nor the attention head, whose fine maps the filter
    blurs: docs/results.md, sixth round), :data:`~weakloc.train.options.DEFAULT_REFINE`.
    ``sources`` says which ``fine_tune`` set."""
    sources = {k: dict(v) for k, v in maps.sources.items()}
    out = replace(maps, options={m: dict(o) for m, o in maps.options.items()}, sources=sources)
    if out.test_size is None and train.test_scale != 1 and model.counting is None and model.head != "attention" and not transformer:
        out.test_size = scaled_size(model.input_size, train.test_scale)
        sources["test_size"] = {"by": "fine_tune", "test_scale": train.test_scale}
    if model.counting is not None and out.count_views is None:
        out.count_views = "dihedral" if train.dihedral else "flip"
        sources["count_views"] = {"by": "fine_tune", "dihedral": train.dihedral}
    if not options_given:
        out.options = {m: dict(o) for m, o in DEFAULT_MAP_OPTIONS.items()}
        sources["options"] = {"by": "fine_tune"}
    if out.refine is None and model.counting is None and model.head != "attention":
        out.refine = DEFAULT_REFINE
        sources["refine"] = {"by": "fine_tune"}
    return out


def best_metrics(checkpoint: dict, history: TrainingHistory, module: ClassifierModule, n_train: int, n_val: int) -> dict:
    """The best epoch and its metrics as the checkpoint the model comes from recorded them (so they
    are the saved model's whatever resumes came in between), the skipped images and the split sizes."""
    recorded = checkpoint.get("callbacks", {}).get(history.state_key, {}).get("history", [])
    epoch = next((h for h in recorded if h["epoch"] == checkpoint["epoch"]), {})
    return {"best_epoch": epoch.get("epoch"), **{k: v for k, v in epoch.items() if k.startswith("val_")},
            "skipped_images": module.skipped, "train_images": n_train, "val_images": n_val}


def write_run_files(out: Path, metrics: dict, history: list[dict], skipped: SkipLog, training: dict | None = None) -> None:
    """``metrics.json`` (the best epoch, every epoch and the run's layout, :func:`training_record`)
    and, when images were skipped, ``skipped.txt``."""
    if skipped:
        listing = "".join(line + "\n" for line in skipped.lines())
        atomic_write(out / SKIPPED_FILE, lambda f: f.write(listing.encode("utf-8")))
    report = json.dumps({"best": metrics, "history": history, "training": training or {}}, indent=2)
    atomic_write(out / "metrics.json", lambda f: f.write(report.encode()))


# --- fine_tune -----------------------------------------------------------------------------------

def fine_tune(
    data: str | Path | LabeledImages,
    out: str | Path = "runs/weakloc",
    *,
    model: ModelConfig | None = None,
    train: TrainConfig | None = None,
    maps: MapConfig | None = None,
    val: str | Path | LabeledImages | None = None,
    teacher: str | Path | WeaklocNet | None = None,
    resume: bool = False,
    progress: bool = True,
    positive: str | None = None,
    **settings,
) -> TrainResult:
    """Fine-tune a pretrained timm backbone on image-level labels.

    The backbone is frozen for ``freeze_epochs`` (head warm-up), then everything trains with
    layer-wise learning rates; AdamW with a one-cycle (or cosine) schedule; random resized crop,
    flip and light colour jitter; mixed precision on a GPU. The best epoch by ``monitor`` is kept.

    Settings come as config objects or, fast.ai style, as keywords by their field names
    (``fine_tune("data", epochs=3, backbone="resnet18")``): :class:`~weakloc.config.ModelConfig`'s
    ``backbone``, ``input_size``, ``output_stride``, ``drop_rate``, ``head``, ``attention_stages``,
    ``attention_norm``, ``cbam_stages``, ``adl_stages``, ``tap_threshold``, ``counting``,
    ``density_stage``, ``density_hidden``, ``density_context``, and every
    :class:`~weakloc.config.TrainConfig` field (see there what each does). A setting given both in
    a config object and as a keyword is refused. The old keywords ``image_size``, ``num_workers``,
    ``val_data`` and ``map_options`` still work, with a :class:`DeprecationWarning`.

    Args:
        data: a labels CSV, a folder holding ``labels.csv``, a folder-per-class tree, or
            :class:`LabeledImages` (with counts, :func:`weakloc.data.counts.load_count_labels`:
            the model counts, with a ``density`` head unless ``counting`` says otherwise). Its own
            split (CSV ``split`` column, ``train/``/``val/`` folders) is used; otherwise a seeded
            split of ``val_fraction``.
        out: output folder: ``model/`` (best checkpoint), ``checkpoints/`` (``best.ckpt``, and
            ``last.ckpt`` of every epoch; written atomically, so a killed run leaves them whole),
            ``logs/``, ``metrics.json`` (the best epoch and every epoch's metrics), ``skipped.txt``
            (images that could not be decoded, if any). A fresh run deletes an older run's checkpoints.
        model: the model's settings; classes, task and yes/no class come from the data. Without
            one, a counting model's density head reads stage -3 through a 64-channel 3x3
            convolution and also reads the last feature map (unless keywords say otherwise);
            a given ModelConfig is used as given.
        train: the training settings (:class:`~weakloc.config.TrainConfig`). The saved model's
            ``config.train`` holds the ones used, defaults settled (crop range, backbone learning
            rates, frozen epochs, the teacher's method and threshold).
        maps: map settings stored with the model (used by localize / evaluate / explain /
            calibrate unless overridden). Where unset, ``fine_tune`` stores the test-time size
            (``test_scale`` times the training size; not for counting models, the attention head
            or transformers), a counting model's count views (``dihedral`` when trained with
            ``dihedral``, else ``flip``) and, unless ``maps.options`` is given,
            :data:`~weakloc.train.options.DEFAULT_MAP_OPTIONS`; ``maps.sources`` records which.
        val: separate validation data (read with the training data's classes).
        teacher: a first-stage model (or its folder): trains a second stage whose localizer head
            learns the teacher's maps on the training images, thresholded at ``teacher_threshold``,
            as object masks (PSOL's idea; no human boxes). ``teacher_method`` and the threshold
            default to the teacher's calibrated ones (``weakloc calibrate``), else ``cam`` and 0.2.
        resume: continue after an interruption, from the newest checkpoint in ``out/checkpoints``
            that loads completely (a broken one is named in a warning and skipped). SIGTERM or
            Ctrl+C stop training between two batches with a resumable ``last.ckpt`` and raise
            :class:`TrainingInterrupted`; the history and the best epoch carry over.
        progress: show a progress bar.
        positive: the "yes" class of a two-class task (``--positive``), stored in the model as
            ``positive_class``; by default two classes are yes/no only when one is a 'no' word
            (``LabeledImages.task_description`` says which and why). Its decision threshold, the
            probability cut with the best F1 on the validation images, is stored as
            ``decision_threshold``.

    Several processes (``devices`` > 1, ``num_nodes`` > 1, or torchrun; docs/scale.md): each
    trains on a share of the images (``batch_size`` per process; ``lr`` as given, never scaled);
    validation metrics are those of the whole validation set, gathered over the processes; only
    global rank zero writes ``out``. ``strategy="ddp"`` starts this script again (``sys.argv``)
    for each extra process, so every process runs this call.

    Returns:
        :class:`TrainResult` with the best model; on a rank other than zero, what
        :class:`TrainResult` says of those (``rank`` > 0, nothing written).

    Raises:
        OptionError: a bad, unknown or twice-given setting, before any data is read.
    """
    given = settle_settings(model, train, maps, val, settings, stacklevel=3)
    check_train_options(given.model, given.train, out, maps=given.maps, spelled=given.spelled,
                        teacher=teacher is not None)  # before any data is read
    out = Path(out)
    resume_from, resume_info = resume_checkpoint(out / "checkpoints") if resume else (None, None)
    train_set, val_set = load_training_data(data, given.val, positive, given.train)
    config, settings_used = settle_for_data(given.model, given.train, train_set)
    pl.seed_everything(settings_used.seed, workers=True, verbose=False)
    teacher_net, config, settings_used = load_teacher(teacher, config, settings_used)
    if config.box_backbone and given.maps == MapConfig():  # the classifier is the teacher's: so are its (calibrated) map settings
        given = replace(given, maps=teacher_net.config.maps, options_given=True)
    net = build_model(config, settings_used, teacher_net)
    net.frozen_stage_parameters(settings_used.frozen_stages, option_name("frozen_stages", given.spelled))  # its stage count is known only now
    loaders = make_loaders(train_set, val_set, net.config, settings_used)
    module = ClassifierModule(net, settings_used, teacher_net, given.train)
    if resume_from is not None:
        check_resumable(module, resume_from, resume_info["shapes"], resume_info["teacher"], resume_info["recipe"])
    run = make_trainer(out, settings_used, len(loaders[0]), progress)
    rank, record = run.trainer.global_rank, training_record(run.trainer, settings_used)
    if len(val_set) < record["processes"]:
        raise WeaklocError(f"{len(val_set)} validation image(s) for {record['processes']} training processes: each process "
                           "validates a share of them, so give at least one per process")
    if rank == 0:
        clear_old_run(out, resuming=resume_from is not None)
        if progress:
            if resume_from is not None:
                print(f"resuming from {resume_from} (epoch {resume_info['epoch']}, step {resume_info['global_step']})", file=sys.stderr)
            print(describe_layout(record), file=sys.stderr)
    run_training(run, module, loaders, resume_from, settings_used.epochs)
    rank = run.trainer.global_rank  # ddp_spawn: the process that called fit is rank zero's, after it
    if rank == 0 and not run.history.epochs and run.last.is_file():
        spawned_state(run, module)
    if rank != 0:  # rank zero writes the model folder and the run's files
        last = module.evaluated_model.cpu().float().eval()
        return TrainResult(last, out / "model", {}, run.history.epochs, module.skip_log, record, rank)
    # the SWA average is the run's end, not an epoch validation picked; so is a separate box network,
    # whose validation figures are its frozen teacher's, the same every epoch
    at_end = settings_used.swa or net.frozen_classifier
    best, checkpoint = best_model(module, Path(run.last if at_end else run.best.best_model_path or run.last))
    _finish_config(best, loaders[1], settings_used, given)
    model_dir = save_model(best, out / "model")
    # the saved config.json as load_model reads it (JSON's types: tuples for pairs, floats), so the
    # returned model and load_model(model_dir) are the same; the weights are already the saved ones
    best.config = ModelConfig.from_json(best.config.to_json(), str(model_dir / "config.json"))
    metrics = best_metrics(checkpoint, run.history, module, len(train_set), len(val_set))
    write_run_files(out, metrics, run.history.epochs, module.skip_log, record)
    return TrainResult(best, model_dir, metrics, run.history.epochs, module.skip_log, record)


def _finish_config(best: WeaklocNet, val_loader: DataLoader, train: TrainConfig, given: TrainSettings) -> None:
    """Complete the trained model's config: the yes/no decision threshold chosen on ``val_loader``,
    the stored map settings (:func:`trained_maps`) and the training settings used."""
    config = best.config
    if config.positive_class is not None:
        config.decision_threshold = validation_threshold(best, val_loader, config.positive_class)
    transformer = hasattr(best.backbone, "patch_embed")  # ViT, DeiT, Swin, ...: fixed position embeddings
    config.maps = trained_maps(config, train, given.maps, options_given=given.options_given, transformer=transformer)
    config.train = train
