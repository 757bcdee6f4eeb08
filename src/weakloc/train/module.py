"""The LightningModule: loss, layer-wise learning rates, the two-phase schedule, metrics."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.utils.model_ema import ModelEmaV3
from torchvision.ops import sigmoid_focal_loss

from weakloc.config import TrainConfig
from weakloc.data.dataset import EpochLoader, SkipLog, SkippedImage, derived_seed
from weakloc.errors import WeaklocError
from weakloc.evaluate.classification import classification_metrics
from weakloc.explain.maps import at_size
from weakloc.models.checkpoint import weights_digest
from weakloc.models.classifier import WeaklocNet
from weakloc.train.alignment import alignment_loss, dropout_consistency_loss, present_classes
from weakloc.train.augment import cutmix, hide_patches
from weakloc.train.pseudo import box_loss, localizer_loss, pseudo_boxes, pseudo_masks, teacher_maps, teacher_size_and_refine
from weakloc.train.state import RECIPE_KEY, TEACHER_KEY, training_recipe


#: (earliest, latest) multipliers of the head's learning rate for the backbone's layer groups, when
#: ``TrainConfig.backbone_lr`` is None: counting trains the early layers harder, as they must learn
#: to tell single objects apart (docs/results.md, the counting section)
BACKBONE_LR = (0.01, 0.3)
COUNTING_BACKBONE_LR = (0.3, 1.0)


def default_backbone_lr(counting: str | None) -> tuple[float, float]:
    """The backbone's learning-rate multipliers for a model with (or without) a counting head."""
    return COUNTING_BACKBONE_LR if counting else BACKBONE_LR


def one_cycle(progress: float, warmup: float = 0.25, start: float = 0.04, end: float = 1e-3) -> float:
    """LR multiplier at ``progress`` in [0, 1]: cosine rise from ``start`` to 1, cosine fall to ``end``."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return start + (1 - start) * (1 - math.cos(math.pi * progress / warmup)) / 2
    p = (progress - warmup) / (1 - warmup)
    return end + (1 - end) * (1 + math.cos(math.pi * p)) / 2


def swa_start(total: int, swa: float) -> int:
    """The step from which stochastic weight averaging holds the LR and averages: the last ``swa``
    fraction of ``total`` steps (``total`` with ``swa`` 0)."""
    return total - int(round(total * swa))


def weight_average(model: WeaklocNet, settings: TrainConfig) -> ModelEmaV3 | None:
    """timm's moving average of ``model``'s weights for ``settings.ema_decay``, or for
    ``settings.swa`` the uniform average from the step :func:`swa_start` gives (set by
    ``configure_optimizers``, once the run's length is known): with warm-up power 1 and gamma 1
    the decay after ``n`` averaged steps is n / (n + 1), and before the start it is 0 (a copy).
    One averager for both keeps the validated average, checkpoints and ``--resume`` on one path
    (Lightning's StochasticWeightAveraging swaps the model only when training ends)."""
    if settings.swa:
        return ModelEmaV3(model, decay=1.0, use_warmup=True, warmup_gamma=1.0, warmup_power=1.0).requires_grad_(False)
    if settings.ema_decay:
        return ModelEmaV3(model, decay=settings.ema_decay, use_warmup=True).requires_grad_(False)
    return None


class ClassifierModule(pl.LightningModule):
    """Trains a :class:`WeaklocNet` on image-level labels.

    Args:
        model: the network.
        settings: the losses, their weights, augmentation and the optimiser (:class:`TrainConfig`;
            ``backbone_lr`` None: :func:`default_backbone_lr`).
        teacher: a first-stage model whose maps (``settings.teacher_method``, default ``cam``, at the
            size and refinement the pipeline makes them with, :func:`teacher_size_and_refine`;
            thresholded at ``settings.teacher_threshold``, default 0.2) train
            ``model``'s localizer head (masks) and box head (the extent of the present classes' masks).
        given: the settings as the caller gave them, before the data settled some (None:
            ``settings``); kept in checkpoints, so that a resume with others is refused.
    """

    def __init__(self, model: WeaklocNet, settings: TrainConfig, teacher: WeaklocNet | None = None, given: TrainConfig | None = None):
        super().__init__()
        self.model = model
        self.settings = settings
        if (teacher is None) != (model.localizer is None and model.box_head is None):
            raise ValueError("second-stage heads (localizer, box) are trained from a teacher, and a teacher needs a model with one")
        self._teacher = (teacher.eval().requires_grad_(False),) if teacher is not None else ()  # not a submodule: not saved
        self.teacher_digest = weights_digest(teacher) if teacher is not None else None  # which teacher, kept in checkpoints
        # the settings as given, before the data settles some of them (a warm-up longer than a short
        # run is dropped, so extending a finished run would otherwise read as another recipe)
        self.recipe = training_recipe(given or settings)
        self.teacher_method = settings.teacher_method or "cam"
        self._teacher_view = teacher_size_and_refine(teacher, self.teacher_method) if teacher is not None else None
        self.teacher_threshold = 0.2 if settings.teacher_threshold is None else settings.teacher_threshold
        self.frozen_ids = {id(p) for p in model.frozen_stage_parameters(settings.frozen_stages)}
        for p in model.parameters():
            if id(p) in self.frozen_ids:
                p.requires_grad_(False)
        self.skip_log = SkipLog()  # undecodable training and validation images, kept in checkpoints
        self._skips_warned = 0
        self._resumed_draws: list[dict] = []  # set by on_load_checkpoint
        self._val_losses: list[torch.Tensor] = []  # (2,): a batch's summed loss and its size
        self._val_probs: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        self._count_errors: list[torch.Tensor] = []
        # a submodule, so checkpoints (and resuming) carry the averaged weights as "ema.module.*"
        self.ema = weight_average(model, settings)
        if self.ema is not None:
            self.ema.train()  # never run in training; left in train mode so Lightning's mode switching sees one model

    @property
    def skipped(self) -> int:
        """How many distinct images could not be decoded, in training or validation."""
        return len(self.skip_log)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain types, so a resumed run still lists the images skipped before it (weights_only loads)
        checkpoint["weakloc_skipped"] = {"events": self.skip_log.events, "files": [
            {"index": it.index, "path": str(it.path), "reason": it.reason} for it in self.skip_log]}
        if self.teacher_digest is not None:
            checkpoint[TEACHER_KEY] = self.teacher_digest
        checkpoint[RECIPE_KEY] = self.recipe  # a resume with other settings is refused (check_resumable)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("weakloc_skipped", {})
        self.skip_log = SkipLog(SkippedImage(f["index"], Path(f["path"]), f["reason"]) for f in saved.get("files", []))
        self.skip_log.events = saved.get("events", len(self.skip_log))
        self._skips_warned = len(self.skip_log)
        # the training loader's place in its draws (EpochLoader.state_dict, which Lightning saves). Lightning
        # gives it back only to a loader it builds after restoring, and it built this one before, to count
        # the schedule's steps: it is given back at the start of training instead (the loader starts lazily)
        self._resumed_draws = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader", [])

    def on_train_start(self) -> None:
        loader = self.trainer.train_dataloader
        if self._resumed_draws and isinstance(loader, EpochLoader):
            loader.load_state_dict(self._resumed_draws[0])
        self._resumed_draws = []

    @property
    def evaluated_model(self) -> WeaklocNet:
        """The weights validation scores and training keeps: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def on_train_epoch_start(self) -> None:
        if self.model.frozen_classifier:
            # Lightning restores each submodule's mode after validation (which runs only at an epoch's
            # end here) one by one, which would put the frozen teacher copy's BatchNorm back in train
            # mode; WeaklocNet.train keeps it in eval. Once per epoch, not per batch.
            self.model.train()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # the step's own random draws (dropout, drop-path, hidden patches, CutMix, crops) from a seed
        # of (run, epoch, batch, process): a resumed run draws what an unstopped one would have
        torch.manual_seed(derived_seed(self.settings.seed, self.current_epoch, batch_idx, self.global_rank))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    # --- loss and steps -------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return classification_loss(logits, target, self.model.config.task, self.settings)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            # NHWC: what cuDNN's tensor-core convolutions run fastest on under mixed precision, and what
            # oneDNN's CPU convolutions run fastest on (their backward most of all). Here, before the
            # strategy wraps the model: DDP's gradient buckets take the parameters' strides when built.
            self.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        for t in self._teacher:
            t.to(self.device)

    def on_fit_end(self) -> None:
        self.to(memory_format=torch.contiguous_format)  # the trained model in the layout it is saved and loaded in

    def _step(self, batch: dict, training: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, logits and the classification targets of a batch (counting targets split off)."""
        net = self.model if training else self.evaluated_model
        x = batch["image"]
        out = net.forward_maps(x.contiguous(memory_format=torch.channels_last),
                               with_box=training and bool(self._teacher))
        target = batch["target"]
        k = net.num_classes
        if net.counting_head is None:
            loss, presence = self.loss(out.logits, target), target
        else:
            presence, counts = target[:, :k], target[:, k:]
            loss = self.loss(out.logits, presence) + counting_loss(out, counts, self.settings)
            self._count_errors.append((out.counts.detach() - counts).abs())
            if training and self.settings.crop_consistency and out.density is not None:
                loss = loss + self.settings.crop_consistency * self._crop_consistency(batch["image"], out.density)
        o = self.settings
        if o.align_weight or o.consistency_weight:
            present = present_classes(presence, k)
            if o.align_weight:
                weight = net.classifier.weight[:, :, 0, 0]
                loss = loss + o.align_weight * alignment_loss(out.features, out.class_maps, weight, present)
            if o.consistency_weight:
                loss = loss + o.consistency_weight * dropout_consistency_loss(out.class_maps, present)
        if self._teacher and training:  # validation runs without gradients, which some teacher maps need
            teacher = self._teacher[0]
            # the teacher's maps as every command makes them: a CAM at its test size and refined (at its training size
            # its pseudo-boxes are far worse, docs/results.md sixth round), a box at its training size, unrefined
            size, refine = self._teacher_view
            maps = teacher_maps(teacher, at_size(batch["image"], size), self.teacher_method, refine)
            present = present_classes(presence, k)
            if out.localizer is not None:
                masks = pseudo_masks(maps, tuple(out.localizer.shape[-2:]), self.teacher_threshold)
                loss = loss + localizer_loss(out.localizer, masks, present)
            if out.box is not None:
                loss = loss + box_loss(out.box, *pseudo_boxes(maps, present, self.teacher_threshold))
        return loss, out.logits, presence

    def _crop_consistency(self, images: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
        """:func:`crop_consistency_loss` of one random crop of the whole batch."""
        box = random_crop_box(tuple(images.shape[-2:]), align=32)
        top, left, height, width = box
        crop = self.model.forward_maps(images[..., top:top + height, left:left + width]).density
        return crop_consistency_loss(density, crop, box, images.shape[-1] // density.shape[-1])

    def _augment(self, batch: dict) -> dict:
        o = self.settings
        if not (o.hide_prob or o.cutmix_alpha):
            return batch
        batch = dict(batch)
        if o.hide_prob:
            batch["image"] = hide_patches(batch["image"], o.hide_grid, o.hide_prob)
        if o.cutmix_alpha:
            batch["image"], batch["target"] = cutmix(batch["image"], batch["target"], self.model.num_classes, self.model.config.task,
                                                     o.cutmix_alpha)
        return batch

    def training_step(self, batch: dict, batch_idx: int):
        self.skip_log.add_batch(batch)
        if batch["image"] is None:
            return None
        batch = self._augment(batch)
        loss, logits, _ = self._step(batch)
        self._count_errors.clear()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        self.skip_log.add_batch(batch)
        if batch["image"] is None:
            return
        loss, logits, target = self._step(batch, training=False)
        self._val_losses.append(torch.stack([loss.detach().float() * len(logits), logits.new_tensor(float(len(logits)))])[None])
        self._val_probs.append(self.model.probabilities(logits.float()).detach())
        self._val_targets.append(target.detach())

    def on_validation_epoch_start(self) -> None:
        # DDP keeps the parameters equal on every process, but each process's BatchNorm statistics
        # took in its own last training batch (DDP broadcasts rank zero's buffers only before a
        # training forward). Rank zero's weights are the ones checkpointed and saved, so every
        # process validates with them: the gathered metrics are then those of the saved model.
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in self.evaluated_model.state_dict().values():
                dist.broadcast(tensor, src=0)

    def _gathered(self, parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        """This process's ``parts`` concatenated, and with several processes every process's, each
        row once (the validation sampler gives each image to one process; the shards may differ in
        size by a batch, so each is padded to the longest for ``all_gather`` and cut back).

        Args:
            parts: ``(n_i, ...)`` tensors; empty: a ``(0, ...)`` tensor of the same trailing shape,
                what this process holds when it has none (every process must take part).
        """
        local = torch.cat(parts) if parts else empty
        trainer = self._trainer  # None outside a Trainer
        if trainer is None or trainer.world_size == 1:
            return local
        import torch.distributed as dist

        world = trainer.world_size
        sizes = [torch.zeros((), dtype=torch.long, device=self.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor(len(local), dtype=torch.long, device=self.device))
        sizes = [int(n) for n in sizes]
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[:len(local)] = local
        rows = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(rows, padded)
        return torch.cat([r[:n] for r, n in zip(rows, sizes)])

    def on_validation_epoch_end(self) -> None:
        # every process takes part in the gathering (collectives), even one with no readable image,
        # and reaches the same figures: those of the whole validation set, each image once
        k = self.model.num_classes
        single = self.model.config.task == "single"
        losses = self._gathered(self._val_losses, torch.zeros((0, 2), device=self.device))
        probs = self._gathered(self._val_probs, torch.zeros((0, k), device=self.device))
        targets = self._gathered([t.float() for t in self._val_targets],
                                 torch.zeros((0,) if single else (0, k), device=self.device))
        counting = self.model.counting_head is not None
        errors = self._gathered(self._count_errors, torch.zeros((0, k), device=self.device)) if counting else None
        for kept in (self._val_losses, self._val_probs, self._val_targets, self._count_errors):
            kept.clear()
        if not len(probs):
            if self._trainer is not None and not self._trainer.sanity_checking:
                # every validation image was unreadable: there is nothing to choose the best epoch by
                first = next(iter(self.skip_log), None)
                example = f" ({len(self.skip_log)} image(s) skipped, e.g. {first.message})" if first is not None else ""
                raise WeaklocError(f"no validation image could be read{example}; check the images or give readable validation data")
            return
        # the figures are the same on every process; sync_dist only keeps Lightning's distributed
        # logging consistent (a mean of equal values)
        sync = self._trainer is not None and self._trainer.world_size > 1
        self.log("val_loss", losses[:, 0].sum() / losses[:, 1].sum(), prog_bar=True, sync_dist=sync)
        targets = targets.long() if single else targets
        for name, value in classification_metrics(probs.cpu(), targets.cpu(), self.model.config.task,
                                                  self.model.config.positive_class).items():
            self.log(f"val_{name}", value, prog_bar=name in ("acc", "auroc", "map"), sync_dist=sync)
        if errors is not None and len(errors):
            self.log("val_count_mae", errors.mean(0).mean(), prog_bar=True, sync_dist=sync)

    def on_train_epoch_end(self) -> None:
        if self.skipped > self._skips_warned:  # once per new file, not again every epoch
            new = list(self.skip_log)[self._skips_warned:]
            warnings.warn(f"{self.skip_log.summary()} so far, e.g. {new[0].message}", stacklevel=1)
            self._skips_warned = self.skipped
        # each process counts the images it skipped (a file skipped by two processes counts twice)
        self.log("skipped_images", float(self.skipped), sync_dist=self.trainer.world_size > 1, reduce_fx="sum")

    # --- optimiser ------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.settings
        groups = self.model.backbone_groups(3)
        earliest, latest = o.backbone_lr or default_backbone_lr(self.model.config.counting)
        mults = torch.logspace(math.log10(earliest), math.log10(latest), len(groups)).tolist()
        param_groups = [{"params": g, "lr": o.lr * m} for g, m in zip(groups, mults)]
        param_groups.append({"params": self.model.new_parameters(), "lr": o.lr})
        opt = torch.optim.AdamW(param_groups, lr=o.lr, weight_decay=o.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        frozen = min(total, round(total * o.freeze_epochs / max(1, o.epochs))) if o.freeze_epochs else 0
        hold = max(frozen, swa_start(total, o.swa))
        if o.swa:
            self.ema.update_after_step = hold  # the uniform average starts where the LR is held

        def multiplier(step: int) -> float:
            if o.swa and step > hold:  # SWA: a constant LR, so the averaged weights differ
                step = hold
            if step < frozen:  # head warm-up phase
                return one_cycle(step / max(1, frozen))
            p = (step - frozen) / max(1, total - frozen)
            if o.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
            return (0.5 if frozen else 1.0) * one_cycle(p)  # fast.ai halves the LR after unfreezing

        sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def classification_loss(logits: torch.Tensor, target: torch.Tensor, task: str, settings: TrainConfig) -> torch.Tensor:
    """Cross entropy (single-label, with ``settings.label_smoothing``), binary cross entropy
    (multi-label), or their focal forms (``settings.loss`` ``focal``: Lin et al. 2017, each example's
    loss scaled by ``(1 - p_t) ** focal_gamma``, so well-classified ones count less -- for rare positives).

    Args:
        logits: ``(B, K)``; target: ``(B,)`` indices, ``(B, K)`` soft targets (CutMix) or multi-hot.
    """
    if settings.loss not in ("ce", "focal"):
        raise ValueError(f"unknown loss {settings.loss!r}: use ce or focal")
    if task == "single":
        if settings.loss == "ce" or target.is_floating_point():  # soft targets (CutMix): plain cross entropy
            return F.cross_entropy(logits, target, label_smoothing=settings.label_smoothing)
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        return ((1 - torch.exp(-ce)).pow(settings.focal_gamma) * ce).mean()
    if settings.loss == "ce":
        return F.binary_cross_entropy_with_logits(logits, target.float())
    return sigmoid_focal_loss(logits.float(), target.float(), alpha=-1, gamma=settings.focal_gamma, reduction="mean")


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring positions of ``(..., h, w)`` maps."""
    dx = (maps[..., :, 1:] - maps[..., :, :-1]).abs().mean() if maps.shape[-1] > 1 else maps.new_zeros(())
    dy = (maps[..., 1:, :] - maps[..., :-1, :]).abs().mean() if maps.shape[-2] > 1 else maps.new_zeros(())
    return dx + dy


def gather_penalty(maps: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """L1/2 sparsity of non-negative ``(B, K, h, w)`` maps: ``sum sqrt(d + e) - sqrt(e)`` over the
    ``n = h * w`` positions, divided by ``sqrt(n)``, averaged over maps; ``e = eps / n``, a fraction of
    one object spread evenly (a fixed ``e`` near ``1 / n`` would make the penalty nearly linear,
    like L1, around exactly the even spread it is meant to penalise).

    A count ``c`` spread evenly over the ``n = h * w`` cells scores about ``sqrt(c)``; the same count
    gathered into ``m`` cells scores about ``sqrt(c * m / n)``. When every training image holds the
    same number of objects, a map spread evenly over the image fits the counts as well as one
    peaked on the objects; this term prefers the peaks.
    """
    n = maps.shape[-1] * maps.shape[-2]
    e = eps / n
    roots = (maps.float().clamp_min(0) + e).sqrt() - math.sqrt(e)
    return roots.flatten(-2).sum(-1).mean() / math.sqrt(n)


def random_crop_box(size: tuple[int, int], align: int = 32, min_fraction: float = 0.5, max_fraction: float = 0.75,
                    generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A random square crop ``(top, left, height, width)`` of an image of ``size`` (H, W) pixels, its
    side between ``min_fraction`` and ``max_fraction`` of the shorter side and every edge on a
    multiple of ``align`` (the backbone's coarsest stride, so the crop's feature grids fall on the
    whole image's). Drawn on the CPU: no device synchronisation."""
    h, w = size
    lo = max(1, math.ceil(min_fraction * min(h, w) / align))
    hi = max(lo, int(max_fraction * min(h, w) // align))
    side = align * int(torch.randint(lo, hi + 1, (), generator=generator))
    if side > min(h, w):
        raise ValueError(f"images of {h}x{w} px are too small for a crop aligned to {align} px")
    top = align * int(torch.randint(0, (h - side) // align + 1, (), generator=generator))
    left = align * int(torch.randint(0, (w - side) // align + 1, (), generator=generator))
    return top, left, side, side


def crop_consistency_loss(full: torch.Tensor, crop: torch.Tensor, box: tuple[int, int, int, int], stride: int) -> torch.Tensor:
    """Huber distance between a crop's count and the whole image's count on the crop's cells.

    A density spread over the whole image, or parked on its border (where zero padding tells a
    network where it is), also fits image-level counts; neither survives this test, because the
    crop's borders and size differ from the image's while its objects do not.

    Args:
        full: ``(B, K, h, w)`` density of the whole images.
        crop: ``(B, K, h', w')`` density of the crops ``box`` = (top, left, height, width) in pixels.
        stride: pixels per density cell (``box`` is a multiple of it).
    """
    top, left, height, width = (v // stride for v in box)
    region = full[..., top:top + height, left:left + width]
    if region.shape[-2:] != crop.shape[-2:]:
        raise ValueError(f"the crop's density is {tuple(crop.shape[-2:])}, its cells on the whole map {tuple(region.shape[-2:])}")
    return F.huber_loss(crop.float().sum((-2, -1)), region.float().sum((-2, -1)))


def counting_loss(out, counts: torch.Tensor, settings: TrainConfig) -> torch.Tensor:
    """Count loss (``settings.count_loss``: Poisson negative log-likelihood or Huber) on the predicted
    counts (and the count head's, for ``both``) plus the density maps' L1 sparsity, total variation
    and gather penalty (:func:`gather_penalty`), with ``settings``' weights.

    Args:
        out: a :class:`~weakloc.models.ModelOutput` with ``counts``; counts: ``(B, K)`` targets.
    """
    if settings.count_loss not in ("poisson", "huber"):
        raise ValueError(f"unknown count loss {settings.count_loss!r}: use poisson or huber")

    def one(pred: torch.Tensor) -> torch.Tensor:
        pred = pred.float()
        if settings.count_loss == "poisson":
            return F.poisson_nll_loss(pred, counts.float(), log_input=False, full=False, eps=1e-6)
        return F.huber_loss(pred, counts.float())

    loss = settings.count_weight * one(out.counts)
    if out.head_counts is not None and out.density is not None:
        loss = loss + settings.count_weight * one(out.head_counts)
    if out.density is not None:
        density = out.density.float()
        loss = loss + settings.density_l1 * density.abs().mean() + settings.density_tv * total_variation(density)
        if settings.density_gather:
            loss = loss + settings.density_gather * gather_penalty(density)
    return loss


def choose_decision_threshold(positive_probs: torch.Tensor, is_positive: torch.Tensor) -> float | None:
    """The probability cut that maximises F1 of the positive class on validation data.

    Args:
        positive_probs: ``(N,)``; is_positive: ``(N,)`` bool.

    Returns:
        the cut (predict positive when ``p >= cut``; midway between neighbouring scores), or None
        without both classes.
    """
    pos = is_positive.bool()
    if pos.all() or not pos.any():
        return None
    order = positive_probs.argsort(descending=True)
    p, y = positive_probs[order], pos[order].float()
    tp = y.cumsum(0)
    fp = (1 - y).cumsum(0)
    f1 = 2 * tp / (tp + fp + pos.sum())
    distinct = torch.cat([p[1:] < p[:-1], torch.tensor([True])])  # cut only between different scores
    f1 = torch.where(distinct, f1, torch.full_like(f1, -1))
    i = int(f1.argmax())
    below = p[i + 1] if i + 1 < len(p) else torch.tensor(0.0)
    return float((p[i] + below) / 2)


class FreezeBackbone(pl.Callback):
    """Backbone parameters frozen for the first ``epochs`` epochs (BatchNorm statistics still adapt);
    those of ``frozen_stages`` stay frozen throughout."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: ClassifierModule) -> None:
        trainable = trainer.current_epoch >= self.epochs
        for p in pl_module.model.pretrained_parameters():
            p.requires_grad_(trainable and id(p) not in pl_module.frozen_ids)
