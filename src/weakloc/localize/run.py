"""Localization of image files, computed batch by batch: typed results, no files written.

:func:`localize_batches` checks its options and lists the images at once (an
:class:`~weakloc.errors.OptionError` before any work), then computes one :class:`RegionBatch`
(classifiers: maps, masks and region boxes) or :class:`CountBatch` (counting models: counts and
numbered instances) at a time. Their records (:class:`LocalizedImage`, :class:`LocalizedBox`) are
the entries of ``detections.json``; :mod:`weakloc.report.localization` draws and writes them.
:func:`localize` collects a whole run's records without writing anything.

Maps are made by the one pipeline (:mod:`weakloc.explain.pipeline`) on images loaded at
``settings.test_size``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weakloc.checks import check_choice, check_int
from weakloc.config import DEFAULT_BOX_THRESHOLD, MapConfig, fallback_threshold
from weakloc.data.dataset import DECODERS
from weakloc.data.images import list_images
from weakloc.errors import OptionError
from weakloc.explain import normalize_minmax, pipeline
from weakloc.explain.run import (ImageBatch, SkippedFile, check_maps, check_method, check_progress, check_target, given_settings,
                                 image_batches, model_device)
from weakloc.localize.instances import Instances, counting_forward, output_instances, predicted_counts
from weakloc.localize.regions import KEEP, binarize, region_boxes, scale_boxes
from weakloc.localize.threshold import check_threshold, thresholds_for
from weakloc.models.classifier import check_finite
from weakloc.results import Result
from weakloc.text import escape_text


def default_target(model) -> str:
    """Which classes to localize by default: the positive class of a yes/no model, every class of a
    multi-label model (kept where predicted present), else the predicted class."""
    if model.config.positive_class is not None:
        return str(model.config.positive_class)
    return "all" if model.config.task == "multi" else "predicted"


@dataclass
class LocalizedBox(Result):
    """One box of ``detections.json`` (a COCO result).

    Attributes:
        id: 1-based, over the whole run.
        image_id: the :class:`LocalizedImage` it belongs to.
        category_id: class index + 1.
        label: class name.
        bbox: ``[x, y, width, height]`` in original pixels, rounded to 0.1.
        score: classifiers: the class probability times the region's mean map value; counting
            models: the map value at the instance's peak.
        instance: counting models: the instance's number within its class and image (1-based).
        point: counting models: the instance's peak ``[x, y]`` in original pixels.
    """

    id: int
    image_id: int
    category_id: int
    label: str
    bbox: list[float]
    score: float
    instance: int | None = None
    point: list[float] | None = None

    def to_dict(self) -> dict:
        out = {"id": self.id, "image_id": self.image_id, "category_id": self.category_id, "label": self.label}
        if self.instance is not None:
            out |= {"instance": self.instance, "point": list(self.point or [])}
        return out | {"bbox": list(self.bbox), "score": self.score}


@dataclass
class LocalizedImage(Result):
    """One image's entry of ``detections.json``.

    Attributes:
        id: 1-based, over the whole run.
        file_name: the image file (undecodable bytes as ``\\xNN``).
        width, height: its original size.
        probabilities: the model's probability of each class, rounded to 4 places.
        predicted: classifiers: the most probable class.
        counts, raw_counts: counting models: each class's whole count, and its count before
            rounding and the presence gate (2 places).
        masks: class -> its mask file, relative to the output folder; given by the writer
            (:mod:`weakloc.report.localization`) for the classes shown, None before.
        overlay: its overlay picture, relative to the output folder (given by the writer).
    """

    id: int
    file_name: str
    width: int
    height: int
    probabilities: list[float]
    predicted: str | None = None
    counts: dict[str, int] | None = None
    raw_counts: dict[str, float] | None = None
    masks: dict[str, str] | None = None
    overlay: str | None = None

    def to_dict(self) -> dict:
        out = {"id": self.id, "file_name": self.file_name, "width": self.width, "height": self.height}
        if self.counts is not None:
            out |= {"counts": dict(self.counts), "raw_counts": dict(self.raw_counts or {})}
        else:
            out["predicted"] = self.predicted
        out["probabilities"] = list(self.probabilities)
        if self.masks is not None:
            out["masks"] = dict(self.masks)
        if self.overlay is not None:
            out["overlay"] = self.overlay
        return out

    @classmethod
    def from_dict(cls, d: dict) -> LocalizedImage:
        """The record ``to_dict()`` gave."""
        return cls(d["id"], d["file_name"], d["width"], d["height"], list(d["probabilities"]), predicted=d.get("predicted"),
                   counts=d.get("counts"), raw_counts=d.get("raw_counts"), masks=d.get("masks"), overlay=d.get("overlay"))


@dataclass
class LocalizedBatch(Result):
    """One batch of :func:`localize_batches` (tensors on the device); this class itself is a batch
    in which no image could be read.

    Attributes:
        images: the readable images' records (B), numbered over the run.
        annotations: their boxes.
        skipped: the batch's unreadable files.
        paths: each record's file.
        display: each image's ``(3, h, w)`` uint8 picture for overlays (CPU); empty when the run
            makes no pictures.
        probabilities: ``(B, K)`` the model's class probabilities.
        skipped_ids: the id each unreadable file would have had (its place in the run's list + 1).
    """

    images: list[LocalizedImage]
    annotations: list[LocalizedBox]
    skipped: list[SkippedFile]
    paths: list[Path]
    display: list[torch.Tensor]
    probabilities: torch.Tensor
    skipped_ids: list[int]

    def to_dict(self) -> dict:
        return {"images": [im.to_dict() for im in self.images], "annotations": [a.to_dict() for a in self.annotations],
                "skipped": [s.to_dict() for s in self.skipped]}


@dataclass
class RegionBatch(LocalizedBatch):
    """A classifier's batch: maps, masks and region boxes.

    Attributes:
        maps: ``(B, T, S, S)`` normalised maps (``S``: ``settings.test_size``).
        targets: ``(B, T)`` class index of each map.
        scores: ``(B, T)`` the model's probability of each map's class.
        present: ``(B, T)`` bool: the maps whose class is shown (boxes and masks made).
        masks: ``(B, T, S, S)`` bool, the maps above their threshold.
        boxes: ``boxes[b][t]``: ``(R, 4)`` region boxes ``x0, y0, x1, y1`` (inclusive map pixels,
            CPU) of each map; empty where not ``present``.
    """

    maps: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor
    present: torch.Tensor
    masks: torch.Tensor
    boxes: list[list[torch.Tensor]]


@dataclass
class CountBatch(LocalizedBatch):
    """A counting model's batch: counts and numbered instances.

    Attributes:
        density: ``(B, S, S)`` all classes' maps summed and normalised to [0, 1].
        counts: ``(B, K)`` whole counts.
        instances: peaks and boxes in map pixels (:class:`~weakloc.localize.instances.Instances`,
            ``(B, K, N, ...)``; ``valid`` marks the counted ones).
    """

    density: torch.Tensor
    counts: torch.Tensor
    instances: Instances


@dataclass
class LocalizationResult(Result):
    """A whole run's records; :meth:`to_dict` is ``detections.json`` (COCO results with ``images``,
    ``annotations``, ``categories`` and ``skipped``)."""

    classes: list[str]
    images: list[LocalizedImage] = field(default_factory=list)
    annotations: list[LocalizedBox] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def categories(self) -> list[dict]:
        return [{"id": k + 1, "name": c} for k, c in enumerate(self.classes)]

    def add(self, images: list[LocalizedImage], annotations: list[LocalizedBox], skipped: list[SkippedFile]) -> None:
        """Append a batch's records (as its writer completed them) and unreadable files."""
        self.images += images
        self.annotations += annotations
        self.skipped += skipped

    def warn_skipped(self) -> None:
        """A :class:`UserWarning` when any image could not be read."""
        if self.skipped:
            warnings.warn(f"{len(self.skipped)} image(s) could not be read and were skipped", stacklevel=3)

    def to_dict(self) -> dict:
        return {"images": [im.to_dict() for im in self.images], "annotations": [a.to_dict() for a in self.annotations],
                "categories": self.categories, "skipped": [s.to_dict() for s in self.skipped]}

    @classmethod
    def from_dict(cls, d: dict) -> LocalizationResult:
        """The result whose ``to_dict()`` is ``d`` (a ``detections.json``)."""
        return cls([c["name"] for c in sorted(d["categories"], key=lambda c: c["id"])], [LocalizedImage.from_dict(i) for i in d["images"]],
                   [LocalizedBox(**a) for a in d["annotations"]], [SkippedFile(**s) for s in d["skipped"]])


class LocalizeBatches:
    """A checked localization run (:func:`localize_batches`); iterate it to compute its batches.

    Attributes:
        settings: the map settings (:func:`~weakloc.explain.pipeline.map_settings`).
        threshold: the box threshold asked for, ``auto`` resolved (``calibrated`` when the model
            has a calibrated one, else :data:`~weakloc.config.DEFAULT_BOX_THRESHOLD`).
        target: the maps' target (classifiers).
        paths: the image files.
    """

    def __init__(self, model, settings: MapConfig, threshold, target, keep: str, min_area: int, paths: list[Path],
                 batch_size: int, device: torch.device, display_size: int | None, progress, workers: int = 0, decode: str = "cpu"):
        self.model, self.settings, self.threshold, self.target, self.paths = model, settings, threshold, target, paths
        self._keep, self._min_area, self._batch_size, self._device = keep, min_area, batch_size, device
        self._display_size, self._progress, self._workers, self._decode = display_size, progress, workers, decode
        self.counting = getattr(model, "counting_head", None) is not None
        self._box_sizes = model.config.instance_box_sizes() if self.counting else None
        self.positions: list[int] = list(range(len(paths)))

    def restrict(self, positions: list[int]) -> LocalizeBatches:
        """Compute only the images at ``positions`` (indices into :attr:`paths`, increasing): a shard
        of a distributed run, or what a resumed run has left. Image ids stay ``position + 1``."""
        self.positions = list(positions)
        return self

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def device(self) -> torch.device:
        return self._device

    def result(self) -> LocalizationResult:
        """An empty :class:`LocalizationResult` of this run, for :meth:`LocalizationResult.add`."""
        return LocalizationResult(list(self.model.config.classes))

    def __iter__(self) -> Iterator[LocalizedBatch]:
        box_id, todo = 0, self.positions
        paths = [self.paths[p] for p in todo]
        for batch in image_batches(self.model, paths, self.settings.test_size, self._batch_size, self._device, self._display_size,
                                   self._workers, self._decode):
            # ids from each file's place in the whole list, so a shard or a resumed run numbers its images as a whole run does
            batch.positions = [todo[i] for i in batch.positions]
            batch.skipped_positions = [todo[i] for i in batch.skipped_positions]
            if batch.x is None:
                out = LocalizedBatch([], [], batch.skipped, [], [], torch.zeros(0, len(self.model.config.classes)), [])
            elif self.counting:
                out = self._count(batch, box_id)
            else:
                out = self._regions(batch, box_id)
            out.skipped_ids = [p + 1 for p in batch.skipped_positions]
            box_id += len(out.annotations)
            yield out
            if self._progress is not None:
                self._progress(batch.done, batch.total)

    def _regions(self, batch: ImageBatch, box_id: int) -> RegionBatch:
        model, cfg = self.model, self.model.config
        heat = pipeline.make_maps(model, batch.x, self.settings, self.target)
        probs = check_finite(model.probabilities(heat.logits.float()), "the model's probability", list(map(str, batch.paths)))
        score = probs.gather(1, heat.targets)  # (B, T)
        if cfg.task == "multi" and heat.targets.shape[1] > 1:
            present = score >= 0.5
            present[torch.arange(len(score)), score.argmax(1)] = True  # always show the top class
        elif cfg.positive_class is not None:
            present = probs[:, cfg.positive_class:cfg.positive_class + 1] >= 0.5
        else:
            present = torch.ones_like(score, dtype=torch.bool)
        b, t, h, w = heat.normalized.shape
        flat = heat.normalized.reshape(b * t, h, w)
        masks = binarize(flat, thresholds_for(flat, self.threshold, self.settings.threshold))
        dets = region_boxes(masks, flat, keep=self._keep, min_area=self._min_area)
        present_cpu, score_cpu, targets_cpu, probs_cpu = present.cpu(), score.cpu(), heat.targets.cpu(), probs.cpu()
        images, annotations, boxes = [], [], []
        for j, (path, (oh, ow), position) in enumerate(zip(batch.paths, batch.sizes, batch.positions)):
            image_id = position + 1
            images.append(LocalizedImage(image_id, escape_text(str(path), controls=False), ow, oh,
                                         [round(float(p), 4) for p in probs_cpu[j]], predicted=cfg.classes[int(probs_cpu[j].argmax())]))
            boxes.append([])
            for k in range(t):
                det = dets[j * t + k]
                if not present_cpu[j, k]:
                    boxes[-1].append(torch.zeros(0, 4))
                    continue
                boxes[-1].append(det.boxes)
                cls = int(targets_cpu[j, k])
                for r, (x0, y0, x1, y1) in enumerate(scale_boxes(det.boxes, (h, w), (oh, ow)).tolist()):
                    box_id += 1
                    annotations.append(LocalizedBox(box_id, image_id, cls + 1, cfg.classes[cls],
                                                    [round(x0, 1), round(y0, 1), round(x1 - x0 + 1, 1), round(y1 - y0 + 1, 1)],
                                                    round(float(score_cpu[j, k] * det.scores[r]), 4)))
        return RegionBatch(images, annotations, batch.skipped, batch.paths, batch.display, probs, [], heat.normalized, heat.targets, score,
                           present, masks.reshape(b, t, h, w), boxes)

    def _count(self, batch: ImageBatch, box_id: int) -> CountBatch:
        """Counts, and numbered instances from the density (or CAM) peaks."""
        model, cfg = self.model, self.model.config
        size = self.settings.test_size
        with torch.no_grad():
            o = counting_forward(model, batch.x, self.settings.count_views)
        whole = predicted_counts(o, cfg.task)
        maps, found = output_instances(o, size, counts=whole, box_sizes=self._box_sizes)
        pts, scores, boxes, valid = (t.cpu() for t in found)
        counts, raw = whole.cpu(), o.counts.float().cpu()
        names = list(map(str, batch.paths))
        check_finite(o.counts, "the model's count", names)
        probs = check_finite(model.probabilities(o.logits.float()), "the model's probability", names)
        probs_cpu = probs.cpu()
        images, annotations = [], []
        for j, (path, (oh, ow), position) in enumerate(zip(batch.paths, batch.sizes, batch.positions)):
            image_id = position + 1
            images.append(LocalizedImage(image_id, escape_text(str(path), controls=False), ow, oh,
                                         [round(float(p), 4) for p in probs_cpu[j]],
                                         counts={c: int(counts[j, k]) for k, c in enumerate(cfg.classes)},
                                         raw_counts={c: round(float(raw[j, k]), 2) for k, c in enumerate(cfg.classes)}))
            sx, sy = ow / size, oh / size
            for k, cname in enumerate(cfg.classes):
                for n in torch.nonzero(valid[j, k])[:, 0].tolist():
                    # instance boxes are continuous (sized boxes sit on a peak's centre), so the COCO box is
                    # their span scaled, not snapped to whole pixels as region boxes are
                    x0, y0, x1, y1 = boxes[j, k, n].tolist()
                    px, py = pts[j, k, n].tolist()
                    box_id += 1
                    annotations.append(LocalizedBox(
                        box_id, image_id, k + 1, cname,
                        [round(x0 * sx, 1), round(y0 * sy, 1), round((x1 - x0 + 1) * sx, 1), round((y1 - y0 + 1) * sy, 1)],
                        round(float(scores[j, k, n]), 5), instance=n + 1, point=[round((px + 0.5) * sx, 1), round((py + 0.5) * sy, 1)]))
        return CountBatch(images, annotations, batch.skipped, batch.paths, batch.display, probs, [], normalize_minmax(maps.sum(1)), whole,
                          found)


def _asked(maps, name: str) -> bool:
    """Whether the caller's map overrides set ``name``."""
    if isinstance(maps, MapConfig):
        return getattr(maps, name) is not None
    return isinstance(maps, dict) and maps.get(name) is not None


def localize_batches(model, images, *, method: str | None = None, maps: MapConfig | dict | None = None, target=None,
                     threshold: str | float = "auto", keep: str = "all", min_area: int = 4, batch_size: int = 16, device=None,
                     count_views: str | None = None, display_size: int | None = 512, progress=None, workers: int = 0,
                     decode: str = "cpu") -> LocalizeBatches:
    """Localize the evidence for each image's class(es), one batch at a time (nothing written).

    Args:
        model: a trained :class:`~weakloc.models.WeaklocNet`.
        images: files and/or folders.
        method: heatmap method (``weakloc methods``); None: the model's stored one, else ``cam``.
        maps: further map settings over the model's stored ones: a
            :class:`~weakloc.config.MapConfig` or a flat dict (``layer``, ``fusion``, ``tta``,
            ``eigen_smooth``, ``dtype``, ``normalization``, ``test_size``, method options).
        target: ``predicted``, ``all``, ``topK``, a class name or index (every image); default
            :func:`default_target`.
        threshold: a number in [0, 1), ``otsu``, ``percentile:Q``, ``calibrated``, or ``auto`` (the
            model's calibrated threshold, ``maps.threshold``, if any, else
            :data:`~weakloc.config.DEFAULT_BOX_THRESHOLD`, or :data:`~weakloc.config.REFINED_THRESHOLD` for
            refined maps).
        keep: ``all`` regions, the ``largest`` per map, or ``peaks`` (every region split at the map's
            peaks, :func:`~weakloc.localize.regions.split_at_peaks`).
        min_area: regions smaller than this many map pixels are dropped (``keep="all"`` or ``"peaks"``).
        count_views: counting models: test-time views counts are averaged over (``none``,
            ``flip``, ``dihedral``); None: the model's stored ``maps.count_views``, else ``none``.
        display_size: longest side of the pictures kept for overlays; None: no pictures.
        progress: optional callable ``(done, total)``, called after each batch.
        workers: DataLoader processes that decode and resize the images (0: this process).
        decode: ``cpu`` (in the workers), or ``device``: JPEGs decoded on the model's device in one
            call per batch (nvJPEG on a GPU) and resized there; other files on the CPU.

    Returns:
        a :class:`LocalizeBatches`: the checked settings, and an iterable of :class:`RegionBatch`
        / :class:`CountBatch` (a plain :class:`LocalizedBatch` where no image of a batch was read).

    Raises:
        OptionError: an argument out of range or of the wrong kind, before any work starts.
    """
    cfg = model.config
    batch_size = check_int("batch_size", batch_size, 1)
    min_area = check_int("min_area", min_area, 0)
    display_size = None if display_size is None else check_int("display_size", display_size, 1)
    workers = check_int("workers", workers, 0)
    decode = check_choice("decode", decode, DECODERS)
    keep = check_choice("keep", keep, KEEP)
    check_progress(progress)
    check_maps(maps)
    if method is not None:
        check_method(method)
    counting = getattr(model, "counting_head", None) is not None
    if not counting and (count_views is not None or _asked(maps, "count_views")):
        raise OptionError("count_views: only counting models average test-time views (use tta in maps for maps)")
    settings = pipeline.map_settings(model, maps, **given_settings(method=method, count_views=count_views))
    calibrated = cfg.maps.threshold
    if isinstance(threshold, str) and threshold == "auto":
        threshold = "calibrated" if calibrated is not None else fallback_threshold(settings.refine, DEFAULT_BOX_THRESHOLD)
    threshold = check_threshold(threshold, calibrated)
    target = default_target(model) if target is None else check_target(target, cfg.classes)
    device = model_device(model, device)
    model = model.to(device).eval()
    return LocalizeBatches(model, settings, threshold, target, keep, min_area, list_images(images), batch_size, device, display_size,
                           progress, workers, decode)


def localize(model, images, **options) -> LocalizationResult:
    """Every image's records (:func:`localize_batches` with ``options``), without writing anything;
    :func:`weakloc.report.localization.localize_images` also writes the files. Warns when an image
    could not be read."""
    run = localize_batches(model, images, **(options | {"display_size": None}))  # no pictures: nothing draws them
    result = run.result()
    for batch in run:
        result.add(batch.images, batch.annotations, batch.skipped)
    result.warn_skipped()
    return result
