"""Heatmaps of image files, computed batch by batch: typed results, no files written.

:func:`explain_batches` checks its options and lists the images at once (an
:class:`~weakloc.errors.OptionError` before any work), then computes one :class:`ExplainedBatch` at
a time; :mod:`weakloc.report.explanation` writes them (overlays, ``maps.safetensors``,
``maps.json``, ``index.html``). Maps are made by the one pipeline (:mod:`weakloc.explain.pipeline`)
on images loaded at ``settings.test_size``.

The option checks shared with localization (:func:`check_target`, :func:`check_method`), the image
batches (:func:`image_batches`) and the record of an unreadable file (:class:`SkippedFile`) live
here too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from weakloc.checks import check_device, check_int
from weakloc.config import MapConfig
from weakloc.data.dataset import JpegData, PredictDataset, collate_list, eval_transform, prepare
from weakloc.data.images import decode_jpeg_batch, read_image
from weakloc.data.images import list_images
from weakloc.errors import ImageReadError, OptionError, WeaklocError
from weakloc.explain import pipeline, resolve_targets
from weakloc.explain.registry import get_method
from weakloc.models.classifier import check_finite
from weakloc.results import Result
from weakloc.text import escape_text


def check_target(target, classes: list[str]) -> str | int:
    """``target`` if it names maps for every image (``predicted``, ``all``, ``topK``, a class name
    or index), else an :class:`~weakloc.errors.OptionError`."""
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        raise OptionError(f"target: expected predicted, all, topK, a class name or a class index, got {target!r}")
    try:
        resolve_targets(target, torch.zeros(1, len(classes)), classes)
    except WeaklocError as e:
        raise OptionError(f"target: {e}") from None
    return target


def check_method(method) -> str:
    """``method`` if it is a registered heatmap method, else an :class:`~weakloc.errors.OptionError`."""
    if not isinstance(method, str):
        raise OptionError(f"method: expected a method name, got {method!r}")
    try:
        get_method(method)
    except WeaklocError as e:
        raise OptionError(f"method: {e}") from None
    return method


def check_maps(maps, name: str = "maps") -> MapConfig | dict | None:
    """``maps`` (per-call map settings: a :class:`~weakloc.config.MapConfig`, a flat dict of
    settings and method options such as ``{"fusion": "max", "positive_weights": True}``, or None)
    if it is of a usable kind, else an :class:`~weakloc.errors.OptionError`; the values are checked
    by :func:`~weakloc.explain.pipeline.map_settings`."""
    if maps is not None and not isinstance(maps, MapConfig) and not (isinstance(maps, dict) and all(isinstance(k, str) for k in maps)):
        raise OptionError(f"{name}: expected a MapConfig or a dict of map settings and method options, got {maps!r}")
    return maps


def check_progress(progress):
    """``progress`` if it is None or a callable ``(done, total)``, else an :class:`~weakloc.errors.OptionError`."""
    if progress is not None and not callable(progress):
        raise OptionError(f"progress: expected a callable (done, total), got {progress!r}")
    return progress


def given_settings(**settings) -> dict:
    """The map settings a caller gave as keywords (None: not given), so that an unset keyword never
    hides the same setting given in ``maps``."""
    return {k: v for k, v in settings.items() if v is not None}


def model_device(model, device) -> torch.device:
    """``device`` checked (:func:`~weakloc.checks.check_device`), else the device of ``model``'s weights."""
    return torch.device(check_device("device", device) if device is not None else next(model.parameters()).device)


@dataclass
class SkippedFile(Result):
    """An image that could not be read: the file (undecodable bytes as ``\\xNN``) and why."""

    file: str
    reason: str


@dataclass
class ImageBatch:
    """One batch of readable images and the files of the batch that could not be read.

    Attributes:
        x: ``(B, 3, S, S)`` model inputs, normalised, on the device.
        paths: each image's file (B).
        sizes: each image's original ``(H, W)``.
        display: each image's picture for overlays, ``(3, h, w)`` uint8 (CPU; longest side
            256..``display_size``); empty when no pictures were asked for.
        skipped: the batch's unreadable files.
        done, total: images handled so far (this batch included), and in all.
        positions: each readable image's position in the list of files given.
        skipped_positions: each unreadable file's position in that list.
    """

    x: torch.Tensor | None
    paths: list[Path]
    sizes: list[tuple[int, int]]
    display: list[torch.Tensor]
    skipped: list[SkippedFile]
    done: int
    total: int
    positions: list[int] = field(default_factory=list)
    skipped_positions: list[int] = field(default_factory=list)


def image_batches(model, paths: list[Path], size: int, batch_size: int, device: torch.device,
                  display_size: int | None = 512, workers: int = 0, decode: str = "cpu") -> Iterator[ImageBatch]:
    """``paths`` read and normalised at ``size × size`` (the model's mean and std), ``batch_size``
    at a time; ``x`` is None for a batch with no readable image.

    Files are decoded (torchvision's libjpeg-turbo / libpng decoders, :func:`read_image`) and
    resized in ``workers`` DataLoader processes (0: in this one) while the device works on the
    previous batch; batches bound for a GPU come from pinned memory and are copied without
    blocking. ``decode="device"``: the workers only read and check JPEG files, which are decoded
    in one call per batch on ``device`` (nvJPEG on a GPU) and resized there. ``display_size``
    None: no pictures for overlays are made."""
    cfg = model.config
    loader = DataLoader(PredictDataset(paths, size, cfg.mean, cfg.std, display_size, decode), batch_size=batch_size,
                        collate_fn=collate_list, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=2 if workers else None)
    tf = eval_transform(size, cfg.mean, cfg.std)
    done = 0
    for batch in loader:
        done += len(batch)
        batch = _decode_on_device(batch, paths, device, tf, display_size) if decode == "device" else batch
        good = [b for b in batch if b[1] is not None]
        bad = [(i, reason) for i, x, reason, _ in batch if x is None]
        skipped = [SkippedFile(escape_text(str(paths[i]), controls=False), escape_text(reason, controls=False)) for i, reason in bad]
        x = torch.stack([b[1].to(device, non_blocking=True) for b in good]) if good else None
        yield ImageBatch(x, [paths[i] for i, *_ in good], [tuple(hw) for _, _, hw, _ in good],
                         [shown for *_, shown in good if shown is not None], skipped, done, len(paths),
                         [i for i, *_ in good], [i for i, _ in bad])


def _decode_on_device(batch: list, paths: list[Path], device: torch.device, tf, display_size: int | None) -> list:
    """The batch's JPEG bytes decoded in one call on ``device`` and prepared there (the same resize
    and normalisation as on the CPU); a file that decoder refuses (nvJPEG lacks some JPEG kinds) is
    read on the CPU instead, and is unreadable only if that fails too."""
    jpegs = [n for n, item in enumerate(batch) if isinstance(item[1], JpegData)]
    decoded = decode_jpeg_batch([batch[n][1].data for n in jpegs], device)
    out = list(batch)
    for n, img in zip(jpegs, decoded):
        i = batch[n][0]
        if isinstance(img, str):
            try:
                img = read_image(paths[i])
            except ImageReadError as e:
                out[n] = (i, None, str(e), None)
                continue
        x, shown = prepare(img.to(device), tf, display_size)
        out[n] = (i, x, tuple(img.shape[-2:]), shown)
    return out


@dataclass
class ExplainedImage(Result):
    """One image's entry of ``maps.json``.

    Attributes:
        file: the image file (undecodable bytes as ``\\xNN``).
        width, height: its original size.
        targets: the class of each of its maps.
        probabilities: the model's probability of each class, rounded to 4 places.
        key: the name of its maps in ``maps.safetensors`` (``NNNNN_stem``), given by the writer
            (:mod:`weakloc.report.explanation`); None before.
    """

    file: str
    width: int
    height: int
    targets: list[str]
    probabilities: list[float]
    key: str | None = None

    def to_dict(self) -> dict:
        out = {} if self.key is None else {"key": self.key}
        return out | {"file": self.file, "width": self.width, "height": self.height, "targets": list(self.targets),
                      "probabilities": list(self.probabilities)}


@dataclass
class ExplainedBatch(Result):
    """One batch of :func:`explain_batches`: records and maps (tensors on the device).

    Attributes:
        images: the readable images' records (B).
        skipped: the batch's unreadable files.
        paths: each record's file.
        display: each image's ``(3, h, w)`` uint8 picture (CPU).
        raw, normalized: ``(B, T, S, S)`` the maps as made and normalised to [0, 1].
        targets: ``(B, T)`` class index of each map.
        probabilities: ``(B, K)`` the model's class probabilities.
    """

    images: list[ExplainedImage]
    skipped: list[SkippedFile]
    paths: list[Path]
    display: list[torch.Tensor]
    raw: torch.Tensor | None
    normalized: torch.Tensor | None
    targets: torch.Tensor | None
    probabilities: torch.Tensor | None

    def to_dict(self) -> dict:
        return {"images": [im.to_dict() for im in self.images], "skipped": [s.to_dict() for s in self.skipped]}


@dataclass
class ExplanationResult(Result):
    """What :func:`~weakloc.report.explanation.explain_images` returns; :meth:`to_dict` is ``maps.json``."""

    method: str
    classes: list[str]
    images: list[ExplainedImage] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def add(self, images: list[ExplainedImage], skipped: list[SkippedFile]) -> None:
        """Append a batch's records (as the writer keyed them) and unreadable files."""
        self.images += images
        self.skipped += skipped

    def to_dict(self) -> dict:
        return {"method": self.method, "classes": list(self.classes), "images": [im.to_dict() for im in self.images],
                "skipped": [s.to_dict() for s in self.skipped]}


class ExplainBatches:
    """A checked heatmap run (:func:`explain_batches`); iterate it to compute its batches.

    Attributes:
        settings: the map settings (:func:`~weakloc.explain.pipeline.map_settings`).
        target: the maps' target for every image.
        paths: the image files.
    """

    def __init__(self, model, settings: MapConfig, target, paths: list[Path], batch_size: int, device: torch.device,
                 display_size: int, progress):
        self.model, self.settings, self.target, self.paths = model, settings, target, paths
        self._batch_size, self._device, self._display_size, self._progress = batch_size, device, display_size, progress

    @property
    def method(self) -> str:
        return self.settings.method

    def result(self) -> ExplanationResult:
        """An empty :class:`ExplanationResult` of this run, for :meth:`ExplanationResult.add`."""
        return ExplanationResult(self.settings.method, list(self.model.config.classes))

    def __iter__(self) -> Iterator[ExplainedBatch]:
        classes = self.model.config.classes
        for batch in image_batches(self.model, self.paths, self.settings.test_size, self._batch_size, self._device, self._display_size):
            if batch.x is None:
                yield ExplainedBatch([], batch.skipped, [], [], None, None, None, None)
            else:
                heat = pipeline.make_maps(self.model, batch.x, self.settings, self.target)
                probs = check_finite(self.model.probabilities(heat.logits.float()), "the model's probability", list(map(str, batch.paths)))
                probs_cpu, targets_cpu = probs.cpu(), heat.targets.cpu()
                records = [ExplainedImage(escape_text(str(path), controls=False), w, h, [classes[c] for c in targets_cpu[j].tolist()],
                                          [round(float(p), 4) for p in probs_cpu[j]])
                           for j, (path, (h, w)) in enumerate(zip(batch.paths, batch.sizes))]
                yield ExplainedBatch(records, batch.skipped, batch.paths, batch.display, heat.raw, heat.normalized, heat.targets, probs)
            if self._progress is not None:
                self._progress(batch.done, batch.total)


def explain_batches(model, images, *, method: str | None = None, target="predicted", layer: str | None = None,
                    maps: MapConfig | dict | None = None, batch_size: int = 16, device=None, display_size: int = 512,
                    progress=None) -> ExplainBatches:
    """Heatmaps of image files, one batch at a time (nothing written).

    Args:
        model: a :class:`~weakloc.models.WeaklocNet`.
        images: files and/or folders.
        method, layer: heatmap method and target layer(s); None: the model's stored ones (method:
            else ``cam``).
        target: ``predicted``, ``all``, ``topK``, a class name or index (every image).
        maps: further map settings over the model's stored ones: a
            :class:`~weakloc.config.MapConfig` or a flat dict (``fusion``, ``tta``,
            ``eigen_smooth``, ``dtype``, ``normalization``, ``test_size``, method options).
        display_size: longest side of the pictures kept for overlays.
        progress: optional callable ``(done, total)``, called after each batch.

    Returns:
        an :class:`ExplainBatches`: the checked settings, and an iterable of :class:`ExplainedBatch`.

    Raises:
        OptionError: an argument out of range or of the wrong kind, before any work starts.
    """
    cfg = model.config
    batch_size = check_int("batch_size", batch_size, 1)
    display_size = check_int("display_size", display_size, 1)
    check_progress(progress)
    check_maps(maps)
    if method is not None:
        check_method(method)
    target = check_target(target, cfg.classes)
    settings = pipeline.map_settings(model, maps, **given_settings(method=method, layer=layer))
    device = model_device(model, device)
    model = model.to(device).eval()
    return ExplainBatches(model, settings, target, list_images(images), batch_size, device, display_size, progress)
