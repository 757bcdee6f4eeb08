"""Image-level label sources: a folder per class, or a CSV of ``path,label``.

Both give a :class:`LabeledImages`: paths, a target tensor and the class names. Single-label
targets are class indices ``(N,)``; multi-label targets are multi-hot ``(N, K)`` floats.

Labels are checked on first contact: a class name that could not be a file name (empty, ``.``,
``..``, a path separator, a control character), two spellings of one class that differ only in
case, an image labelled twice with different labels, or an empty label cell in a single-label CSV is
an error naming the row or folder; a row repeated exactly is kept once, with one warning.
"""

from __future__ import annotations

import csv
import io
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from weakloc.checks import check_choice
from weakloc.data.images import is_image_file
from weakloc.errors import LabelError
from weakloc.text import class_name_problem  # the rule lives in the leaf layer (config.json shares it)

#: Names that mean "the thing is absent" in a yes/no task; the other class is the positive one.
NEGATIVE_NAMES = frozenset(
    {"no", "n", "0", "false", "negative", "neg", "none", "nothing", "absent", "background", "normal", "benign", "clean",
     "ok", "healthy", "empty", "off"}
)
#: Prefixes that make a name an absence too (``no_dog``, ``not-tumor``, ``non melanoma``, ``without_cells``).
NEGATIVE_PREFIXES = ("no_", "no-", "no ", "not_", "not-", "not ", "non_", "non-", "non ", "without_", "without-", "without ")
SPLIT_NAMES = ("train", "val", "test")
PATH_HEADERS = ("path", "image", "file", "filename", "image_path")
_SHOWN = 5  # rows or names quoted in a warning before "..."


def is_no_word(name: str) -> bool:
    """True when a class name means absence (``no``, ``negative``, ``normal``, ``no_dog``, ...)."""
    low = name.strip().lower()
    return low in NEGATIVE_NAMES or low.startswith(NEGATIVE_PREFIXES)


def check_class_name(name: str, where: str) -> None:
    """Refuse a class name that :func:`class_name_problem` finds a problem with.

    Raises:
        LabelError: ``where`` (file and row, or folder) and the name.
    """
    problem = class_name_problem(name)
    if problem:
        raise LabelError(f"{where}: class name {name!r} {problem}")


def check_case_variants(names: dict[str, str]) -> None:
    """Refuse two class names that differ only in case (``Star``, ``star``): one class spelt two ways.

    Args:
        names: each distinct class name -> where it first appears (file and row, or folder).

    Raises:
        LabelError: naming both spellings and where each appears.
    """
    seen: dict[str, str] = {}
    for name in names:
        key = name.casefold()
        if key in seen:
            other = seen[key]
            raise LabelError(f"{names[name]}: class {name!r} differs only in case from {other!r} ({names[other]}); "
                             "use one spelling")
        seen[key] = name


@dataclass
class LabeledImages:
    """Images with image-level labels.

    Attributes:
        paths: image files, absolute or relative to the working directory.
        targets: ``(N,)`` int64 class indices (task ``"single"``) or ``(N, K)`` float32 multi-hot
            (task ``"multi"``).
        classes: class names, index order.
        task: ``"single"`` (one class per image, softmax) or ``"multi"`` (any subset, sigmoid).
        splits: optional per-image split name (``train``/``val``/``test``) given by the source.
        counts: optional ``(N, K)`` float32 number of objects of each class (counting labels; the
            targets are then the presence ``counts > 0`` and the task is ``"multi"``).
        positive: the "yes" class of a two-class task as the user chose it (``--positive``; set
            with :func:`with_positive`); None: chosen from the names (see :attr:`positive_index`).
    """

    paths: list[Path]
    targets: torch.Tensor
    classes: list[str]
    task: str
    splits: list[str] | None = field(default=None)
    counts: torch.Tensor | None = field(default=None)
    positive: str | None = field(default=None)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int]) -> "LabeledImages":
        """The images at ``indices``, same classes and task."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return LabeledImages(
            paths=[self.paths[i] for i in indices],
            targets=self.targets[idx],
            classes=list(self.classes),
            task=self.task,
            splits=None if self.splits is None else [self.splits[i] for i in indices],
            counts=None if self.counts is None else self.counts[idx],
            positive=self.positive,
        )

    @property
    def positive_index(self) -> int | None:
        """Index of the positive class of a yes/no task, else None.

        A yes/no task is two single-label classes of which the user named one positive, or of which
        exactly one is a 'no' word (:func:`is_no_word`). Two object classes (``raccoon``,
        ``kangaroo``) are two classes, not yes/no.
        """
        return _task_choice(self)[0]

    @property
    def task_description(self) -> str:
        """One line saying what task these labels make and why, e.g. ``yes/no task: positive class
        'melanoma' (the other, 'normal', is a 'no' word)`` or ``2 object classes: kangaroo, raccoon
        (neither is a 'no' word; use --positive CLASS to make it a yes/no task)``."""
        return _task_choice(self)[1]


def _names(classes: list[str]) -> str:
    shown = ", ".join(classes[:12])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")


def _task_choice(data: LabeledImages) -> tuple[int | None, str]:
    """``(positive index or None, one-line description)`` of a label set's task."""
    k = len(data.classes)
    if data.counts is not None:
        return None, f"counting task: {k} class(es): {_names(data.classes)}"
    if data.task == "multi":
        return None, f"multi-label task: {k} class(es): {_names(data.classes)}"
    if k != 2:
        return None, f"single-label task: {k} class(es): {_names(data.classes)}"
    if data.positive is not None:
        p = data.classes.index(data.positive)
        return p, (f"yes/no task: positive class {data.positive!r} (chosen with --positive; "
                   f"the other, {data.classes[1 - p]!r}, means 'no')")
    p = positive_class_index(data.classes)
    if p is not None:
        return p, f"yes/no task: positive class {data.classes[p]!r} (the other, {data.classes[1 - p]!r}, is a 'no' word)"
    both = all(is_no_word(c) for c in data.classes)
    return None, (f"2 {'classes' if both else 'object classes'}: {data.classes[0]}, {data.classes[1]} "
                  f"({'both are' if both else 'neither is'} a 'no' word; use --positive CLASS to make it a yes/no task)")


def positive_class_index(classes: list[str]) -> int | None:
    """The positive class of a two-class task named by its words: the one that is not a 'no' word
    when the other is (:func:`is_no_word`); None when neither or both are."""
    if len(classes) != 2:
        return None
    neg = [is_no_word(c) for c in classes]
    if neg[0] != neg[1]:
        return 1 if neg[0] else 0
    return None


def with_positive(data: LabeledImages, positive: str | None) -> LabeledImages:
    """The labels with ``positive`` as the "yes" class of their two-class task (``--positive``).

    The name must be one of the two classes (an exact match, else the one match ignoring case).

    Raises:
        LabelError: the labels are not two single-label classes, or ``positive`` is not one of them.
    """
    if positive is None:
        return data
    if positive not in data.classes:
        folded = [c for c in data.classes if c.casefold() == positive.strip().casefold()]
        if len(folded) != 1:
            raise LabelError(f"--positive {positive!r} is not a class of these labels (classes: {_names(data.classes)})")
        positive = folded[0]
    if data.task != "single" or len(data.classes) != 2 or data.counts is not None:
        raise LabelError(f"--positive makes a yes/no task of two single-label classes; these labels are a "
                         f"{_task_choice(data)[1]}")
    return replace(data, positive=positive)


def read_class_folders(root: str | Path) -> LabeledImages:
    """Read ``root/<class>/*.<image>``; class names are the sorted folder names.

    If ``root/train`` and ``root/val`` (optionally ``root/test``) exist, each is read as a class tree
    and the split of every image is recorded.

    Raises:
        LabelError: no class folders, an empty class folder, split trees with different classes, a
            folder name that cannot name a class, or two folders whose names differ only in case.
    """
    root = Path(root)
    if not root.is_dir():
        raise LabelError(f"{root}: not a directory")
    split_dirs = [root / s for s in SPLIT_NAMES if (root / s).is_dir()]
    if (root / "train").is_dir() and len(split_dirs) >= 2:
        parts = [(d.name, _read_one_tree(d)) for d in split_dirs]
        classes = parts[0][1][1]
        for name, (_, cls) in parts[1:]:
            if cls != classes:
                extra = sorted(set(cls) ^ set(classes))
                raise LabelError(f"{root / name}: class folders differ from {root / 'train'}: {extra}")
        paths, targets, splits = [], [], []
        for name, (items, _) in parts:
            paths += [p for p, _ in items]
            targets += [t for _, t in items]
            splits += [name] * len(items)
        return LabeledImages(paths, torch.tensor(targets, dtype=torch.long), classes, "single", splits)
    items, classes = _read_one_tree(root)
    return LabeledImages([p for p, _ in items], torch.tensor([t for _, t in items], dtype=torch.long), classes, "single")


def _read_one_tree(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise LabelError(f"{root}: no class folders found (expected {root}/<class>/<image files>)")
    for d in class_dirs:
        check_class_name(d.name, f"{d}: class folder")
    check_case_variants({d.name: f"class folder {d}" for d in class_dirs})
    items: list[tuple[Path, int]] = []
    for k, d in enumerate(class_dirs):
        files = sorted(p for p in d.rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            raise LabelError(f"{d}: class folder '{d.name}' holds no image files")
        items += [(p, k) for p in files]
    return items, [d.name for d in class_dirs]


def read_text_file(path: Path, what: str) -> str:
    """The text of a UTF-8 file (a byte-order mark is allowed).

    Raises:
        LabelError: the file is missing or not UTF-8 text, naming it and ``what`` it is.
    """
    if not path.is_file():
        raise LabelError(f"{path}: {what} not found")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise LabelError(f"{path}: cannot read {what}: {e.strerror or e}") from None


def read_csv_rows(path: Path, what: str) -> list[list[str]]:
    """The rows of a UTF-8 CSV file (a byte-order mark is allowed).

    Raises:
        LabelError: the file is missing, not UTF-8 text, or not parsable as CSV (naming the row).
    """
    text = read_text_file(path, what)
    reader = csv.reader(io.StringIO(text, newline=""))  # a quoted cell keeps its line breaks (splitting lines first would glue them away)
    try:
        return list(reader)
    except csv.Error as e:
        raise LabelError(f"{path}, row {reader.line_num}: not a valid CSV row ({e})") from None


def warn_repeated_rows(path: Path, rows: list[int]) -> None:
    """One warning for the rows that repeat an earlier row exactly (they are read once)."""
    if rows:
        shown = ", ".join(map(str, rows[:_SHOWN])) + (", ..." if len(rows) > _SHOWN else "")
        warnings.warn(f"{path}: {len(rows)} row(s) repeat an earlier row exactly and were read once (rows {shown})",
                      stacklevel=3)


def read_labels_csv(path: str | Path, classes: list[str] | None = None) -> LabeledImages:
    """Read a CSV of ``path,label`` (single-label) or ``path,label1;label2`` (multi-label).

    A header row is optional (first cell ``path``, ``image``, ``file`` or ``filename``); a third
    column ``split`` (train/val/test) is honoured. Image paths are relative to the CSV's folder.
    Multi-label is chosen when any label cell holds ``;``; in a multi-label file an empty cell (or
    ``;`` alone) is an image with no class, while in a single-label file it is an error.

    Args:
        path: the CSV file.
        classes: the known class names (e.g. a trained model's); a label outside them is an error.
            By default the classes are the sorted set of labels found.

    Raises:
        LabelError: naming the row, for a missing or non-UTF-8 file, an empty path, a row with too
            few cells, an empty label in a single-label file, an unknown class, a class name that
            cannot name a class (:func:`check_class_name`), two spellings of a class that differ
            only in case, an image listed twice with different labels or splits, or a bad split name.
    """
    path = Path(path)
    rows = read_csv_rows(path, "labels CSV")
    base = path.parent
    start = 1
    split_col = None
    if rows and rows[0] and rows[0][0].strip().lower() in PATH_HEADERS:
        header = [h.strip().lower() for h in rows[0]]
        split_col = header.index("split") if "split" in header else None
        start = 2
        rows = rows[1:]
    records: list[tuple[int, Path, list[str], str | None]] = []
    first_row: dict[Path, tuple[int, frozenset[str], str | None]] = {}
    repeated: list[int] = []
    spelt: dict[str, str] = {}
    multi = any(len(row) > 1 and ";" in row[1] for row in rows)
    for i, row in enumerate(rows, start=start):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}, row {i}"
        if len(row) < 2:
            raise LabelError(f"{where}: expected 'path,label' but found {len(row)} cell(s): {row!r}")
        rel = row[0].strip()
        if not rel:
            raise LabelError(f"{where}: empty image path")
        img = Path(rel) if Path(rel).is_absolute() else base / rel
        if not img.is_file():
            raise LabelError(f"{where}: image file not found: {img}")
        cell = row[1].strip()
        labels = sorted({s.strip() for s in cell.split(";") if s.strip()})
        if not labels and not multi:
            raise LabelError(f"{where}: empty label (each row of a single-label file names one class; in a multi-label "
                             f"file, whose labels are separated by ';', an image with no class is written ';')")
        for lab in labels:
            check_class_name(lab, where)
            spelt.setdefault(lab, where)
        split = None
        if split_col is not None:
            split = row[split_col].strip().lower() if split_col < len(row) else ""
            if split not in SPLIT_NAMES:
                raise LabelError(f"{where}: split must be one of {SPLIT_NAMES}, got {split!r}")
        key = img.resolve()
        if key in first_row:
            j, before, before_split = first_row[key]
            if before == frozenset(labels) and before_split == split:
                repeated.append(i)
                continue
            now = "; ".join(labels) or "no class"
            was = "; ".join(sorted(before)) or "no class"
            raise LabelError(f"{where}: image {rel!r} is listed again with label {now!r}"
                             f"{'' if split is None else f' (split {split})'}, but row {j} gives {was!r}"
                             f"{'' if before_split is None else f' (split {before_split})'}; keep one row per image")
        first_row[key] = (i, frozenset(labels), split)
        records.append((i, img, labels, split))
    if not records:
        raise LabelError(f"{path}: no labelled rows")
    if classes is None:
        check_case_variants(spelt)
        classes = sorted(spelt)
    index = {c: k for k, c in enumerate(classes)}
    for i, _, labs, _ in records:
        for lab in labs:
            if lab not in index:
                raise LabelError(f"{path}, row {i}: unknown class {lab!r} (known: {', '.join(classes)})")
    warn_repeated_rows(path, repeated)
    splits = [s for *_, s in records] if split_col is not None else None
    paths = [img for _, img, _, _ in records]
    if multi:
        targets = torch.zeros(len(records), len(classes))
        for n, (_, _, labs, _) in enumerate(records):
            for lab in labs:
                targets[n, index[lab]] = 1.0
        return LabeledImages(paths, targets, list(classes), "multi", splits)
    targets = torch.tensor([index[labs[0]] for _, _, labs, _ in records], dtype=torch.long)
    return LabeledImages(paths, targets, list(classes), "single", splits)


def load_labels(source: str | Path, classes: list[str] | None = None, positive: str | None = None) -> LabeledImages:
    """Read labels from a CSV file, a folder holding ``labels.csv``, or a folder-per-class tree.

    Args:
        classes: the known class names (e.g. a trained model's); see :func:`read_labels_csv`.
        positive: the "yes" class of a two-class task (``--positive``; see :func:`with_positive`).
            By default two classes are a yes/no task only when one of them is a 'no' word.
    """
    source = Path(source)
    if source.is_file():
        return with_positive(read_labels_csv(source, classes), positive)
    if (source / "labels.csv").is_file():
        return with_positive(read_labels_csv(source / "labels.csv", classes), positive)
    if source.is_dir():
        data = read_class_folders(source)
        if classes is not None and data.classes != list(classes):
            unknown = sorted(set(data.classes) - set(classes))
            if unknown:
                raise LabelError(f"{source}: unknown class folder(s) {unknown} (known: {', '.join(classes)})")
            remap = torch.tensor([classes.index(c) for c in data.classes])
            data = LabeledImages(data.paths, remap[data.targets], list(classes), data.task, data.splits)
        return with_positive(data, positive)
    raise LabelError(f"{source}: no such file or directory")


def split_train_val(data: LabeledImages, val_fraction: float = 0.2, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """Split into train and validation sets.

    The source's own split column or folders win (``test`` rows are left out of both); otherwise a
    seeded random split, stratified by class for single-label data so small classes reach both sides.
    """
    if data.splits is not None:
        tr = [i for i, s in enumerate(data.splits) if s == "train"]
        va = [i for i, s in enumerate(data.splits) if s == "val"]
        if tr and va:
            return data.subset(tr), data.subset(va)
    if not 0.0 < val_fraction < 1.0:
        raise LabelError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = random.Random(seed)
    if data.task == "single":
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(data.targets.tolist()):
            groups.setdefault(t, []).append(i)
        tr, va = [], []
        for idx in groups.values():
            rng.shuffle(idx)
            n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
            va += idx[:n_val]
            tr += idx[n_val:]
    else:
        idx = list(range(len(data)))
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * val_fraction))
        va, tr = idx[:n_val], idx[n_val:]
    if not tr or not va:
        raise LabelError(f"cannot split {len(data)} image(s) into non-empty train and validation sets")
    return data.subset(sorted(tr)), data.subset(sorted(va))


EVAL_SPLITS = ("auto", *SPLIT_NAMES, "all")
"""Split choices of the evaluation commands: ``auto`` (test, else val, else all), a named split, or ``all``."""


def check_split(split, choices: tuple[str, ...] = EVAL_SPLITS, name: str = "split") -> str:
    """``split`` if it is one of ``choices``; else :class:`~weakloc.errors.OptionError` naming ``name``
    (an unknown name must not quietly mean "every image" when the source has no splits)."""
    return check_choice(name, split, choices)


def select_split(data: LabeledImages, split: str) -> LabeledImages:
    """The images of one named split, or all images when the source names no splits."""
    check_split(split, SPLIT_NAMES)
    if data.splits is None:
        return data
    keep = [i for i, s in enumerate(data.splits) if s == split]
    if not keep:
        raise LabelError(f"no images in split {split!r} (splits present: {sorted(set(data.splits))})")
    return data.subset(keep)


def resolve_split(data: LabeledImages, split: str = "auto") -> tuple[LabeledImages, str]:
    """The images evaluation should use: ``auto`` means test, else val, else all (when the source
    names no splits, every image). Returns the selected images and the split's name."""
    check_split(split)
    if split == "auto":
        present = set(data.splits or [])
        split = "test" if "test" in present else "val" if "val" in present else "all"
    return (data if split == "all" else select_split(data, split)), split
