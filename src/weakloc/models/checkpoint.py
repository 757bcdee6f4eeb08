"""Checkpoints: ``model.safetensors`` + ``config.json`` in one folder. Loading never unpickles.

A model folder may come from anywhere (a colleague, a download), so loading checks it before use:
config.json against a schema (:func:`~weakloc.config.validate_config`), the weights for
shape and for NaN/inf. Saving is atomic: both files are written in full to temporary files beside
them and then renamed over the old ones, config.json last, so an interrupted save leaves the old
model (or none), never half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save

from weakloc.errors import CheckpointError, WeaklocError
from weakloc.models.backbone import for_inference, os_reason, read_state_dict
from weakloc.models.classifier import ModelConfig, WeaklocNet
from weakloc.models.colocalization import FILE as COLOCALIZATION_FILE
from weakloc.models.colocalization import directions_bytes, load_directions

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: far above any real config.json (tens of kB with per-class box sizes); a larger file is not one
MAX_CONFIG_BYTES = 16 * 2**20


def _write_error(folder: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"cannot write the model to {folder}: {os_reason(e)}")


def _temp_path(folder: Path, name: str) -> Path:
    # hidden and random: concurrent saves do not collide, and a crash's leftover is never read as a model
    return folder / f".{name}.{secrets.token_hex(6)}.tmp"


def _write_new_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create ``path`` (it must not exist), fill it with ``write(file)`` and flush it to disk.

    Mode 0o666 less the umask, as any program's new file: safetensors' own ``save_file`` and
    ``tempfile.mkstemp`` make 0o600 files, which the rest of a shared model folder is not.
    """
    with open(path, "xb", opener=lambda p, flags: os.open(p, flags, 0o666)) as f:  # f.name stays the path
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    # a rename is on disk only once its folder is (POSIX); folders cannot be opened on Windows
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` with ``write(file)`` so that it holds its old or its complete new contents,
    whenever the process dies: a temporary file in the same folder, flushed to disk, then renamed
    over ``path``. Same folder, because a rename is atomic only within one filesystem: fsspec's
    transaction, which Lightning uses, writes to the system temporary folder and then moves the
    file, which becomes a copy in place when the output folder is on another filesystem. The
    temporary file is removed on any error; only a kill (SIGKILL, power loss) leaves one behind
    (hidden, ending in ``.tmp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path.parent, path.name)
    try:
        _write_new_file(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)
    return path


def replace_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write every ``files`` entry to a temporary file in ``folder`` (made if missing, as
    :func:`atomic_write` makes its file's), then rename each over its name in ``files``' order; no
    temporary file is left behind, whatever fails."""
    folder.mkdir(parents=True, exist_ok=True)
    temps: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            tmp = _temp_path(folder, name)
            temps.append((tmp, folder / name))
            _write_new_file(tmp, lambda f, data=data: f.write(data))
        for tmp, target in temps:
            os.replace(tmp, target)
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    _fsync_folder(folder)


def ensure_writable(folder: str | Path) -> None:
    """Raise now, not after a long computation, if :func:`save_model` could not write into ``folder``
    (an existing folder, e.g. the model folder ``calibrate`` updates in place).

    Raises:
        CheckpointError: ``"cannot write the model to FOLDER: permission denied"`` and the like.
    """
    folder = Path(folder)
    probe = _temp_path(folder, "write-test")
    try:
        _write_new_file(probe, lambda _f: None)
        probe.unlink()
    except OSError as e:
        raise _write_error(folder, e) from None


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's state: every tensor's name, dtype, shape and bytes, in order. Equal
    weights give equal digests; it names which model a run was made from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_model(model: WeaklocNet, folder: str | Path) -> Path:
    """Write ``folder/model.safetensors``, ``folder/config.json`` and, when the model has
    co-localization statistics, ``folder/ddt.safetensors`` atomically; returns the folder.

    Both files get the mode of any new file (0o666 less the umask).

    Raises:
        CheckpointError: the folder cannot be created or written (read-only, a file in the way, disk full).
    """
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save(state, metadata={"format": "weakloc"})
    config = model.config.to_json().encode("utf-8")
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot write the model to {folder}: it is a file, not a folder")
    try:
        files = {WEIGHTS_NAME: weights}
        stats = getattr(model, "colocalization", None)
        if stats is None:  # statistics of other weights (an earlier model in this folder) must not be read as this one's
            (folder / COLOCALIZATION_FILE).unlink(missing_ok=True)
        else:
            files[COLOCALIZATION_FILE] = directions_bytes(stats)
        # config.json last: until it is replaced, the folder holds a loadable model, or no model
        replace_files(folder, files | {CONFIG_NAME: config})
    except OSError as e:
        raise _write_error(folder, e) from None
    return folder


def _resolve(path: Path) -> Path:
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent
    return path


def load_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint folder (or of the folder of a ``.safetensors``).

    Raises:
        CheckpointError: no folder, no or unreadable config.json, or a field that fails the schema.
    """
    folder = _resolve(Path(path))
    if not folder.exists():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} (no such folder)")
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} (is this a weakloc model folder?)")
    try:
        if cfg_file.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{cfg_file}: {cfg_file.stat().st_size} bytes, too large for a model's {CONFIG_NAME}")
        text = cfg_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CheckpointError(f"{cfg_file}: cannot read ({os_reason(e)})") from None
    return ModelConfig.from_json(text, str(cfg_file))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> WeaklocNet:
    """Rebuild a model from a checkpoint folder; ``eval()`` mode, on ``device``, channels-last
    (:func:`~weakloc.models.backbone.for_inference`).

    Raises:
        CheckpointError: missing or unreadable files, a config.json that fails the schema, weights
            that are not safetensors, hold NaN/inf, or do not match the config.
    """
    folder = _resolve(Path(path))
    config = load_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}")
    state = read_state_dict(weights)
    try:
        model = WeaklocNet(config, pretrained="none")
    except WeaklocError as e:  # settings valid one by one but not together (e.g. a stage index the backbone lacks)
        raise CheckpointError(f"{folder / CONFIG_NAME}: {e}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{weights}: weights do not match {CONFIG_NAME} (missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
        )
    model.load_state_dict(state)
    model.colocalization = load_directions(folder, len(config.classes))
    return for_inference(model, device)
