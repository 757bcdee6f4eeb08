"""Ground truth for evaluation: boxes, optional masks and points, per image.

Readers for COCO JSON, a Pascal VOC XML folder and a YOLO dataset give a :class:`GroundTruth` keyed by image file
name. Boxes are ``x0, y0, x1, y1`` in pixels of the original image. Training never reads these.

Every entry is checked on first contact. A malformed one (a bbox that is not four finite numbers,
an odd-length polygon, an RLE whose runs do not fill its size, an undecodable file) is an
:class:`AnnotationError` naming the file and the annotation id or line. Boxes that real datasets do
hold -- zero-size or inverted boxes, boxes past the image edge -- are dropped or clipped, with one
warning per kind giving the count and the first few (the full list is ``GroundTruth.issues``).
:func:`match_annotations` checks each annotation's image size against the real image.
"""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import torch

from weakloc.errors import AnnotationError, ImageReadError

#: How far (pixels) a box may reach past the image edge before it counts as clipped: normalised
#: YOLO coordinates and VOC's 1-based ones put exact edge boxes up to a pixel out.
EDGE_TOLERANCE = 1.0
#: Relative difference of the width and height scale factors under which an image whose size
#: differs from its annotation's is taken for a resized copy (its boxes are scaled with it).
RESIZE_TOLERANCE = 0.01
_SHOWN = 3  # examples quoted in a warning

#: Kinds of box trouble that are repaired, not refused, and how the warning names them.
BOX_ISSUES = {
    "zero_size": "zero-size box(es) dropped",
    "inverted": "invalid box(es) (negative width or height) dropped",
    "outside": "box(es) entirely outside their image dropped",
    "clipped": "box(es) reaching past the image edge clipped to it",
    "no_image": "label file(s) without an image ignored",
    "unreadable_image": "label file(s) whose image cannot be read ignored",
    "degenerate_polygon": "segmentation polygon(s) of fewer than 3 points dropped (no area; their boxes are kept)",
}


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
    """Annotations of a set of images, looked up by path, relative path or file name.

    Attributes:
        images: annotation per file name (full relative name and base name).
        classes: annotation class names.
        source: the file or folder read.
        issues: boxes and files repaired or left out while reading, per kind (:data:`BOX_ISSUES`):
            ``"file, annotation id / line: box"`` strings.
    """

    images: dict[str, ImageAnnotation]
    classes: list[str]
    source: str = ""
    issues: dict[str, list[str]] = field(default_factory=dict)

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


class _Issues:
    """Repairs made while reading one annotation source, warned once per kind at the end."""

    def __init__(self, source: Path):
        self.source = source
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, where: str) -> None:
        self.kinds.setdefault(kind, []).append(where)

    def finish(self) -> dict[str, list[str]]:
        for kind, items in self.kinds.items():
            shown = "; ".join(items[:_SHOWN]) + ("; ..." if len(items) > _SHOWN else "")
            warnings.warn(f"{self.source}: {len(items)} {BOX_ISSUES[kind]}: {shown}", stacklevel=3)
        return self.kinds


def _add(images: dict[str, ImageAnnotation], ann: ImageAnnotation, source: Path) -> None:
    key = PurePosixPath(ann.file_name.replace("\\", "/")).as_posix()
    if key in images:
        raise AnnotationError(f"{source}: image {ann.file_name!r} is annotated twice")
    images[key] = ann
    base = PurePosixPath(key).name
    if base != key:
        images.setdefault(base, ann)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _clean_boxes(raw: list[list[float]], width: int, height: int, wheres: list[str], issues: _Issues,
                 inclusive: bool = False) -> tuple[list[list[float]], list[int]]:
    """Drop zero-size, inverted and outside boxes and clip the rest to the image, logging each.

    Args:
        raw: ``x0, y0, x1, y1`` boxes (finite numbers).
        wheres: per box, where it comes from (file and annotation id or line).
        inclusive: the corners are pixel indices (VOC: ``x0 == x1`` is one pixel wide); otherwise
            continuous coordinates (COCO, YOLO: ``x0 == x1`` has no width).

    Returns:
        the kept boxes clipped to ``[0, width - 1] x [0, height - 1]``, and their indices in ``raw``.
    """
    hi_x, hi_y = (width - 1.0, height - 1.0) if inclusive else (float(width), float(height))
    kept, idx = [], []
    for i, (x0, y0, x1, y1) in enumerate(raw):
        where = f"{wheres[i]}: {[round(v, 2) for v in (x0, y0, x1, y1)]}"
        if x1 < x0 or y1 < y0:
            issues.add("inverted", where)
            continue
        if not inclusive and (x1 == x0 or y1 == y0):
            issues.add("zero_size", where)
            continue
        no_overlap = (x0 > hi_x or y0 > hi_y or x1 < 0 or y1 < 0) if inclusive else (x0 >= hi_x or y0 >= hi_y or x1 <= 0 or y1 <= 0)
        if no_overlap:
            issues.add("outside", where)
            continue
        if min(x0, y0) < -EDGE_TOLERANCE or x1 > hi_x + EDGE_TOLERANCE or y1 > hi_y + EDGE_TOLERANCE:
            issues.add("clipped", where)
        kept.append([min(max(x0, 0.0), width - 1.0), min(max(y0, 0.0), height - 1.0),
                     min(max(x1, 0.0), width - 1.0), min(max(y1, 0.0), height - 1.0)])
        idx.append(i)
    return kept, idx


def _coco_int(value, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise AnnotationError(f"{where}: {what} must be an integer, got {_short(value)}")
    try:
        number = float(value)
    except ValueError:
        raise AnnotationError(f"{where}: {what} must be an integer, got {_short(value)}") from None
    if not math.isfinite(number) or number != int(number):
        raise AnnotationError(f"{where}: {what} must be an integer, got {_short(value)}")
    return int(number)


def _coco_segmentation(seg, height: int, width: int, where: str, issues: _Issues | None = None, short: str = ""):
    """A COCO segmentation checked: None, a list of polygons ``[x0, y0, x1, y1, ...]`` (even length;
    a flat list is one polygon) or an RLE ``{"size": [h, w], "counts": ...}`` of the image's size.

    A polygon of fewer than 3 points encloses nothing: it is dropped and logged in ``issues`` (an
    instance left without polygons has no mask, so it is not scored as all background); ``short``
    names the annotation there."""
    if seg is None or (isinstance(seg, (list, dict)) and not seg):
        return None
    if isinstance(seg, list):
        polys = [seg] if all(_finite(v) for v in seg) else seg
        for n, poly in enumerate(polys):
            if not isinstance(poly, list) or not all(_finite(v) for v in poly):
                raise AnnotationError(f"{where}: polygon {n} of the segmentation is not a list of finite numbers: {_short(poly)}")
            if len(poly) % 2:
                raise AnnotationError(f"{where}: polygon {n} of the segmentation has an odd number ({len(poly)}) of "
                                      "coordinates; polygons are x, y pairs")
        kept = [poly for poly in polys if len(poly) >= 6]
        if len(kept) < len(polys) and issues is not None:
            issues.add("degenerate_polygon", f"{short or where}: {len(polys) - len(kept)} of {len(polys)} polygon(s)")
        return kept or None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise AnnotationError(f"{where}: RLE segmentation needs 'size': [height, width], got {_short(size)}")
        if list(size) != [height, width]:
            raise AnnotationError(f"{where}: RLE segmentation size {size} differs from the image's [height, width] "
                                  f"[{height}, {width}]")
        if isinstance(counts, str):
            try:
                runs = _rle_string_counts(counts)
            except IndexError:
                runs = None
            if runs is None or any(ord(ch) < 48 or ord(ch) > 111 for ch in counts):
                raise AnnotationError(f"{where}: RLE segmentation 'counts' is not a valid compressed RLE string")
        elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            runs = counts
        else:
            raise AnnotationError(f"{where}: RLE segmentation 'counts' must be a list of integers or a compressed "
                                  f"string, got {_short(counts)}")
        if any(r < 0 for r in runs) or sum(runs) != height * width:
            raise AnnotationError(f"{where}: RLE segmentation runs cover {sum(runs)} pixels (some negative: "
                                  f"{any(r < 0 for r in runs)}), not the {height} x {width} = {height * width} of its size")
        return seg
    raise AnnotationError(f"{where}: segmentation must be a list of polygons or an RLE dict, got {_short(seg)}")


def read_coco(path: str | Path) -> GroundTruth:
    """Read a COCO JSON file (``images``, ``annotations``, ``categories``).

    Boxes come from ``bbox`` (``x, y, w, h`` -> ``x, y, x + w, y + h``); masks from
    ``segmentation`` (polygons or RLE) and points from an optional ``point: [x, y]``.

    Raises:
        AnnotationError: unreadable or non-UTF-8 JSON, missing keys, repeated image or category
            ids, references to unknown images/categories, or a malformed bbox, segmentation or
            point (naming the annotation id).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark some editors write is not content
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # json decodes nested lists and objects recursively
        raise AnnotationError(f"{path}: JSON nested too deeply to be a COCO file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(doc.get("categories"), list):
        raise AnnotationError(f"{path}: a COCO file needs 'images' and 'categories' lists")
    cats: dict[int, str] = {}
    for n, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), (str, int)) or not str(c["name"]).strip():
            raise AnnotationError(f"{path}: category #{n} needs an id and a name, got {_short(c)}")
        cid = _coco_int(c["id"], "category id", f"{path}: category #{n}")
        if cid in cats:
            raise AnnotationError(f"{path}: category id {cid} appears twice")
        cats[cid] = str(c["name"]).strip()
    imgs: dict[int, tuple[str, int, int]] = {}
    for n, im in enumerate(doc["images"]):
        where = f"{path}: image entry #{n}"
        if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "width", "height")):
            raise AnnotationError(f"{where} needs id, file_name, width and height")
        iid = _coco_int(im["id"], "id", where)
        w, h = _coco_int(im["width"], "width", where), _coco_int(im["height"], "height", where)
        if not isinstance(im["file_name"], str) or not im["file_name"].strip():
            raise AnnotationError(f"{where}: file_name must be a non-empty string, got {_short(im['file_name'])}")
        if w <= 0 or h <= 0:
            raise AnnotationError(f"{where} ({im['file_name']}): width and height must be positive, got {w} x {h}")
        if iid in imgs:
            raise AnnotationError(f"{path}: image id {iid} appears twice ({imgs[iid][0]!r} and {im['file_name']!r})")
        imgs[iid] = (im["file_name"].strip(), w, h)
    annotations = doc.get("annotations", [])
    if not isinstance(annotations, list):
        raise AnnotationError(f"{path}: 'annotations' must be a list")
    issues = _Issues(path)
    per_image: dict[int, list[tuple[str, list[float], str, object, list[float]]]] = {i: [] for i in imgs}
    for n, a in enumerate(annotations):
        ident = f"annotation {a['id']!r}" if isinstance(a, dict) and "id" in a else f"annotation #{n}"
        if not isinstance(a, dict):
            raise AnnotationError(f"{path}: {ident} is not an object")
        try:
            iid, cid = int(a["image_id"]), int(a["category_id"])
        except (KeyError, TypeError, ValueError):
            raise AnnotationError(f"{path}: {ident} lacks image_id/category_id") from None
        if iid not in imgs:
            raise AnnotationError(f"{path}: {ident} refers to unknown image_id {iid}")
        if cid not in cats:
            raise AnnotationError(f"{path}: {ident} refers to unknown category_id {cid}")
        fname, w, h = imgs[iid]
        where = f"{path}: {ident} of {fname}"
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_finite(v) for v in bbox):
            raise AnnotationError(f"{where}: needs a 4-number bbox [x, y, width, height] of finite numbers, "
                                  f"got {_short(bbox)}")
        seg = _coco_segmentation(a.get("segmentation"), h, w, where, issues, f"{fname}, {ident}")
        p = a.get("point")
        if p is not None and not (isinstance(p, list) and len(p) == 2 and all(_finite(v) for v in p)):
            raise AnnotationError(f"{where}: point must be [x, y], got {_short(p)}")
        x, y, bw, bh = (float(v) for v in bbox)
        per_image[iid].append((f"{fname}, {ident}", [x, y, x + bw, y + bh], cats[cid], seg,
                               [float(p[0]), float(p[1])] if p is not None else [float("nan")] * 2))
    images: dict[str, ImageAnnotation] = {}
    for iid, (fname, w, h) in imgs.items():
        entries = per_image[iid]
        boxes, keep = _clean_boxes([e[1] for e in entries], w, h, [e[0] for e in entries], issues)
        ann = ImageAnnotation(
            fname, w, h,
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            [entries[i][2] for i in keep], [entries[i][3] for i in keep],
            torch.tensor([entries[i][4] for i in keep], dtype=torch.float32).reshape(-1, 2),
        )
        _add(images, ann, path)
    classes = list(dict.fromkeys(cats[k] for k in sorted(cats)))  # two ids of one name are one class
    return GroundTruth(images, classes, str(path), issues.finish())


def _voc_size(root: ET.Element, f: Path, fname: str) -> tuple[int, int]:
    """``(width, height)`` of a VOC file's ``<size>``; a missing or zero size (some exporters write
    0) is read from the image in the dataset's ``JPEGImages`` folder when it is there."""
    size = root.find("size")
    try:
        w, h = int(float(size.findtext("width"))), int(float(size.findtext("height")))
    except (AttributeError, TypeError, ValueError):
        w = h = 0
    if w > 0 and h > 0:
        return w, h
    image = f.parent.parent / "JPEGImages" / fname
    if image.is_file():
        from weakloc.data.images import image_size

        try:
            return image_size(image)
        except ImageReadError:
            pass
    raise AnnotationError(f"{f}: <size> gives no positive width and height, and the image {image} cannot be read for them")


def read_voc(folder: str | Path) -> GroundTruth:
    """Read a folder of Pascal VOC XML files (``<object><name>`` + ``<bndbox>``).

    VOC pixel indices start at 1; boxes are shifted to start at 0. A box with ``xmin == xmax`` is
    one pixel wide (kept).

    Raises:
        AnnotationError: naming the XML file (and object), for unparsable XML or missing or
            non-numeric fields.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.xml")) if folder.is_dir() else [folder]
    if not files or not files[0].is_file():
        raise AnnotationError(f"{folder}: no VOC .xml files found")
    images: dict[str, ImageAnnotation] = {}
    classes: set[str] = set()
    issues = _Issues(folder)
    for f in files:
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as e:
            raise AnnotationError(f"{f}: not valid XML ({e})") from None
        fname = (root.findtext("filename") or "").strip()
        if not fname:
            raise AnnotationError(f"{f}: missing <filename>")
        if not Path(fname).suffix:
            fname += ".jpg"
        w, h = _voc_size(root, f, fname)
        raw, labels, wheres = [], [], []
        for n, obj in enumerate(root.iter("object"), 1):
            name = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            try:
                coords = [float(bb.findtext(k)) - 1.0 for k in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                coords = None
            if not name or coords is None or not all(math.isfinite(v) for v in coords):
                raise AnnotationError(f"{f}: object {n} needs a <name> and a <bndbox> of finite xmin, ymin, xmax, ymax")
            raw.append(coords)
            labels.append(name)
            wheres.append(f"{f.name}, object {n}")
        boxes, keep = _clean_boxes(raw, w, h, wheres, issues, inclusive=True)
        labels = [labels[i] for i in keep]
        classes.update(labels)
        ann = ImageAnnotation(fname, w, h, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), labels,
                              [None] * len(labels), torch.full((len(labels), 2), float("nan")))
        _add(images, ann, f)
    return GroundTruth(images, sorted(classes), str(folder), issues.finish())


def _yaml_loader():
    """A safe YAML loader that refuses a mapping with a repeated key (PyYAML keeps the last one
    silently, which would drop a class name)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        seen = set()
        for k, (key_node, _) in zip(keys, node.value):
            try:
                repeated = k in seen
                seen.add(k)
            except TypeError:  # an unhashable key; the constructor below names it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"key {k!r} appears twice", key_node.start_mark)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _yolo_names(yaml_file: Path) -> list[str]:
    """The class names of a YOLO ``data.yaml``: ``names`` as a list, or as a mapping whose keys are
    exactly the class indices ``0..K-1`` (label lines index it, so a gap or a word key would shift
    or lose classes). Names are non-empty strings (numbers are taken as their text), all different.

    Raises:
        AnnotationError: naming ``yaml_file`` and what is wrong with ``names``.
    """
    import yaml

    try:
        raw = yaml.load(yaml_file.read_text(encoding="utf-8-sig"), Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{yaml_file}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise AnnotationError(f"{yaml_file}: not valid YAML ({where}{e.problem or e.context})") from None
    except yaml.YAMLError as e:
        raise AnnotationError(f"{yaml_file}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise AnnotationError(f"{yaml_file}: YAML nested too deeply to be a data.yaml") from None
    names = raw.get("names") if isinstance(raw, dict) else None
    if isinstance(names, dict):  # {0: fish, 1: ...}
        keys = list(names)
        bad = [k for k in keys if not isinstance(k, int) or isinstance(k, bool)]
        if bad:
            raise AnnotationError(f"{yaml_file}: the keys of 'names' must be class indices 0, 1, ..., got {_short(bad[0])} "
                                  f"(keys: {_short(keys)})")
        if sorted(keys) != list(range(len(keys))):
            raise AnnotationError(f"{yaml_file}: the keys of 'names' must be the class indices 0..{len(keys) - 1} without "
                                  f"gaps, got {sorted(keys)[:10]}")
        names = [names[k] for k in range(len(keys))]
    if not isinstance(names, list) or not names:
        raise AnnotationError(f"{yaml_file}: needs a 'names' list (or 0: name mapping) of class names, got {_short(names)}")
    for k, n in enumerate(names):
        if not isinstance(n, (str, int)) or isinstance(n, bool) or not str(n).strip():
            raise AnnotationError(f"{yaml_file}: class {k} in 'names' must be a non-empty name, got {_short(n)}")
    out = [str(n).strip() for n in names]
    first: dict[str, int] = {}
    for k, n in enumerate(out):
        if n in first:
            raise AnnotationError(f"{yaml_file}: 'names' gives {n!r} to classes {first[n]} and {k}; each class needs its own name")
        first[n] = k
    return out


def _yolo_line(cells: list[str], where: str, n_classes: int) -> tuple[int, list[float]]:
    """``(class, [cx, cy, w, h])`` of a YOLO line ``class cx cy w h``, or of a segment line
    ``class x1 y1 x2 y2 ...`` (its bounding box), all normalised."""
    line = " ".join(cells)
    try:
        k, values = int(cells[0]), [float(v) for v in cells[1:]]
    except (ValueError, IndexError):
        raise AnnotationError(f"{where}: expected 'class cx cy w h', got {line!r}") from None
    polygon = len(values) >= 6 and len(values) % 2 == 0
    if not (len(values) == 4 or polygon) or not 0 <= k < n_classes:
        raise AnnotationError(f"{where}: expected 'class cx cy w h' (or 'class x1 y1 x2 y2 ...') with class in "
                              f"0..{n_classes - 1}, got {line!r}")
    if not all(math.isfinite(v) for v in values):
        raise AnnotationError(f"{where}: coordinates must be finite numbers, got {line!r}")
    if polygon:
        xs, ys = values[0::2], values[1::2]
        values = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
    return k, values


def read_yolo(root: str | Path) -> GroundTruth:
    """Read a YOLO dataset: ``data.yaml`` (``names``) and ``labels/*.txt`` beside ``images/``, either
    directly under ``root`` or under split folders (``root/train/labels``, ``root/valid/labels``, ...).

    Each label line is ``class cx cy w h`` in coordinates normalised by the image size, which is
    read from the image's header (a segment line ``class x1 y1 x2 y2 ...`` gives its bounding box).
    An empty label file is an image without objects; an image without a label file is unannotated.

    Raises:
        AnnotationError: naming the file and line, for a non-UTF-8 file, a malformed line or an
            unknown class index.
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
    issues = _Issues(root)
    for label_dir in label_dirs:
        image_dir = label_dir.parent / "images"
        by_stem = {p.stem: p for p in image_dir.iterdir() if is_image_file(p)} if image_dir.is_dir() else {}
        for f in sorted(label_dir.glob("*.txt")):
            img = by_stem.get(f.stem)
            if img is None:
                issues.add("no_image", str(f))
                continue
            try:
                text = f.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as e:
                raise AnnotationError(f"{f}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
            try:
                w, h = image_size(img)
            except ImageReadError as e:
                issues.add("unreadable_image", str(e))
                continue
            raw, labels, wheres = [], [], []
            for n, line in enumerate(text.splitlines(), 1):
                cells = line.split()
                if not cells:
                    continue
                k, (cx, cy, bw, bh) = _yolo_line(cells, f"{f}:{n}", len(names))
                raw.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
                labels.append(names[k])
                wheres.append(f"{f.relative_to(root).as_posix()}:{n}")
            boxes, keep = _clean_boxes(raw, w, h, wheres, issues)
            labels = [labels[i] for i in keep]
            rel = img.relative_to(root).as_posix()
            ann = ImageAnnotation(rel, w, h, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), labels,
                                  [None] * len(labels), torch.full((len(labels), 2), float("nan")))
            _add(images, ann, f)
    return GroundTruth(images, names, str(root), issues.finish())


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


def match_annotations(gt: GroundTruth, paths: list[Path]) -> tuple[list[ImageAnnotation | None], list[str]]:
    """Each image's annotation, its size checked against the image's; and the images that have none.

    The size is read from the image's header (after EXIF rotation). An image of another size than
    its annotation says is accepted as a resized copy when both sides are scaled alike (its boxes
    are scaled with it; one warning gives the count); otherwise the boxes cannot be placed on it.
    An image whose header cannot be read is left to the image loader, which skips and reports it.

    Returns:
        per path its :class:`ImageAnnotation` or None, and the paths (as strings) without one.

    Raises:
        AnnotationError: naming the first image whose size disagrees with its annotation's beyond
            a resize (both sizes given), and how many do.
    """
    from weakloc.data.images import image_size

    anns: list[ImageAnnotation | None] = []
    unannotated: list[str] = []
    resized: list[str] = []
    wrong: list[str] = []
    for p in paths:
        ann = gt.find(p)
        anns.append(ann)
        if ann is None:
            unannotated.append(str(p))
            continue
        try:
            w, h = image_size(p)
        except ImageReadError:
            continue
        if (w, h) == (ann.width, ann.height):
            continue
        sx, sy = w / ann.width, h / ann.height
        what = f"{p}: the image is {w}x{h} pixels but {gt.source or 'the annotations'} give {ann.width}x{ann.height}"
        if abs(sx - sy) <= RESIZE_TOLERANCE * max(sx, sy):
            resized.append(what)
        elif (w, h) == (ann.height, ann.width):
            wrong.append(what + " (width and height swapped: was the image rotated, e.g. by its EXIF orientation, "
                                "after it was annotated?)")
        else:
            wrong.append(what)
    if wrong:
        more = f" ({len(wrong)} images disagree like this)" if len(wrong) > 1 else ""
        raise AnnotationError(f"{wrong[0]}; its boxes cannot be placed on it{more}")
    if resized:
        warnings.warn(f"{len(resized)} image(s) are resized copies of the annotated ones; their boxes are scaled with "
                      f"them: {'; '.join(resized[:_SHOWN])}{'; ...' if len(resized) > _SHOWN else ''}", stacklevel=2)
    return anns, unannotated


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
