"""The weakly-supervised classifier: a timm backbone and a class-map head.

The head is a 1x1 convolution over the feature map followed by global average pooling. Because
pooling and a linear layer commute, the logits equal those of GAP + linear, and the pre-pooling
tensor *is* the class activation map of every class -- CAM for all classes at no extra cost.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from weakloc.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from weakloc.errors import CheckpointError
from weakloc.models.backbone import DEFAULT_BACKBONE, create_backbone, input_normalization
from weakloc.models.grid import to_grid

TASKS = ("single", "multi")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and use it; stored as JSON beside the weights.

    Attributes:
        backbone: timm model name.
        classes: class names in output order.
        task: ``single`` (softmax) or ``multi`` (sigmoid per class).
        input_size: side of the square input.
        mean, std: input normalisation (None: the backbone's own, from timm's pretrained config).
        output_stride: timm ``output_stride`` (16 or 8 dilate the last stages; None = native 32).
        drop_rate: channel dropout before the classifier during training.
        positive_class: the "yes" class of a two-class task, else None.
        localization: settings calibrated for ``localize`` (e.g. ``{"threshold": 0.35}``).
    """

    backbone: str = DEFAULT_BACKBONE
    classes: list[str] = field(default_factory=list)
    task: str = "single"
    input_size: int = 224
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output_stride: int | None = None
    drop_rate: float = 0.2
    head: str = "cam"
    positive_class: int | None = None
    localization: dict = field(default_factory=dict)
    format_version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "config") -> "ModelConfig":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where}: not valid JSON ({e})") from None
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise CheckpointError(f"{where}: unknown config key(s) {sorted(unknown)}")
        if not raw.get("classes"):
            raise CheckpointError(f"{where}: config has no classes")
        raw["mean"] = tuple(raw.get("mean") or IMAGENET_MEAN)
        raw["std"] = tuple(raw.get("std") or IMAGENET_STD)
        return cls(**raw)


class ModelOutput(NamedTuple):
    """What one forward pass gives.

    Attributes:
        logits: ``(B, K)``.
        class_maps: ``(B, K, h, w)`` CAM of every class (classifier applied at each position; their
            spatial mean plus nothing else is ``logits``).
        features: ``(B, C, h, w)`` the backbone's last feature map.
    """

    logits: torch.Tensor
    class_maps: torch.Tensor
    features: torch.Tensor


class WeaklocNet(nn.Module):
    """Backbone + 1x1-conv classifier + global average pooling.

    Args:
        config: the model's :class:`ModelConfig`.
        pretrained: ``"imagenet"``, ``"none"`` or a weights file (see :mod:`weakloc.models.backbone`).
    """

    def __init__(self, config: ModelConfig, pretrained: str = "none"):
        super().__init__()
        if config.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
        self.config = config
        self.backbone = create_backbone(config.backbone, pretrained, config.output_stride)
        if config.mean is None or config.std is None:
            config.mean, config.std = input_normalization(self.backbone)
        self.dropout = nn.Dropout2d(config.drop_rate)  # whole channels: same as dropout on pooled features
        self.classifier = nn.Conv2d(self.backbone.num_features, len(config.classes), kernel_size=1)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, h, w)``; transformer tokens are laid out on their patch grid."""
        return to_grid(self.backbone.forward_features(x), self.backbone, tuple(x.shape[-2:]))

    def forward_maps(self, x: torch.Tensor) -> ModelOutput:
        """Logits, class maps of every class and features from one forward pass."""
        f = self.features(x)
        maps = self.classifier(self.dropout(f))
        return ModelOutput(maps.mean(dim=(2, 3)), maps, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, K)``."""
        return self.forward_maps(x).logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax (single-label) or sigmoid (multi-label) of ``(B, K)`` logits."""
        return logits.softmax(-1) if self.config.task == "single" else logits.sigmoid()

    def backbone_groups(self, n: int = 3) -> list[list[nn.Parameter]]:
        """Backbone parameters in ``n`` consecutive groups, earliest layers first (for layer-wise LRs)."""
        params = [p for p in self.backbone.parameters()]
        size = -(-len(params) // n)
        return [params[i:i + size] for i in range(0, len(params), size)]
