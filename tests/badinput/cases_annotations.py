"""Ground-truth annotations -- COCO JSON, a Pascal VOC XML folder, a YOLO dataset -- through
``evaluate``, ``calibrate`` and ``train --counts-from``.

What the issue asks: a malformed file or field is an error naming the file (and the annotation or
line); a box that cannot be right (outside the image, no area, not finite) is refused or reported,
never clipped into a silent zero-size box; an annotated size that disagrees with the real image is
an error; images without annotations are named, not only counted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checks import calibrated, evaluated, mentions_skip, reached_training
from .harness import Case, Cli, Env, Result
from .cases_labels import TRAIN


def _eval(ann: str = "{ann}") -> Cli:
    return Cli(["evaluate", "{model}", "{labels}", "-a", ann, "--split", "all", "-o", "{out}/report.json"])


def _calib(ann: str = "{ann}") -> Cli:
    return Cli(["calibrate", "{model}", "{labels}", "-a", ann, "--per-class", "2"])


def _counts_from(ann: str = "{ann}") -> Cli:
    return Cli(["train", "{labels}", "--counts-from", ann, "-o", "{out}", *TRAIN])


def _skip_names(*names: str):
    """The command ran and its output names one of ``names`` as skipped / ignored."""

    def check(env: Env, res: Result) -> None:
        errors = []
        for n in names:
            try:
                mentions_skip(res.text, n.format_map({**env.vars, **env.info}))
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError("; ".join(errors[:2]))

    return check


# --- COCO -----------------------------------------------------------------------------------------


def coco(mutate=None, *, raw: bytes | None = None):
    """Builder: model and data copies, ``annotations.json`` mutated (``mutate(doc, env)`` edits or
    returns a replacement) or replaced by ``raw`` bytes. ``{img_name}`` is the first annotation's image."""

    def build(env: Env) -> None:
        env.model()
        data = env.data()
        path = data / "annotations.json"
        doc = json.loads(path.read_text())
        first = doc["annotations"][0]
        env.info["img_name"] = Path(next(im["file_name"] for im in doc["images"] if im["id"] == first["image_id"])).name
        if raw is not None:
            path.write_bytes(raw)
        elif mutate is not None:
            new = mutate(doc, env)
            path.write_text(json.dumps(doc if new is None else new))

    return build


def _ann0(key, value):
    def m(doc, env):
        doc["annotations"][0][key] = value

    return m


def _img0(key, value):
    def m(doc, env):
        iid = doc["annotations"][0]["image_id"]
        im = next(im for im in doc["images"] if im["id"] == iid)
        if value is _DELETE:
            del im[key]
        else:
            im[key] = value(im[key]) if callable(value) else value

    return m


_DELETE = object()


def _half_unannotated(doc, env):
    """Images 6..11 left out of the annotation file altogether (their ground truth is unknown)."""
    keep = {im["id"] for im in doc["images"][:6]}
    doc["images"] = [im for im in doc["images"] if im["id"] in keep]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]


def _half_without_objects(doc, env):
    """Images 6..11 listed with no object: annotated negatives, not missing ground truth."""
    keep = {im["id"] for im in doc["images"][:6]}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]


def _dup_image_id(doc, env):
    doc["images"][1]["id"] = doc["images"][0]["id"]


def _dup_category_id(doc, env):
    doc["categories"][1]["id"] = doc["categories"][0]["id"]


def _extra_keys(doc, env):
    doc["info"] = {"year": 2024}
    doc["licenses"] = [{"id": 1, "name": "x"}]


UNANNOTATED = "|".join(f"{i:06d}.jpg" for i in range(6, 12))

COCO_CASES = [
    # (slug, builder, expect, match, commands, note)
    ("not_json", coco(raw=b"this is not json {"), "error", "annotations.json", "ecn", None),
    ("json_list", coco(raw=b"[]"), "error", "annotations.json", "e", None),
    ("no_images_key", coco(lambda d, e: d.pop("images") and None), "error", "annotations.json", "e", None),
    ("no_categories_key", coco(lambda d, e: d.pop("categories") and None), "error", "annotations.json", "e", None),
    ("images_is_dict", coco(lambda d, e: d.update(images={})), "error", "annotations.json", "e", None),
    ("annotations_null", coco(lambda d, e: d.update(annotations=None)), "error", "annotations.json", "e", None),
    ("annotation_is_number", coco(lambda d, e: d["annotations"].__setitem__(0, 7)), "error", "annotations.json", "e", None),
    ("bbox_null", coco(_ann0("bbox", None)), "error", "annotations.json", "ecn", "issue: a null bbox crashes"),
    ("bbox_string", coco(_ann0("bbox", "1,2,3,4")), "error", "annotations.json", "e", "issue: a string bbox crashes"),
    ("bbox_three_numbers", coco(_ann0("bbox", [1, 2, 3])), "error", "annotations.json", "e", None),
    ("bbox_words", coco(_ann0("bbox", ["a", "b", "c", "d"])), "error", "annotations.json", "e", None),
    ("bbox_nan", coco(_ann0("bbox", [float("nan"), 1, 2, 3])), ("error", "skip"), "{img_name}", "e", None),
    ("bbox_inf", coco(raw=None, mutate=_ann0("bbox", [float("inf"), 1, 2, 3])), ("error", "skip"), "{img_name}", "e", None),
    ("bbox_negative_size", coco(_ann0("bbox", [5, 5, -3, 4])), ("error", "skip"), "{img_name}", "e", None),
    ("bbox_outside_image", coco(_ann0("bbox", [1000, 1000, 5, 5])), ("error", "skip"), "{img_name}", "ec",
     "issue: a box outside the image is clipped to a silent zero-size box"),
    ("bbox_zero_size", coco(_ann0("bbox", [5, 5, 0, 0])), ("error", "skip"), "{img_name}", "e", "issue: zero-size boxes"),
    ("size_disagrees", coco(_img0("width", lambda w: w * 2)), "error", "{img_name}", "ec",
     "issue: COCO image sizes disagreeing with the real image"),
    ("width_zero", coco(_img0("width", 0)), "error", "{img_name}", "e", None),
    ("width_negative", coco(_img0("height", -32)), "error", "{img_name}", "e", None),
    ("width_word", coco(_img0("width", "wide")), "error", "annotations.json", "e", None),
    ("width_missing", coco(_img0("width", _DELETE)), "error", "annotations.json", "e", None),
    ("file_name_null", coco(_img0("file_name", None)), "error", "annotations.json", "e", None),
    ("image_without_id", coco(_img0("id", _DELETE)), "error", "annotations.json", "e", None),
    ("category_without_name", coco(lambda d, e: d["categories"][0].pop("name") and None), "error", "annotations.json", "e", None),
    ("category_id_word", coco(lambda d, e: d["categories"][0].update(id="a")), "error", "annotations.json", "e", None),
    ("duplicate_image_id", coco(_dup_image_id), "error", "annotations.json", "e", "two images share an id"),
    ("duplicate_category_id", coco(_dup_category_id), "error", "annotations.json", "e", None),
    ("unknown_image_id", coco(_ann0("image_id", 999)), "error", "annotations.json", "e", None),
    ("unknown_category_id", coco(_ann0("category_id", 99)), "error", "annotations.json", "e", None),
    ("polygon_odd_length", coco(_ann0("segmentation", [[1, 2, 3, 4, 5, 6, 7]])), "error", "annotations.json", "ec",
     "issue: odd-length polygons crash"),
    ("polygon_two_points", coco(_ann0("segmentation", [[1, 2, 3, 4]])), ("error", "skip"), "annotations.json|{img_name}", "e", None),
    ("polygon_words", coco(_ann0("segmentation", [["a", "b", "c", "d", "e", "f"]])), "error", "annotations.json", "e", None),
    ("segmentation_string", coco(_ann0("segmentation", "not a polygon")), "error", "annotations.json", "e", None),
    ("rle_bad_total", coco(_ann0("segmentation", {"size": [32, 32], "counts": [10, 5]})), "error", "annotations.json", "ec",
     "issue: bad RLE crashes"),
    ("rle_negative_run", coco(_ann0("segmentation", {"size": [32, 32], "counts": [-5, 1029]})), "error", "annotations.json", "e", None),
    ("rle_garbage_string", coco(_ann0("segmentation", {"size": [32, 32], "counts": "\x01\x02 garbage"})), "error",
     "annotations.json", "e", None),
    ("rle_size_missing", coco(_ann0("segmentation", {"counts": [0, 1024]})), "error", "annotations.json", "e", None),
    ("point_words", coco(_ann0("point", ["a"])), "error", "annotations.json", "e", None),
    ("half_unannotated", coco(_half_unannotated), ("error", "skip"), UNANNOTATED, "en",
     "issue: half the images without annotations are reported only as a count"),
    ("no_annotations", coco(lambda d, e: d.update(annotations=[])), "error", "annotations.json", "e", None),
    ("half_without_objects", coco(_half_without_objects), "ok", None, "en", "listed images without objects are negatives"),
    ("latin1", coco(raw='{"images": [], "categories": [{"id": 1, "name": "étoile"}]}'.encode("latin-1")), "error",
     "annotations.json", "e", None),
    ("deep_nesting", coco(raw=b"[" * 100_000 + b"]" * 100_000), "error", "annotations.json", "e", "Python's JSON recursion limit"),
    # valid variations
    ("utf8_bom", coco(lambda d, e: None), "ok", None, "e", None),
    ("box_partly_outside", coco(_ann0("bbox", [20, 20, 30, 30])), "ok", None, "e", "a box over the edge is clipped to the image"),
    ("absolute_file_names", coco(lambda d, e: [im.update(file_name="/elsewhere/" + im["file_name"]) for im in d["images"]] and None),
     "ok", None, "e", None),
    ("backslash_file_names", coco(lambda d, e: [im.update(file_name=im["file_name"].replace("/", "\\")) for im in d["images"]] and None),
     "ok", None, "e", None),
    ("extra_keys", coco(_extra_keys), "ok", None, "ecn", None),
]


def _bom(build):
    def wrapped(env: Env) -> None:
        build(env)
        path = Path(env["ann"])
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())

    return wrapped


# --- VOC ------------------------------------------------------------------------------------------

VOC_OBJECT = "<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"


def _voc_xml(fname: str, w: int, h: int, objects: list[tuple]) -> str:
    objs = "".join(VOC_OBJECT.format(name=n, x0=x0 + 1, y0=y0 + 1, x1=x1 + 1, y1=y1 + 1) for n, x0, y0, x1, y1 in objects)
    return f"<annotation><filename>{fname}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"


def voc(edit=None, *, raw: bytes | None = None, empty: bool = False):
    """Builder: ``{voc}`` = one XML per image (from the COCO file); ``000000.xml`` edited by
    ``edit(text) -> text`` or replaced by ``raw``."""

    def build(env: Env) -> None:
        env.model()
        data = env.data()
        doc = json.loads((data / "annotations.json").read_text())
        cats = {c["id"]: c["name"] for c in doc["categories"]}
        folder = env.dir("voc")
        if not empty:
            for im in doc["images"]:
                objs = [(cats[a["category_id"]], a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
                        for a in doc["annotations"] if a["image_id"] == im["id"]]
                name = Path(im["file_name"]).name
                (folder / (Path(name).stem + ".xml")).write_text(_voc_xml(name, im["width"], im["height"], objs))
            first = folder / "000000.xml"
            if raw is not None:
                first.write_bytes(raw)
            elif edit is not None:
                first.write_text(edit(first.read_text()))
        else:
            (folder / "README.txt").write_text("no xml here")
        env.set(voc=folder)

    return build


def _replace(old: str, new: str, count: int = 1):
    def edit(text: str) -> str:
        assert old in text, f"builder: {old!r} not in the XML"
        return text.replace(old, new, count)

    return edit


def _sub_tag(tag: str, value: str):
    import re

    def edit(text: str) -> str:
        return re.sub(f"<{tag}>[^<]*</{tag}>", f"<{tag}>{value}</{tag}>", text, count=1)

    return edit


def _drop_tag(tag: str):
    import re

    def edit(text: str) -> str:
        return re.sub(f"<{tag}>.*?</{tag}>", "", text, count=1, flags=re.S)

    return edit


BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
                  + ']><annotation><filename>&lol9;</filename></annotation>').encode()
XXE = (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/hostname">]>'
       b"<annotation><filename>&xxe;</filename><size><width>32</width><height>32</height></size></annotation>")

VOC_CASES = [
    ("malformed", voc(lambda t: t[: len(t) // 2]), "error", "000000.xml", "ec", None),
    ("missing_filename", voc(_drop_tag("filename")), "error", "000000.xml", "e", None),
    ("missing_size", voc(_drop_tag("size")), "error", "000000.xml", "e", None),
    ("size_zero", voc(_sub_tag("width", "0")), "error", "000000.xml", "e", None),
    ("size_disagrees", voc(_sub_tag("width", "64")), "error", "000000", "e", "the XML's size is not the image's"),
    ("no_bndbox", voc(_drop_tag("bndbox")), "error", "000000.xml", "e", None),
    ("coordinate_word", voc(_sub_tag("xmin", "left")), "error", "000000.xml", "e", None),
    ("inverted_box", voc(_sub_tag("xmin", "30")), ("error", "skip"), "000000", "e", None),
    ("box_outside", voc(lambda t: _sub_tag("xmax", "900")(_sub_tag("xmin", "800")(t))), ("error", "skip"), "000000", "e", None),
    ("empty_name", voc(_sub_tag("name", "")), ("error", "skip"), "000000", "e", None),
    ("no_xml_files", voc(empty=True), "error", "voc", "e", None),
    ("billion_laughs", voc(raw=BILLION_LAUGHS), "error", "000000.xml", "ec", "an entity-expansion bomb must not hang"),
    ("external_entity", voc(raw=XXE), "error", "000000.xml", "e", "an external entity must not be read"),
    ("latin1_no_declaration", voc(raw=_voc_xml("000000.jpg", 32, 32, [("étoile", 1, 1, 5, 5)]).encode("latin-1")), "error",
     "000000.xml", "e", None),
    ("valid", voc(), "ok", None, "ec", None),
]


# --- YOLO -----------------------------------------------------------------------------------------


def yolo(edit_label=None, *, yaml: bytes | None = None, no_yaml: bool = False, no_labels: bool = False, corrupt_image: bool = False):
    """Builder: ``{yolo}`` = data.yaml, images/ and labels/*.txt (from the COCO file); ``000000.txt``
    edited by ``edit_label(text) -> text | bytes``."""

    def build(env: Env) -> None:
        env.model()
        data = env.data()
        doc = json.loads((data / "annotations.json").read_text())
        names = [c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])]
        root = env.dir("yolo")
        (root / "images").mkdir()
        if not no_labels:
            (root / "labels").mkdir()
        for im in doc["images"]:
            src = data / im["file_name"]
            shutil.copy(src, root / "images" / src.name)
            lines = []
            for a in doc["annotations"]:
                if a["image_id"] == im["id"]:
                    x, y, w, h = a["bbox"]
                    lines.append(f"{a['category_id'] - 1} {(x + w / 2) / im['width']:.6f} {(y + h / 2) / im['height']:.6f} "
                                 f"{w / im['width']:.6f} {h / im['height']:.6f}")
            if not no_labels:
                (root / "labels" / (src.stem + ".txt")).write_text("\n".join(lines) + "\n")
        if not no_yaml:
            (root / "data.yaml").write_bytes(yaml if yaml is not None else ("names: [" + ", ".join(names) + "]\n").encode())
        label = root / "labels" / "000000.txt"
        if edit_label is not None:
            new = edit_label(label.read_text())
            label.write_bytes(new if isinstance(new, bytes) else new.encode())
        if corrupt_image:
            img = root / "images" / "000000.jpg"
            img.write_bytes(b"not a jpeg")
        env.set(yolo=root)

    return build


def _first_line(fn):
    def edit(text: str) -> str:
        lines = text.splitlines()
        lines[0] = fn(lines[0])
        return "\n".join(lines) + "\n"

    return edit


YOLO_CASES = [
    ("no_data_yaml", yolo(no_yaml=True), "error", "yolo", "e", None),
    ("yaml_invalid", yolo(yaml=b"names: [a, b\n  - : :\n\t"), "error", "data.yaml", "ec", None),
    ("yaml_empty", yolo(yaml=b""), "error", "data.yaml", "e", None),
    ("yaml_list", yolo(yaml=b"- triangle\n- square\n"), "error", "data.yaml", "e", None),
    ("names_missing", yolo(yaml=b"nc: 3\n"), "error", "data.yaml", "e", None),
    ("names_string", yolo(yaml=b"names: triangle square star\n"), "error", "data.yaml", "e", None),
    ("names_mixed_keys", yolo(yaml=b"names: {0: triangle, x: square}\n"), "error", "data.yaml", "e", None),
    ("yaml_latin1", yolo(yaml="names: [étoile, carré, triangle]\n".encode("latin-1")), "error", "data.yaml", "e", None),
    ("no_labels_folder", yolo(no_labels=True), "error", "yolo", "e", None),
    ("four_fields", yolo(_first_line(lambda ln: " ".join(ln.split()[:4]))), "error", "000000.txt", "ec", None),
    ("class_out_of_range", yolo(_first_line(lambda ln: "7 " + ln.split(" ", 1)[1])), "error", "000000.txt", "e", None),
    ("class_negative", yolo(_first_line(lambda ln: "-1 " + ln.split(" ", 1)[1])), "error", "000000.txt", "e", None),
    ("class_float", yolo(_first_line(lambda ln: "0.0 " + ln.split(" ", 1)[1])), "error", "000000.txt", "e", None),
    ("coords_nan", yolo(_first_line(lambda ln: ln.split()[0] + " nan 0.5 0.2 0.2")), ("error", "skip"), "000000", "e", None),
    ("coords_outside", yolo(_first_line(lambda ln: ln.split()[0] + " 1.7 1.6 0.2 0.2")), ("error", "skip"), "000000", "e",
     "issue: boxes outside the image"),
    ("zero_size", yolo(_first_line(lambda ln: ln.split()[0] + " 0.5 0.5 0 0")), ("error", "skip"), "000000", "e", None),
    ("label_latin1", yolo(lambda t: ("# étiquette\n" + t).encode("latin-1")), "error", "000000.txt", "ec",
     "issue: a non-UTF-8 YOLO file crashes"),
    ("label_binary", yolo(lambda t: bytes(range(256))), "error", "000000.txt", "e", None),
    ("image_undecodable", yolo(corrupt_image=True), ("error", "skip"), "000000.jpg", "e", None),
    ("valid", yolo(), "ok", None, "ec", None),
]


# --- assembling -------------------------------------------------------------------------------------


def _cases(kind: str, rows, ann: str) -> list[Case]:
    out = []
    for slug, build, expect, match, commands, note in rows:
        expect = (expect,) if isinstance(expect, str) else expect
        if slug == "utf8_bom":
            build = _bom(build)
        skip_names = tuple(match.split("|")) if match else ()
        for c in commands:
            if c == "e":
                run, checks, cmd, writes = _eval(ann), {}, "evaluate", ("{out}",)
                if "ok" in expect:
                    checks["ok"] = evaluated(min_images=12)
                if "skip" in expect:
                    checks["skip"] = _skip_names(*skip_names)
            elif c == "c":
                run, checks, cmd, writes = _calib(ann), {}, "calibrate", ("{model}",)
                if "ok" in expect:
                    checks["ok"] = calibrated()
                if "skip" in expect:
                    checks["skip"] = _skip_names(*skip_names)
            else:
                run, checks, cmd, writes = _counts_from(ann), {}, "train-counts-from", ("{out}",)
                if "ok" in expect:
                    checks["ok"] = reached_training()
                if "skip" in expect:
                    checks["skip"] = _skip_names(*skip_names)
            out.append(Case(f"{kind}/{slug}/{cmd}", kind, build, run, expect, match=(match,) if match else (), checks=checks,
                            writes=writes, note=note or ""))
    return out


def cases() -> list[Case]:
    return _cases("coco", COCO_CASES, "{ann}") + _cases("voc", VOC_CASES, "{voc}") + _cases("yolo", YOLO_CASES, "{yolo}")
