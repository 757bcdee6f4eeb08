"""A model's class-level co-localization statistics (``ddt.safetensors`` in its folder).

Computed by :func:`weakloc.explain.ddt.fit_directions` (``weakloc ddt MODEL DATA``); kept beside the
weights so that the ``ddt`` and ``cam+ddt`` methods need nothing but the model folder. Tensors only
(safetensors), never unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from weakloc.errors import CheckpointError

FILE = "ddt.safetensors"


@dataclass
class Directions:
    """Per-class co-localization statistics of one layer.

    Attributes:
        mean: ``(K, C)`` each class's mean descriptor.
        direction: ``(K, C)`` each class's first principal direction (unit length, signed).
        eigenvalue: ``(K,)`` the variance along it.
        positions: ``(K,)`` how many descriptors each class's statistics pooled.
        layer: the layer (None: the classifier's feature map).
    """

    mean: torch.Tensor
    direction: torch.Tensor
    eigenvalue: torch.Tensor
    positions: torch.Tensor
    layer: str | None = None


def directions_bytes(stats: Directions) -> bytes:
    """``ddt.safetensors``'s content."""
    from safetensors.torch import save

    return save({"mean": stats.mean.float().contiguous(), "direction": stats.direction.float().contiguous(),
                 "eigenvalue": stats.eigenvalue.float().contiguous(), "positions": stats.positions.double().contiguous()},
                metadata={"format": "weakloc-ddt", "layer": stats.layer or ""})


def save_directions(stats: Directions, folder: str | Path) -> Path:
    """Write ``folder/ddt.safetensors`` atomically (``folder`` made if missing); returns its path."""
    from weakloc.models.checkpoint import replace_files

    replace_files(Path(folder), {FILE: directions_bytes(stats)})
    return Path(folder) / FILE


def load_directions(folder: str | Path, classes: int, channels: int | None = None) -> Directions | None:
    """The statistics in ``folder`` (None when it has none), checked against ``classes`` classes.

    Raises:
        CheckpointError: the file is not safetensors, or its tensors have the wrong shapes or are not finite.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in ("mean", "direction", "eigenvalue", "positions")}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not weakloc co-localization statistics ({' '.join(str(e).split()) or type(e).__name__})") from None
    k, c = t["mean"].shape if t["mean"].ndim == 2 else (-1, -1)
    if (k != classes or t["direction"].shape != (k, c) or t["eigenvalue"].shape != (k,) or t["positions"].shape != (k,)
            or (channels is not None and c != channels)):
        raise CheckpointError(f"{path}: statistics of shape {tuple(t['mean'].shape)} do not fit this model ({classes} classes); "
                              "recompute them with weakloc ddt")
    if not all(torch.isfinite(v).all() for v in t.values()):
        raise CheckpointError(f"{path}: the statistics hold NaN or infinite values; recompute them with weakloc ddt")
    return Directions(t["mean"], t["direction"], t["eigenvalue"], t["positions"], meta.get("layer") or None)
