"""``weakloc localize``'s files: overlays, masks, ``detections.json`` (COCO) and a gallery.

:class:`LocalizationWriter` writes the batches of :func:`~weakloc.localize.run.localize_batches`;
:func:`localize_images` runs both (what the command and the demo call).
"""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import replace
from pathlib import Path

import torch
from torchvision.utils import draw_keypoints

from weakloc.config import MapConfig
from weakloc.explain.maps import upsample
from weakloc.localize.regions import scale_boxes
from weakloc.localize.run import CountBatch, LocalizationResult, LocalizedBatch, LocalizedImage, RegionBatch, localize_batches
from weakloc.report.explanation import class_file_names
from weakloc.report.html import gallery_cards, write_page
from weakloc.report.overlay import blend, draw_detections, save_png
from weakloc.report.paths import OutputFolder, safe_component


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: a leading =, +, - or @ would start a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def counts_csv(result: LocalizationResult) -> str:
    """A counting run's per-class counts as CSV text: a ``path,<class>,...`` header, then one row per
    image with its whole counts (what ``detections.json`` holds as ``counts``), for a spreadsheet."""
    buffer = io.StringIO()
    rows = csv.writer(buffer, lineterminator="\n")
    rows.writerow(["path", *(_cell(c) for c in result.classes)])
    for image in result.images:
        counts = image.counts or {}
        rows.writerow([_cell(image.file_name), *(counts.get(c, "") for c in result.classes)])
    return buffer.getvalue()


class LocalizationWriter:
    """Writes one localization run into ``out``, batch by batch.

    Files (all inside ``out``; names made from image stems and class names by
    :func:`~weakloc.report.paths.safe_component`): ``overlays/NNNNN_stem.png`` (the first shown
    class's map with every box, or for counting models all classes' density with numbered
    instances), ``masks/NNNNN_stem_class.png`` (classifiers: the binary mask of each shown class
    at the original size), and at :meth:`finish` ``detections.json``, ``index.html`` and, for a
    counting model, ``counts.csv``.
    """

    def __init__(self, out: str | Path | OutputFolder, classes: list[str]):
        self.out = out if isinstance(out, OutputFolder) else OutputFolder(out)
        self.classes = list(classes)
        self._class_files = class_file_names(self.classes)
        self._cards: list[dict] = []

    def add(self, batch: LocalizedBatch) -> list[LocalizedImage]:
        """Write the batch's pictures; returns its image records, with their mask files."""
        if isinstance(batch, RegionBatch):
            return self._regions(batch)
        if isinstance(batch, CountBatch):
            self._counts(batch)
        return list(batch.images)

    def _regions(self, batch: RegionBatch) -> list[LocalizedImage]:
        out, classes, records = self.out, self.classes, []
        h, w = batch.maps.shape[-2:]
        present, scores, targets, probs = batch.present.cpu(), batch.scores.cpu(), batch.targets.cpu(), batch.probabilities.cpu()
        for j, (record, path, shown) in enumerate(zip(batch.images, batch.paths, batch.display)):
            stem = f"{record.id:05d}_{safe_component(Path(path).stem)}"
            masks: dict[str, str] = {}
            drawn_boxes, drawn_labels = [], []
            for k in range(batch.targets.shape[1]):
                if not present[j, k]:
                    continue
                cls = int(targets[j, k])
                boxes = batch.boxes[j][k]
                drawn_boxes.append(scale_boxes(boxes, (h, w), tuple(shown.shape[-2:])))
                full = torch.nn.functional.interpolate(batch.masks[j, k][None, None].float(), size=(record.height, record.width),
                                                       mode="nearest")[0, 0]
                mask_png = save_png((full * 255).to(torch.uint8), out.file("masks", f"{stem}_{self._class_files[cls]}", ".png"), out.root)
                masks[classes[cls]] = mask_png.relative_to(out.root).as_posix()
                drawn_labels += [f"{classes[cls]} {float(scores[j, k]):.2f}"] * len(boxes)
            # overlay the first shown target's map (the predicted / positive class)
            k_show = int(present[j].float().argmax()) if present[j].any() else 0
            heat = upsample(batch.maps[j, k_show][None], tuple(shown.shape[-2:]), mode="bilinear").clamp(0, 1)
            over = blend(shown[None].to(heat.device), heat)[0]
            boxes_all = torch.cat(drawn_boxes) if drawn_boxes else torch.zeros(0, 4)
            png = save_png(draw_detections(over, boxes_all, drawn_labels), out.file("overlays", stem, ".png"), out.root)
            pred = int(probs[j].argmax())
            self._cards.append({"image": png, "title": Path(path).name,
                                "lines": [f"predicted {classes[pred]} ({float(probs[j, pred]):.2f})", f"{len(boxes_all)} box(es)"]})
            records.append(replace(record, masks=masks) if masks else record)
        return records

    def _counts(self, batch: CountBatch) -> None:
        out, classes = self.out, self.classes
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
            png = save_png(picture, out.file("overlays", f"{record.id:05d}_{safe_component(Path(path).stem)}", ".png"), out.root)
            self._cards.append({"image": png, "title": Path(path).name, "lines": [summary, f"{len(labels)} instance(s)"]})

    def finish(self, result: LocalizationResult, method: str, threshold) -> None:
        """Write ``detections.json`` (``result.to_dict()``), ``index.html`` (the gallery, with a
        note of the ``method`` and ``threshold``) and, for a counting model, ``counts.csv``
        (:func:`counts_csv`)."""
        out = self.out
        out.file(None, "detections", ".json").write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
        if any(image.counts is not None for image in result.images):
            out.file(None, "counts", ".csv").write_text(counts_csv(result), encoding="utf-8")
        note = (f"<p class='note'>Method {html.escape(str(method))}, threshold {html.escape(str(threshold))}, {len(result.images)} "
                f"image(s), {len(result.annotations)} box(es); boxes in detections.json (COCO format, original pixels).</p>")
        write_page(out.file(None, "index", ".html"), "weakloc — localization", [("", note), ("", gallery_cards(self._cards, out.root))])


def localize_images(model, images, out: str | Path | None = None, *, method: str | None = None, maps: MapConfig | dict | None = None,
                    target=None, threshold: str | float = "auto", keep: str = "all", min_area: int = 4, batch_size: int = 16,
                    device=None, count_views: str | None = None, display_size: int = 512, progress=None) -> LocalizationResult:
    """Localize the evidence for each image's class(es), and write the results when ``out`` is given.

    Args:
        model, images, method, maps, target, threshold, keep, min_area, batch_size, device,
            count_views, display_size, progress: see :func:`~weakloc.localize.run.localize_batches`.
        out: when given, the folder :class:`LocalizationWriter` writes ``overlays/``, ``masks/``,
            ``detections.json`` (boxes in original pixels, scores, labels, and each image's mask
            files) and ``index.html`` into. The JSON keeps the original names, a file path that is
            not valid UTF-8 written with ``\\xNN`` for each undecodable byte.

    Returns:
        a :class:`~weakloc.localize.run.LocalizationResult`; its ``to_dict()`` is ``detections.json``
        (``images``, ``annotations``, ``categories``, ``skipped``). Warns when an image could not
        be read.

    Raises:
        OptionError: an argument out of range or of the wrong kind, before any work starts.
    """
    run = localize_batches(model, images, method=method, maps=maps, target=target, threshold=threshold, keep=keep, min_area=min_area,
                           batch_size=batch_size, device=device, count_views=count_views, display_size=display_size, progress=progress)
    writer = LocalizationWriter(out, model.config.classes) if out is not None else None
    result = run.result()
    for batch in run:
        result.add(writer.add(batch) if writer is not None else batch.images, batch.annotations, batch.skipped)
    result.warn_skipped()
    if writer is not None:
        writer.finish(result, run.method, run.threshold)
    return result
