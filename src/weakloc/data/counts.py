"""Counting labels: how many objects of each class an image holds, never where.

From a CSV ``path,<class1>,<class2>,...[,split]`` or by counting the objects of COCO / VOC
annotations (only the number of boxes per class is read; their coordinates are never used).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from weakloc.data.annotations import GroundTruth, read_annotations
from weakloc.data.labels import (PATH_HEADERS, SPLIT_NAMES, LabeledImages, check_case_variants, check_class_name,
                                 load_labels, read_csv_rows, warn_repeated_rows)
from weakloc.errors import LabelError

#: The largest count a counts CSV may give one class of one image. Counts are learnt as densities
#: summing to the count; a count past this is a typing slip (an extra digit, a row id in the wrong
#: column, 1e12), and training on it gives NaN losses rather than a model.
MAX_COUNT = 10_000


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
    if value > MAX_COUNT:
        raise LabelError(f"{where}: count of {column!r} is {text}, more than the {MAX_COUNT:,} objects per class an "
                         "image may hold; is a digit or a column out of place?")
    return value


def read_counts_csv(path: str | Path, classes: list[str] | None = None) -> LabeledImages:
    """Read ``path,<class1>,<class2>,...`` with a header row naming the classes (and optionally ``split``).

    Args:
        classes: the known classes (e.g. a trained model's); a count column outside them is an
            error, a known class without a column counts 0.

    Returns:
        :class:`LabeledImages` with task ``"multi"``, presence targets and ``counts``.

    Raises:
        LabelError: naming the row and column, for a missing, non-UTF-8 or headerless file, a
            missing image, a negative, fractional, non-finite, non-numeric or absurd (over
            :data:`MAX_COUNT`) count, an unknown, repeated, case-variant or unusable class column
            name, an image listed twice with different counts or splits, or a bad split. A row
            repeated exactly is read once, with one warning.
    """
    path = Path(path)
    rows = read_csv_rows(path, "counts CSV")
    if not rows or not rows[0] or rows[0][0].strip().lower() not in PATH_HEADERS:
        raise LabelError(f"{path}: the first row must be a header 'path,<class1>,<class2>,...'")
    header = [h.strip() for h in rows[0]]
    split_col = next((i for i, h in enumerate(header) if h.lower() == "split"), None)
    columns = [(i, h) for i, h in enumerate(header) if i > 0 and i != split_col]
    if not columns:
        raise LabelError(f"{path}: no class columns in the header")
    names = [h for _, h in columns]
    for i, h in columns:
        check_class_name(h, f"{path}, row 1 (header), column {i + 1}")
    repeated_names = sorted({h for h in names if names.count(h) > 1})
    if repeated_names:
        raise LabelError(f"{path}, row 1 (header): class column(s) {repeated_names} appear more than once")
    check_case_variants({h: f"{path}, row 1 (header), column {i + 1}" for i, h in columns})
    if classes is None:
        classes = names
    unknown = [h for h in names if h not in classes]
    if unknown:
        raise LabelError(f"{path}: unknown class column(s) {unknown} (known: {', '.join(classes)})")
    index = {c: k for k, c in enumerate(classes)}
    paths, counts, splits = [], [], []
    first_row: dict[Path, tuple[int, list[float], str | None]] = {}
    repeated: list[int] = []
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
        split = None
        if split_col is not None:
            split = row[split_col].strip().lower()
            if split not in SPLIT_NAMES:
                raise LabelError(f"{where}: split must be one of {SPLIT_NAMES}, got {split!r}")
        key = img.resolve()
        if key in first_row:
            j, before, before_split = first_row[key]
            if before == vec and before_split == split:
                repeated.append(r)
                continue
            raise LabelError(f"{where}: image {rel!r} is listed again with other counts or split than in row {j}; "
                             "keep one row per image")
        first_row[key] = (r, vec, split)
        if split is not None:
            splits.append(split)
        paths.append(img)
        counts.append(vec)
    if not paths:
        raise LabelError(f"{path}: no rows")
    warn_repeated_rows(path, repeated)
    c = torch.tensor(counts, dtype=torch.float32)
    return LabeledImages(paths, (c > 0).float(), list(classes), "multi", splits if split_col is not None else None, c)


def counts_csv_of(source: str | Path) -> Path | None:
    """The counts CSV a label source is, or holds: ``source/counts.csv``, or ``source`` itself when
    it is a CSV file whose header is ``path,<class>,...`` without a ``label`` column (a labels CSV
    is ``path,label[,split]`` or has no header). None when the source holds no counts CSV."""
    source = Path(source)
    if source.is_dir():
        return source / "counts.csv" if (source / "counts.csv").is_file() else None
    if not source.is_file():
        return None
    header = read_csv_rows(source, "CSV")[:1]
    cells = [c.strip().lower() for c in header[0]] if header else []
    if not cells or cells[0] not in PATH_HEADERS:
        return None
    return None if any(c in ("label", "labels", "class", "classes") for c in cells[1:]) else source


def counts_from_annotations(images: LabeledImages, gt: GroundTruth, classes: list[str] | None = None) -> LabeledImages:
    """Counting labels for ``images`` from the number of annotated objects of each class.

    Images without an annotation entry are an error (an absent file would silently count 0).
    The annotation classes become the model's classes unless ``classes`` is given, so their names
    are checked as a labels CSV's are.
    """
    if classes is None:
        where = f"{gt.source or 'annotations'}: class"
        for c in gt.classes:
            check_class_name(c, where)
        check_case_variants({c: where for c in gt.classes})
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
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise LabelError(f"{len(missing)} image(s) have no annotation to count: {shown}")
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
    """Counting labels for evaluation: the counts CSV ``source`` is or holds (:func:`counts_csv_of`),
    read and checked like any counts CSV (a bad one is an error naming its row, never replaced by
    the annotations); only when there is no counts CSV, the images of the label source ``source``
    with their annotated objects counted (``annotations`` is read only then)."""
    csv_file = counts_csv_of(source)
    if csv_file is not None:
        return read_counts_csv(csv_file, classes)
    gt = annotations if isinstance(annotations, GroundTruth) else read_annotations(annotations)
    return counts_from_annotations(load_labels(source), gt, classes)
