"""Image-level label sources: a folder per class, or a CSV of ``path,label``.

Both give a :class:`LabeledImages`: paths, a target tensor and the class names. Single-label
targets are class indices ``(N,)``; multi-label targets are multi-hot ``(N, K)`` floats.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weakloc.data.images import is_image_file
from weakloc.errors import LabelError

#: Names that mean "the thing is absent" in a yes/no task; the other class is the positive one.
NEGATIVE_NAMES = frozenset(
    {"no", "0", "false", "negative", "neg", "none", "absent", "background", "normal", "benign", "clean", "ok"}
)
SPLIT_NAMES = ("train", "val", "test")


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
    """

    paths: list[Path]
    targets: torch.Tensor
    classes: list[str]
    task: str
    splits: list[str] | None = field(default=None)
    counts: torch.Tensor | None = field(default=None)

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
        )

    @property
    def positive_index(self) -> int | None:
        """Index of the positive class of a yes/no task (2 classes, single-label); else None."""
        return positive_class_index(self.classes) if self.task == "single" and len(self.classes) == 2 else None


def positive_class_index(classes: list[str]) -> int:
    """The positive class of a two-class task: the one whose name is not a 'no' word (default 1)."""
    neg = [c.strip().lower() in NEGATIVE_NAMES for c in classes]
    if neg[0] and not neg[1]:
        return 1
    if neg[1] and not neg[0]:
        return 0
    return 1


def read_class_folders(root: str | Path) -> LabeledImages:
    """Read ``root/<class>/*.<image>``; class names are the sorted folder names.

    If ``root/train`` and ``root/val`` (optionally ``root/test``) exist, each is read as a class tree
    and the split of every image is recorded.

    Raises:
        LabelError: no class folders, an empty class folder, or split trees with different classes.
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
    items: list[tuple[Path, int]] = []
    for k, d in enumerate(class_dirs):
        files = sorted(p for p in d.rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            raise LabelError(f"{d}: class folder '{d.name}' holds no image files")
        items += [(p, k) for p in files]
    return items, [d.name for d in class_dirs]


def read_labels_csv(path: str | Path, classes: list[str] | None = None) -> LabeledImages:
    """Read a CSV of ``path,label`` (single-label) or ``path,label1;label2`` (multi-label).

    A header row is optional (first cell ``path``, ``image``, ``file`` or ``filename``); a third
    column ``split`` (train/val/test) is honoured. Image paths are relative to the CSV's folder.
    Multi-label is chosen when any label cell holds ``;`` or is empty (an image with no class).

    Args:
        path: the CSV file.
        classes: the known class names (e.g. a trained model's); a label outside them is an error.
            By default the classes are the sorted set of labels found.

    Raises:
        LabelError: naming the row, for a missing file, an empty path, a row with too few cells,
            an empty label in a single-label file, an unknown class, or a bad split name.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: labels CSV not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    rows = list(csv.reader(text.splitlines()))
    base = path.parent
    start = 1
    split_col = None
    if rows and rows[0] and rows[0][0].strip().lower() in ("path", "image", "file", "filename", "image_path"):
        header = [h.strip().lower() for h in rows[0]]
        split_col = header.index("split") if "split" in header else None
        start = 2
        rows = rows[1:]
    records: list[tuple[int, Path, list[str], str | None]] = []
    multi = False
    for i, row in enumerate(rows, start=start):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2:
            raise LabelError(f"{path}, row {i}: expected 'path,label' but found {len(row)} cell(s): {row!r}")
        rel = row[0].strip()
        if not rel:
            raise LabelError(f"{path}, row {i}: empty image path")
        img = Path(rel) if Path(rel).is_absolute() else base / rel
        if not img.is_file():
            raise LabelError(f"{path}, row {i}: image file not found: {img}")
        cell = row[1].strip()
        labels = [s.strip() for s in cell.split(";") if s.strip()]
        if ";" in cell or not labels:
            multi = True
        split = None
        if split_col is not None:
            split = row[split_col].strip().lower() if split_col < len(row) else ""
            if split not in SPLIT_NAMES:
                raise LabelError(f"{path}, row {i}: split must be one of {SPLIT_NAMES}, got {split!r}")
        records.append((i, img, labels, split))
    if not records:
        raise LabelError(f"{path}: no labelled rows")
    found = sorted({lab for _, _, labs, _ in records for lab in labs})
    if classes is None:
        classes = found
    index = {c: k for k, c in enumerate(classes)}
    for i, _, labs, _ in records:
        for lab in labs:
            if lab not in index:
                raise LabelError(f"{path}, row {i}: unknown class {lab!r} (known: {', '.join(classes)})")
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


def load_labels(source: str | Path, classes: list[str] | None = None) -> LabeledImages:
    """Read labels from a CSV file, a folder holding ``labels.csv``, or a folder-per-class tree."""
    source = Path(source)
    if source.is_file():
        return read_labels_csv(source, classes)
    if (source / "labels.csv").is_file():
        return read_labels_csv(source / "labels.csv", classes)
    if source.is_dir():
        data = read_class_folders(source)
        if classes is not None and data.classes != list(classes):
            unknown = sorted(set(data.classes) - set(classes))
            if unknown:
                raise LabelError(f"{source}: unknown class folder(s) {unknown} (known: {', '.join(classes)})")
            remap = torch.tensor([classes.index(c) for c in data.classes])
            data = LabeledImages(data.paths, remap[data.targets], list(classes), data.task, data.splits)
        return data
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


def select_split(data: LabeledImages, split: str) -> LabeledImages:
    """The images of one named split, or all images when the source names no splits."""
    if data.splits is None:
        return data
    keep = [i for i, s in enumerate(data.splits) if s == split]
    if not keep:
        raise LabelError(f"no images in split {split!r} (splits present: {sorted(set(data.splits))})")
    return data.subset(keep)


def resolve_split(data: LabeledImages, split: str = "auto") -> tuple[LabeledImages, str]:
    """The images evaluation should use: ``auto`` means test, else val, else all (when the source
    names no splits, every image). Returns the selected images and the split's name."""
    if split == "auto":
        present = set(data.splits or [])
        split = "test" if "test" in present else "val" if "val" in present else "all"
    return (data if split == "all" else select_split(data, split)), split
