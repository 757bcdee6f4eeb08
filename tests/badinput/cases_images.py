"""Image files: broken, hostile, huge or merely unusual, each run through the commands that read
images -- ``read_image`` (the Python API), the training/evaluation data loader, ``localize`` and
``explain``.

What the issue asks: an undecodable file is an error naming it when read alone, skipped and counted
(named) by the loader and the commands, while the other images are still processed; an odd but
valid file is read correctly (colours, size, orientation); a hostile file name never breaks the
output nor writes outside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import files as F
from .checks import explain_skipped, explained, localize_skipped, localized
from .harness import Api, Case, Cli, Env, Proc, Result


def _not_root() -> str | None:
    return "running as root: permissions do not stop reads or writes" if os.geteuid() == 0 else None


# --- content checks of read_image's tensor --------------------------------------------------------


def shape(w: int, h: int):
    def check(t) -> None:
        assert tuple(t.shape) == (3, h, w), f"shape {tuple(t.shape)}, expected (3, {h}, {w})"

    return check


def nonblack(t) -> None:
    f = t.float()
    assert f.mean() > 30 and f.std() > 10, f"decoded (almost) black or flat: mean {f.mean():.1f}, std {f.std():.1f}"


def gray(t) -> None:
    assert (t[0] == t[1]).all() and (t[1] == t[2]).all(), "a grayscale image must give three equal channels"


def full_range(t) -> None:
    assert int(t.min()) <= 10 and int(t.max()) >= 245, f"values {int(t.min())}..{int(t.max())}: range lost"


def white_where_transparent(t) -> None:
    right = t[:, :, t.shape[2] // 2 + 2:].float().mean((1, 2))
    left = t[:, :, : t.shape[2] // 2 - 2].float().mean((1, 2))
    assert (right > 245).all(), f"transparent half is {right.tolist()}, expected white"
    assert left[2] > 200 and left[0] < 50, f"opaque half is {left.tolist()}, expected blue"


def red(t) -> None:
    m = t.float().mean((1, 2))
    assert m[0] > 180 and m[1] < 80 and m[2] < 80, f"mean colour {m.tolist()}, expected red"


def all_of(*checks):
    def check(t) -> None:
        for c in checks:
            c(t)

    return check


# --- the images -----------------------------------------------------------------------------------


@dataclass
class Img:
    """One image file and what each command should do with it.

    ``valid``: "yes" (read correctly), "no" (an error when read alone, skipped and named in a
    batch), "either" (the issue allows reading it or refusing it clearly, e.g. 120 megapixels).
    ``commands``: subset of r (read_image), d (data loader), l (localize), e (explain).
    ``explicit``: pass the file itself on the command line (else its folder, beside good.png).
    """

    name: str
    make: Callable[[Path, Env], None]
    valid: str
    content: Callable | None = None
    size: tuple[int, int] | None = None
    commands: str = "rdle"
    timeout: float = 60.0
    explicit: bool = False
    requires: Callable | None = None
    html: str | None = None
    note: str = ""


def _bytes(data_fn):
    def make(path: Path, env: Env) -> None:
        path.write_bytes(data_fn())

    return make


def _pil(fn, fmt: str, **kw):
    def make(path: Path, env: Env) -> None:
        path.write_bytes(F.image_bytes(fn(), fmt, **kw))

    return make


def _cached(name: str, w: int, h: int):
    """A huge zero PNG made once per session and hard-linked into the case (no copy of its bytes)."""

    def make(path: Path, env: Env) -> None:
        src = env.assets.cached(name, lambda p: F.write_zero_png(p, w, h))
        os.link(src, path)

    return make


def _dir(path: Path, env: Env) -> None:
    path.mkdir()
    (path / "inside.png").write_bytes(F.good_png(seed=5))


def _fifo(path: Path, env: Env) -> None:
    os.mkfifo(path)


def _broken_link(path: Path, env: Env) -> None:
    os.symlink(path.parent / "no-such-target.png", path)


def _unreadable(path: Path, env: Env) -> None:
    path.write_bytes(F.good_png())
    path.chmod(0)


def _rng_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


BIG = (200, 160)  # large enough that a cut leaves whole scan lines missing

IMAGES: list[Img] = [
    # --- undecodable: an error alone, skipped and named among others
    Img("empty.jpg", _bytes(lambda: b""), "no"),
    Img("text.jpg", _bytes(lambda: b"this is not an image\n"), "no", commands="rdl"),
    Img("html.png", _bytes(lambda: b"<html><body>404 Not Found</body></html>"), "no", commands="rd"),
    Img("random.png", _bytes(lambda: _rng_bytes(3000)), "no", commands="rd"),
    Img("random_sig.png", _bytes(lambda: F.PNG_SIG + _rng_bytes(3000, 1)), "no", commands="rd"),
    Img("trunc_half.jpg", _bytes(lambda: F.jpeg_cut(F.good_jpeg(*BIG), 0.5)), "no", commands="rdl"),
    Img("trunc_eoi.jpg", _bytes(lambda: F.jpeg_cut(F.good_jpeg(*BIG), 0.5, eoi=True)), "no",
        note="issue: JPEG cut short with an end marker appended decodes silently (grey bottom)"),
    Img("trunc_prog_eoi.jpg", _bytes(lambda: F.jpeg_cut(F.good_jpeg(*BIG, progressive=True), 0.4, eoi=True)), "no",
        commands="rd"),
    Img("header_only.jpg", _bytes(F.jpeg_header_only), "no", commands="rd"),
    Img("zeros.jpg", _bytes(lambda: b"\xff\xd8" + bytes(2000)), "no", commands="rd"),
    Img("trunc.png", _bytes(lambda: F.good_png(*BIG)[: len(F.good_png(*BIG)) * 6 // 10]), "no", commands="rdl"),
    Img("crc_idat.png", _bytes(lambda: F.png_bad_idat_crc(F.good_png(*BIG))), "no",
        note="issue: a PNG with a corrupt IDAT CRC segfaults (libpng via torchvision)"),
    Img("crc_ihdr.png", _bytes(lambda: F.png_bad_chunk_crc(F.good_png(*BIG))), "no", commands="rd"),
    Img("bad_zlib.png", _bytes(lambda: F.png_bad_zlib(F.good_png(*BIG))), "no", commands="rd"),
    Img("zero_width.png", _bytes(lambda: F.png_with_size(F.good_png(), 0, 40)), "no", commands="rd"),
    Img("lying_size.png", _bytes(lambda: F.png_with_size(F.good_png(), 5000, 4000)), "no", commands="rdl",
        note="the header claims 5000x4000, the data holds 50x40"),
    Img("bomb.png", _cached("bomb.png", 20000, 20000), "no", timeout=90,
        note="issue: decompression bomb (small file, 400 megapixels) is decoded silently"),
    Img("trunc.gif", _bytes(lambda: F.animated_gif()[:150]), "no", commands="rd"),
    Img("trunc.webp", _bytes(lambda: F.image_bytes(Image.fromarray(F.pattern(*BIG)), "WEBP")[:300]), "no", commands="rd"),
    Img("trunc.bmp", _bytes(lambda: F.image_bytes(Image.fromarray(F.pattern(*BIG)), "BMP")[:2000]), "no", commands="rd"),
    Img("trunc.tif", _bytes(lambda: F.image_bytes(Image.fromarray(F.pattern(*BIG)), "TIFF")[:2000]), "no", commands="rd"),
    Img("garbage.tif", _bytes(lambda: b"II*\x00" + _rng_bytes(500, 2)), "no", commands="rd"),
    Img("dir.jpg", _dir, "no", commands="r", explicit=True, note="a folder named like an image, read as an image"),
    Img("fifo.jpg", _fifo, "no", commands="rl", explicit=True, timeout=30,
        note="a named pipe: opening it for reading blocks forever"),
    Img("broken_link.png", _broken_link, "no", commands="rl", explicit=True),
    Img("unreadable.png", _unreadable, "no", commands="rdl", requires=_not_root,
        note="issue: unreadable files crash"),
    # --- odd but valid: read correctly
    Img("gray.jpg", _pil(lambda: Image.fromarray(F.pattern(48, 40)).convert("L"), "JPEG"), "yes",
        all_of(shape(48, 40), gray), commands="rd"),
    Img("gray16.png", _bytes(F.gray16_png), "yes", all_of(shape(48, 40), gray, full_range), size=(48, 40), commands="rdl"),
    Img("rgb16.png", _bytes(F.rgb16_png), "yes", all_of(shape(48, 40), full_range), commands="rd"),
    Img("float.tif", _bytes(F.float_tiff), "either", all_of(shape(48, 40), nonblack), size=(48, 40),
        note="issue: a 32-bit float TIFF decodes black"),
    Img("float_wide_range.tif", _bytes(lambda: F.float_tiff(low=-1000.0, high=5000.0)), "either",
        all_of(shape(48, 40), nonblack), commands="rd"),
    Img("rgba.png", _bytes(F.rgba_png), "yes", all_of(shape(40, 32), white_where_transparent), size=(40, 32), commands="rdl"),
    Img("la.png", _pil(lambda: Image.fromarray(F.pattern(40, 32)).convert("LA"), "PNG"), "yes", shape(40, 32), commands="rd"),
    Img("palette.png", _bytes(F.palette_png), "yes", all_of(shape(40, 32), nonblack), commands="rd"),
    Img("palette_trns.png", _bytes(lambda: F.palette_png(transparent=True)), "yes", shape(40, 32), commands="rd"),
    Img("onebit.png", _pil(lambda: Image.fromarray(F.pattern(40, 32)).convert("1"), "PNG"), "yes", all_of(shape(40, 32), gray),
        commands="rd"),
    Img("cmyk.jpg", _bytes(F.cmyk_jpeg), "yes", all_of(shape(40, 32), red), commands="rd"),
    Img("exif6.jpg", _bytes(lambda: F.jpeg_with_exif_orientation(Image.fromarray(F.pattern(50, 40)), 6)), "yes",
        shape(40, 50), size=(40, 50), commands="rdl", note="EXIF orientation 6: a 50x40 file is a 40x50 picture"),
    Img("exif_bad.jpg", _bytes(lambda: F.jpeg_with_exif_orientation(Image.fromarray(F.pattern(50, 40)), 9)), "yes",
        shape(50, 40), commands="rd", note="an EXIF orientation outside 1..8 is ignored"),
    Img("progressive.jpg", _bytes(lambda: F.good_jpeg(progressive=True)), "yes", shape(50, 40), commands="rd"),
    Img("wide.png", _bytes(lambda: F.good_png(20000, 20)), "yes", shape(20000, 20), size=(20000, 20),
        note="issue: a 20000x20 image ends in an inverted-box crash"),
    Img("tall.png", _bytes(lambda: F.good_png(20, 20000)), "yes", shape(20, 20000), size=(20, 20000), commands="rdl"),
    Img("tiny.png", _bytes(lambda: F.good_png(1, 1)), "yes", shape(1, 1), size=(1, 1)),
    Img("line.png", _bytes(lambda: F.good_png(2, 1)), "yes", shape(2, 1), size=(2, 1), commands="rdl"),
    Img("anim.gif", _bytes(F.animated_gif), "yes", shape(40, 32), commands="rd"),
    Img("lossless.webp", _pil(lambda: Image.fromarray(F.pattern(40, 32)), "WEBP", lossless=True), "yes", shape(40, 32), commands="rd"),
    Img("plain.bmp", _pil(lambda: Image.fromarray(F.pattern(40, 32)), "BMP"), "yes", shape(40, 32), commands="rd"),
    Img("multi.tif", _bytes(F.multipage_tiff), "yes", shape(40, 32), commands="rd"),
    Img("jpeg_named.png", _bytes(lambda: F.good_jpeg()), "yes", shape(50, 40), commands="rd"),
    Img("png_named.jpg", _bytes(lambda: F.good_png()), "yes", shape(50, 40), commands="rd"),
    Img("UPPER.JPG", _bytes(lambda: F.good_jpeg()), "yes", shape(50, 40), size=(50, 40), commands="rdl"),
    Img("trailing.png", _bytes(lambda: F.png_extra_after_iend(F.good_png())), "yes", shape(50, 40), commands="rd"),
    Img("big120.png", _cached("big120.png", 12000, 10000), "either", shape(12000, 10000), size=(12000, 10000),
        commands="rl", timeout=120, note="issue: a 120-megapixel image crashes"),
    # --- hostile file names: read and written out safely
    Img("new\nline.png", _bytes(F.good_png), "yes", shape(50, 40), commands="dle"),
    Img("<img src=x onerror=alert(1)>.png", _bytes(F.good_png), "yes", shape(50, 40), commands="le",
        html="<img src=x onerror=alert(1)>"),
    Img("-rf.png", _bytes(F.good_png), "yes", shape(50, 40), commands="le", explicit=True),
    Img(os.fsdecode(b"bad\xff\xfename.png"), _bytes(F.good_png), "yes", shape(50, 40), commands="rdle",
        note="issue: file names that are not valid UTF-8 crash"),
    Img('quote"and\'apos.png', _bytes(F.good_png), "yes", shape(50, 40), commands="le"),
    Img("x" * 240 + ".png", _bytes(F.good_png), "yes", shape(50, 40), commands="le"),
    Img("%s%n{0}.png", _bytes(F.good_png), "yes", shape(50, 40), commands="le"),
    Img("...png", _bytes(F.good_png), "yes", shape(50, 40), commands="le"),
    Img("tab\tand\x1b[31mescape.png", _bytes(F.good_png), "yes", shape(50, 40), commands="le"),
    Img("ünïcödé 名前.png", _bytes(F.good_png), "yes", shape(50, 40), commands="le"),
]


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "._-" else "_" for c in name.encode("ascii", "replace").decode())
    return keep[:40]


def _place(img: Img):
    """Builder: ``imgs/`` holding the image (and good.png unless the image is passed alone)."""

    def build(env: Env) -> None:
        env.model()
        folder = env.dir("imgs")
        path = folder / img.name
        img.make(path, env)
        env.info["name"] = img.name
        (folder / "good.png").write_bytes(F.good_png(seed=3))
        env.set(imgs=folder, img=path, good=folder / "good.png")

    return build


def _read(img: Img):
    def call(env: Env):
        from weakloc.data.images import read_image

        return read_image(env["img"])

    return call


def _loader(env: Env):
    """The training / evaluation loader on [good.png, the image]: a batch dict (collate_skip_bad)."""
    import torch
    from torch.utils.data import DataLoader

    from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform

    ds = ImageDataset([Path(env["good"]), Path(env["img"])], torch.tensor([0, 1]), eval_transform(32))
    return next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_skip_bad)))


def _loader_skipped(env: Env, res: Result) -> None:
    b = res.value
    assert b["skipped"] == 1, f"the loader counted {b['skipped']} skipped image(s), expected 1"
    assert b["image"] is not None and b["image"].shape[0] == 1, "the good image did not come through"


def _loader_ok(env: Env, res: Result) -> None:
    b = res.value
    assert b["skipped"] == 0, f"the loader skipped {b['skipped']} image(s) of a valid file"
    assert tuple(b["image"].shape) == (2, 3, 32, 32) and bool(b["image"].isfinite().all()), "bad batch"


def _read_ok(img: Img):
    def check(env: Env, res: Result) -> None:
        t = res.value
        assert str(t.dtype) == "torch.uint8" and t.ndim == 3 and t.shape[0] == 3, f"read_image gave {t.dtype} {tuple(t.shape)}"
        if img.content is not None:
            img.content(t)

    return check


def cases() -> list[Case]:
    out: list[Case] = []
    for img in IMAGES:
        slug = _slug(img.name)
        name_match = ("{name}",) if img.name.isascii() and img.name.isprintable() else (_slug(img.name)[:3],)
        err_ok = {"no": ("error",), "yes": ("ok",), "either": ("ok", "error")}[img.valid]
        use_ok = {"no": ("skip",), "yes": ("ok",), "either": ("ok", "skip")}[img.valid]
        common = {"kind": "image", "build": _place(img), "timeout": img.timeout, "requires": img.requires, "note": img.note}
        if "r" in img.commands:
            out.append(Case(f"image/{slug}/read_image", run=Api(_read(img), "read_image(path)"), expect=err_ok,
                            match=name_match, checks={"ok": _read_ok(img)}, **common))
        if "d" in img.commands:
            out.append(Case(f"image/{slug}/loader", run=Api(_loader, "ImageDataset + collate_skip_bad"), expect=use_ok,
                            checks={"skip": _loader_skipped, "ok": _loader_ok}, **common))
        target = "{img}" if img.explicit else "{imgs}"
        names = [img.name] + ([] if img.explicit else ["good.png"])
        sizes = {img.name: img.size} if img.size else None
        if "l" in img.commands:
            expect = ("error", "skip") if img.explicit and img.valid == "no" else use_ok
            out.append(Case(f"image/{slug}/localize", run=Cli(["localize", "{model}", target, "-o", "{out}"]), expect=expect,
                            match=name_match,
                            checks={"skip": localize_skipped(img.name, [] if img.explicit else ["good.png"]),
                                    "ok": localized(names, sizes, n_images=len(names), escaped_html=img.html)}, **common))
        if "e" in img.commands:
            expect = ("error", "skip") if img.explicit and img.valid == "no" else use_ok
            out.append(Case(f"image/{slug}/explain", run=Cli(["explain", "{model}", target, "-o", "{out}"]), expect=expect,
                            match=name_match,
                            checks={"skip": explain_skipped(img.name, [] if img.explicit else ["good.png"]),
                                    "ok": explained(names, sizes, n_images=len(names), escaped_html=img.html)}, **common))
    # every image of a folder unreadable: nothing to show is an error, or each is reported
    out.append(Case("image/all_unreadable/localize", "image", _all_bad, Cli(["localize", "{model}", "{imgs}", "-o", "{out}"]),
                    expect=("error", "skip"), match=("imgs",),
                    checks={"skip": localize_skipped("a.jpg", [])}))
    # a folder without a single image file
    out.append(Case("image/no_images/localize", "image", _no_images, Cli(["localize", "{model}", "{imgs}", "-o", "{out}"]),
                    expect="error", match=("imgs",)))
    # the tester's segfault through the real entry point: a fresh process, its exit code
    crc = next(i for i in IMAGES if i.name == "crc_idat.png")
    out.append(Case("image/crc_idat.png/localize_process", "image", _place(crc),
                    Proc(["localize", "{model}", "{imgs}", "-o", "{out}"]), expect="skip", timeout=240,
                    checks={"skip": localize_skipped("crc_idat.png", ["good.png"])}, note=crc.note))
    # a folder named like an image, given on the command line: a folder of images like any other
    dir_img = next(i for i in IMAGES if i.name == "dir.jpg")
    out.append(Case("image/folder_named_dir.jpg/localize", "image", _place(dir_img), Cli(["localize", "{model}", "{img}", "-o", "{out}"]),
                    expect="ok", checks={"ok": localized(["inside.png"], n_images=1)}))
    out.append(Case("image/missing_file/explain", "image", _place(IMAGES[0]),
                    Cli(["explain", "{model}", "{imgs}/nope.png", "-o", "{out}"]), expect="error", match=("nope.png",)))
    return out


def _all_bad(env: Env) -> None:
    env.model()
    folder = env.dir("imgs")
    for n in ("a.jpg", "b.png"):
        (folder / n).write_bytes(b"not an image")
    env.set(imgs=folder)


def _no_images(env: Env) -> None:
    env.model()
    folder = env.dir("imgs")
    (folder / "notes.txt").write_text("no images here")
    env.set(imgs=folder)
