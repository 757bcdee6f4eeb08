"""Issue 16: no file weakloc localize / explain writes escapes its output folder, whatever the class
names and image names hold, and the galleries' links work from any output path."""

from __future__ import annotations

import json
import os
import unicodedata
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from weakloc.errors import OptionError, WeaklocError
from weakloc.report import gallery_cards, page_link, safe_component, save_png
from weakloc.report.explanation import explain_images
from weakloc.report.localization import localize_images
from weakloc.report.paths import OutputFolder

HOSTILE_CLASSES = ["../../../ESCAPE_a", "../../../../ESCAPE_b", "a/b", "..", ".", "c\\d", "e\x00f",
                   "<script>alert(1)</script>", "x" * 300, "A", "a", "CON", "-rf", "\udcff"]
HOSTILE_STEMS = ["..", "<script>alert(1)</script>", "a b#c%d?é", "-rf", "CON", "Img", "img", "back\\slash",
                 "new\nline", "y" * 200, ".", os.fsdecode(b"\xff\xfebytes")]
# hostile classes on two images, and hostile image names with two classes: every name reaches
# every kind of file, at a fraction of the work of all names against all
CASES = {"classes": (HOSTILE_CLASSES, HOSTILE_STEMS[1:3]), "stems": (HOSTILE_CLASSES[:3], HOSTILE_STEMS)}


def _model(classes, **extra):
    """A tiny model whose classes are set in memory, past any validation a config load would do:
    the writers must defend themselves."""
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", classes=[f"c{k}" for k in range(len(classes))], input_size=64, output_stride=8,
                      drop_rate=0.0, **extra)
    model = WeaklocNet(cfg, pretrained="none").eval()
    model.config.classes = list(classes)
    return model


def _images(folder: Path, stems=HOSTILE_STEMS) -> list[Path]:
    """Small PNGs named ``stems``, where the file system allows (not every one takes undecodable bytes)."""
    folder.mkdir(parents=True)
    made = []
    for k, stem in enumerate(stems):
        path = folder / f"{stem}.png"
        try:
            Image.new("RGB", (48, 40), (30 * k % 255, 90, 160)).save(path, format="PNG")
        except (OSError, UnicodeEncodeError):  # e.g. macOS refuses undecodable names
            continue
        made.append(path)
    return made


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src") and v is not None]


def _check_page(page: Path, out: Path) -> int:
    """Every link of ``page`` names an existing file inside ``out``; returns the number of links."""
    parser = _Links()
    text = page.read_bytes().decode("utf-8")  # strict: the page is valid UTF-8
    parser.feed(text)
    assert "<script" not in text.lower()  # hostile names are shown as text, never as markup
    for link in parser.links:
        assert "://" not in link and not link.startswith("/")
        target = (page.parent / os.fsdecode(unquote_to_bytes(link))).resolve()
        assert target.is_file(), link
        assert target.is_relative_to(out.resolve()), link
    return len(parser.links)


def _check_written(before: set[Path], after: set[Path], out: Path, folders: set[str]) -> list[Path]:
    """Everything new lies in ``out`` or its fixed sub-folders (no folders made from names), with
    names unique case-insensitively and safe as one component."""
    new = sorted(after - before)
    assert new, "nothing written"
    files = []
    for p in new:
        if p.is_dir() and out.is_relative_to(p):  # the output folder and the folders above it
            continue
        assert p.is_relative_to(out), f"written outside the output folder: {p}"
        rel = p.relative_to(out)
        if p.is_dir():
            assert rel.as_posix() in folders, f"unexpected folder {rel}"
            continue
        assert len(rel.parts) == 1 or (len(rel.parts) == 2 and rel.parts[0] in folders), rel
        files.append(p)
        name = p.name
        assert len(name.encode("utf-8")) <= 255 and name[0] not in ".-"
        assert all(c.isalnum() or c in "-_.+=,()" for c in name), name
    for folder in {p.parent for p in files}:
        names = [p.name.casefold() for p in files if p.parent == folder]
        assert len(names) == len(set(names))
    return files


@pytest.fixture(params=sorted(CASES))
def hostile(request, tmp_path):
    classes, stems = CASES[request.param]
    return _model(classes), _images(tmp_path / "imgs", stems)


def test_localize_hostile_names_stay_inside(hostile, tmp_path):
    model, images = hostile
    classes = model.config.classes
    out = tmp_path / "work" / "out"
    before = _tree(tmp_path)
    res = localize_images(model, tmp_path / "imgs", out, target="all", threshold=0.3, batch_size=4)
    files = _check_written(before, _tree(tmp_path), out, {"overlays", "masks", "parts"})
    assert not [p for p in _tree(tmp_path) if "ESCAPE" in p.name and not p.is_relative_to(out)]
    masks = [p for p in files if p.parent.name == "masks"]
    assert len(masks) == len(images) * len(classes)  # one per image and class: none overwritten
    assert len([p for p in files if p.parent.name == "overlays"]) == len(images)
    assert _check_page(out / "index.html", out) == 2 * len(images)
    doc = json.loads((out / "detections.json").read_bytes().decode("utf-8"))
    assert [c["name"] for c in doc["categories"]] == classes  # data keeps the original names
    assert doc == res.to_dict()
    for im in doc["images"]:
        assert set(im["masks"]) == set(classes)
        assert all((out / m).resolve().is_file() and (out / m).resolve().is_relative_to(out.resolve()) for m in im["masks"].values())
    named = {im["file_name"] for im in doc["images"]}
    assert str(tmp_path / "imgs" / "a b#c%d?é.png") in named
    if any("bytes" in p.name for p in images):  # the undecodable bytes, written as \xNN
        assert str(tmp_path / "imgs" / "\\xff\\xfebytes.png") in named
        assert (out / "detections.json").read_text(encoding="utf-8").count("\\\\xff") == 1


def test_explain_hostile_names_stay_inside(hostile, tmp_path):
    from safetensors.torch import load_file

    model, images = hostile
    classes = model.config.classes
    out = tmp_path / "work" / "out"
    before = _tree(tmp_path)
    index = explain_images(model, tmp_path / "imgs", out, method="cam", target="all", batch_size=5)
    files = _check_written(before, _tree(tmp_path), out, {"overlays"})
    assert not [p for p in _tree(tmp_path) if "ESCAPE" in p.name and not p.is_relative_to(out)]
    assert len([p for p in files if p.parent.name == "overlays"]) == len(images) * len(classes)
    assert _check_page(out / "index.html", out) == 2 * len(images) * len(classes)
    saved = json.loads((out / "maps.json").read_bytes().decode("utf-8"))
    assert saved["classes"] == classes and saved == index.to_dict()
    assert all(im["targets"] == classes for im in saved["images"])
    tensors = load_file(str(out / "maps.safetensors"))
    assert {f"{im['key']}.{part}" for im in saved["images"] for part in ("raw", "normalized", "targets")} == set(tensors)


def test_counting_overlays_stay_inside(tmp_path):
    _images(tmp_path / "imgs", HOSTILE_STEMS[:4])
    model = _model(["../../../ESCAPE_a", "a/b"], counting="density")
    out = tmp_path / "work" / "out"
    before = _tree(tmp_path)
    localize_images(model, tmp_path / "imgs", out)
    _check_written(before, _tree(tmp_path), out, {"overlays", "parts"})
    assert _check_page(out / "index.html", out) > 0


@pytest.mark.parametrize("out_name", ["out/", "rel out #1 %41 é", "./a/../b"])
def test_gallery_links_work_with_a_relative_output(tmp_path, monkeypatch, out_name):
    _images(tmp_path / "imgs", HOSTILE_STEMS[1:3] + HOSTILE_STEMS[-1:])
    model = _model(["<b>", "c\\d", "e"])
    monkeypatch.chdir(tmp_path)
    localize_images(model, "imgs", out_name, target="c\\d", batch_size=8)
    explain_images(model, "imgs", Path(out_name) / "exp", method="cam", target="top2", batch_size=8)
    out = tmp_path / os.path.normpath(out_name)
    assert _check_page(out / "index.html", out) > 0
    assert _check_page(out / "exp" / "index.html", out / "exp") > 0


def test_symlinked_sub_folder_is_refused(tmp_path):
    _images(tmp_path / "imgs", ["x"])
    model = _model(["a", "b"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    try:
        (tmp_path / "out" / "overlays").symlink_to(elsewhere, target_is_directory=True)
    except OSError:
        pytest.skip("no symlinks here")
    with pytest.raises(WeaklocError, match="outside the output folder"):
        localize_images(model, tmp_path / "imgs", tmp_path / "out")
    assert not list(elsewhere.iterdir())


def test_save_png_makes_no_folders_of_its_own(tmp_path):
    img = torch.zeros(4, 4, dtype=torch.uint8)
    with pytest.raises(WeaklocError, match="outside"):
        save_png(img, tmp_path / "out" / "masks" / "x" / ".." / ".." / ".." / "esc" / "n.png", root=tmp_path / "out")
    with pytest.raises(FileNotFoundError):  # without a root, the folder must exist
        save_png(img, tmp_path / "new" / "n.png")
    assert not (tmp_path / "esc").exists() and not (tmp_path / "new").exists()
    assert save_png(img, tmp_path / "out" / "m" / "n.png", root=tmp_path / "out").is_file()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.characters(codec=None, exclude_categories=()), max_size=120), min_size=1, max_size=6))
def test_safe_component_is_one_safe_unique_name(texts):
    used: set[str] = set()
    names = [safe_component(t, used) for t in texts]
    assert len({n.casefold() for n in names}) == len(texts)  # unique even for repeated or case-folded texts
    again: set[str] = set()
    assert [safe_component(t, again) for t in texts] == names  # deterministic
    for n in names:
        assert 0 < len(n.encode("utf-8")) <= 80
        assert n not in (".", "..") and n[0] not in ".-" and n[-1] != "."
        assert os.path.basename(n) == n and "/" not in n and "\\" not in n
        assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zs") for c in n)
        assert n.split(".")[0].upper() not in ("CON", "PRN", "AUX", "NUL", "COM1", "LPT1")


def test_safe_component_examples():
    assert safe_component("../../x") == "_.._.._x"
    assert safe_component("a/b") == "a_b" and safe_component("") == "_" and safe_component("CON") == "_CON"
    assert safe_component("Zellkern é") == "Zellkern_é"
    long = [safe_component("x" * 300 + tail) for tail in "ab"]
    assert long[0] != long[1] and all(len(n) <= 80 for n in long)  # a hash keeps long names apart
    used: set[str] = set()
    assert [safe_component(t, used) for t in ["A", "a", "a."]] == ["A", "a-2", "a-3"]


def test_output_folder_dedups_within_each_folder(tmp_path):
    folder = OutputFolder(tmp_path / "o")
    first, second = folder.file("masks", "x/y", ".png"), folder.file("masks", "x_y", ".png")
    assert first.name == "x_y.png" and second.name == "x_y-2.png"
    assert folder.file("overlays", "x_y", ".png").name == "x_y.png"
    assert (tmp_path / "o" / "masks").is_dir()


def test_gallery_cards_relative_encoded_escaped(tmp_path):
    page_dir = tmp_path / "p q"
    image = page_dir / "overlays" / "a b#c%d?é.png"
    html_text = gallery_cards([{"image": image, "title": "<script>alert(1)</script>", "lines": ["<b>", "x\udcffy"]}], page_dir)
    assert 'src="overlays/a%20b%23c%25d%3F%C3%A9.png"' in html_text
    assert "&lt;script&gt;" in html_text and "<script" not in html_text and "&lt;b&gt;" in html_text
    assert "x\\xffy" in html_text
    assert page_link(tmp_path / "img.png", page_dir) == "../img.png"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": True}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"threshold": "percentile:150"}, "percentile"),
    ({"threshold": "calibrated"}, "no calibrated threshold"),
    ({"threshold": "half"}, "threshold"),
    ({"keep": "foo"}, "keep"),
    ({"min_area": -1}, "min_area"),
    ({"target": True}, "target"),
    ({"target": 1.0}, "target"),
    ({"target": "nope"}, "target: unknown class"),
    ({"target": 7}, "target"),
    ({"target": "top9"}, "target"),
    ({"method": "nope"}, "method"),
    ({"display_size": 0}, "display_size"),
    ({"count_views": "flip"}, "count_views: only counting models"),
    ({"maps": {"count_views": "flip"}}, "count_views: only counting models"),
    ({"progress": 3}, "progress"),
    ({"maps": ["tta"]}, "maps"),
    ({"maps": {1: "tta"}}, "maps"),
    ({"maps": {"fusion": "sum"}}, "fusion"),
    ({"maps": {"test_size": 8}}, "test_size"),
    ({"maps": {"normalization": "zscore"}}, "normalization"),
])
def test_localize_refuses_bad_arguments_before_any_work(tmp_path, kwargs, match):
    _images(tmp_path / "imgs", ["x"])
    with pytest.raises(OptionError, match=match):
        localize_images(_model(["a", "b"]), tmp_path / "imgs", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 0}, "batch_size"),
    ({"target": False}, "target"),
    ({"target": [0, 1]}, "target"),
    ({"method": "nope"}, "method"),
    ({"method": 3}, "method"),
    ({"progress": "yes"}, "progress"),
    ({"maps": 3}, "maps"),
    ({"maps": {"dtype": "int8"}}, "dtype"),
    ({"out": None}, "out"),
])
def test_explain_refuses_bad_arguments_before_any_work(tmp_path, kwargs, match):
    _images(tmp_path / "imgs", ["x"])
    kwargs = {"out": tmp_path / "out", **kwargs}
    with pytest.raises(OptionError, match=match):
        explain_images(_model(["a", "b"]), tmp_path / "imgs", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("kwargs", "match"), [({"count_views": "sideways"}, "count_views"), ({"maps": {"count_views": "rot45"}}, "count_views")])
def test_localize_refuses_bad_count_views_of_a_counting_model(tmp_path, kwargs, match):
    _images(tmp_path / "imgs", ["x"])
    with pytest.raises(OptionError, match=match):
        localize_images(_model(["a", "b"], counting="density"), tmp_path / "imgs", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
