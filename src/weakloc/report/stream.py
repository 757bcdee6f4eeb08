"""A localization run streamed to disk: one JSON Lines file per rank, resumable, merged into COCO.

Layout of an output folder (``weakloc localize MODEL SOURCE -o OUT``)::

    OUT/run.json                  what the run is: model, settings, image list (its fingerprint)
    OUT/parts/part-RRRRR.jsonl    rank RRRRR's results, one line per image, in the order made
    OUT/detections.json           the merged COCO results (:func:`assemble`), at the end
    OUT/counts.csv, index.html    the same merge's spreadsheet (counting models) and gallery

A line is written whole, flushed and synced once its batch's pictures are on disk, so a run killed
at any moment leaves complete lines and at most one torn last line, which :class:`PartWriter` cuts
off before appending. Re-running the same command reads which images have a line and computes only
the others; the merge orders lines by image id, so a resumed or sharded run gives the same
``detections.json`` as one uninterrupted process. Memory stays flat: nothing but one byte per image
(done or not) and one id and offset per line is kept.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import shutil
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weakloc.errors import WeaklocError
from weakloc.report.html import gallery_cards, write_page
from weakloc.results import Result
from weakloc.text import display_path

MANIFEST = "run.json"
PARTS = "parts"
#: the gallery shows this many images (the first by id); every result is in detections.json
GALLERY_LIMIT = 500
FORMAT = "weakloc-localize-stream/1"


def part_path(out: Path, rank: int) -> Path:
    """Rank ``rank``'s JSON Lines file in ``out``."""
    return out / PARTS / f"part-{rank:05d}.jsonl"


# --- what a run is ------------------------------------------------------------------------------

def model_digest(model) -> str:
    """SHA-256 of ``model``'s configuration and weights: a run resumes only with the same model."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def list_digest(paths: list[Path]) -> str:
    """SHA-256 of the image list, in order (positions are the images' ids)."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(os.fsencode(p) + b"\0")
    return digest.hexdigest()


def fingerprint(model, paths: list[Path], settings: dict) -> dict:
    """``run.json``'s content: the model's digest, the run's settings (JSON values) and the image list's."""
    return {"format": FORMAT, "model": model_digest(model), "settings": settings,
            "images": {"count": len(paths), "sha256": list_digest(paths)}}


def _differences(old: dict, new: dict) -> list[str]:
    if old.get("format") != new["format"]:
        return [f"format {old.get('format')!r}"]
    out = []
    if old.get("model") != new["model"]:
        out.append("another model (or other weights)")
    if old.get("images") != new["images"]:
        out.append(f"another image list ({old.get('images', {}).get('count')} image(s) then, {new['images']['count']} now)")
    old_s, new_s = old.get("settings", {}), new["settings"]
    out += [f"{k} {old_s.get(k)!r} then, {new_s.get(k)!r} now" for k in sorted(set(old_s) | set(new_s)) if old_s.get(k) != new_s.get(k)]
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    os.replace(tmp, path)


def prepare(out: Path, run: dict, *, restart: bool, zero: bool) -> bool:
    """Check ``out`` against the run described by ``run`` (:func:`fingerprint`); True when an
    earlier run of the same command is there to resume. Rank zero (``zero``) writes ``run.json``
    and, with ``restart`` or for a folder without one, clears earlier parts; the caller waits for it
    at a barrier before reading them.

    Raises:
        WeaklocError: ``out`` holds a run of another model, settings or image list (and not
            ``restart``), named by what differs.
    """
    manifest = out / MANIFEST
    old = None
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None  # a manifest that cannot be read describes nothing to resume
    resume = isinstance(old, dict) and not restart
    if resume:
        differs = _differences(old, run)
        if differs:
            raise WeaklocError(f"{display_path(out)}: holds a localization run with {'; '.join(differs)}; give another --out, "
                               "or --restart to discard the results there")
    if zero:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            shutil.rmtree(out / PARTS, ignore_errors=True)
        (out / PARTS).mkdir(exist_ok=True)
        _write_atomic(manifest, json.dumps(run, indent=1))
    return resume


# --- lines --------------------------------------------------------------------------------------

def image_line(image: dict, boxes: list[dict]) -> dict:
    """One image's line: its ``detections.json`` entry and its boxes (without ids: the merge gives those)."""
    return image | {"boxes": [{k: v for k, v in b.items() if k not in ("id", "image_id")} for b in boxes]}


def skipped_line(image_id: int, file: str, reason: str) -> dict:
    """An unreadable file's line (it counts as done: a resumed run does not retry it)."""
    return {"id": image_id, "file_name": file, "skipped": reason}


def repair(path: Path) -> None:
    """Cut a torn last line (a run killed while writing it) off ``path``."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            step = min(65536, end)
            f.seek(end - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                end = end - step + cut + 1
                break
            end -= step
        if end != size:
            f.truncate(end)


class PartWriter:
    """Appends lines to one rank's part file; each :meth:`write` is whole, flushed and synced."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        repair(path)
        self._file = open(path, "ab")  # noqa: SIM115 -- held for the run, closed by close()

    def write(self, lines: list[dict]) -> None:
        if not lines:
            return
        # ASCII JSON (undecodable names' lone surrogates as \\udcXX escapes, as detections.json always had them)
        self._file.write("".join(json.dumps(line) + "\n" for line in lines).encode("ascii"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``(offset, record)`` of each whole, parsable line with an integer ``id``; others are passed over."""
    with open(path, "rb") as f:
        offset = 0
        for raw in f:
            start, offset = offset, offset + len(raw)
            if not raw.endswith(b"\n"):
                break  # a torn last line
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), int) and not isinstance(record["id"], bool):
                yield start, record


def parts(out: Path) -> list[Path]:
    return sorted((out / PARTS).glob("part-*.jsonl")) if (out / PARTS).is_dir() else []


def done_ids(out: Path, count: int) -> bytearray:
    """One byte per image of a run of ``count`` images: 1 where some part holds its line."""
    done = bytearray(count)
    for path in parts(out):
        for _, record in _lines(path):
            if 1 <= record["id"] <= count:
                done[record["id"] - 1] = 1
    return done


# --- the merge ----------------------------------------------------------------------------------

@dataclass
class Assembly(Result):
    """What :func:`assemble` merged: images with results, boxes, unreadable files (the first
    :data:`GALLERY_LIMIT` of them named), and the files written."""

    images: int = 0
    boxes: int = 0
    skipped: int = 0
    skipped_files: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def _ordered(out: Path) -> Iterator[dict]:
    """Every line of every part, by image id, each id once (the first line written for it)."""
    ids, offsets, files = array("q"), array("q"), array("i")
    paths = parts(out)
    for k, path in enumerate(paths):
        for offset, record in _lines(path):
            ids.append(record["id"])
            offsets.append(offset)
            files.append(k)
    order = np.lexsort((np.frombuffer(offsets, np.int64), np.frombuffer(files, np.int32), np.frombuffer(ids, np.int64))) if ids else []
    handles = [open(p, "rb") for p in paths]  # noqa: SIM115 -- closed below
    try:
        last = None
        for i in map(int, order):
            if ids[i] == last:
                continue
            last = ids[i]
            f = handles[files[i]]
            f.seek(offsets[i])
            yield json.loads(f.readline())
    finally:
        for f in handles:
            f.close()


def _csv_cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: a leading =, +, - or @ would start a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def counts_header(classes: list[str]) -> list[str]:
    """``counts.csv``'s header: ``path`` and the class names."""
    return ["path", *(_csv_cell(c) for c in classes)]


def counts_row(file_name: str, counts: dict, classes: list[str]) -> list:
    """One image's ``counts.csv`` row: its file and each class's whole count (blank where none)."""
    return [_csv_cell(file_name), *(counts.get(c, "") for c in classes)]


def _card(record: dict, boxes: list, root: Path) -> dict | None:
    if not record.get("overlay"):
        return None
    if record.get("counts") is not None:
        lines = [" · ".join(f"{c} {n}" for c, n in record["counts"].items()), f"{len(boxes)} instance(s)"]
    else:
        probs = record.get("probabilities", [])
        shown = f" ({max(probs):.2f})" if probs else ""  # the predicted class is the most probable one
        lines = [f"predicted {record.get('predicted')}{shown}", f"{len(boxes)} box(es)"]
    return {"image": root / record["overlay"], "title": Path(record["file_name"]).name, "lines": lines}


def assemble(out: str | Path) -> Assembly:
    """Merge ``out``'s parts into ``detections.json`` (COCO results: ``images``, ``annotations``
    with ids numbered in image order, ``categories``, ``skipped``), ``counts.csv`` for a counting
    model and ``index.html`` (the first :data:`GALLERY_LIMIT` overlays); each written whole or not
    at all. Runs at the end of ``weakloc localize`` and on demand (``weakloc assemble OUT``), also
    while a run is still going or after it was killed.

    Raises:
        WeaklocError: ``out`` holds no localization run.
    """
    out = Path(out)
    try:
        run = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        settings, classes = run["settings"], list(run["settings"]["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        raise WeaklocError(f"{display_path(out)}: no localization run here (its {MANIFEST} is missing or unreadable)") from None
    result = Assembly()
    images_tmp, boxes_tmp, skipped_tmp = out / "detections.images.tmp", out / "detections.boxes.tmp", out / "detections.skipped.tmp"
    counts_tmp = out / "counts.csv.tmp"
    counting = False
    cards = []
    with (open(images_tmp, "w", encoding="utf-8") as fi, open(boxes_tmp, "w", encoding="utf-8") as fb,
          open(skipped_tmp, "w", encoding="utf-8") as fs, open(counts_tmp, "w", encoding="utf-8", errors="backslashreplace", newline="") as fc):
        counts_rows = csv.writer(fc, lineterminator="\n")
        for record in _ordered(out):
            if "skipped" in record:
                entry = {"file": record.get("file_name", ""), "reason": record["skipped"]}
                fs.write(("," if result.skipped else "") + "\n" + json.dumps(entry))
                result.skipped += 1
                if len(result.skipped_files) < GALLERY_LIMIT:
                    result.skipped_files.append(entry)
                continue
            boxes = record.pop("boxes", [])
            fi.write(("," if result.images else "") + "\n" + json.dumps(record))
            result.images += 1
            for box in boxes:
                result.boxes += 1
                entry = {"id": result.boxes, "image_id": record["id"], **box}
                fb.write(("," if result.boxes > 1 else "") + "\n" + json.dumps(entry))
            if record.get("counts") is not None:
                if not counting:
                    counting = True
                    counts_rows.writerow(counts_header(classes))
                counts_rows.writerow(counts_row(record["file_name"], record["counts"], classes))
            if len(cards) < GALLERY_LIMIT:
                card = _card(record, boxes, out)
                if card is not None:
                    cards.append(card)
    categories = [{"id": k + 1, "name": c} for k, c in enumerate(classes)]
    det_tmp = out / "detections.json.tmp"
    with open(det_tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write('{"images": [')
        _copy(images_tmp, f)
        f.write('\n], "annotations": [')
        _copy(boxes_tmp, f)
        f.write(f'\n], "categories": {json.dumps(categories)}, "skipped": [')
        _copy(skipped_tmp, f)
        f.write("\n]}\n")
    os.replace(det_tmp, out / "detections.json")
    for tmp in (images_tmp, boxes_tmp, skipped_tmp):
        tmp.unlink()
    result.files.append(str(out / "detections.json"))
    if counting:
        os.replace(counts_tmp, out / "counts.csv")
        result.files.append(str(out / "counts.csv"))
    else:
        counts_tmp.unlink()
    shown = f"the first {len(cards)} of " if result.images > len(cards) else ""
    note = (f"<p class='note'>Method {html.escape(str(settings.get('method')))}, threshold {html.escape(str(settings.get('threshold')))}, "
            f"{result.images} image(s), {result.boxes} box(es){f', {result.skipped} unreadable file(s) skipped' if result.skipped else ''}; "
            f"{shown}pictures below; every result in detections.json (COCO format, original pixels).</p>")
    write_page(out / "index.html", "weakloc — localization", [("", note), ("", gallery_cards(cards, out))])
    result.files.append(str(out / "index.html"))
    return result


def _copy(path: Path, f) -> None:
    with open(path, encoding="utf-8") as src:
        shutil.copyfileobj(src, f)
