"""``evaluate_model``: classification metrics and the WSOL protocol's localization metrics of a
trained model on annotated images, with the centre baseline evaluated beside it.

Maps come from the one map pipeline (:mod:`weakloc.explain.pipeline`): the model's stored map
settings plus the caller's overrides, on images at the resolved test-time size, so the maps scored
here are the maps ``localize`` draws. Evaluation reads the model's configuration and never
changes it (:func:`~weakloc.evaluate.calibrate.calibrate` is what stores calibrated settings).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from weakloc.checks import check_choice, check_float, check_int
from weakloc.config import DEFAULT_GT_KNOWN_THRESHOLD, MapConfig, fallback_threshold
from weakloc.data.annotations import GroundTruth, match_annotations, read_annotations
from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform
from weakloc.data.images import read_image
from weakloc.data.labels import LabeledImages, check_split, load_labels, resolve_split
from weakloc.errors import CheckpointError, ImageReadError, OptionError, WeaklocError
from weakloc.evaluate.classification import classification_metrics
from weakloc.evaluate.matching import InstanceMetrics, instance_metrics, region_instances
from weakloc.evaluate.wsol import BoxAccuracyCounts, BoxMetrics, PxAPAccumulator, WSOLMetrics, box_sweep, check_step, threshold_list
from weakloc.explain import centre_gaussian, get_method, pipeline
from weakloc.explain.run import check_maps, model_device
from weakloc.localize.regions import KEEP
from weakloc.results import Result

if TYPE_CHECKING:
    from weakloc.evaluate.counting import CountingReport


@dataclass
class _Sample:
    image: int  # index into the labelled images
    cls: int
    boxes: torch.Tensor  # (M, 4) in input pixels, truncated to int as the reference does
    mask: Callable[[], torch.Tensor] | None  # makes the (S, S) uint8 mask when its batch is scored: masks of a large test set never all in memory


def scale_gt_boxes(boxes: torch.Tensor, width: int, height: int, size: int) -> torch.Tensor:
    """GT boxes from original pixels to the ``size x size`` input, truncated to integers (reference)."""
    sx, sy = size / width, size / height
    scaled = boxes.double() * torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
    return scaled.trunc()


def check_methods(methods, name: str = "methods") -> list[str]:
    """``methods`` (one name or a sequence of names) as a non-empty list of registered method names
    (:func:`~weakloc.explain.get_method` names the unknown one)."""
    names = [methods] if isinstance(methods, str) else methods
    if not isinstance(names, (list, tuple)) or not names:
        raise OptionError(f"{name}: give at least one method name (see `weakloc methods`), got {methods!r}")
    for m in names:
        if not isinstance(m, str):
            raise OptionError(f"{name}: method names are strings, got {m!r}")
        get_method(m)
    return list(names)


def check_gt_class(gt_class, name: str = "gt_class") -> dict[str, str] | None:
    """``gt_class`` as a ``{annotation class: model class}`` dict of strings, or None."""
    if gt_class is None:
        return None
    if not isinstance(gt_class, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in gt_class.items()):
        raise OptionError(f"{name}: expected a dict of annotation class name -> model class name, got {gt_class!r}")
    return gt_class


def check_batch_size(batch_size, name: str = "batch_size") -> int:
    """``batch_size`` as an int >= 1 (a DataLoader would fail on 0 deep inside)."""
    return check_int(name, batch_size, 1)


def stored_threshold(cfg, refine: str | None = None) -> float:
    """The model's calibrated box threshold (``maps.threshold``), else
    :data:`~weakloc.config.DEFAULT_GT_KNOWN_THRESHOLD` (the CAM paper's), or for maps refined with
    the image (``refine``) :data:`~weakloc.config.REFINED_THRESHOLD`; a value outside [0, 1] is a
    :class:`~weakloc.errors.CheckpointError`."""
    tau = cfg.maps.threshold
    if tau is None:
        tau = fallback_threshold(refine, DEFAULT_GT_KNOWN_THRESHOLD)
    try:
        return check_float("maps.threshold in the model's config.json", tau, 0.0, 1.0)
    except OptionError as e:
        raise CheckpointError(str(e)) from None


def class_mapping(model_classes: list[str], gt_classes: list[str], explicit: dict[str, str] | None = None) -> dict[str, int]:
    """Which annotation class is which model class: explicit ``{gt: model}`` pairs first, then equal
    names (case-insensitive). Annotation classes with no model class are not evaluated."""
    lower = {c.lower(): k for k, c in enumerate(model_classes)}
    out: dict[str, int] = {}
    for g in gt_classes:
        if explicit and g in explicit:
            if explicit[g] not in model_classes:
                raise WeaklocError(f"--gt-class maps {g!r} to {explicit[g]!r}, which is not a model class ({', '.join(model_classes)})")
            out[g] = model_classes.index(explicit[g])
        elif g.lower() in lower:
            out[g] = lower[g.lower()]
    return out


def _mask(ann, label: str, size: int) -> torch.Tensor:
    return ann.mask_of(label, (size, size)).to(torch.uint8)


def _samples(data: LabeledImages, gt: GroundTruth, mapping: dict[str, int], size: int,
             positive: int | None) -> tuple[list[_Sample], list[str], dict[str, int]]:
    """The (image, class) pairs to score, the images without an annotation, and the boxes left
    unscored per annotation class (no model class, or not the positive class of a yes/no model)."""
    samples: list[_Sample] = []
    unscored: dict[str, int] = {}
    anns, unannotated = match_annotations(gt, data.paths)
    for i, ann in enumerate(anns):
        if ann is None:
            continue
        for g in dict.fromkeys(ann.labels):
            k = mapping.get(g)
            if k is None or (positive is not None and k != positive):
                unscored[g] = unscored.get(g, 0) + len(ann.boxes_of(g))
        for g, k in mapping.items():
            if positive is not None and k != positive:
                continue
            boxes = ann.boxes_of(g)
            if len(boxes) == 0:
                continue
            mask = partial(_mask, ann, g, size) if ann.has_masks(g) else None
            samples.append(_Sample(i, k, scale_gt_boxes(boxes, ann.width, ann.height, size), mask))
    return samples, unannotated, unscored


def skipped_images(paths: list[Path], seen: set[int]) -> list[dict]:
    """``{"file", "reason"}`` of each image the loader skipped (read again for its reason)."""
    out = []
    for i, p in enumerate(paths):
        if i in seen:
            continue
        try:
            read_image(p)
            reason = "could not be read"
        except ImageReadError as e:
            reason = str(e)
        out.append({"file": str(p), "reason": reason})
    return out


@dataclass
class EvaluationReport(Result):
    """What :func:`evaluate_model` found, and what it did and did not score.

    Attributes:
        split: the split evaluated.
        images: images of the split.
        localization_samples: (image, class) pairs scored.
        samples_per_class: model class -> samples scored.
        unscored_boxes: annotation class -> boxes of the evaluated images left out (no model class
            matches it, or it is not a yes/no model's positive class).
        unannotated_images: paths without an annotation.
        skipped_images: ``{"file", "reason"}`` of images that could not be decoded.
        classification: :func:`~weakloc.evaluate.classification.classification_metrics`.
        localization: the map method's :class:`~weakloc.evaluate.wsol.WSOLMetrics`.
        centre_baseline: the centre Gaussian's :class:`~weakloc.evaluate.wsol.BoxMetrics`.
        counting: a counting model's :class:`~weakloc.evaluate.counting.CountingReport`, when the
            caller adds one (``dataclasses.replace(report, counting=...)``); None otherwise.
        instances: every connected region of each sample's map at the fixed threshold
            (``GT-known_tau``), but those smaller than one feature-map cell (output stride squared
            pixels), as one instance box, matched one to one with the class's ground-truth
            boxes at IoU >= 0.5: per-class precision / recall / F1 (a box around a whole school of
            fish is one false positive and many misses here, where MaxBoxAccV2 counts a hit).
        instance_keep: the rule of ``instances``: ``all`` regions, or ``peaks`` (split at the map's peaks).
    """

    split: str
    images: int
    localization_samples: int
    samples_per_class: dict[str, int]
    unscored_boxes: dict[str, int]
    unannotated_images: list[str]
    skipped_images: list[dict]
    classification: dict[str, float]
    localization: WSOLMetrics
    centre_baseline: BoxMetrics
    counting: CountingReport | None = None
    instances: InstanceMetrics | None = None
    instance_keep: str = "all"

    def to_dict(self) -> dict:
        """The JSON ``weakloc evaluate --out`` writes (``counting`` only when there is one)."""
        out = {"split": self.split, "images": self.images, "localization_samples": self.localization_samples,
               "samples_per_class": dict(self.samples_per_class), "unscored_boxes": dict(self.unscored_boxes),
               "unannotated_images": list(self.unannotated_images), "skipped_images": [dict(s) for s in self.skipped_images],
               "classification": dict(self.classification), "localization": self.localization.to_dict(),
               "centre_baseline": self.centre_baseline.to_dict()}
        if self.instances is not None:
            out["instances"] = {"keep": self.instance_keep, **self.instances.to_dict()}
        if self.counting is not None:
            out["counting"] = self.counting.to_dict()
        return out


def evaluate_model(
    model,
    data: str | Path | LabeledImages,
    annotations: str | Path | GroundTruth,
    *,
    method: str | None = None,
    maps: MapConfig | dict | None = None,
    split: str = "auto",
    step: float = 0.01,
    gt_known_tau: float | None = None,
    gt_class: dict[str, str] | None = None,
    keep: str = "all",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress=None,
) -> EvaluationReport:
    """Evaluate classification and localization.

    Localization samples are (image, class) pairs: each annotated class of the image that the model
    knows -- every class with boxes, except for a yes/no model (``config.positive_class``), whose
    positive class alone is localized. The map is the GT class's (GT-known). Each annotation's image
    size is checked against the image (:func:`~weakloc.data.annotations.match_annotations`).

    The maps are made by :func:`weakloc.explain.pipeline.make_maps` with
    :func:`~weakloc.explain.pipeline.map_settings` (``maps`` and ``method`` over the model's stored
    settings), on images at the resolved ``test_size``; boxes and GT boxes are in those pixels.

    Args:
        data: labels (CSV / folder / :class:`LabeledImages`); with splits, ``split`` chooses one
            (``auto``: test, else val, else all).
        annotations: COCO JSON, VOC folder or :class:`GroundTruth`.
        method: map method (default: the model's stored one, else ``cam``).
        maps: map-setting overrides -- a :class:`~weakloc.config.MapConfig` or a flat dict of
            settings and method options (``layer``, ``fusion``, ``tta``, ``eigen_smooth``,
            ``dtype``, ``normalization``, ``test_size``, ``positive_weights``, ...).
        step: threshold step of the sweep (``cam_curve_interval``).
        gt_known_tau: fixed threshold of GT-known / Top-1 Loc (default: the model's calibrated
            threshold, else :data:`~weakloc.config.DEFAULT_GT_KNOWN_THRESHOLD` as in the CAM paper, or
            :data:`~weakloc.config.REFINED_THRESHOLD` for refined maps).
        gt_class: explicit ``{annotation class: model class}`` names.
        keep: how the instance boxes (``instances``) are taken: ``all`` connected regions, or
            ``peaks`` (each region split at the map's peaks; ``largest`` is one box per map, the
            protocol's own rule).
        progress: optional callable ``(done, total)``.

    Returns:
        :class:`EvaluationReport` (``to_dict()`` is the JSON report).

    Raises:
        OptionError: before any work, for an unknown ``method`` or ``split``, a ``step`` outside
            ``[MIN_STEP, 0.5]`` (:func:`~weakloc.evaluate.wsol.check_step`), a ``gt_known_tau``
            outside [0, 1], a ``batch_size`` < 1, a malformed ``gt_class``, or ``maps`` that are
            not map settings (the message names the setting).
    """
    if method is not None:
        check_methods(method, "method")
    check_split(split)
    step = check_step(step)
    gt_known_tau = check_float("gt_known_tau", gt_known_tau, 0.0, 1.0, allow_none=True)
    batch_size = check_batch_size(batch_size)
    gt_class = check_gt_class(gt_class)
    keep = check_choice("keep", keep, KEEP)
    settings = pipeline.map_settings(model, check_maps(maps), method=method)
    device = model_device(model, device)
    model = model.to(device).eval()
    cfg = model.config
    labeled = data if isinstance(data, LabeledImages) else load_labels(data, classes=cfg.classes)
    if labeled.counts is not None:  # counting labels: presence is the classification target here
        labeled = dataclasses.replace(labeled, counts=None)
    if labeled.task != cfg.task:
        raise WeaklocError(f"labels are {labeled.task}-label but the model is {cfg.task}-label")
    labeled, split = resolve_split(labeled, split)
    gt = annotations if isinstance(annotations, GroundTruth) else read_annotations(annotations)
    mapping = class_mapping(cfg.classes, gt.classes, gt_class)
    if not mapping:
        raise WeaklocError(f"no annotation class matches a model class (annotations: {gt.classes}; model: {cfg.classes}); use --gt-class GT=MODEL")
    size = settings.test_size
    samples, unannotated, unscored = _samples(labeled, gt, mapping, size, cfg.positive_class)
    if not samples:
        raise WeaklocError(f"{gt.source or 'the annotations'}: none of the {len(labeled)} images has a box of an evaluated "
                           f"class ({', '.join(mapping)}); {len(unannotated)} of them have no annotation at all")
    by_image: dict[int, list[int]] = {}
    for s_idx, s in enumerate(samples):
        by_image.setdefault(s.image, []).append(s_idx)
    taus = threshold_list(step)
    tau_fixed = gt_known_tau if gt_known_tau is not None else stored_threshold(cfg, settings.refine)
    loader = DataLoader(ImageDataset.from_labels(labeled, eval_transform(size, cfg.mean, cfg.std)), batch_size=batch_size,
                        shuffle=False, collate_fn=collate_skip_bad)
    centre = centre_gaussian((size, size), device=device)
    probs_all, targets_all = [], []
    # counts, not per-sample arrays: memory does not grow with the test set (but for each image's class probabilities)
    sweeps, base_sweeps = BoxAccuracyCounts(taus), BoxAccuracyCounts(taus)
    hits = hits_correct = 0
    instance_stats: dict[str, list[int]] = {}
    min_region = (cfg.output_stride or 32) ** 2  # a region smaller than one feature cell is a fragment of upsampling, not an object
    pxap_acc = PxAPAccumulator(taus, device)
    pxap_base = PxAPAccumulator(taus, device)
    has_masks = False
    seen: set[int] = set()
    done = 0
    for batch in loader:
        done += len(batch["index"]) + batch["skipped"] if batch["index"] is not None else batch["skipped"]
        if batch["image"] is None:
            continue
        x = batch["image"].to(device)
        idx = batch["index"].tolist()
        seen.update(idx)
        rows = [(r, s) for r, i in enumerate(idx) for s in by_image.get(i, [])]
        if rows:
            t_max = max(len(by_image.get(i, [])) for i in idx)
            tgt = torch.zeros(len(idx), t_max, dtype=torch.long)
            for r, i in enumerate(idx):
                cls = [samples[s].cls for s in by_image.get(i, [])] or [0]
                tgt[r] = torch.tensor((cls * t_max)[:t_max])
            heat = pipeline.make_maps(model, x, settings, tgt.to(device))
            logits = heat.logits
            col = {(r, s): by_image[idx[r]].index(s) for r, s in rows}
            maps = torch.stack([heat.normalized[r, col[(r, s)]] for r, s in rows])
            gts = [samples[s].boxes for _, s in rows]
            sweeps.update(box_sweep(maps, gts, taus))
            base_sweeps.update(box_sweep(centre.expand(len(rows), -1, -1), gts, taus))
            hit = box_sweep(maps, gts, torch.tensor([tau_fixed], dtype=torch.float64)).best_iou_largest[:, 0] >= 0.5
            pr = model.probabilities(logits.float())
            row_of, cls_of = torch.tensor([r for r, _ in rows]), torch.tensor([samples[s].cls for _, s in rows])
            pr_rows = pr.detach().cpu()[row_of]
            if cfg.task == "single":
                correct = pr_rows.argmax(1) == cls_of
            else:
                correct = pr_rows.gather(1, cls_of[:, None])[:, 0] >= 0.5
            hits += int(hit.sum())
            for r, (_, s) in zip(region_instances(maps, gts, tau_fixed, min_area=min_region, keep=keep), rows):
                name = cfg.classes[samples[s].cls]
                instance_stats[name] = [a + b for a, b in zip(instance_stats.get(name, [0, 0, 0]), r)]
            hits_correct += int((hit.cpu() & correct).sum())
            with_mask = [(maps[n], samples[s].mask()) for n, (_, s) in enumerate(rows) if samples[s].mask is not None]
            if with_mask:
                has_masks = True
                mm = torch.stack([m for m, _ in with_mask])
                gm = torch.stack([g for _, g in with_mask]).to(device)
                pxap_acc.update(mm, gm)
                pxap_base.update(centre.expand(len(with_mask), -1, -1), gm)
        else:
            with torch.no_grad():
                logits = model(x)
        probs_all.append(model.probabilities(logits.float()).cpu())
        targets_all.append(batch["target"])
        if progress is not None:
            progress(min(done, len(labeled)), len(labeled))
    if not sweeps.n:
        raise WeaklocError("no annotated image could be read")
    n = sweeps.n
    boxes = sweeps.metrics(pxap_acc.compute() if has_masks else None)
    loc = WSOLMetrics(**dataclasses.asdict(boxes), method=settings.method, step=step,
                      gt_known_loc=float(torch.tensor(hits / n, dtype=torch.float64) * 100),
                      top1_loc=float(torch.tensor(hits_correct / n, dtype=torch.float64) * 100), gt_known_tau=tau_fixed)
    base = base_sweeps.metrics(pxap_base.compute() if has_masks else None)
    cls_metrics = classification_metrics(torch.cat(probs_all), torch.cat(targets_all), cfg.task, cfg.positive_class)
    per_class: dict[str, int] = {}
    for s in samples:
        if s.image in seen:
            per_class[cfg.classes[s.cls]] = per_class.get(cfg.classes[s.cls], 0) + 1
    return EvaluationReport(split=split, images=len(labeled), localization_samples=n, samples_per_class=per_class,
                            unscored_boxes=unscored, unannotated_images=unannotated,
                            skipped_images=skipped_images(labeled.paths, seen), classification=cls_metrics,
                            localization=loc, centre_baseline=base, instances=instance_metrics(instance_stats), instance_keep=keep)


def summary_rows(report: EvaluationReport | dict) -> list[dict]:
    """Rows (method, centre baseline) for a printed or HTML table of a report (typed, or its ``to_dict()``)."""
    loc, base = report["localization"], report["centre_baseline"]
    keys = ["MaxBoxAccV2", "IoU30", "IoU50", "IoU70", "MaxBoxAcc", "GT-known Loc", "Top-1 Loc", "PxAP"]
    rows = [{"map": loc["method"], **{k: loc[k] for k in keys if k in loc}},
            {"map": "centre baseline", **{k: base[k] for k in keys if k in base}}]
    return [{k: (v if not (isinstance(v, float) and math.isnan(v)) else "") for k, v in r.items()} for r in rows]
