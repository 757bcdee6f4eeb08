"""Counting labels: how many objects of each class an image holds, never where.

From a CSV ``path,<class1>,<class2>,...[,split]`` or by counting the objects of COCO / VOC
annotations (only the number of boxes per class is read; their coordinates are never used).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from weakloc.data.annotations import GroundTruth, read_annotations
from weakloc.data.labels import SPLIT_NAMES, LabeledImages, load_labels
from weakloc.errors import LabelError


def _count_cell(cell: str, where: str, column: str) -> float:
    text = cell.strip()
    try:
        value = float(text)
    except ValueError:
        raise LabelError(f"{where}: count of {column!r} is not a number: {cell!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise LabelError(f"{where}: count of {column!r} is {text}")
    if value < 0:
        raise LabelError(f"{where}: count of {column!r} is negative ({text})")
    if value != int(value):
        raise LabelError(f"{where}: count of {column!r} is not a whole number ({text})")
    return value


def read_counts_csv(path: str | Path, classes: list[str] | None = None) -> LabeledImages:
    """Read ``path,<class1>,<class2>,...`` with a header row naming the classes (and optionally ``split``).

    Args:
        classes: the known classes (e.g. a trained model's); a count column outside them is an
            error, a known class without a column counts 0.

    Returns:
        :class:`LabeledImages` with task ``"multi"``, presence targets and ``counts``.

    Raises:
        LabelError: naming the row and column, for a missing file or image, a missing header, a
            negative, fractional, NaN or non-numeric count, an unknown class column, a bad split.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: counts CSV not found")
    rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    if not rows or not rows[0] or rows[0][0].strip().lower() not in ("path", "image", "file", "filename", "image_path"):
        raise LabelError(f"{path}: the first row must be a header 'path,<class1>,<class2>,...'")
    header = [h.strip() for h in rows[0]]
    split_col = next((i for i, h in enumerate(header) if h.lower() == "split"), None)
    columns = [(i, h) for i, h in enumerate(header) if i > 0 and i != split_col]
    if not columns:
        raise LabelError(f"{path}: no class columns in the header")
    names = [h for _, h in columns]
    if classes is None:
        classes = names
    unknown = [h for h in names if h not in classes]
    if unknown:
        raise LabelError(f"{path}: unknown class column(s) {unknown} (known: {', '.join(classes)})")
    index = {c: k for k, c in enumerate(classes)}
    paths, counts, splits = [], [], []
    for r, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}, row {r}"
        if len(row) < len(header):
            raise LabelError(f"{where}: expected {len(header)} cells, found {len(row)}")
        rel = row[0].strip()
        img = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        if not rel or not img.is_file():
            raise LabelError(f"{where}: image file not found: {img}")
        vec = [0.0] * len(classes)
        for i, h in columns:
            vec[index[h]] = _count_cell(row[i], where, h)
        if split_col is not None:
            split = row[split_col].strip().lower()
            if split not in SPLIT_NAMES:
                raise LabelError(f"{where}: split must be one of {SPLIT_NAMES}, got {split!r}")
            splits.append(split)
        paths.append(img)
        counts.append(vec)
    if not paths:
        raise LabelError(f"{path}: no rows")
    c = torch.tensor(counts, dtype=torch.float32)
    return LabeledImages(paths, (c > 0).float(), list(classes), "multi", splits if split_col is not None else None, c)


def counts_from_annotations(images: LabeledImages, gt: GroundTruth, classes: list[str] | None = None) -> LabeledImages:
    """Counting labels for ``images`` from the number of annotated objects of each class.

    Images without an annotation entry are an error (an absent file would silently count 0).
    """
    classes = list(classes or gt.classes)
    index = {c: k for k, c in enumerate(classes)}
    counts = torch.zeros(len(images), len(classes))
    missing = []
    for n, p in enumerate(images.paths):
        ann = gt.find(p)
        if ann is None:
            missing.append(str(p))
            continue
        for lab in ann.labels:
            if lab in index:
                counts[n, index[lab]] += 1
    if missing:
        raise LabelError(f"{len(missing)} image(s) have no annotation to count, e.g. {missing[0]}")
    return LabeledImages(list(images.paths), (counts > 0).float(), classes, "multi", images.splits, counts)


def load_count_labels(source: str | Path, annotations: str | Path | None = None, classes: list[str] | None = None) -> LabeledImages:
    """Counting labels from a counts CSV (or a folder holding ``counts.csv``), or -- with
    ``annotations`` -- for the images of any label source, counted from COCO / VOC objects."""
    source = Path(source)
    if annotations is not None:
        return counts_from_annotations(load_labels(source), read_annotations(annotations), classes)
    if source.is_dir() and (source / "counts.csv").is_file():
        source = source / "counts.csv"
    return read_counts_csv(source, classes)


def count_labels_or_annotated(source: str | Path, annotations: str | Path | GroundTruth, classes: list[str] | None = None) -> LabeledImages:
    """The counts a counts CSV (or a folder holding ``counts.csv``) holds; for any other label
    source, its images' annotated objects counted (``annotations`` is read only then)."""
    try:
        return load_count_labels(source, classes=classes)
    except LabelError:
        gt = annotations if isinstance(annotations, GroundTruth) else read_annotations(annotations)
        return counts_from_annotations(load_labels(source), gt, classes)
