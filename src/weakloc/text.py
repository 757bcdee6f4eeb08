"""Text rules every layer shares: the one display escaper, and what text may name a class.

A file name that is not valid UTF-8 arrives as a string holding lone surrogates (Python's
``surrogateescape``), and any name or label may hold control characters, line separators or bidi
overrides, which would break a line of output, move a terminal's cursor or show text reversed.
:func:`escape_text` writes each of those as a backslash escape; everything else, any script
included, comes back unchanged. Messages, ``skipped.txt``, JSON files, HTML pages and the command
line all use it, so one file is spelt the same way everywhere.

:func:`class_name_problem` is the one rule for what text may name a class (class names become
file and folder names). This is a leaf module: it imports nothing of weakloc's, so the
configuration and the data readers share both.
"""

from __future__ import annotations

import os
import unicodedata

_BIDI_CONTROLS = frozenset({"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"})


def _escape_char(c: str, controls: bool) -> str:
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if 0xD800 <= o <= 0xDFFF:  # any other lone surrogate: UTF-8 cannot carry it
        return f"\\u{o:04x}"
    if controls:
        cat = unicodedata.category(c)
        if cat in ("Cc", "Zl", "Zp") or (cat == "Cf" and unicodedata.bidirectional(c) in _BIDI_CONTROLS):
            return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"
    return c


def escape_text(text: str, controls: bool = True) -> str:
    """``text`` with what UTF-8 output cannot carry, or a reader should not meet raw, escaped.

    Each undecodable byte (a surrogate ``U+DC80..U+DCFF``) is written ``\\xNN`` (the byte, as
    Python's ``backslashreplace`` spells it), any other lone surrogate ``\\uNNNN``. With
    ``controls`` (for display: messages, text files, HTML, the terminal) control characters, line
    and paragraph separators and bidi embedding/override/isolate characters are escaped too, as
    ``\\xNN`` below U+0100 and ``\\uNNNN`` above. JSON escapes control characters itself, so its
    data passes ``controls=False`` and keeps them exact.

    Examples: ``"a\\nb"`` -> ``"a\\\\x0ab"``; ``"evil\\u202egnp"`` -> ``"evil\\\\u202egnp"``;
    ``"ünïcödé 名前"`` unchanged.
    """
    return "".join(_escape_char(c, controls) for c in text)


def display_path(path: str | bytes | os.PathLike) -> str:
    """A file name as text any UTF-8 output can carry (:func:`escape_text` of it, controls escaped).

    ``bytes`` and path objects are decoded as the file system does (``os.fsdecode``), so an
    undecodable byte shows as ``\\xNN``; a valid, printable name comes back as the user typed it.
    """
    text = path if isinstance(path, str) else os.fsdecode(os.fspath(path))
    return escape_text(text)


#: longest class name: names become parts of file names, which file systems cap
CLASS_NAME_MAX = 128


def class_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a class name, or None: the one rule for labels files, class folders,
    counts headers and a model's config.json, so training never saves a model that loading refuses.
    Class names become file and folder names (overlays, masks, reports), so a name such as
    ``../../x`` could otherwise write outside the output folder."""
    if not isinstance(name, str):
        return "is not a string"
    if not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "is not a class name (a relative folder name)"
    if "/" in name or "\\" in name:
        return "holds a path separator ('/' or '\\')"
    # Cs: a lone surrogate (an undecodable byte), which no file name can hold
    if any(unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") for ch in name):
        return "holds a control character"
    if len(name) > CLASS_NAME_MAX:
        return f"is longer than {CLASS_NAME_MAX} characters"
    return None


__all__ = ["CLASS_NAME_MAX", "class_name_problem", "display_path", "escape_text"]
