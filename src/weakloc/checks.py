"""Argument checks shared by the CLI and the Python API.

Each check raises :class:`~weakloc.errors.OptionError` with one line naming the option (its CLI
spelling where the caller passes it) and the allowed values, so bad arguments stop a command before
any work starts instead of failing deep inside with a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real

from weakloc.errors import OptionError


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_int(name: str, value, low: int | None = None, high: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` as an int in ``[low, high]`` (either bound optional); bools and floats are refused."""
    if value is None and allow_none:
        return None
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise OptionError(f"{name}: expected an integer, got {value!r}")
    return int(_in_range(name, int(value), low, high))


def check_float(name: str, value, low: float | None = None, high: float | None = None, allow_none: bool = False,
                low_open: bool = False, high_open: bool = False) -> float | None:
    """``value`` as a finite float in the range (closed unless ``low_open`` / ``high_open``)."""
    if value is None and allow_none:
        return None
    if not _is_number(value) or not math.isfinite(float(value)):
        raise OptionError(f"{name}: expected a finite number, got {value!r}")
    return float(_in_range(name, float(value), low, high, low_open, high_open))


def _in_range(name, value, low, high, low_open=False, high_open=False):
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise OptionError(f"{name}: {value:g} is out of range (must be {' and '.join(p for p in (lo, hi) if p)})")
    return value


def check_choice(name: str, value, choices: Iterable, allow_none: bool = False):
    """``value`` if it is one of ``choices``."""
    choices = list(choices)
    if value is None and allow_none:
        return None
    if value not in choices:
        raise OptionError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def check_device(name: str, device) -> str:
    """A torch device string that exists on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    import torch

    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise OptionError(f"{name}: {text!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{name}: {text!r} asked for, but no CUDA GPU is available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"{name}: {text!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise OptionError(f"{name}: 'mps' asked for, but MPS is not available on this machine (use cpu)")
    elif dev.type != "cpu":
        raise OptionError(f"{name}: {text!r} is not supported (use cpu, cuda, cuda:N or mps)")
    return text


def check_output_folder(name: str, path) -> None:
    """``path`` can be (or already is) a folder: it is not a file, and its nearest existing parent is a
    folder. Checked before the work, so a typo in ``-o`` does not end a run when its results are written."""
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OptionError(f"{name}: {p} exists and is not a folder")
    _check_parents(name, p)


def check_output_file(name: str, path) -> None:
    """``path`` can be written as a file: it is not a folder, and its nearest existing parent is a folder."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise OptionError(f"{name}: {p} is a folder; give a file name, e.g. {p / 'report.json'}")
    _check_parents(name, p)


def _check_parents(name: str, p) -> None:
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OptionError(f"{name}: cannot create {p}: {parent} is a file, not a folder")
            return
