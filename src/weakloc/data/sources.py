"""Image files named in a list: a text file with one path per line, or a CSV with a path column.

``weakloc localize MODEL files.txt`` and ``weakloc localize MODEL table.csv`` take their images
from such a list (a folder of half a million files is slow to search and hard to split); relative
paths are read from the list's folder. Entries that do not exist are kept: they are skipped and
counted when read, as any unreadable image is.
"""

from __future__ import annotations

import os
from pathlib import Path

from weakloc.data.labels import PATH_HEADERS, read_csv_rows, read_text_file
from weakloc.errors import LabelError
from weakloc.text import display_path

#: the suffixes of a file list (any other file given is an image)
LIST_SUFFIXES = (".txt", ".lst", ".csv")


def is_file_list(path: Path) -> bool:
    """True when ``path``'s suffix names a file list rather than an image."""
    return path.suffix.lower() in LIST_SUFFIXES


def _text_entries(path: Path) -> list[tuple[int, str]]:
    text = read_text_file(path, "file list")
    # blank lines and # comments are not entries; a path's own spaces are kept, only the line break dropped
    return [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip() and not line.lstrip().startswith("#")]


def _csv_entries(path: Path) -> list[tuple[int, str]]:
    rows = read_csv_rows(path, "file list")
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    column = next((header.index(h) for h in PATH_HEADERS if h in header), None)
    start = 1 if column is not None else 0  # no path header: the first column of every row
    column = column or 0
    out = []
    for n, row in enumerate(rows[start:], start + 1):
        if not any(c.strip() for c in row):
            continue
        if column >= len(row) or not row[column].strip():
            raise LabelError(f"{display_path(path)}, row {n}: no image path in column {column + 1}")
        out.append((n, row[column].strip()))
    return out


def read_file_list(path: str | os.PathLike) -> list[Path]:
    """The image paths a file list names, in its order, relative ones joined to the list's folder.

    Args:
        path: a ``.txt`` / ``.lst`` file (one path per line; blank lines and lines starting with
            ``#`` skipped) or a ``.csv`` file (the column headed ``path``, ``image``, ``file``,
            ``filename`` or ``image_path``; without such a header, the first column of every row).

    Raises:
        LabelError: the list cannot be read, a CSV row has no path, or it names no image at all.
    """
    path = Path(path)
    entries = _csv_entries(path) if path.suffix.lower() == ".csv" else _text_entries(path)
    if not entries:
        raise LabelError(f"{display_path(path)}: the file list names no image")
    for n, entry in entries:
        if "\0" in entry:
            raise LabelError(f"{display_path(path)}, line {n}: the path holds a NUL character")
    return [path.parent / entry for _, entry in entries]
