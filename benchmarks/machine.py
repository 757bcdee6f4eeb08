"""The machine line every benchmark table states."""

from __future__ import annotations

import platform

import torch


def machine_name() -> str:
    """The GPU's name when one is used, else ``CPU <arch>, <n> threads``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
