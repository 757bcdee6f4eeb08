"""``fine_tune``: train a weakly-supervised classifier from image-level labels, the fast.ai way.

Lightning runs the loop (devices, mixed precision, checkpointing, progress, logging); the result
is a checkpoint folder (``model.safetensors`` + ``config.json``) of the best validation epoch.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, WeightedRandomSampler

from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform, train_transform
from weakloc.data.labels import LabeledImages, load_labels, split_train_val, with_positive
from weakloc.errors import WeaklocError
from weakloc.models.backbone import DEFAULT_BACKBONE
from weakloc.models.checkpoint import load_model, save_model
from weakloc.models.classifier import ModelConfig, WeaklocNet
from weakloc.train.module import ClassifierModule, FreezeBackbone, OptimConfig, choose_decision_threshold


@dataclass
class TrainResult:
    """What :func:`fine_tune` returns.

    Attributes:
        model: the best model (eval mode, on the CPU).
        model_dir: its checkpoint folder.
        metrics: validation metrics of the best epoch.
        history: per-epoch validation metrics.
    """

    model: WeaklocNet
    model_dir: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)


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
        out: output folder: ``model/`` (best checkpoint), ``checkpoints/``, ``logs/``, ``metrics.json``.
        backbone_lr: (earliest, latest) multipliers of ``lr`` for the backbone's layer groups
            (default: (0.01, 0.3); (0.3, 1.0) with counting, whose early layers must learn to tell
            single objects apart -- on synthetic counting it lowered the validation MAE from 1.57
            to 1.41 in the same budget).
        resume: continue from ``out/checkpoints/last.ckpt`` after an interruption.
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
    out = Path(out)
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
    if not 0 <= ema_decay < 1:
        raise WeaklocError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if loss not in ("ce", "focal"):
        raise WeaklocError(f"unknown loss {loss!r}: use ce or focal")
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
        calibrated = teacher_model.config.localization or {}
        teacher_method = teacher_method or calibrated.get("method", "cam")
        teacher_threshold = teacher_threshold if teacher_threshold is not None else calibrated.get("threshold", 0.2)
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
    mode = "min" if monitor.endswith(("loss", "mae", "rmse")) else "max"
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode=mode, save_last=True)
    history: list[dict] = []

    class _History(pl.Callback):
        # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the
        # module's, so metrics the module logs at epoch end (val_acc, val_map, val_count_mae) would be
        # the previous epoch's there
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                history.append({"epoch": trainer.current_epoch, **{k: float(v) for k, v in trainer.callback_metrics.items()}})

    if precision is None:
        precision = "16-mixed" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "32-true"
    callbacks = [ckpt, FreezeBackbone(freeze_epochs), _History()]
    if progress:
        callbacks.append(_progress_bar())
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=accelerator, devices=devices, precision=precision,
        callbacks=callbacks, logger=CSVLogger(out, name="logs"), enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=max(1, min(5, len(train_loader))), num_sanity_val_steps=0,
        limit_train_batches=limit_batches, limit_val_batches=limit_batches, deterministic=False,
    )
    last = out / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise WeaklocError(f"cannot resume: {last} does not exist")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        trainer.fit(module, train_loader, val_loader, ckpt_path=last if resume else None, weights_only=True)
    best_path = ckpt.best_model_path or str(last)
    state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    best = module.evaluated_model.cpu().eval()
    if config.positive_class is not None:
        best.config.decision_threshold = validation_threshold(best, val_loader, config.positive_class)
    is_transformer = hasattr(best.backbone, "patch_embed")  # ViT, DeiT, Swin, ...: fixed position embeddings
    if test_scale != 1 and config.counting is None and config.head != "attention" and not is_transformer:
        best.config.localization["input_size"] = max(32, int(round(image_size * test_scale / 32)) * 32)
    if config.counting is not None:  # average the counts over the views training made equivalent (docs/counting.md)
        best.config.localization["count_tta"] = "dihedral" if dihedral else "flip"
    stored = DEFAULT_MAP_OPTIONS if map_options is None else map_options
    if stored:
        best.config.localization["options"] = {m: dict(o) for m, o in stored.items()}
    model_dir = save_model(best, out / "model")
    best_epoch = min(history, key=lambda h: h.get(monitor, float("inf"))) if mode == "min" and history else (
        max(history, key=lambda h: h.get(monitor, float("-inf"))) if history else {})
    metrics = {"best_epoch": best_epoch.get("epoch"), **{k: v for k, v in best_epoch.items() if k.startswith("val_")},
               "skipped_images": module.skipped, "train_images": len(train_set), "val_images": len(val_set)}
    (out / "metrics.json").write_text(json.dumps({"best": metrics, "history": history}, indent=2))
    return TrainResult(load_model(model_dir), model_dir, metrics, history)
