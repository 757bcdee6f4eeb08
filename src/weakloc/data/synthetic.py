"""Synthetic images with exact ground truth, for tests, the demo and benchmarks.

Object classes differ by *shape* (triangle, square, star, cross), never by colour: every object
and distractor gets a random colour, size, position and rotation on a textured, cluttered
background. Distractors are ellipses and line segments. Each object is a polygon, so its mask, box
and point (mask centroid) are exact.

Modes:
- ``single``: every image holds 1..``max_instances`` objects of one class (the label).
- ``binary``: "does the image contain ``target``?" -- positives hold 1..``max_instances`` targets;
  other classes appear in positives and negatives alike. Labels: ``target`` or ``none``.
- ``multi``: each class independently 0..``max_instances`` times; the label is the set of
  present classes and ``counts.csv`` holds the per-class counts.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from weakloc.errors import WeaklocError

SHAPES: dict[str, np.ndarray] = {
    "triangle": np.array([[math.cos(a), math.sin(a)] for a in np.deg2rad([-90, 30, 150])]),
    "square": np.array([[-0.75, -0.75], [0.75, -0.75], [0.75, 0.75], [-0.75, 0.75]]),
    "star": np.array([[r * math.cos(a), r * math.sin(a)]
                      for i, a in enumerate(np.deg2rad(np.arange(-90, 270, 36)))
                      for r in [1.0 if i % 2 == 0 else 0.42]]),
    "cross": np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3],
                       [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]),
}
MODES = ("single", "binary", "multi")


@dataclass
class SyntheticConfig:
    """What :func:`write_synthetic` and :func:`render` make.

    Attributes:
        n_images: images to make.
        size: side of the square images in pixels.
        mode: ``single``, ``binary`` or ``multi``.
        classes: object classes, names from :data:`SHAPES`.
        max_instances: most objects of one class in one image.
        target: the class asked about in ``binary`` mode.
        val_fraction, test_fraction: shares of images put in the val and test splits.
        distractors: (min, max) distractor shapes per image.
        seed: everything follows from it.
    """

    n_images: int = 1000
    size: int = 128
    mode: str = "single"
    classes: tuple[str, ...] = ("triangle", "square", "star")
    max_instances: int = 1
    target: str = "star"
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    distractors: tuple[int, int] = (2, 6)
    seed: int = 0
    radius: tuple[float, float] = field(default=(0.10, 0.26))

    def check(self) -> None:
        """Raise :class:`WeaklocError` on an impossible configuration."""
        if self.mode not in MODES:
            raise WeaklocError(f"synthetic mode must be one of {MODES}, got {self.mode!r}")
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown or len(set(self.classes)) != len(self.classes) or not self.classes:
            raise WeaklocError(f"synthetic classes must be distinct names from {sorted(SHAPES)}, got {list(self.classes)}")
        if self.mode == "binary" and self.target not in self.classes:
            raise WeaklocError(f"binary target {self.target!r} is not among classes {list(self.classes)}")
        if not 32 <= self.size <= 4096:
            raise WeaklocError(f"--size: {self.size} is out of range (synthetic images are 32 to 4096 pixels)")
        if not 1 <= self.n_images <= 1_000_000:
            raise WeaklocError(f"--n: {self.n_images} is out of range (1 to 1,000,000 images)")
        if not 0 <= self.seed < 2**63:
            raise WeaklocError(f"--seed: {self.seed} is out of range (0 to 2**63 - 1)")
        if not 1 <= self.max_instances <= 50:
            raise WeaklocError(f"--max-instances: {self.max_instances} is out of range (1 to 50)")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise WeaklocError("val_fraction + test_fraction must be below 1")


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    low = rng.uniform(30, 225, size=(4, 4, 3)).astype(np.float32)
    bg = cv2.resize(low, (s, s), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    f = rng.uniform(0.15, 0.9, size=2)
    stripes = np.sin(f[0] * xx + f[1] * yy + rng.uniform(0, 6.28)) * rng.uniform(5, 20)
    bg += stripes[..., None] + rng.normal(0, 10, size=(s, s, 3)).astype(np.float32)
    return bg


def _counts(cfg: SyntheticConfig, rng: np.random.Generator) -> dict[str, int]:
    k = len(cfg.classes)
    counts = dict.fromkeys(cfg.classes, 0)
    if cfg.mode == "single":
        counts[cfg.classes[rng.integers(k)]] = int(rng.integers(1, cfg.max_instances + 1))
    elif cfg.mode == "binary":
        if rng.random() < 0.5:
            counts[cfg.target] = int(rng.integers(1, cfg.max_instances + 1))
        for c in cfg.classes:
            if c != cfg.target and rng.random() < 0.5:
                counts[c] = int(rng.integers(1, 3))
    else:
        for c in cfg.classes:
            counts[c] = int(rng.integers(0, cfg.max_instances + 1))
    return counts


def render(cfg: SyntheticConfig, index: int) -> tuple[np.ndarray, list[dict]]:
    """Render image ``index`` of the dataset ``cfg`` describes.

    Returns:
        ``(H, W, 3)`` uint8 RGB image and its instances, each a dict with ``label``, ``polygon``
        (``(V, 2)`` float, pixels), ``mask`` (``(H, W)`` bool), ``box`` (``x0, y0, x1, y1`` of the
        mask's pixels) and ``point`` (mask centroid ``x, y``).
    """
    rng = np.random.default_rng([cfg.seed, index])
    s = cfg.size
    img = _background(rng, s)
    for _ in range(int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))):
        colour = rng.uniform(0, 255, 3).tolist()
        c = tuple(int(v) for v in rng.uniform(0, s, 2))
        if rng.random() < 0.6:
            axes = tuple(int(v) for v in rng.uniform(0.04, 0.2, 2) * s)
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
        else:
            end = tuple(int(v) for v in rng.uniform(0, s, 2))
            cv2.line(img, c, end, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    counts = _counts(cfg, rng)
    wanted = [c for c in cfg.classes for _ in range(counts[c])]
    rng.shuffle(wanted)
    crowd = max(1.0, math.sqrt(len(wanted) / 2))
    placed: list[tuple[float, float, float]] = []
    instances: list[dict] = []
    for label in wanted:
        for _ in range(60):
            r = rng.uniform(*cfg.radius) * s / crowd
            r = max(r, 0.06 * s)
            cx, cy = rng.uniform(r, s - r, 2)
            if all(math.hypot(cx - px, cy - py) > 1.05 * (r + pr) for px, py, pr in placed):
                break
        else:
            continue  # no room left: the label counts only what was drawn
        placed.append((cx, cy, r))
        theta = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        poly = SHAPES[label] @ rot.T * r + (cx, cy)
        pts = np.round(poly - 0.5).astype(np.int32)
        mask = np.zeros((s, s), np.uint8)
        cv2.fillPoly(mask, [pts], 1)
        if not mask.any():
            continue
        under = img[mask.astype(bool)].mean(0)
        for _ in range(10):
            colour = rng.uniform(0, 255, 3)
            if np.abs(colour - under).sum() > 120:
                break
        img[mask.astype(bool)] = colour
        ys, xs = np.nonzero(mask)
        instances.append({
            "label": label, "polygon": poly, "mask": mask.astype(bool),
            "box": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
            "point": [float(xs.mean()), float(ys.mean())],
        })
    return np.clip(img, 0, 255).astype(np.uint8), instances


def image_label(cfg: SyntheticConfig, instances: list[dict]) -> str:
    """The image-level label string written to ``labels.csv``."""
    present = sorted({i["label"] for i in instances}, key=cfg.classes.index)
    if cfg.mode == "binary":
        return cfg.target if cfg.target in present else "none"
    if cfg.mode == "single":
        return present[0]
    return ";".join(present)


def write_synthetic(root: str | Path, cfg: SyntheticConfig | None = None, progress=None) -> Path:
    """Write a synthetic dataset to ``root``.

    Layout: ``images/*.jpg``, ``labels.csv`` (path, label, split), ``annotations.json`` (COCO:
    boxes, polygon masks, ``point``), ``counts.csv`` (path, one count column per class, split) and
    ``synthetic.json`` (the config). Deterministic for a config.

    Args:
        progress: optional callable ``(done, total)`` for a progress bar.

    Returns:
        ``root``.
    """
    cfg = cfg or SyntheticConfig()
    cfg.check()
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    split_rng = np.random.default_rng([cfg.seed, 10**9])
    u = split_rng.random(cfg.n_images)
    splits = np.where(u < cfg.val_fraction, "val", np.where(u < cfg.val_fraction + cfg.test_fraction, "test", "train"))
    coco = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": c} for k, c in enumerate(cfg.classes)]}
    label_rows, count_rows = [], []
    ann_id = 1
    for i in range(cfg.n_images):
        img, instances = render(cfg, i)
        rel = f"images/{i:06d}.jpg"
        cv2.imwrite(str(root / rel), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        coco["images"].append({"id": i + 1, "file_name": rel, "width": cfg.size, "height": cfg.size})
        for inst in instances:
            x0, y0, x1, y1 = inst["box"]
            coco["annotations"].append({
                "id": ann_id, "image_id": i + 1, "category_id": cfg.classes.index(inst["label"]) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(inst["mask"].sum()), "iscrowd": 0,
                "segmentation": [np.round(inst["polygon"], 2).ravel().tolist()],
                "point": [round(v, 2) for v in inst["point"]],
            })
            ann_id += 1
        label_rows.append([rel, image_label(cfg, instances), splits[i]])
        per_class = [sum(1 for inst in instances if inst["label"] == c) for c in cfg.classes]
        count_rows.append([rel, *per_class, splits[i]])
        if progress is not None:
            progress(i + 1, cfg.n_images)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(label_rows)
    with open(root / "counts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *cfg.classes, "split"])
        w.writerows(count_rows)
    (root / "annotations.json").write_text(json.dumps(coco))
    (root / "synthetic.json").write_text(json.dumps(asdict(cfg), indent=2))
    return root
