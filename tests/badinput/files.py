"""Bad (and odd but valid) input files, written at test time: images byte by byte, text files in
any encoding. Nothing here is a stored binary fixture."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    """``(h, w, 3)`` uint8: a gradient with a bright square and noise (maps are not constant on it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 90)], -1).astype(np.int32)
    img[h // 4: h // 2 + 1, w // 4: w // 2 + 1] = (250, 250, 40)
    img += rng.integers(-20, 21, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_png(w: int = 50, h: int = 40, seed: int = 0) -> bytes:
    return image_bytes(Image.fromarray(pattern(w, h, seed)), "PNG")


def good_jpeg(w: int = 50, h: int = 40, seed: int = 0, **kw) -> bytes:
    return image_bytes(Image.fromarray(pattern(w, h, seed)), "JPEG", quality=90, **kw)


# --- PNG surgery ------------------------------------------------------------------------------

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def png_chunks(data: bytes) -> list[list[bytes]]:
    """``[[type, payload, crc], ...]`` of a PNG."""
    assert data[:8] == PNG_SIG
    out, p = [], 8
    while p + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[p:p + 8])
        out.append([kind, data[p + 8:p + 8 + n], data[p + 8 + n:p + 12 + n]])
        p += 12 + n
    return out


def png_join(chunks: list[list[bytes]], fix_crc: bool = True) -> bytes:
    parts = [PNG_SIG]
    for kind, payload, crc in chunks:
        if fix_crc:
            crc = struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        parts.append(struct.pack(">I", len(payload)) + kind + payload + crc)
    return b"".join(parts)


def png_bad_idat_crc(data: bytes) -> bytes:
    """A byte of the compressed pixel data flipped, the chunk's CRC left as it was."""
    chunks = png_chunks(data)
    for c in chunks:
        if c[0] == b"IDAT":
            body = bytearray(c[1])
            body[len(body) // 2] ^= 0x5A
            c[1] = bytes(body)
            break
    return png_join(chunks, fix_crc=False)


def png_bad_chunk_crc(data: bytes, kind: bytes = b"IHDR") -> bytes:
    chunks = png_chunks(data)
    for c in chunks:
        if c[0] == kind:
            c[2] = b"\x00\x00\x00\x00"
    return png_join(chunks, fix_crc=False)


def png_with_size(data: bytes, w: int, h: int) -> bytes:
    """The header claims ``w x h`` (valid CRC); the pixel data stays that of the real image."""
    chunks = png_chunks(data)
    ihdr = chunks[0]
    ihdr[1] = struct.pack(">II", w, h) + ihdr[1][8:]
    return png_join(chunks)


def png_bad_zlib(data: bytes) -> bytes:
    """Valid CRCs around a compressed stream that is not zlib."""
    chunks = png_chunks(data)
    for c in chunks:
        if c[0] == b"IDAT":
            c[1] = b"\x78\x9c" + bytes(range(256)) * 2
    return png_join(chunks)


def png_extra_after_iend(data: bytes) -> bytes:
    return data + b"trailing garbage after IEND" * 10


def write_zero_png(path: Path, w: int, h: int, bit_depth: int = 1, color_type: int = 0) -> None:
    """A valid all-black PNG of any size, streamed: a decompression bomb or a huge picture in a small file."""
    bits = {0: 1, 2: 3, 4: 2, 6: 4}[color_type] * bit_depth
    row = b"\x00" + bytes((w * bits + 7) // 8)
    comp = zlib.compressobj(9)
    with open(path, "wb") as f:
        f.write(PNG_SIG)
        ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
        f.write(struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF))
        block = row * max(1, (1 << 20) // len(row))
        rows_per_block = len(block) // len(row)
        done, idat = 0, []
        while done < h:
            n = min(rows_per_block, h - done)
            idat.append(comp.compress(block[: n * len(row)]))
            done += n
        idat.append(comp.flush())
        payload = b"".join(idat)
        f.write(struct.pack(">I", len(payload)) + b"IDAT" + payload + struct.pack(">I", zlib.crc32(b"IDAT" + payload) & 0xFFFFFFFF))
        f.write(struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND") & 0xFFFFFFFF))


# --- JPEG surgery -----------------------------------------------------------------------------


def jpeg_cut(data: bytes, frac: float = 0.5, eoi: bool = False) -> bytes:
    """The first ``frac`` of a JPEG, optionally with an end-of-image marker appended (the file then
    looks complete to a decoder that only checks the last two bytes)."""
    cut = data[: int(len(data) * frac)]
    return cut + (b"\xff\xd9" if eoi else b"")


def jpeg_with_exif_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(img, "JPEG", quality=90, exif=exif.tobytes())


def jpeg_header_only() -> bytes:
    """Start of image, a JFIF header and the end marker: no frame, no scan."""
    return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"


# --- other formats ----------------------------------------------------------------------------


def float_tiff(w: int = 48, h: int = 40, low: float = 0.0, high: float = 1.0) -> bytes:
    """A 32-bit float TIFF (Pillow mode F) with values from ``low`` to ``high`` (a gradient)."""
    arr = np.linspace(low, high, w * h, dtype=np.float32).reshape(h, w)
    return image_bytes(Image.fromarray(arr, mode="F"), "TIFF")


def gray16_png(w: int = 48, h: int = 40) -> bytes:
    arr = np.linspace(0, 65535, w * h).astype(np.uint16).reshape(h, w)
    return image_bytes(Image.fromarray(arr), "PNG")


def rgb16_png(w: int = 48, h: int = 40) -> bytes:
    """16-bit RGB written by hand (Pillow cannot write it): a gradient over the full 16-bit range."""
    arr = np.linspace(0, 65535, w * h * 3).astype(">u2").reshape(h, w * 3)
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return png_join([[b"IHDR", ihdr, b""], [b"IDAT", zlib.compress(raw), b""], [b"IEND", b"", b""]])


def animated_gif(w: int = 40, h: int = 32) -> bytes:
    frames = [Image.fromarray(pattern(w, h, s)).convert("P") for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def multipage_tiff(w: int = 40, h: int = 32) -> bytes:
    frames = [Image.fromarray(pattern(w, h, s)) for s in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def cmyk_jpeg(w: int = 40, h: int = 32) -> bytes:
    """Pure red in CMYK (C=0, M=255, Y=255, K=0)."""
    img = Image.new("CMYK", (w, h), (0, 255, 255, 0))
    return image_bytes(img, "JPEG", quality=95)


def rgba_png(w: int = 40, h: int = 32) -> bytes:
    """Transparent everywhere except an opaque blue left half (transparent parts must come out white)."""
    arr = np.zeros((h, w, 4), np.uint8)
    arr[:, : w // 2] = (0, 0, 255, 255)
    return image_bytes(Image.fromarray(arr, "RGBA"), "PNG")


def palette_png(w: int = 40, h: int = 32, transparent: bool = False) -> bytes:
    img = Image.fromarray(pattern(w, h)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    kw = {"transparency": 0} if transparent else {}
    return image_bytes(img, "PNG", **kw)


# --- text -------------------------------------------------------------------------------------


def csv_text(rows: list[list[str]], newline: str = "\n") -> str:
    import csv

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=newline)
    w.writerows(rows)
    return buf.getvalue()
