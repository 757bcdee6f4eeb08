"""Output file names from untrusted text, kept inside their output folder.

Class names come from a labels CSV or a shared model's ``config.json``, image stems from whatever
folder is localized: either may hold ``/``, ``..``, control characters, undecodable bytes or
names a file system refuses. Every file weakloc writes for ``localize`` / ``explain`` is named by
:func:`safe_component` and placed with :class:`OutputFolder`, which refuses any path that does not
resolve inside the folder (a ``..`` that slipped through, a planted symlink).
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path
from urllib.parse import quote

from weakloc.errors import WeaklocError
from weakloc.text import display_path

# Windows refuses these as a file's base name whatever the extension ("CON.png", "com1.txt").
_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))})
_KEPT_PUNCTUATION = frozenset("-_.+=,()")
MAX_COMPONENT_BYTES = 80


def _keep(c: str) -> bool:
    # letters, digits and combining marks of any script; a few ASCII punctuation marks that no
    # shell or file system treats specially. Separators, quotes, wildcards, controls, format
    # characters (bidi overrides), spaces and surrogates are replaced.
    return c in _KEPT_PUNCTUATION or unicodedata.category(c)[0] in "LNM"


def _truncate(name: str, original: str, max_bytes: int) -> str:
    """``name`` cut to ``max_bytes`` of UTF-8, ending in a hash of ``original`` so that long names
    sharing a beginning stay distinct."""
    digest = hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    head = name.encode("utf-8")[: max(1, max_bytes - len(digest) - 1)].decode("utf-8", "ignore")
    return f"{head}-{digest}"


def safe_component(text: str, used: set[str] | None = None, max_bytes: int = MAX_COMPONENT_BYTES) -> str:
    """One file-name component made from any text: deterministic, at most ``max_bytes`` of UTF-8,
    never empty, ``.``, ``..``, hidden, option-like or a Windows device name, and free of path
    separators and control characters.

    Args:
        text: a class name, an image stem, ... (lone surrogates from undecodable bytes allowed).
        used: names already given in the same folder, compared case-insensitively (macOS and
            Windows file systems are); a clash gets ``-2``, ``-3``, ... and the result is added.
        max_bytes: the limit on the result's UTF-8 length (file systems allow 255 for a name,
            including any extension the caller adds).

    Examples: ``"../../x"`` -> ``"_.._.._x"``, ``"a/b"`` -> ``"a_b"``, ``""`` -> ``"_"``,
    ``"CON"`` -> ``"_CON"``, ``"<script>"`` -> ``"_script_"``.
    """
    text = str(text)
    name = "".join(c if _keep(c) else "_" for c in unicodedata.normalize("NFC", text))
    if name[:1] in (".", "-", ""):  # hidden files, "." / "..", names read as command-line options
        name = "_" + name
    name = name.rstrip(".")  # Windows drops trailing dots: "a." and "a" would be one file
    if name.split(".")[0].upper() in _RESERVED:
        name = "_" + name
    if len(name.encode("utf-8")) > max_bytes:
        name = _truncate(name, text, max_bytes)
    if used is None:
        return name
    base, n = name, 1
    while name.casefold() in used:
        n += 1
        tail = f"-{n}"
        cut = base.encode("utf-8")[: max_bytes - len(tail)].decode("utf-8", "ignore")
        name = cut + tail
    used.add(name.casefold())
    return name


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` if it resolves (symlinks followed) inside ``root``, else a :class:`WeaklocError`.

    The last line of defence for writers: names are already made safe, so a refusal means a
    planted symlink or a bug, and nothing is written.
    """
    root, path = Path(root), Path(path)
    if not path.resolve().is_relative_to(root.resolve()):
        raise WeaklocError(f"{display_path(path)}: refusing to write outside the output folder {display_path(root)}")
    return path


class OutputFolder:
    """The files of one output folder: names made safe and unique per sub-folder, paths checked.

    ``file("masks", "00001_cat_a/b", ".png")`` -> ``root/masks/00001_cat_a_b.png``.
    """

    def __init__(self, root: str | Path):
        from weakloc.checks import check_output_folder

        check_output_folder("out", root)  # before any work, not when the first result is written
        self.root = Path(root)
        self._used: dict[tuple[str | None, str], set[str]] = {}

    def file(self, sub: str | None, stem: str, suffix: str, *, unique: bool = True) -> Path:
        """A path ``root/[sub/]NAME{suffix}`` (``sub`` a fixed name of weakloc's own, ``stem`` any
        text); its folder is created inside ``root``. ``unique`` False: the caller's stems are
        distinct already (they start with an id), so no record of the names given is kept."""
        used = self._used.setdefault((sub, suffix.casefold()), set()) if unique else None
        name = safe_component(stem, used, max_bytes=2 * MAX_COMPONENT_BYTES)
        folder = self.root if sub is None else inside(self.root, self.root / safe_component(sub))
        path = inside(self.root, folder / f"{name}{suffix}")
        folder.mkdir(parents=True, exist_ok=True)
        return inside(self.root, path)  # again: the folder may have existed as a symlink


def page_link(target: str | Path, page_folder: str | Path) -> str:
    """An ``href``/``src`` value for ``target`` on a page in ``page_folder``: relative to the page,
    ``/``-separated and percent-encoded (spaces, ``#``, ``%``, ``?``, ``:``, non-ASCII; undecodable
    bytes as the file system's bytes), so it works for relative, absolute and odd paths alike.
    Both paths are taken as they are (relative ones from the working directory)."""
    target, page_folder = os.path.abspath(target), os.path.abspath(page_folder)
    try:
        rel = Path(os.path.relpath(target, page_folder)).as_posix()
    except ValueError:  # Windows: another drive, no relative path
        return Path(target).as_uri()
    return quote(os.fsencode(rel), safe="/")
