"""Checkpoints: ``model.safetensors`` + ``config.json`` in one folder. Loading never unpickles."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from weakloc.errors import CheckpointError
from weakloc.models.classifier import ModelConfig, WeaklocNet

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_model(model: WeaklocNet, folder: str | Path) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "weakloc"})
    (folder / CONFIG_NAME).write_text(model.config.to_json())
    return folder


def _resolve(path: Path) -> Path:
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent
    return path


def load_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint folder (or of the folder of a ``.safetensors``)."""
    folder = _resolve(Path(path))
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} (is this a weakloc model folder?)")
    return ModelConfig.from_json(cfg_file.read_text(), str(cfg_file))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> WeaklocNet:
    """Rebuild a model from a checkpoint folder; ``eval()`` mode, on ``device``.

    Raises:
        CheckpointError: missing files, or weights that do not match the config.
    """
    folder = _resolve(Path(path))
    config = load_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}")
    model = WeaklocNet(config, pretrained="none")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors' own error types
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{weights}: weights do not match {CONFIG_NAME} (missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
        )
    model.load_state_dict(state)
    return model.to(device).eval()
