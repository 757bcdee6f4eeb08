"""Reading images of any common kind into ``uint8`` RGB tensors, refusing what cannot be read faithfully.

:func:`read_image` is the one reader. Every file passes the same gates, in this order:

1. **The file.** It must be a regular file that can be opened and read. It is opened without
   blocking and checked with ``fstat`` on the open descriptor, so a FIFO named ``x.jpg`` is refused
   instead of hanging the reader, and a folder, device or unreadable file gives an error naming it.
2. **The header.** Pillow's ``Image.open`` reads the header only and names the format from the
   content (a file whose suffix lies is read by what it holds). Only the formats weakloc reads are
   tried (JPEG, PNG, GIF, BMP, WebP, TIFF, PNM), so a file is never handed to an exotic plugin
   (EPS, for one, runs Ghostscript). An image of more pixels than :func:`get_max_pixels` is refused
   here, before anything is decoded (a decompression bomb is a small file with a huge header size).
3. **JPEG** is decoded by torchvision (libjpeg-turbo, the fast path). libjpeg does not fail on
   missing or damaged scan data: it warns, fills the rest with grey and returns an image. Its
   warnings are collected (they go to the process's standard error) and those that mean lost
   pixels are an error; a structural check also refuses a file whose scans stop before every
   component (and, when progressive, every coefficient) is complete: a file cut between two scans
   and closed with an end marker, which libjpeg decodes without a warning.
4. **PNG** is never decoded by torchvision: its libpng error handling kills the process (SIGSEGV)
   on a corrupt PNG instead of raising. Every chunk's CRC is checked first, so a flipped byte is
   refused rather than decoded into wrong pixels. Plain 8-bit RGB and grayscale PNGs are then
   decoded by OpenCV (its libpng raises on errors; as fast as torchvision), 16-bit colour PNGs too
   (Pillow would keep only the high byte of each value), and every other PNG (palette,
   transparency, EXIF, animation, 16-bit gray) by Pillow, which also explains what OpenCV refuses.
5. **Everything else** (TIFF, BMP, GIF, WebP, PNM) by Pillow; the first frame of an animation or
   multi-page file.

Conversion to 8-bit RGB:

- 8-bit images as stored: palette expanded, grayscale repeated on the three channels, CMYK through
  Pillow's (Adobe) conversion, transparency composited on white, EXIF orientation applied.
- Integer images wider than 8 bits, one rule per image: values all within 0..255 are 8-bit data
  in a wide container and kept as they are (scaling them by the container's range would give a
  black image); other 16-bit data (PNG, TIFF, PNM) is scaled by 255/65535, the full range of the
  type, so images of one camera keep their relative brightness; anything else (32-bit integer
  data, negative values) is stretched from its minimum to its maximum (a constant image clipped
  to 0..255). An alpha channel is always a fraction of its type's full range.
- Floating-point images (32-bit float TIFF, Pillow mode ``F``): values all within 0..1 are scaled
  by 255; any other range is stretched from its minimum to its maximum (an image of one constant
  value outside 0..1 is clipped to 0..255); NaN or infinite values are refused.
- 16-bit colour TIFFs are reduced to 8 bits by Pillow itself (each value's high byte: the
  full-range rule).

Either way the result is ``(3, H, W) uint8`` in RGB, or an :class:`ImageReadError` naming the file
(by :func:`~weakloc.text.display_path`, safe to print whatever bytes the name holds).
"""

from __future__ import annotations

import io
import os
import re
import stat
import sys
import tempfile
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from weakloc.errors import ImageReadError, OptionError, WeaklocError
from weakloc.text import display_path  # re-exported: data's callers name files with it

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: Pillow formats :func:`read_image` decodes (by content, whatever the suffix). Pillow's JPEG
#: opener also gives MPO (a camera JPEG holding more than one picture; the first is read).
READ_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")

#: Default pixel limit: Pillow's own decompression-bomb threshold (1 GiB / 4 / 3 pixels, 256 MiB as
#: 8-bit RGB). An image this size already needs a few GiB on its way through the reader and the
#: float transforms of training and ``localize`` (larger ones have run out of memory: see
#: docs/benchmarks.md, "Memory"), while camera photos stay well below it. Using Pillow's value
#: also means Pillow's own check never fires first with a different message.
DEFAULT_MAX_PIXELS = 89_478_485
MAX_PIXELS_ENV = "WEAKLOC_MAX_PIXELS"

_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})  # Pillow modes of more than 8 bits
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- names and errors -----------------------------------------------------------------------------


def _as_path(path: str | bytes | os.PathLike) -> Path:
    return Path(os.fsdecode(os.fspath(path)))


def _error(path: Path, reason: str) -> ImageReadError:
    """An :class:`ImageReadError` ``"<file>: <reason>"``; ``.path`` and ``.reason`` hold the parts."""
    e = ImageReadError(f"{display_path(path)}: {reason}")
    e.path, e.reason = path, reason
    return e


# --- the pixel limit ------------------------------------------------------------------------------


def _parse_limit(value, source: str) -> int | None:
    """A pixel limit from an int or text: a positive whole number, or 0 / None for no limit."""
    if value is None:
        return None
    n = value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            n = int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                f = float("nan")
            if not f.is_integer():
                raise OptionError(f"{source}={value!r}: expected a whole number of pixels (0 = no limit)") from None
            n = int(f)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise OptionError(f"{source}={value!r}: expected a whole number of pixels >= 0 (0 = no limit)")
    return int(n) or None


def get_max_pixels() -> int | None:
    """The pixel limit :func:`read_image` applies: ``WEAKLOC_MAX_PIXELS`` when set (0 = no limit),
    else :data:`DEFAULT_MAX_PIXELS`. None means no limit."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_PIXELS
    return _parse_limit(raw, MAX_PIXELS_ENV)


def set_max_pixels(n: int | None) -> int | None:
    """Set the pixel limit of :func:`read_image` (0 or None: no limit); returns the previous one.

    Stored in the ``WEAKLOC_MAX_PIXELS`` environment variable, so that data-loader worker
    processes (forked or spawned) apply the same limit.
    """
    previous = get_max_pixels()
    os.environ[MAX_PIXELS_ENV] = str(_parse_limit(n, "max_pixels") or 0)
    return previous


_PILLOW_LOCK = threading.Lock()


@contextmanager
def _pillow_bomb_limit(limit: int | None) -> Iterator[None]:
    """Pillow's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``, checked as it opens and
    seeks) set to ``limit`` while the block runs, and its warning silenced: weakloc's limit, checked
    from the header, takes its place. The global is changed only when it differs, under a lock."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if Image.MAX_IMAGE_PIXELS == limit:
            yield
            return
        with _PILLOW_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(path: Path, size: tuple[int, int], limit: int | None) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise _error(path, f"cannot decode: image has zero size ({w}x{h})")
    if limit is not None and w * h > limit:
        raise _error(path, f"image is {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} pixels; to read it, raise "
                           f"the limit: environment variable {MAX_PIXELS_ENV}={w * h} (0 = no limit) or "
                           f"weakloc.data.images.set_max_pixels({w * h})")


# --- the file -------------------------------------------------------------------------------------


def _read_file(path: Path, head: int | None = None) -> bytes:
    """The bytes of a regular file (the first ``head`` only, if given); a clear error for anything
    else (never blocks on a FIFO)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _error(path, "broken symbolic link (its target does not exist)" if os.path.islink(path)
                     else "file not found") from None
    except PermissionError:
        raise _error(path, "permission denied: the file cannot be read"
                     + (" (it is a folder)" if os.path.isdir(path) else "")) from None
    except IsADirectoryError:
        raise _error(path, "is a folder, not an image file") from None
    except (UnicodeError, ValueError):  # a lone surrogate the file system cannot encode, or a NUL
        raise _error(path, "the file name cannot be passed to the file system") from None
    except OSError as e:
        raise _error(path, f"cannot open the file: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode  # of what was opened: no race with a file swapped after a check
        if stat.S_ISDIR(mode):
            raise _error(path, "is a folder, not an image file")
        if not stat.S_ISREG(mode):
            raise _error(path, "is not a regular file (a pipe, socket or device)")
        with os.fdopen(fd, "rb") as f:
            fd = None
            data = f.read(head) if head else f.read()
    except MemoryError:
        raise _error(path, "file is too large to read into memory") from None
    except OSError as e:
        raise _error(path, f"cannot read the file: {e.strerror or e}") from None
    finally:
        if fd is not None:
            os.close(fd)
    if not data:
        raise _error(path, "file is empty")
    return data


def _open_header(data: bytes, path: Path) -> Image.Image:
    """Pillow's image object for ``data`` with only the header read (nothing decoded)."""
    try:
        with _pillow_bomb_limit(None):  # the header is checked against weakloc's limit instead
            return Image.open(io.BytesIO(data), formats=READ_FORMATS)
    except UnidentifiedImageError:
        # Pillow's openers refuse a damaged header as "not mine": name the damage where the signature is known
        if data.startswith(_PNG_SIGNATURE):
            raise _error(path, f"cannot decode: {png_chunk_problem(data) or 'corrupt PNG (its header cannot be read)'}") from None
        if data.startswith(b"\xff\xd8\xff"):
            raise _error(path, "cannot decode: truncated or corrupt JPEG (its header cannot be read)") from None
        said = f" (the name says {path.suffix})" if is_image_file(path) else ""
        raise _error(path, f"cannot decode: not an image of a supported kind{said}") from None
    except Exception as e:  # noqa: BLE001 -- Pillow's plugins raise many kinds on malformed headers
        kind = "truncated or corrupt JPEG, " if data.startswith(b"\xff\xd8\xff") else ""
        raise _error(path, f"cannot decode: {kind}unreadable image header ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return re.sub(r"^.*?\.(?:cpp|c|h):\d+,\s*", "", text)  # torchvision's "decode_jpeg, /path/x.cpp:171, " prefix


# --- JPEG -----------------------------------------------------------------------------------------

# a marker: 0xFF then a code that is not 0x00 (a stuffed 0xFF in scan data), 0xFF (fill) or RSTn
_JPEG_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_ALL_COEFFICIENTS = (1 << 64) - 1
# libjpeg warnings that mean pixels were lost or guessed; others ("extraneous bytes before
# marker", "bad ICC marker", an unknown JFIF revision) leave the picture whole
_LIBJPEG_DAMAGE = re.compile(r"premature end|bad huffman code|bad arithmetic code|instead of rst|"
                             r"inconsistent progression|corrupt jpeg data: (?!\d+ extraneous)(?!bad icc)", re.I)


def jpeg_scan_problem(data: bytes) -> str | None:
    """Why the scans of a JPEG stop before the picture is complete, or None.

    Walks the markers up to the end marker: every component of the frame must be carried by some
    scan and, in a progressive file, every one of its 64 coefficients must be finished by a scan
    (successive-approximation bit 0). A file cut between two scans and closed with an end marker
    fails this; libjpeg decodes it without a warning. Malformed structure is left to the decoder.
    """
    components: list[int] | None = None
    done: dict[int, int] = {}
    progressive = False
    pos = 2
    try:
        while True:
            m = _JPEG_MARKER.search(data, pos)
            if m is None:
                return None  # no end marker: the decoder reports the truncation
            i, code = m.start(), data[m.start() + 1]
            if code == 0xD9:
                break
            if code == 0xD8:
                pos = i + 2
                continue
            length = int.from_bytes(data[i + 2:i + 4], "big")
            seg = data[i + 4:i + 2 + length]
            pos = i + 2 + length
            if code in _JPEG_SOF and components is None:
                progressive = code in _JPEG_PROGRESSIVE
                components = [seg[6 + 3 * k] for k in range(seg[5])]
                done = dict.fromkeys(components, 0)
            elif code == 0xDA and components is not None:
                ns = seg[0]
                ids = [seg[1 + 2 * k] for k in range(ns)]
                ss, se, al = (seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns] & 15) if progressive else (0, 63, 0)
                if al == 0 and ss <= se <= 63:
                    bits = ((1 << (se + 1)) - 1) ^ ((1 << ss) - 1)
                    for c in ids:
                        if c in done:
                            done[c] |= bits
    except IndexError:
        return None
    if not components:
        return None
    if not progressive and any(v == 0 for v in done.values()):
        return "truncated or corrupt JPEG: no scan carries some of its components (the file was cut short and closed)"
    if any(v != _ALL_COEFFICIENTS for v in done.values()):
        return "truncated or corrupt JPEG: its progressive scans stop before the picture is complete (the file was cut short and closed)"
    return None


_SINK: tuple[int, int] | None = None  # (pid, descriptor of a temporary file) native stderr goes to while captured
_SINK_LOCK = threading.Lock()


_LIBJPEG_LINE = re.compile(r"jpeg|jfif|adobe|progression", re.I)
_LIBPNG_LINE = re.compile(r"libpng", re.I)


@contextmanager
def _native_stderr(messages: list[str], own: re.Pattern) -> Iterator[None]:
    """Collect what native code writes to file descriptor 2 while the block runs (libjpeg's
    warnings, libpng's errors): lines matching ``own`` are appended to ``messages``, any others are
    written back to the real standard error afterwards. Where fd 2 cannot be redirected, the block
    runs as it is. The lock serialises such blocks across threads: fd 2 is one per process."""
    global _SINK
    with _SINK_LOCK:
        try:
            if _SINK is None or _SINK[0] != os.getpid():  # one file per process: a forked worker must not share its offset
                with tempfile.TemporaryFile() as f:  # kept open by the duplicate descriptor alone
                    _SINK = (os.getpid(), os.dup(f.fileno()))
            sink = _SINK[1]
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved is None:
            yield
            return
        os.dup2(sink, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            size = os.lseek(sink, 0, os.SEEK_CUR)
            os.lseek(sink, 0, os.SEEK_SET)
            text = os.read(sink, size).decode("utf-8", "replace") if size else ""
            os.ftruncate(sink, 0)
            other = []
            for line in text.splitlines():
                (messages if own.search(line) else other).append(line)
            if other:
                os.write(2, ("\n".join(other) + "\n").encode())


def _decode_jpeg(data: bytes, path: Path) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB by torchvision, EXIF orientation applied; damaged data refused."""
    problem = jpeg_scan_problem(data)
    if problem:
        raise _error(path, f"cannot decode: {problem}")
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    messages: list[str] = []
    try:
        with _native_stderr(messages, _LIBJPEG_LINE), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # RGB: libjpeg expands grayscale; CMYK goes through Pillow's (Adobe) formula, as Pillow would
            out = decode_image(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception as e:  # noqa: BLE001 -- torchvision raises RuntimeError (and others) on bad data
        raise _error(path, f"cannot decode: truncated or corrupt JPEG ({_reason(e)})") from None
    messages += [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    damage = [m for m in messages if _LIBJPEG_DAMAGE.search(m)]
    if damage:
        raise _error(path, f"cannot decode: truncated or corrupt JPEG (libjpeg: {' '.join(damage[0].split())})")
    return out.contiguous()  # torchvision's is a channels-last view


# --- PNG ------------------------------------------------------------------------------------------


def png_chunk_problem(data: bytes) -> str | None:
    """Why a PNG's chunk structure is broken, or None: each chunk whole and its CRC right, up to
    IEND (data after IEND is ignored, as decoders do)."""
    if not data.startswith(_PNG_SIGNATURE):
        return "not a PNG file (bad signature)"
    view = memoryview(data)
    pos, n = len(_PNG_SIGNATURE), len(data)
    while True:
        if pos + 12 > n:
            return "truncated PNG (it ends before its IEND chunk)"
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = bytes(data[pos + 4:pos + 8])
        if not kind.isalpha():  # chunk types are four ASCII letters
            return f"corrupt PNG (no chunk starts at byte {pos}, where one should)"
        name = kind.decode("ascii")
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > n:
            return f"truncated PNG (its {name} chunk is cut short)"
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return f"corrupt PNG (the CRC of its {name} chunk does not match its data)"
        if kind == b"IEND":
            return None
        pos = end


def _opencv_png(data: bytes) -> np.ndarray | None:
    """``(H, W)`` or ``(H, W, C)`` array of a PNG as OpenCV decodes it unchanged (BGR order, 8 or 16
    bits), or None when it fails (OpenCV catches libpng's errors; Pillow then says why)."""
    import cv2

    try:
        with _native_stderr([], _LIBPNG_LINE):  # "libpng error: ..." (Pillow gives the reason)
            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None


def _plain_png(data: bytes, im: Image.Image) -> torch.Tensor | None:
    """``(3, H, W)`` uint8 of a plain 8-bit RGB or grayscale PNG (no transparency, EXIF or
    animation: nothing Pillow would have to handle) by OpenCV, which decodes it as fast as
    torchvision did; None for any other PNG or when OpenCV fails."""
    rawmode = im.tile[0].args if len(im.tile) == 1 else None
    if rawmode not in ("RGB", "L") or "transparency" in im.info or any("exif" in str(k).lower() for k in im.info):
        return None
    if getattr(im, "is_animated", False):
        return None
    arr = _opencv_png(data)
    if arr is None or arr.dtype != np.uint8 or arr.shape[:2] != (im.height, im.width):
        return None
    if arr.ndim == 2:
        return torch.from_numpy(arr)[None].expand(3, -1, -1).contiguous()
    if arr.ndim == 3 and arr.shape[2] == 3:
        return torch.from_numpy(np.ascontiguousarray(arr[..., ::-1].transpose(2, 0, 1)))
    return None


def _png16_colour(data: bytes) -> np.ndarray | None:
    """``(H, W, 3|4)`` uint16 RGB(A) of a 16-bit colour PNG by OpenCV, or None when it fails."""
    arr = _opencv_png(data)
    if arr is None or arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint16:
        return None
    return arr[..., [2, 1, 0, 3][: arr.shape[2]]]


# --- conversion -----------------------------------------------------------------------------------


def to_uint8(values: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Pixel values of any integer or float type as uint8, by the module's rule (same shape).

    Integers: within 0..255 kept; data of ``bits`` <= 16 (default: the array type's width) within
    0..2**bits-1 scaled by 255/(2**bits-1); anything else (32-bit data, negative values) min-max
    stretched. Floats: within 0..1 scaled by 255, else min-max stretched. A constant image that
    cannot be stretched is clipped to 0..255.

    Raises:
        ValueError: float values that are NaN or infinite.
    """
    if values.dtype == np.uint8:
        return values
    if values.size == 0:
        return values.astype(np.uint8)
    if values.dtype.kind == "f":
        v = values.astype(np.float32, copy=False)
        if not np.isfinite(v).all():
            raise ValueError("the image holds NaN or infinite values (no 8-bit conversion is faithful)")
        lo, hi = float(v.min()), float(v.max())
        if lo >= 0.0 and hi <= 1.0:
            out = v * np.float32(255)
        elif hi > lo:
            out = (v - np.float32(lo)) * np.float32(255 / (hi - lo))
        else:
            out = np.clip(v, 0, 255)
    elif values.dtype.kind in "ui":
        lo, hi = int(values.min()), int(values.max())
        top = (1 << (bits or values.dtype.itemsize * 8)) - 1
        if lo >= 0 and hi <= 255:
            return values.astype(np.uint8)
        if top <= 65535 and lo >= 0 and hi <= top:
            out = values.astype(np.float32) * np.float32(255 / top)
        elif hi > lo:
            out = (values.astype(np.float64) - lo) * (255 / (hi - lo))
        else:
            out = np.clip(values, 0, 255)
    else:
        raise ValueError(f"unsupported pixel type {values.dtype}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _wide_to_image(values: np.ndarray, bits: int | None, info: dict) -> Image.Image:
    """A Pillow L / RGB / RGBA image of wide-typed pixel values (alpha converted on its own),
    carrying ``info`` (for the EXIF orientation)."""
    if values.ndim == 3 and values.shape[2] == 4:
        # opacity is always a fraction of the type's full range (0..255 in a 16-bit alpha is nearly transparent)
        top = (1 << (bits or values.dtype.itemsize * 8)) - 1
        alpha = np.rint(values[..., 3:].astype(np.float32) * np.float32(255 / top)).astype(np.uint8)
        arr = np.concatenate([to_uint8(values[..., :3], bits), alpha], axis=2)
    else:
        arr = to_uint8(values, bits)
    img = Image.fromarray(np.ascontiguousarray(arr))
    img.info.update(info)
    return img


def _decode_with_pillow(im: Image.Image, data: bytes, path: Path) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB of an opened (header-only) Pillow image: decode, orient, convert."""
    rawmode = im.tile[0].args if im.tile else None
    rawmode = rawmode[0] if isinstance(rawmode, tuple) and rawmode else rawmode  # libtiff's args are a tuple
    # bits per value as stored: Pillow gives 16-bit PNM and (older Pillow) 16-bit PNG as 32-bit mode I
    bits = 16 if isinstance(rawmode, str) and ";16" in rawmode else None
    wide = _png16_colour(data) if im.format == "PNG" and rawmode in ("RGB;16B", "RGBA;16B") else None
    if wide is None:  # (when OpenCV fails on a 16-bit PNG, Pillow says why, or reads its high bytes)
        im.load()  # raises on truncated or corrupt data
        if im.mode in _WIDE_MODES:
            wide = np.asarray(im)
    if wide is not None:
        try:
            im = _wide_to_image(wide, bits, im.info)
        except ValueError as e:
            raise _error(path, f"cannot decode: {e}") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 -- an unreadable EXIF block: read unrotated, as torchvision does
        pass
    if im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        im = im.convert("RGB")
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)))


# --- the reader -----------------------------------------------------------------------------------


def read_image(path: str | bytes | os.PathLike, *, max_pixels: int | None = None) -> torch.Tensor:
    """Read an image file as RGB, or refuse it with one line naming the file and the reason.

    Handles grayscale, RGBA/LA (composited on white), palette, 16-bit and float, CMYK and
    EXIF-rotated files (see the module docstring for the conversion rule).

    Args:
        path: the file (``bytes`` names are decoded as the file system does).
        max_pixels: refuse images of more pixels than this, from the header, before decoding;
            None: :func:`get_max_pixels` (``WEAKLOC_MAX_PIXELS``, default
            :data:`DEFAULT_MAX_PIXELS`); 0: no limit.

    Returns:
        ``(3, H, W)`` uint8 tensor.

    Raises:
        ImageReadError: the file is missing, unreadable, not a regular file, empty, truncated,
            corrupt, too large, or not an image of a supported kind. ``.path`` and ``.reason``
            hold the file and the reason.
    """
    path = _as_path(path)
    limit = get_max_pixels() if max_pixels is None else _parse_limit(max_pixels, "max_pixels")
    data = _read_file(path)
    im = _open_header(data, path)
    try:
        _check_pixels(path, im.size, limit)
        # a limit above Pillow's own would let Pillow refuse (or warn about) an accepted image as it decodes
        pil_limit = Image.MAX_IMAGE_PIXELS
        above_pillow = pil_limit is not None and (limit is None or limit > pil_limit)
        with _pillow_bomb_limit(limit) if above_pillow else nullcontext():
            if im.format in ("JPEG", "MPO"):
                out = _decode_jpeg(data, path)
            else:
                problem = png_chunk_problem(data) if im.format == "PNG" else None
                if problem:
                    raise _error(path, f"cannot decode: {problem}")
                out = _plain_png(data, im) if im.format == "PNG" else None
                try:
                    if out is None:
                        out = _decode_with_pillow(im, data, path)
                except ImageReadError:
                    raise
                except Exception as e:  # noqa: BLE001 -- Pillow's plugins raise many kinds on bad data
                    raise _error(path, f"cannot decode: {_describe_pillow_error(e)}") from None
    finally:
        im.close()
    if out.ndim != 3 or out.shape[0] != 3 or out.shape[1] == 0 or out.shape[2] == 0:
        raise _error(path, f"cannot decode: image has zero size or an unexpected layout {tuple(out.shape)}")
    return out


def read_jpeg_data(path: str | bytes | os.PathLike, *, max_pixels: int | None = None) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """A JPEG file's bytes, checked as :func:`read_image` checks them before decoding (readable,
    header, pixel limit, no damaged scan), for decoding elsewhere (on a GPU with nvJPEG:
    :func:`decode_jpeg_batch`); None when the file is not a JPEG (read it with :func:`read_image`).

    Returns:
        the bytes as a ``(N,)`` uint8 tensor, and the image's ``(H, W)`` after its EXIF rotation.

    Raises:
        ImageReadError: as :func:`read_image` would, for the reasons it finds before decoding.
    """
    path = _as_path(path)
    limit = get_max_pixels() if max_pixels is None else _parse_limit(max_pixels, "max_pixels")
    data = _read_file(path)
    with _open_header(data, path) as im:
        if im.format not in ("JPEG", "MPO"):
            return None
        _check_pixels(path, im.size, limit)
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 -- an unreadable EXIF block means no rotation (as read_image)
            orientation = 1
    problem = jpeg_scan_problem(data)
    if problem:
        raise _error(path, f"cannot decode: {problem}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), ((w, h) if orientation in (5, 6, 7, 8) else (h, w))


def decode_jpeg_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
    """Decode JPEG bytes (:func:`read_jpeg_data`) on ``device`` in one call (nvJPEG on a GPU, libjpeg
    on the CPU), RGB with the EXIF rotation applied: each a ``(3, H, W)`` uint8 tensor on ``device``,
    or the reason it could not be decoded (the batch is then decoded one file at a time)."""
    from torchvision.io import decode_jpeg

    def one(d):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's notice of TorchCodec, once per call
            return decode_jpeg(d, mode=ImageReadMode.RGB, apply_exif_orientation=True, device=device)

    try:
        return [t.contiguous() for t in one([d.to(device, non_blocking=True) for d in data])] if data else []
    except Exception:  # noqa: BLE001 -- one bad file fails the whole call: find which
        out: list[torch.Tensor | str] = []
        for d in data:
            try:
                out.append(one(d.to(device)).contiguous())
            except Exception as e:  # noqa: BLE001 -- the decoders raise RuntimeError (and others) on bad data
                out.append(f"cannot decode: truncated or corrupt JPEG ({_reason(e)})")
        return out


def _describe_pillow_error(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "not enough memory to decode it"
    reason = _reason(e)
    if "truncated" in reason.lower():
        return f"truncated image ({reason})"
    if isinstance(e, (SyntaxError, OSError, EOFError)) or "broken" in reason.lower():
        return f"corrupt image data ({reason})"
    return reason


def image_size(path: str | bytes | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image after EXIF rotation, read from the header only (no pixel limit)."""
    path = _as_path(path)
    head = 1 << 20  # headers (with EXIF, ICC profiles) fit; the pixel data need not be read
    data = _read_file(path, head)
    try:
        im = _open_header(data, path)
    except ImageReadError:
        if len(data) < head:
            raise
        im = _open_header(_read_file(path), path)
    with im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 -- an unreadable EXIF block means no rotation (as read_image)
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def is_image_file(path: str | bytes | os.PathLike) -> bool:
    """True when the file name ends in a suffix weakloc reads as an image."""
    return _as_path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(sources: list[str | bytes | os.PathLike] | str | bytes | os.PathLike) -> list[Path]:
    """Image files from files, folders and file lists (folders searched recursively, regular files
    with an image suffix, sorted; a ``.txt`` / ``.lst`` / ``.csv`` file is a list of images,
    :func:`~weakloc.data.sources.read_file_list`). Names that are not valid UTF-8 are kept (decoded
    as the file system does); messages name them by :func:`display_path`."""
    from weakloc.data.sources import is_file_list, read_file_list  # the list reader builds on the labels reader, which builds on this module

    if isinstance(sources, (str, bytes, os.PathLike)):
        sources = [sources]
    paths = [_as_path(s) for s in sources]
    out: list[Path] = []
    for s in paths:
        if s.is_dir():
            out += sorted(p for p in s.rglob("*") if is_image_file(p) and p.is_file())
        elif s.is_file():
            out += read_file_list(s) if is_file_list(s) else [s]
        elif os.path.lexists(s):
            kind = "a broken symbolic link" if os.path.islink(s) else "not a regular file or folder (a pipe, socket or device)"
            raise WeaklocError(f"{display_path(s)}: {kind}")
        else:
            raise WeaklocError(f"{display_path(s)}: no such image file or folder")
    if not out:
        raise WeaklocError(f"no image files found in {', '.join(map(display_path, paths))}")
    return out
