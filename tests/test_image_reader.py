"""The image reader refuses (and the loaders skip, count and name) what it cannot decode faithfully,
and reads every odd-but-valid file right (issue 16). All files are made at test time."""

from __future__ import annotations

import io
import os
import re
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from torch.utils.data import DataLoader

from weakloc.data import images as images_module
from weakloc.data.dataset import ImageDataset, SkipLog, SkippedImage, collate_skip_bad, eval_transform
from weakloc.data.images import (DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, display_path, get_max_pixels, jpeg_scan_problem,
                                 list_images, read_image, set_max_pixels, to_uint8)
from weakloc.errors import ImageReadError, OptionError

PNG_SIG = b"\x89PNG\r\n\x1a\n"


# --- building files -------------------------------------------------------------------------------


def _pattern(w: int = 64, h: int = 48, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: a picture JPEG compresses in several scans."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(w + h - 2, 1)], -1)
    noise = np.random.default_rng(seed).integers(0, 30, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _jpeg(w: int = 64, h: int = 48, **kw) -> bytes:
    return _encode(Image.fromarray(_pattern(w, h)), "JPEG", quality=90, **kw)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos:pos + 4])
        out.append((png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def _join(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIG + b"".join(struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks)


def _png_rgb16(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one) of ``(H, W, 3)`` uint16 values."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return _join([(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")])


def _png_bad_idat_crc(png: bytes) -> bytes:
    """One byte in the middle of the first IDAT flipped, its CRC left as it was."""
    pos = png.index(b"IDAT") - 4
    (n,) = struct.unpack(">I", png[pos:pos + 4])
    bad = bytearray(png)
    bad[pos + 8 + n // 2] ^= 0xFF
    return bytes(bad)


def _png_garbage_zlib(png: bytes) -> bytes:
    """IDAT replaced by random bytes with a correct CRC: only the zlib stream is broken."""
    garbage = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    return _join([(k, garbage if k == b"IDAT" else d) for k, d in _chunks(png)])


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


# --- the pixel limit ------------------------------------------------------------------------------


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    # a header of 40000 x 30000 pixels over a few bytes of data: decoding it would take gigabytes
    png = _join([(b"IHDR", struct.pack(">IIBBBBB", 40000, 30000, 8, 2, 0, 0, 0)), (b"IDAT", zlib.compress(b"\0" * 100)),
                 (b"IEND", b"")])
    p = _write(tmp_path, "bomb.png", png)
    monkeypatch.setattr(images_module, "_decode_with_pillow", lambda *a: pytest.fail("decoded"))
    monkeypatch.setattr(images_module, "_plain_png", lambda *a: pytest.fail("decoded"))
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    msg = str(e.value)
    assert "bomb.png" in msg and "40000x30000" in msg and f"{DEFAULT_MAX_PIXELS:,}" in msg
    assert MAX_PIXELS_ENV in msg and "set_max_pixels" in msg


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP"])
def test_pixel_limit_applies_to_every_format(tmp_path, fmt):
    p = _write(tmp_path, f"x.{fmt.lower()}", _encode(Image.fromarray(_pattern(40, 30)), fmt))
    with pytest.raises(ImageReadError, match="1,200 pixels, over the limit of 1,000"):
        read_image(p, max_pixels=1000)
    assert read_image(p, max_pixels=1200).shape == (3, 30, 40)
    assert read_image(p, max_pixels=0).shape == (3, 30, 40)  # 0: no limit


def test_pixel_limit_from_environment_and_setter(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    p = _write(tmp_path, "x.png", _encode(Image.fromarray(_pattern(40, 30)), "PNG"))
    assert get_max_pixels() == DEFAULT_MAX_PIXELS
    monkeypatch.setenv(MAX_PIXELS_ENV, "1_000")
    with pytest.raises(ImageReadError, match="over the limit of 1,000"):
        read_image(p)
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")
    assert get_max_pixels() is None and read_image(p).shape == (3, 30, 40)
    assert set_max_pixels(500) is None and os.environ[MAX_PIXELS_ENV] == "500"  # inherited by loader workers
    with pytest.raises(ImageReadError, match="limit of 500"):
        read_image(p)
    assert set_max_pixels(None) == 500 and get_max_pixels() is None
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(OptionError, match=MAX_PIXELS_ENV):
        read_image(p)
    with pytest.raises(OptionError):
        set_max_pixels(-1)


def test_a_limit_above_pillows_own_lets_pillow_decode(tmp_path, monkeypatch):
    # Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS by itself; weakloc's limit must win
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for fmt in ("GIF", "PNG", "JPEG"):
        p = _write(tmp_path, f"x.{fmt.lower()}", _encode(Image.fromarray(_pattern(40, 30)), fmt))
        assert read_image(p, max_pixels=10_000).shape == (3, 30, 40)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored


# --- PNG ------------------------------------------------------------------------------------------


def _in_forked_child(fn) -> tuple[int, str]:
    """Run ``fn() -> str`` in a forked child (torch already imported: no second start-up); its exit
    code (negative: killed by that signal) and what it returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child
        code = 3
        try:
            os.close(r)
            os.write(w, fn().encode("utf-8", "backslashreplace"))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while block := f.read(65536):
            chunks.append(block)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_corrupt_pngs_raise_instead_of_killing_the_process(tmp_path):
    good = _encode(Image.fromarray(_pattern(64, 48)), "PNG")
    rgb16 = _png_rgb16(np.full((8, 8, 3), 40000, np.uint16))
    files = {"crc.png": _png_bad_idat_crc(good), "zlib.png": _png_garbage_zlib(good),
             "crc16.png": _png_bad_idat_crc(rgb16), "zlib16.png": _png_garbage_zlib(rgb16)}
    for name, data in files.items():
        _write(tmp_path, name, data)

    def read_all() -> str:
        out = []
        for name in sorted(files):
            try:
                read_image(tmp_path / name)
                out.append(f"{name} READ")
            except ImageReadError as e:
                out.append(f"{name} REFUSED {e}")
        return "\n".join(out)

    # torchvision's PNG decoder segfaults on both kinds: a child, so that a crash fails this test only
    code, text = _in_forked_child(read_all)
    assert code == 0, f"the reader died (exit {code})"
    lines = dict(line.split(" ", 1) for line in text.splitlines())
    assert set(lines) == set(files)
    assert all(v.startswith("REFUSED") for v in lines.values()), lines
    assert "CRC of its IDAT chunk" in lines["crc.png"] and "crc.png" in lines["crc.png"]
    assert "corrupt" in lines["zlib.png"]


@pytest.mark.parametrize("edit, reason", [
    (lambda png: png[: len(png) - 30], "truncated PNG"),
    (lambda png: png[: png.index(b"IEND") - 4], "truncated PNG"),
    (lambda png: png[:16] + bytes([png[16] ^ 1]) + png[17:], "CRC of its IHDR chunk"),
])
def test_broken_png_structure_is_named(tmp_path, edit, reason):
    png = _encode(Image.fromarray(_pattern()), "PNG")
    with pytest.raises(ImageReadError, match=reason):
        read_image(_write(tmp_path, "b.png", edit(png)))


def test_data_after_iend_is_ignored(tmp_path):
    png = _encode(Image.fromarray(_pattern()), "PNG")
    assert (_hwc(read_image(_write(tmp_path, "t.png", png + b"trailing junk"))) == _pattern()).all()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "1", "I;16"])
def test_png_pixels_match_pillow_exactly(tmp_path, mode):
    """Whichever decoder reads it (OpenCV for plain RGB/L, Pillow for the rest), a PNG gives Pillow's pixels."""
    img = Image.fromarray(_pattern()).convert(mode) if mode != "I;16" else Image.fromarray(
        (_pattern()[..., 0].astype(np.uint16) * 257))
    data = _encode(img, "PNG")
    out = _hwc(read_image(_write(tmp_path, "x.png", data)))
    if mode in ("RGBA", "LA"):  # opaque here: compositing on white changes nothing
        expected = _pillow_rgb(data)
    elif mode == "I;16":
        expected = np.repeat(_pattern()[..., :1], 3, axis=2)
    else:
        expected = _pillow_rgb(data)
    assert out.shape == expected.shape and (out == expected).all()


# --- JPEG -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"progressive": True}, {"subsampling": 0}, {"optimize": True}])
@pytest.mark.parametrize("frac", [0.3, 0.6, 0.95])
def test_jpeg_cut_short_and_closed_with_an_end_marker_is_refused(tmp_path, kw, frac):
    data = _jpeg(160, 120, **kw)
    sos = data.index(b"\xff\xda")
    cut = sos + int((len(data) - sos) * frac)
    p = _write(tmp_path, "cut.jpg", data[:cut] + b"\xff\xd9")
    with pytest.raises(ImageReadError, match=r"cut\.jpg: cannot decode: truncated or corrupt JPEG"):
        read_image(p)


def test_progressive_jpeg_cut_between_two_scans_is_refused(tmp_path):
    data = _jpeg(160, 120, progressive=True)
    first = data.index(b"\xff\xda")
    boundaries = [m.start() for m in re.finditer(rb"\xff\xda", data) if m.start() > first]
    assert len(boundaries) >= 3
    for b in boundaries:
        closed = data[:b] + b"\xff\xd9"
        assert jpeg_scan_problem(closed) is not None
        with pytest.raises(ImageReadError, match="progressive scans stop"):
            read_image(_write(tmp_path, "p.jpg", closed))
    assert jpeg_scan_problem(data) is None


def test_jpeg_cut_without_end_marker_is_refused(tmp_path):
    data = _jpeg(160, 120)
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(_write(tmp_path, "t.jpg", data[: len(data) // 2]))


def test_libjpeg_warnings_are_collected_not_printed(tmp_path, capfd):
    data = _jpeg(160, 120)
    with pytest.raises(ImageReadError, match="premature end of data segment"):
        read_image(_write(tmp_path, "w.jpg", data[: len(data) * 2 // 3] + b"\xff\xd9"))
    assert "Corrupt JPEG" not in capfd.readouterr().err


def test_valid_jpeg_kinds_read_like_pillow(tmp_path):
    pic = _pattern(64, 48)
    cases = {
        "baseline.jpg": _jpeg(),
        "progressive.jpg": _jpeg(progressive=True),
        "444.jpg": _jpeg(subsampling=0),
        "gray.jpg": _encode(Image.fromarray(pic).convert("L"), "JPEG", quality=90),
        "cmyk.jpg": _encode(Image.fromarray(pic).convert("CMYK"), "JPEG", quality=95),
        # bytes between the end of the scan and the end marker: libjpeg warns, the picture is whole
        "extraneous.jpg": _jpeg()[:-2] + b"\x00\x00\x00\xff\xd9",
    }
    for name, data in cases.items():
        out = _hwc(read_image(_write(tmp_path, name, data))).astype(int)
        diff = np.abs(out - _pillow_rgb(data).astype(int)).mean()
        assert out.shape == (48, 64, 3) and diff < 1.5, (name, diff)


@pytest.mark.parametrize("orientation, shape", [(1, (3, 48, 64)), (6, (3, 64, 48)), (8, (3, 64, 48)), (9, (3, 48, 64))])
def test_jpeg_exif_orientation(tmp_path, orientation, shape):
    img = Image.new("RGB", (64, 48), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 48))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = read_image(_write(tmp_path, "r.jpg", _encode(img, "JPEG", quality=95, exif=exif.tobytes())))
    assert tuple(out.shape) == shape
    red = (out[0].float() > 200) & (out[2].float() < 60)
    if orientation == 6:  # rotated 90 degrees clockwise: the left band is at the top
        assert red[:8].float().mean() > 0.9 and red[-8:].float().mean() < 0.1
    elif orientation == 8:  # counter-clockwise: at the bottom
        assert red[-8:].float().mean() > 0.9 and red[:8].float().mean() < 0.1
    else:  # 1, and 9 (not an orientation) ignored
        assert red[:, :8].float().mean() > 0.9


# --- wide and float values ------------------------------------------------------------------------


def test_float_tiff_in_unit_range_is_scaled_by_255(tmp_path):
    v = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    out = read_image(_write(tmp_path, "f.tif", _encode(Image.fromarray(v, mode="F"), "TIFF")))
    assert (out[0] == out[2]).all() and (out[0].numpy() == np.rint(v * 255).astype(np.uint8)).all()


def test_float_tiff_of_another_range_is_stretched(tmp_path):
    v = np.linspace(-200, 1000, 48 * 64, dtype=np.float32).reshape(48, 64)
    out = read_image(_write(tmp_path, "f.tif", _encode(Image.fromarray(v, mode="F"), "TIFF")))[0].numpy()
    assert out.min() == 0 and out.max() == 255 and (np.diff(out.ravel().astype(int)) >= 0).all()
    assert abs(int(out[24, 32]) - round((v[24, 32] + 200) / 1200 * 255)) <= 1


def test_float_tiff_with_nan_is_refused(tmp_path):
    v = np.ones((8, 8), np.float32)
    v[3, 3] = np.nan
    with pytest.raises(ImageReadError, match="nan.tif: cannot decode: .*NaN"):
        read_image(_write(tmp_path, "nan.tif", _encode(Image.fromarray(v, mode="F"), "TIFF")))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_gray_full_range_and_eight_bit_content(tmp_path, fmt):
    v = np.linspace(0, 65535, 48 * 64).astype(np.uint16).reshape(48, 64)
    out = read_image(_write(tmp_path, f"a.{fmt}", _encode(Image.fromarray(v), fmt)))[0].numpy()
    assert (out == np.rint(v * (255 / 65535)).astype(np.uint8)).all()
    small = (np.arange(48 * 64) % 200).astype(np.uint16).reshape(48, 64)  # 8-bit values in a 16-bit file
    out = read_image(_write(tmp_path, f"b.{fmt}", _encode(Image.fromarray(small), fmt)))[0].numpy()
    assert (out == small).all()


def test_sixteen_bit_colour_png_keeps_its_channels_and_range(tmp_path):
    arr = np.zeros((8, 12, 3), np.uint16)
    arr[..., 0] = 65535
    arr[..., 1] = 32896  # 128 * 257
    arr[..., 2] = np.arange(12) * 5000
    out = _hwc(read_image(_write(tmp_path, "c16.png", _png_rgb16(arr))))
    assert (out[..., 0] == 255).all() and (out[..., 1] == 128).all()
    assert (out[0, :, 2] == np.rint(np.arange(12) * 5000 * 255 / 65535)).all()
    small = np.full((4, 4, 3), 200, np.uint16)  # 8-bit content: kept, not black
    assert (read_image(_write(tmp_path, "s16.png", _png_rgb16(small))) == 200).all()


def test_thirty_two_bit_integer_tiff(tmp_path):
    v = np.linspace(0, 100000, 48 * 64).astype(np.int32).reshape(48, 64)
    out = read_image(_write(tmp_path, "i.tif", _encode(Image.fromarray(v, mode="I"), "TIFF")))[0].numpy()
    assert out.min() == 0 and out.max() == 255 and (np.diff(out.ravel().astype(int)) >= 0).all()
    small = (np.arange(48 * 64) % 256).astype(np.int32).reshape(48, 64)
    assert (read_image(_write(tmp_path, "s.tif", _encode(Image.fromarray(small, mode="I"), "TIFF")))[0].numpy() == small).all()


_SHAPES = st.tuples(st.integers(1, 6), st.integers(1, 6))


@settings(max_examples=60, deadline=None)
@given(st.one_of(arrays(np.uint16, _SHAPES), arrays(np.int32, _SHAPES, elements=st.integers(-10**6, 10**6)),
                 arrays(np.float32, _SHAPES, elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False))))
def test_conversion_keeps_the_order_of_values_and_uses_the_range(values):
    out = to_uint8(values)
    assert out.dtype == np.uint8 and out.shape == values.shape
    flat_in, flat_out = values.ravel().astype(np.float64), out.ravel().astype(int)
    order = np.argsort(flat_in, kind="stable")
    assert (np.diff(flat_out[order]) >= 0).all()  # brighter input is never darker output
    lo, hi = flat_in.min(), flat_in.max()
    if hi > lo and (lo < 0 or hi > (1 if values.dtype.kind == "f" else 65535)):
        assert flat_out.min() == 0 and flat_out.max() == 255  # stretched ranges use all of 0..255


# --- files and names ------------------------------------------------------------------------------


def test_folder_fifo_device_empty_and_lying_suffix(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageReadError, match=r"dir\.jpg: is a folder"):
        read_image(tmp_path / "dir.jpg")
    with pytest.raises(ImageReadError, match="empty.png: file is empty"):
        read_image(_write(tmp_path, "empty.png", b""))
    with pytest.raises(ImageReadError, match=r"text\.jpg: cannot decode: not an image .*says \.jpg"):
        read_image(_write(tmp_path, "text.jpg", b"this is not an image\n"))
    if os.path.exists("/dev/zero"):
        with pytest.raises(ImageReadError, match="not a regular file"):
            read_image("/dev/zero")
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    with pytest.raises(ImageReadError, match="broken symbolic link"):
        read_image(tmp_path / "link.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "SIGALRM"), reason="needs FIFOs and SIGALRM")
def test_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")

    def timeout(*_):
        raise TimeoutError("read_image blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    try:
        with pytest.raises(ImageReadError, match=r"pipe\.jpg: is not a regular file"):
            read_image(tmp_path / "pipe.jpg")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_suffix_that_lies_about_a_valid_image(tmp_path):
    png = _encode(Image.fromarray(_pattern()), "PNG")
    assert (_hwc(read_image(_write(tmp_path, "really_png.jpg", png))) == _pattern()).all()


def test_permission_denied_is_an_error(tmp_path, monkeypatch):
    p = _write(tmp_path, "locked.png", _encode(Image.fromarray(_pattern()), "PNG"))
    real_open = os.open

    def deny(path, *a, **kw):  # tests run as root, whom file modes do not stop
        if os.fspath(path) == str(p):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ImageReadError, match=r"locked\.png: permission denied"):
        read_image(p)


def test_read_error_of_an_open_file_is_an_error(tmp_path, monkeypatch):
    p = _write(tmp_path, "eio.png", _encode(Image.fromarray(_pattern()), "PNG"))

    class Failing(io.BufferedReader):
        def read(self, *a):
            raise OSError(5, "Input/output error")

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **kw: Failing(real_fdopen(fd, "rb", buffering=0)))
    with pytest.raises(ImageReadError, match=r"eio\.png: cannot read the file: Input/output error"):
        read_image(p)


def test_names_that_are_not_utf8(tmp_path):
    root = os.fsencode(tmp_path)
    good = os.path.join(root, b"\xff\xfe.png")
    bad = os.path.join(root, b"bad\xe9.jpg")
    with open(good, "wb") as f:
        f.write(_encode(Image.fromarray(_pattern()), "PNG"))
    with open(bad, "wb") as f:
        f.write(b"not an image")
    assert read_image(good).shape == (3, 48, 64)  # bytes
    assert read_image(os.fsdecode(good)).shape == (3, 48, 64)  # str with surrogate escapes
    with pytest.raises(ImageReadError) as e:
        read_image(bad)
    msg = str(e.value)
    assert msg.startswith(display_path(tmp_path)) and "bad\\xe9.jpg" in msg
    msg.encode("utf-8")  # printable on any UTF-8 output: no lone surrogate left
    found = list_images(tmp_path)
    assert [p.name for p in found] == sorted([os.fsdecode(b"\xff\xfe.png"), os.fsdecode(b"bad\xe9.jpg")])
    assert list_images(root) == found


def test_display_path_escapes_what_would_break_a_line():
    assert display_path("plain/ünïcödé 名前.png") == "plain/ünïcödé 名前.png"
    assert display_path("a\nb\tc\x1b[31m.png") == "a\\x0ab\\x09c\\x1b[31m.png"
    assert display_path("evil\u202egnp.jpg") == "evil\\u202egnp.jpg"
    assert display_path(b"\xff\xfe.png") == "\\xff\\xfe.png"
    assert display_path(Path(os.fsdecode(b"x\x80y"))) == "x\\x80y"
    for text in ("\udcff", "\ud800", "\x00", "\u2028"):
        display_path(text).encode("ascii")


def test_list_images_names_special_sources(tmp_path):
    from weakloc.errors import WeaklocError

    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(WeaklocError, match="link: a broken symbolic link"):
        list_images(tmp_path / "link")
    with pytest.raises(WeaklocError, match="nope: no such image file or folder"):
        list_images(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").mkdir()  # a folder named like an image is not listed
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "d" / "p.png")  # nor a pipe
    with pytest.raises(WeaklocError, match="no image files found"):
        list_images(tmp_path / "d")


def test_image_size_reads_the_header_only(tmp_path, monkeypatch):
    from weakloc.data.images import image_size

    exif = Image.Exif()
    exif[0x0112] = 6
    assert image_size(_write(tmp_path, "r.jpg", _encode(Image.fromarray(_pattern(64, 48)), "JPEG", exif=exif.tobytes()))) == (48, 64)
    noisy = np.random.default_rng(0).integers(0, 256, (700, 600, 3), dtype=np.uint8)  # over 1 MiB as PNG
    big = _write(tmp_path, "big.png", _encode(Image.fromarray(noisy), "PNG"))
    assert big.stat().st_size > 1 << 20 and image_size(big) == (600, 700)
    monkeypatch.setenv(MAX_PIXELS_ENV, "10")  # no pixel limit on a header
    assert image_size(big) == (600, 700)
    with pytest.raises(ImageReadError, match="not a regular file"):
        image_size("/dev/zero")


def test_animated_gif_reads_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 10), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = read_image(_write(tmp_path, "a.gif", buf.getvalue()))
    assert out.shape == (3, 10, 20) and out[0].float().mean() > 200 and out[2].float().mean() < 50


# --- the loaders' skip list -----------------------------------------------------------------------


def _mixed_folder(tmp_path: Path) -> list[Path]:
    good = _write(tmp_path, "good.png", _encode(Image.fromarray(_pattern(16, 16)), "PNG"))
    cut = _write(tmp_path, "cut.jpg", _jpeg(64, 48)[:400] + b"\xff\xd9")
    odd = tmp_path / os.fsdecode(b"odd\xff\nname.png")
    odd.write_bytes(b"garbage")
    return [good, cut, good, odd]


def test_collate_lists_skipped_images_with_path_and_reason(tmp_path):
    paths = _mixed_folder(tmp_path)
    ds = ImageDataset(paths, torch.tensor([0, 1, 0, 1]), eval_transform(16))
    batch = collate_skip_bad([ds[i] for i in range(4)])
    assert batch["skipped"] == 2 and batch["index"].tolist() == [0, 2]
    skipped = batch["skipped_images"]
    assert [s.index for s in skipped] == [1, 3] and [s.path for s in skipped] == [paths[1], paths[3]]
    assert "truncated or corrupt JPEG" in skipped[0].reason and "cut.jpg" not in skipped[0].reason
    assert skipped[0].message.startswith(str(paths[1]) + ": cannot decode: truncated")
    empty = collate_skip_bad([ds[1]])
    assert empty["image"] is None and empty["skipped"] == 1 and len(empty["skipped_images"]) == 1


def test_skip_log_counts_each_file_once_across_workers_and_epochs(tmp_path):
    paths = _mixed_folder(tmp_path)
    ds = ImageDataset(paths, torch.tensor([0, 1, 0, 1]), eval_transform(16))
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
    log = SkipLog()
    for _epoch in range(2):
        for batch in log.track(loader):
            assert batch["image"] is not None
    assert len(log) == 2 and log.events == 4
    assert [s.path for s in log] == [paths[1], paths[3]]
    out = log.write(tmp_path / "skipped.txt")
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2  # the newline in the name is escaped: one line per file
    assert lines[0].startswith(f"{paths[1]}\tcannot decode: truncated or corrupt JPEG")
    assert lines[1].startswith(display_path(paths[3]) + "\t") and "\\xff\\x0aname.png" in lines[1]
    assert log.summary(tmp_path / "skipped.txt") == f"2 image(s) could not be decoded and were skipped, listed in {tmp_path / 'skipped.txt'}"
    assert log.records()[1]["file"] == display_path(paths[3])
    merged = SkipLog([SkippedImage(0, paths[1], "again")])
    merged.update(log)
    assert len(merged) == 2 and merged.events == 5 and next(iter(merged)).reason == "again"
