"""``weakloc localize``'s files: overlays, masks, results streamed to JSON Lines, ``detections.json``
(COCO), ``counts.csv`` and a gallery.

:class:`LocalizationWriter` draws the batches of :func:`~weakloc.localize.run.localize_batches`;
:func:`localize_to_folder` runs both and streams the records to disk (:mod:`weakloc.report.stream`:
resumable, one shard per ``torchrun`` rank, merged at the end); :func:`localize_images` is the same
run returning the merged results (what the demo calls).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torchvision.utils import draw_keypoints

from weakloc.checks import check_choice
from weakloc.config import MapConfig
from weakloc.distributed import Rank, barrier, current_rank, process_group
from weakloc.explain.maps import upsample
from weakloc.explain.run import SkippedFile
from weakloc.localize.regions import scale_boxes
from weakloc.localize.run import (CountBatch, LocalizationResult, LocalizedBatch, LocalizedBox, LocalizedImage, RegionBatch,
                                  localize, localize_batches)
from weakloc.report import stream
from weakloc.report.explanation import class_file_names
from weakloc.report.overlay import blend, draw_detections, save_png
from weakloc.report.paths import OutputFolder, safe_component
from weakloc.results import Result

#: what ``pictures`` may ask for: overlays and masks, overlays only, or records only (fastest)
PICTURES = ("all", "overlays", "none")


def counts_csv(result: LocalizationResult) -> str:
    """A counting run's per-class counts as CSV text: a ``path,<class>,...`` header, then one row per
    image with its whole counts (what ``detections.json`` holds as ``counts``), for a spreadsheet."""
    buffer = io.StringIO()
    rows = csv.writer(buffer, lineterminator="\n")
    rows.writerow(stream.counts_header(result.classes))
    for image in result.images:
        rows.writerow(stream.counts_row(image.file_name, image.counts or {}, result.classes))
    return buffer.getvalue()


class LocalizationWriter:
    """Draws one localization run's pictures into ``out``, batch by batch.

    Files (inside ``out``; ``NNNNN`` is the image's id, the rest of each name made from the image
    stem and class name by :func:`~weakloc.report.paths.safe_component`): ``overlays/NNNNN_stem.png``
    (the first shown class's map with every box, or for counting models all classes' density with
    numbered instances) and, with ``pictures="all"``, ``masks/NNNNN_stem_class.png`` (classifiers:
    the binary mask of each shown class at the original size). Names depend on the id only, so a
    resumed run writes the same names.
    """

    def __init__(self, out: str | Path | OutputFolder, classes: list[str], pictures: str = "all"):
        self.out = out if isinstance(out, OutputFolder) else OutputFolder(out)
        self.classes = list(classes)
        self.pictures = check_choice("pictures", pictures, PICTURES)
        self._class_files = class_file_names(self.classes)

    def add(self, batch: LocalizedBatch) -> list[LocalizedImage]:
        """Write the batch's pictures; returns its image records, with their overlay and mask files."""
        if self.pictures == "none" or not batch.images:
            return list(batch.images)
        if isinstance(batch, RegionBatch):
            return self._regions(batch)
        if isinstance(batch, CountBatch):
            return self._counts(batch)
        return list(batch.images)

    def _picture(self, sub: str, stem: str) -> Path:
        # names start with the image's unique id: no per-name bookkeeping, which would grow with the run
        return self.out.file(sub, stem, ".png", unique=False)

    def _regions(self, batch: RegionBatch) -> list[LocalizedImage]:
        out, classes, records = self.out, self.classes, []
        h, w = batch.maps.shape[-2:]
        present, scores, targets, probs = batch.present.cpu(), batch.scores.cpu(), batch.targets.cpu(), batch.probabilities.cpu()
        for j, (record, path, shown) in enumerate(zip(batch.images, batch.paths, batch.display)):
            stem = f"{record.id:05d}_{safe_component(Path(path).stem)}"
            masks: dict[str, str] = {}
            with_masks = self.pictures == "all"
            drawn_boxes, drawn_labels = [], []
            for k in range(batch.targets.shape[1]):
                if not present[j, k]:
                    continue
                cls = int(targets[j, k])
                boxes = batch.boxes[j][k]
                drawn_boxes.append(scale_boxes(boxes, (h, w), tuple(shown.shape[-2:])))
                if with_masks:
                    full = torch.nn.functional.interpolate(batch.masks[j, k][None, None].float(), size=(record.height, record.width),
                                                           mode="nearest")[0, 0]
                    mask_png = save_png((full * 255).to(torch.uint8), self._picture("masks", f"{stem}_{self._class_files[cls]}"), out.root)
                    masks[classes[cls]] = mask_png.relative_to(out.root).as_posix()
                drawn_labels += [f"{classes[cls]} {float(scores[j, k]):.2f}"] * len(boxes)
            # overlay the first shown target's map (the predicted / positive class)
            k_show = int(present[j].float().argmax()) if present[j].any() else 0
            heat = upsample(batch.maps[j, k_show][None], tuple(shown.shape[-2:]), mode="bilinear").clamp(0, 1)
            over = blend(shown[None].to(heat.device), heat)[0]
            boxes_all = torch.cat(drawn_boxes) if drawn_boxes else torch.zeros(0, 4)
            png = save_png(draw_detections(over, boxes_all, drawn_labels), self._picture("overlays", stem), out.root)
            records.append(replace(record, masks=masks or None, overlay=png.relative_to(out.root).as_posix()))
        return records

    def _counts(self, batch: CountBatch) -> list[LocalizedImage]:
        out, classes, records = self.out, self.classes, []
        size = batch.density.shape[-1]
        pts, boxes, valid = (t.cpu() for t in (batch.instances.points, batch.instances.boxes, batch.instances.valid))
        counts = batch.counts.cpu()
        for j, (record, path, shown) in enumerate(zip(batch.images, batch.paths, batch.display)):
            dh, dw = shown.shape[-2:]
            drawn, labels, points = [], [], []
            for k, cname in enumerate(classes):
                keep_n = torch.nonzero(valid[j, k])[:, 0]
                drawn.append(scale_boxes(boxes[j, k, keep_n], (size, size), (dh, dw)))
                for n in keep_n.tolist():
                    px, py = pts[j, k, n].tolist()
                    points.append([(px + 0.5) * dw / size, (py + 0.5) * dh / size])
                    labels.append(f"{cname} {n + 1}")
            disp = upsample(batch.density[j][None], (dh, dw), mode="bilinear").clamp(0, 1)
            picture = blend(shown[None].to(disp.device), disp)[0].cpu()
            summary = " · ".join(f"{c} {int(counts[j, k])}" for k, c in enumerate(classes))
            banner = torch.tensor([[0.0, 0.0, dw - 1.0, 0.0]])  # a flat box carries the counts as its caption
            picture = draw_detections(picture, torch.cat([banner, *drawn]), [summary] + labels)
            if points:
                picture = draw_keypoints(picture, torch.tensor(points)[None], colors="white", radius=3)
            png = save_png(picture, self._picture("overlays", f"{record.id:05d}_{safe_component(Path(path).stem)}"), out.root)
            records.append(replace(record, overlay=png.relative_to(out.root).as_posix()))
        return records



@dataclass
class LocalizationSummary(Result):
    """What :func:`localize_to_folder` did.

    Attributes:
        out: the output folder.
        images, boxes: images with results and their boxes in ``detections.json`` (the whole
            run, every rank's; on ranks other than zero, this rank's share of this session).
        skipped: files that could not be read (skipped, never fatal); ``skipped_files`` names the
            first of them with the reason.
        resumed: images an earlier, interrupted run of the same command had done.
        computed: images this process computed now.
        rank, world: this process among the ``torchrun`` ranks (0 of 1 when started alone).
        seconds: this process's time.
    """

    out: str
    images: int
    boxes: int
    skipped: int
    resumed: int
    computed: int
    rank: int = 0
    world: int = 1
    seconds: float = 0.0
    skipped_files: list[SkippedFile] = field(default_factory=list)


def _lines(batch: LocalizedBatch, records: list[LocalizedImage]) -> list[dict]:
    """The batch's JSON Lines: each image's record with its boxes, then each unreadable file."""
    boxes: dict[int, list[dict]] = {}
    for box in batch.annotations:
        boxes.setdefault(box.image_id, []).append(box.to_dict())
    lines = [stream.image_line(r.to_dict(), boxes.get(r.id, [])) for r in records]
    return lines + [stream.skipped_line(i, s.file, s.reason) for i, s in zip(batch.skipped_ids, batch.skipped)]


def _run_settings(run, model, keep: str, min_area: int, pictures: str, display_size) -> dict:
    """Everything that decides a run's results (what ``run.json`` records, and a resume must match)."""
    return {"classes": list(model.config.classes), "method": run.method, "maps": run.settings.to_dict(), "threshold": run.threshold,
            "target": run.target, "keep": keep, "min_area": min_area, "pictures": pictures,
            "display_size": None if pictures == "none" else display_size}


def localize_to_folder(model, images, out: str | Path, *, method: str | None = None, maps: MapConfig | dict | None = None, target=None,
                       threshold: str | float = "auto", keep: str = "all", min_area: int = 4, batch_size: int = 16, device=None,
                       count_views: str | None = None, display_size: int = 512, pictures: str = "all", workers: int = 0,
                       decode: str = "cpu", restart: bool = False, progress=None) -> LocalizationSummary:
    """Localize ``images`` into the folder ``out``, streaming each batch's records to disk.

    Results go to ``out/parts/part-RRRRR.jsonl`` as they are made (one line per image), pictures
    to ``overlays/`` and ``masks/`` (``pictures``), and at the end ``detections.json``,
    ``counts.csv`` (counting models) and ``index.html`` are merged from the parts
    (:func:`weakloc.report.stream.assemble`). Memory stays flat whatever the number of images.
    Running the same call again after an interruption (a kill, a crash, a lost node) computes only
    the images without a line yet; the merged results are those of one uninterrupted run. Under
    ``torchrun`` each rank takes every ``world``-th image (on ``cuda:LOCAL_RANK`` when GPUs are
    there and ``device`` is not given), the ranks meet at the end and rank zero merges.

    Args:
        model, images, method, maps, target, threshold, keep, min_area, batch_size, device,
            count_views, display_size, progress: see :func:`~weakloc.localize.run.localize_batches`;
            ``images`` may also be file lists (``.txt``, ``.csv``).
        out: the output folder.
        pictures: ``all`` (overlays and masks), ``overlays``, or ``none`` (records only).
        workers: DataLoader processes decoding and resizing the images.
        decode: ``cpu``, or ``device`` (JPEGs decoded on the device, nvJPEG on a GPU; see
            :func:`~weakloc.localize.run.localize_batches`).
        restart: discard an earlier run's results in ``out`` instead of resuming it.

    Returns:
        a :class:`LocalizationSummary`.

    Raises:
        OptionError: an argument out of range or of the wrong kind, before any work starts.
        WeaklocError: ``out`` holds a run of another model, settings or image list (without ``restart``).
    """
    t0 = time.perf_counter()
    pictures = check_choice("pictures", pictures, PICTURES)
    folder = OutputFolder(out)
    rank = current_rank()
    if device is None and rank.world > 1 and torch.cuda.is_available():
        device = f"cuda:{rank.local}"
    run = localize_batches(model, images, method=method, maps=maps, target=target, threshold=threshold, keep=keep, min_area=min_area,
                           batch_size=batch_size, device=device, count_views=count_views,
                           display_size=None if pictures == "none" else display_size, progress=progress, workers=workers,
                           decode=decode)
    root, total = folder.root, len(run.paths)
    with process_group(rank, run.device):
        described = stream.fingerprint(model, run.paths, _run_settings(run, model, keep, min_area, pictures, display_size))
        stream.prepare(root, described, restart=restart, zero=rank.zero)
        barrier(rank)  # run.json written (and an old run cleared) before anyone reads the parts
        part = stream.PartWriter(stream.part_path(root, rank.rank))  # cuts a torn last line of this rank's part
        barrier(rank)
        done = stream.done_ids(root, total)
        resumed = sum(done)
        run.restrict([p for p in range(total) if rank.owns(p) and not done[p]])
        draw = LocalizationWriter(folder, model.config.classes, pictures)
        computed = boxes = skipped = 0
        skipped_files: list[SkippedFile] = []
        try:
            for batch in run:
                records = draw.add(batch)
                part.write(_lines(batch, records))  # after the batch's pictures: a line means all its files are there
                computed += len(batch.images) + len(batch.skipped)
                boxes += len(batch.annotations)
                skipped += len(batch.skipped)
                skipped_files += batch.skipped[:max(0, stream.GALLERY_LIMIT - len(skipped_files))]
        finally:
            part.close()
        barrier(rank)
        summary = LocalizationSummary(str(root), computed - skipped, boxes, skipped, resumed, computed, rank.rank, rank.world)
        if rank.zero:
            merged = stream.assemble(root)
            summary = replace(summary, images=merged.images, boxes=merged.boxes, skipped=merged.skipped,
                              skipped_files=[SkippedFile(**s) for s in merged.skipped_files])
        else:
            summary.skipped_files = skipped_files
        barrier(rank)  # detections.json merged before any rank returns
    summary.seconds = round(time.perf_counter() - t0, 2)
    return summary


def read_detections(out: str | Path) -> LocalizationResult:
    """The :class:`~weakloc.localize.run.LocalizationResult` an output folder's ``detections.json`` holds."""
    return LocalizationResult.from_dict(json.loads((Path(out) / "detections.json").read_text(encoding="utf-8")))


def localize_images(model, images, out: str | Path | None = None, *, method: str | None = None, maps: MapConfig | dict | None = None,
                    target=None, threshold: str | float = "auto", keep: str = "all", min_area: int = 4, batch_size: int = 16,
                    device=None, count_views: str | None = None, display_size: int = 512, progress=None, pictures: str = "all",
                    workers: int = 0, decode: str = "cpu", restart: bool = False) -> LocalizationResult:
    """Localize the evidence for each image's class(es), and write the results when ``out`` is given.

    Args:
        model, images, method, maps, target, threshold, keep, min_area, batch_size, device,
            count_views, display_size, progress, workers, decode: see :func:`~weakloc.localize.run.localize_batches`.
        out: when given, the folder :func:`localize_to_folder` writes into (``overlays/``,
            ``masks/``, ``parts/``, ``detections.json`` with boxes in original pixels, scores, labels
            and each image's picture files, ``index.html``); an interrupted earlier call with the
            same arguments is resumed. The JSON keeps the original names, a file path that is not
            valid UTF-8 written with ``\\xNN`` for each undecodable byte.
        pictures, restart: see :func:`localize_to_folder`.

    Returns:
        a :class:`~weakloc.localize.run.LocalizationResult`; its ``to_dict()`` is ``detections.json``
        (``images``, ``annotations``, ``categories``, ``skipped``). Warns when an image could not
        be read.

    Raises:
        OptionError: an argument out of range or of the wrong kind, before any work starts.
    """
    options = dict(method=method, maps=maps, target=target, threshold=threshold, keep=keep, min_area=min_area, batch_size=batch_size,
                   device=device, count_views=count_views, display_size=display_size, progress=progress, workers=workers,
                   decode=decode)
    if out is None:
        return localize(model, images, **options)
    localize_to_folder(model, images, out, pictures=pictures, restart=restart, **options)
    result = read_detections(out)
    result.warn_skipped()
    return result
