"""Ground truth for evaluation: boxes, optional masks and points, per image.

Readers for COCO JSON, a Pascal VOC XML folder and a YOLO dataset give a :class:`GroundTruth` keyed by image file
name. Boxes are ``x0, y0, x1, y1`` in pixels of the original image. Training never reads these.
"""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import torch

from weakloc.errors import AnnotationError


@dataclass
class ImageAnnotation:
    """One image's ground truth.

    Attributes:
        file_name: the image path as the annotation file gives it.
        width, height: original image size in pixels.
        boxes: ``(M, 4)`` float32 ``x0, y0, x1, y1``.
        labels: ``M`` class names.
        segmentations: per instance a COCO segmentation (polygon list or RLE dict) or None.
        points: ``(M, 2)`` float32 ``x, y`` instance points, NaN where absent.
    """

    file_name: str
    width: int
    height: int
    boxes: torch.Tensor
    labels: list[str]
    segmentations: list = field(default_factory=list)
    points: torch.Tensor | None = None

    def boxes_of(self, cls: str) -> torch.Tensor:
        """``(M_c, 4)`` boxes of class ``cls``."""
        keep = [i for i, lab in enumerate(self.labels) if lab == cls]
        return self.boxes[keep]

    def has_masks(self, cls: str) -> bool:
        """True when every instance of ``cls`` has a segmentation."""
        segs = [self.segmentations[i] if i < len(self.segmentations) else None for i, lab in enumerate(self.labels) if lab == cls]
        return bool(segs) and all(s is not None for s in segs)

    def mask_of(self, cls: str, size: tuple[int, int]) -> torch.Tensor:
        """Union of the instance masks of ``cls`` rasterised at ``size = (H, W)``: ``(H, W)`` bool."""
        out = np.zeros(size, dtype=np.uint8)
        sx, sy = size[1] / self.width, size[0] / self.height
        for i, lab in enumerate(self.labels):
            if lab != cls or i >= len(self.segmentations) or self.segmentations[i] is None:
                continue
            seg = self.segmentations[i]
            if isinstance(seg, list):
                polys = [np.round(np.asarray(p, dtype=np.float64).reshape(-1, 2) * (sx, sy) - 0.5).astype(np.int32) for p in seg if len(p) >= 6]
                if polys:
                    cv2.fillPoly(out, polys, 1)
            else:
                full = decode_rle(seg)
                out |= cv2.resize(full, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        return torch.from_numpy(out.astype(bool))


@dataclass
class GroundTruth:
    """Annotations of a set of images, looked up by path, relative path or file name."""

    images: dict[str, ImageAnnotation]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def find(self, path: str | Path) -> ImageAnnotation | None:
        """The annotation whose file name matches ``path`` (full path suffix first, then base name)."""
        p = PurePosixPath(Path(path).as_posix())
        for k in range(len(p.parts), 0, -1):
            key = "/".join(p.parts[-k:])
            if key in self.images:
                return self.images[key]
        return None


def _add(images: dict[str, ImageAnnotation], ann: ImageAnnotation, source: Path) -> None:
    key = PurePosixPath(ann.file_name.replace("\\", "/")).as_posix()
    if key in images:
        raise AnnotationError(f"{source}: image {ann.file_name!r} is annotated twice")
    images[key] = ann
    base = PurePosixPath(key).name
    if base != key:
        images.setdefault(base, ann)


def _clean_boxes(boxes: list[list[float]], width: int, height: int, where: str) -> tuple[list[list[float]], list[int]]:
    """Drop inverted or non-finite boxes (with a warning), clip the rest to the image."""
    kept, idx = [], []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not all(np.isfinite([x0, y0, x1, y1])) or x1 < x0 or y1 < y0:
            warnings.warn(f"{where}: box {i} {[x0, y0, x1, y1]} is invalid and is ignored", stacklevel=3)
            continue
        kept.append([min(max(x0, 0.0), width - 1.0), min(max(y0, 0.0), height - 1.0),
                     min(max(x1, 0.0), width - 1.0), min(max(y1, 0.0), height - 1.0)])
        idx.append(i)
    return kept, idx


def read_coco(path: str | Path) -> GroundTruth:
    """Read a COCO JSON file (``images``, ``annotations``, ``categories``).

    Boxes come from ``bbox`` (``x, y, w, h`` -> ``x, y, x + w, y + h``); masks from
    ``segmentation`` (polygons or RLE) and points from an optional ``point: [x, y]``.

    Raises:
        AnnotationError: unreadable JSON, missing keys, or references to unknown images/categories.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "images" not in doc or "categories" not in doc:
        raise AnnotationError(f"{path}: a COCO file needs 'images' and 'categories' lists")
    try:
        cats = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
        imgs = {int(im["id"]): im for im in doc["images"]}
    except (KeyError, TypeError, ValueError) as e:
        raise AnnotationError(f"{path}: malformed image or category entry ({e!r})") from None
    per_image: dict[int, list[dict]] = {i: [] for i in imgs}
    for n, a in enumerate(doc.get("annotations", [])):
        try:
            iid, cid = int(a["image_id"]), int(a["category_id"])
        except (KeyError, TypeError, ValueError):
            raise AnnotationError(f"{path}: annotation #{n} lacks image_id/category_id") from None
        if iid not in imgs:
            raise AnnotationError(f"{path}: annotation #{n} refers to unknown image_id {iid}")
        if cid not in cats:
            raise AnnotationError(f"{path}: annotation #{n} refers to unknown category_id {cid}")
        per_image[iid].append(a)
    images: dict[str, ImageAnnotation] = {}
    for iid, im in imgs.items():
        try:
            fname, w, h = str(im["file_name"]), int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError):
            raise AnnotationError(f"{path}: image entry {iid} needs file_name, width and height") from None
        raw, labels, segs, pts = [], [], [], []
        for a in per_image[iid]:
            if "bbox" not in a or len(a["bbox"]) != 4:
                raise AnnotationError(f"{path}: annotation {a.get('id', '?')} of {fname} has no 4-number bbox")
            x, y, bw, bh = (float(v) for v in a["bbox"])
            raw.append([x, y, x + bw, y + bh])
            labels.append(cats[int(a["category_id"])])
            segs.append(a.get("segmentation") or None)
            p = a.get("point")
            pts.append([float(p[0]), float(p[1])] if p is not None else [float("nan")] * 2)
        boxes, keep = _clean_boxes(raw, w, h, f"{path}: {fname}")
        ann = ImageAnnotation(
            fname, w, h,
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            [labels[i] for i in keep], [segs[i] for i in keep],
            torch.tensor([pts[i] for i in keep], dtype=torch.float32).reshape(-1, 2),
        )
        _add(images, ann, path)
    return GroundTruth(images, [cats[k] for k in sorted(cats)])


def read_voc(folder: str | Path) -> GroundTruth:
    """Read a folder of Pascal VOC XML files (``<object><name>`` + ``<bndbox>``).

    VOC pixel indices start at 1; boxes are shifted to start at 0.

    Raises:
        AnnotationError: naming the XML file, for unparsable XML or missing fields.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.xml")) if folder.is_dir() else [folder]
    if not files or not files[0].is_file():
        raise AnnotationError(f"{folder}: no VOC .xml files found")
    images: dict[str, ImageAnnotation] = {}
    classes: set[str] = set()
    for f in files:
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as e:
            raise AnnotationError(f"{f}: not valid XML ({e})") from None
        try:
            fname = root.findtext("filename").strip()
            size = root.find("size")
            w, h = int(float(size.findtext("width"))), int(float(size.findtext("height")))
            raw, labels = [], []
            for obj in root.iter("object"):
                name = obj.findtext("name").strip()
                bb = obj.find("bndbox")
                raw.append([float(bb.findtext(k)) - 1.0 for k in ("xmin", "ymin", "xmax", "ymax")])
                labels.append(name)
        except (AttributeError, TypeError, ValueError) as e:
            raise AnnotationError(f"{f}: missing or malformed filename/size/object fields ({e})") from None
        if not Path(fname).suffix:
            fname += ".jpg"
        boxes, keep = _clean_boxes(raw, w, h, str(f))
        labels = [labels[i] for i in keep]
        classes.update(labels)
        ann = ImageAnnotation(fname, w, h, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), labels,
                              [None] * len(labels), torch.full((len(labels), 2), float("nan")))
        _add(images, ann, f)
    return GroundTruth(images, sorted(classes))


def _yolo_names(yaml_file: Path) -> list[str]:
    import yaml

    try:
        raw = yaml.safe_load(yaml_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{yaml_file}: not valid YAML ({e})") from None
    names = raw.get("names") if isinstance(raw, dict) else None
    if isinstance(names, dict):  # {0: fish, 1: ...}
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise AnnotationError(f"{yaml_file}: needs a 'names' list of class names")
    return [str(n) for n in names]


def read_yolo(root: str | Path) -> GroundTruth:
    """Read a YOLO dataset: ``data.yaml`` (``names``) and ``labels/*.txt`` beside ``images/``, either
    directly under ``root`` or under split folders (``root/train/labels``, ``root/valid/labels``, ...).

    Each label line is ``class cx cy w h`` in coordinates normalised by the image size, which is
    read from the image's header. An empty label file is an image without objects.

    Raises:
        AnnotationError: naming the file and line, for a malformed line or an unknown class index.
    """
    from weakloc.data.images import image_size, is_image_file

    root = Path(root)
    yaml_file = root if root.is_file() else next((root / n for n in ("data.yaml", "dataset.yaml") if (root / n).is_file()), None)
    if yaml_file is None:
        raise AnnotationError(f"{root}: no data.yaml with the class names of a YOLO dataset")
    root = yaml_file.parent
    names = _yolo_names(yaml_file)
    label_dirs = sorted(p for p in [root / "labels", *root.glob("*/labels")] if p.is_dir())
    if not label_dirs:
        raise AnnotationError(f"{root}: no labels/ folder of YOLO .txt files")
    images: dict[str, ImageAnnotation] = {}
    for label_dir in label_dirs:
        image_dir = label_dir.parent / "images"
        by_stem = {p.stem: p for p in image_dir.iterdir() if is_image_file(p)} if image_dir.is_dir() else {}
        for f in sorted(label_dir.glob("*.txt")):
            img = by_stem.get(f.stem)
            if img is None:
                warnings.warn(f"{f}: no image named {f.stem}.* in {image_dir}; ignored", stacklevel=2)
                continue
            w, h = image_size(img)
            raw, labels = [], []
            for n, line in enumerate(f.read_text().splitlines(), 1):
                cells = line.split()
                if not cells:
                    continue
                try:
                    k, cx, cy, bw, bh = int(cells[0]), *map(float, cells[1:5])
                except (ValueError, TypeError):
                    raise AnnotationError(f"{f}:{n}: expected 'class cx cy w h', got {line.strip()!r}") from None
                if len(cells) != 5 or not 0 <= k < len(names):
                    raise AnnotationError(f"{f}:{n}: expected 'class cx cy w h' with class in 0..{len(names) - 1}, got {line.strip()!r}")
                raw.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
                labels.append(names[k])
            boxes, keep = _clean_boxes(raw, w, h, str(f))
            labels = [labels[i] for i in keep]
            rel = img.relative_to(root).as_posix()
            ann = ImageAnnotation(rel, w, h, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), labels,
                                  [None] * len(labels), torch.full((len(labels), 2), float("nan")))
            _add(images, ann, f)
    return GroundTruth(images, names)


def read_annotations(source: str | Path) -> GroundTruth:
    """COCO JSON file, a YOLO dataset (folder with ``data.yaml``), or a folder (or single file) of VOC XML."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".json":
        return read_coco(source)
    if (source.is_file() and source.suffix.lower() in (".yaml", ".yml")) or (source / "data.yaml").is_file() \
            or (source / "dataset.yaml").is_file():
        return read_yolo(source)
    if source.is_dir() and (source / "Annotations").is_dir():
        source = source / "Annotations"
    if source.exists():
        return read_voc(source)
    raise AnnotationError(f"{source}: no such annotation file or folder")


def decode_rle(rle: dict) -> np.ndarray:
    """Decode a COCO RLE (``counts`` as a list or compressed string, ``size = [h, w]``) to ``(h, w)`` uint8."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
    flat = np.zeros(h * w, dtype=np.uint8)
    pos, val = 0, 0
    for c in counts:
        if val:
            flat[pos:pos + c] = 1
        pos += c
        val ^= 1
    return flat.reshape(w, h).T.copy()  # COCO RLE runs go down columns


def _rle_string_counts(s: str) -> list[int]:
    """COCO's compressed RLE: 5-bit little-endian groups offset by 48, deltas after the 2nd count."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts
