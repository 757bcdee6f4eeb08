"""Reading images of any common kind into ``uint8`` RGB tensors.

torchvision decodes JPEG/PNG/WebP/GIF on its own (with EXIF rotation); everything it refuses
(CMYK JPEGs in some builds, TIFF, BMP, 16-bit or palette PNGs with odd modes) goes through Pillow.
Either way the result is ``(3, H, W) uint8`` in RGB, or an :class:`ImageReadError` naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from weakloc.errors import ImageReadError, WeaklocError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_file(path: str | Path) -> bool:
    """True when the file name ends in a suffix weakloc reads as an image."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _to_uint8_rgb(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint16:
        t = (t.to(torch.int32) >> 8).to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise ImageReadError(f"unexpected decoded dtype {t.dtype}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t[:3].contiguous()


def _read_with_pillow(path: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()  # raises on truncated data
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
                return torch.from_numpy(arr)[None].expand(3, -1, -1).contiguous()
            if im.mode != "RGB":
                if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA")
                    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(background, im)
                im = im.convert("RGB")
            return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as RGB.

    Handles grayscale, RGBA (composited on white), palette, 16-bit, CMYK and EXIF-rotated files.

    Returns:
        ``(3, H, W)`` uint8 tensor.

    Raises:
        ImageReadError: the file is missing, empty, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    data = None
    if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
        try:
            raw = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29+ deprecates its codecs
                warnings.simplefilter("error", UserWarning)  # libjpeg warns (not fails) on truncated data
                data = decode_image(raw, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)
            if data.shape[0] in (2, 4) or data.dtype not in (torch.uint8, torch.uint16):
                data = None  # alpha or exotic layouts: let Pillow composite them
            else:
                data = _to_uint8_rgb(data)
        except (RuntimeError, UserWarning, ValueError):
            data = None
    if data is None:
        try:
            data = _read_with_pillow(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
            reason = str(e) or type(e).__name__
            if "truncated" in reason.lower() or "image file is truncated" in reason:
                reason = f"truncated image ({reason})"
            raise ImageReadError(f"{path}: cannot decode image: {reason}") from None
    if data.shape[1] == 0 or data.shape[2] == 0:
        raise ImageReadError(f"{path}: image has zero size")
    return data


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image after EXIF rotation, read from the header only."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError) as e:
        raise ImageReadError(f"{path}: cannot read image header: {e}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def list_images(sources: list[str | Path] | str | Path) -> list[Path]:
    """Image files from files and folders (folders searched recursively, sorted)."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out: list[Path] = []
    for s in map(Path, sources):
        if s.is_dir():
            out += sorted(p for p in s.rglob("*") if p.is_file() and is_image_file(p))
        elif s.is_file():
            out.append(s)
        else:
            raise WeaklocError(f"{s}: no such image file or folder")
    if not out:
        raise WeaklocError(f"no image files found in {', '.join(map(str, sources))}")
    return out
