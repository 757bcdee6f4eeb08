"""The weakly-supervised classifier: a timm backbone and a class-map head.

The head is a 1x1 convolution over the feature map followed by global average pooling. Because
pooling and a linear layer commute, the logits equal those of GAP + linear, and the pre-pooling
tensor *is* the class activation map of every class -- CAM for all classes at no extra cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from weakloc.config import HEADS, TASKS, ModelConfig
from weakloc.errors import WeaklocError
from weakloc.models.backbone import create_backbone, early_parameters, input_normalization
from weakloc.models.grid import to_grid
from weakloc.models.heads import CBAM, AttentionHead, BoxHead, CountingHead, insert_adl, insert_cbam, thresholded_average_pool


def check_finite(tensor: torch.Tensor, what: str, names: Sequence[str] | None = None) -> torch.Tensor:
    """``tensor`` unchanged when every value is finite; else a :class:`WeaklocError` naming the first
    bad row's ``names`` entry (one name per row of ``tensor``, e.g. the images of a batch).

    Meant for what users see (probabilities, counts): NaN would otherwise print as a probability and
    its arg-max as a "predicted" class.
    """
    bad = ~torch.isfinite(tensor.detach())
    if not bool(bad.any()):
        return tensor
    rows = bad.reshape(bad.shape[0], -1).any(1).nonzero()[:, 0].tolist() if bad.dim() else [0]
    where = ""
    if names is not None and rows:
        others = len(rows) - 1
        where = f" for {names[rows[0]]}" + (f" (and {others} other{'s' if others > 1 else ''})" if others else "")
    raise WeaklocError(f"{what} is NaN or infinite{where}: the model's weights are broken, or its computation "
                       "overflowed (try float32)")


class ModelOutput(NamedTuple):
    """What one forward pass gives.

    Attributes:
        logits: ``(B, K)``.
        class_maps: ``(B, K, h, w)`` CAM of every class (the classifier applied at each position; for
            the ``cam`` head their spatial mean is ``logits``).
        features: ``(B, C, h, w)`` the backbone's last feature map.
        attention: the attention head's maps ``[(B, h_s, w_s)]`` (empty for other heads).
        counts: ``(B, K)`` predicted counts (models with a counting head), else None.
        density: ``(B, K, h, w)`` density maps summing to ``counts`` (density heads), else None.
        head_counts: ``(B, K)`` the pooled count head's own prediction (``count``/``both``), else None.
        localizer: ``(B, K, h, w)`` the second-stage localizer's logits (sigmoid: object
            probability per class and position), else None.
        box: ``(B, 4)`` the second-stage box regressor's class-agnostic box ``x0, y0, x1, y1`` in
            image coordinates (``[0, 1]`` is the image; not clamped), else None.
    """

    logits: torch.Tensor
    class_maps: torch.Tensor
    features: torch.Tensor
    attention: tuple = ()
    counts: torch.Tensor | None = None
    density: torch.Tensor | None = None
    head_counts: torch.Tensor | None = None
    localizer: torch.Tensor | None = None
    box: torch.Tensor | None = None


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
        if config.head not in HEADS:
            raise WeaklocError(f"unknown head {config.head!r}: use one of {', '.join(HEADS)}")
        self.config = config
        # with a separate box network, the rest is a teacher's copy: ``pretrained`` is the box network's
        self.backbone = create_backbone(config.backbone, "none" if config.box_backbone else pretrained, config.output_stride,
                                        config.input_size)
        if config.mean is None or config.std is None:
            config.mean, config.std = input_normalization(self.backbone)
        if config.cbam_stages:
            insert_cbam(self.backbone, list(config.cbam_stages))
        if config.adl_stages:
            insert_adl(self.backbone, list(config.adl_stages))
        self.dropout = nn.Dropout2d(config.drop_rate)  # whole channels: same as dropout on pooled features
        self.classifier = nn.Conv2d(self.backbone.num_features, len(config.classes), kernel_size=1)
        info = self.backbone.feature_info
        dicts = info if isinstance(info, list) else info.get_dicts()
        n = len(dicts)
        self._attention_indices: list[int] = []
        self._density_index: int | None = None
        self.counting_head = None
        #: class-level co-localization statistics (:mod:`weakloc.models.colocalization`), set by
        #: load_model from ddt.safetensors or by ``weakloc ddt``; None until computed
        self.colocalization = None
        if config.counting:
            density_channels = self.backbone.num_features
            if config.density_stage is not None:
                if not -n <= config.density_stage < n:
                    raise WeaklocError(f"density stage {config.density_stage} must be an index in -{n}..{n - 1}")
                self._density_index = config.density_stage % n
                density_channels = dicts[self._density_index]["num_chs"]
            reduction = dicts[-1 if self._density_index is None else self._density_index].get("reduction")
            positions = math.ceil(config.input_size / reduction) ** 2 if reduction else None
            self.counting_head = CountingHead(self.backbone.num_features, len(config.classes), config.counting,
                                              density_channels=density_channels, hidden=config.density_hidden, positions=positions,
                                              context=config.density_context and self._density_index is not None)
        self.localizer = nn.Conv2d(self.backbone.num_features, len(config.classes), 1) if config.localizer else None
        self.box_backbone = None
        if config.box_backbone:
            if not config.box_head:
                raise WeaklocError("box_backbone is the box head's own network: it needs box_head")
            self.box_backbone = create_backbone(config.box_backbone, pretrained, config.output_stride, config.input_size)
            mean, std = input_normalization(self.box_backbone)
            if (tuple(mean), tuple(std)) != (tuple(config.mean), tuple(config.std)):
                raise WeaklocError(f"box backbone {config.box_backbone!r} normalises its input differently from "
                                   f"{config.backbone!r}; use the same backbone family")
        box_channels = (self.box_backbone or self.backbone).num_features
        self.box_head = BoxHead(box_channels) if config.box_head else None
        self.attention_head = None
        if config.head == "attention":
            stages = sorted({s % n for s in config.attention_stages if -n <= s < n})
            if len(stages) != len(config.attention_stages) or not stages:
                raise WeaklocError(f"attention stages {config.attention_stages} must be distinct indices in -{n}..{n - 1}")
            self._attention_indices = stages
            self.attention_head = AttentionHead([dicts[s]["num_chs"] for s in stages], self.backbone.num_features,
                                                len(config.classes), normalize=config.attention_norm)
        # the stages one forward pass must return besides the last map (attention and density inputs)
        self._intermediate_indices = sorted(set(self._attention_indices) | ({self._density_index} - {None}))

    @property
    def num_classes(self) -> int:
        return self.classifier.out_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, h, w)``; transformer tokens are laid out on their patch grid."""
        return to_grid(self.backbone.forward_features(x), self.backbone, tuple(x.shape[-2:]))

    def forward_maps(self, x: torch.Tensor, on_features=None, with_box: bool = False) -> ModelOutput:
        """Logits, class maps of every class, features and attention maps from one forward pass.

        ``on_features`` (optional) may replace the last feature map before the head reads it
        (the explanation engine makes it a leaf there). A box head on the shared features always
        answers; a separate box network (``box_backbone``) runs only ``with_box``: it would double
        the cost of every other map and prediction.
        """
        local: list[torch.Tensor] = []
        density_features = None
        wanted = self._intermediate_indices
        if wanted:
            final, inter = self.backbone.forward_intermediates(x, indices=wanted)
            by_index = dict(zip(wanted, inter))
            local = [by_index[i] for i in self._attention_indices]
            density_features = by_index.get(self._density_index)
            f = to_grid(final, self.backbone, tuple(x.shape[-2:]))
        else:
            f = self.features(x)
        if on_features is not None:
            f = on_features(f)
        fd = self.dropout(f)
        maps = self.classifier(fd)
        attention: tuple = ()
        logits = self._pooled_logits(fd, maps)
        if self.attention_head is not None:
            local_logits, attn = self.attention_head(local, f)
            logits = logits + local_logits
            attention = tuple(attn)
        counts = density = head_counts = None
        if self.counting_head is not None:
            counts, density, head_counts = self.counting_head(f, density_features)
        localizer = self.localizer(f) if self.localizer is not None else None
        box = None
        if self.box_head is not None and self.box_backbone is None:
            box = self.box_head(f)
        elif self.box_head is not None and with_box:
            box = self.box_head(to_grid(self.box_backbone.forward_features(x), self.box_backbone, tuple(x.shape[-2:])))
        return ModelOutput(logits, maps, f, attention, counts, density, head_counts, localizer, box)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from a last feature map alone ``(N, C, h, w) -> (N, K)`` (not for the attention head,
        whose logits also read earlier stages)."""
        if self.attention_head is not None:
            raise WeaklocError("the attention head also reads earlier stages; name a target layer instead")
        return self._pooled_logits(features)

    def _pooled_logits(self, features: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier on pooled features: TAP for the ``tap`` head, else the mean of the class maps
        (``maps``, the classifier applied at every position, when already computed)."""
        if self.config.head == "tap":
            return self.classifier(thresholded_average_pool(features, self.config.tap_threshold)[:, :, None, None])[:, :, 0, 0]
        return (self.classifier(features) if maps is None else maps).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, K)``."""
        return self.forward_maps(x).logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax (single-label) or sigmoid (multi-label) of ``(B, K)`` logits."""
        return logits.softmax(-1) if self.config.task == "single" else logits.sigmoid()

    @property
    def frozen_classifier(self) -> bool:
        """A separate box network (``box_backbone``) is trained beside a frozen copy of its teacher:
        only the box network and the localizer head learn, and the rest stays in eval mode."""
        return self.box_backbone is not None

    def train(self, mode: bool = True) -> "WeaklocNet":
        super().train(mode)
        if self.frozen_classifier:  # the teacher's BatchNorm statistics and dropout stay as they were
            for part in (self.backbone, self.dropout, self.classifier, self.attention_head, self.counting_head):
                if part is not None:
                    part.eval()
        return self

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters that start untrained: classifier, attention, counting and localizer heads, CBAM blocks (head learning rate,
        trained from the first epoch). With a separate box network: the box and localizer heads only."""
        if self.frozen_classifier:
            return list(self.box_head.parameters()) + (list(self.localizer.parameters()) if self.localizer is not None else [])
        cbam = [p for m in self.backbone.modules() if isinstance(m, CBAM) for p in m.parameters()]
        head = list(self.classifier.parameters())
        for extra in (self.attention_head, self.counting_head, self.localizer, self.box_head):
            if extra is not None:
                head += list(extra.parameters())
        return head + cbam

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The backbone's own parameters (without inserted blocks), earliest layers first; with a
        separate box network, that network's (the classifier's backbone is frozen)."""
        if self.frozen_classifier:
            return list(self.box_backbone.parameters())
        new = {id(p) for p in self.new_parameters()}
        return [p for p in self.backbone.parameters() if id(p) not in new]

    def frozen_stage_parameters(self, stages: int, option: str = "frozen_stages") -> list[nn.Parameter]:
        """The pretrained parameters of the trained backbone's stem and first ``stages`` stages
        (:func:`~weakloc.models.backbone.early_parameters`; the box network's with a separate one),
        without blocks inserted after them (CBAM starts untrained)."""
        new = {id(p) for p in self.new_parameters()}
        net = self.box_backbone if self.frozen_classifier else self.backbone
        return [p for p in early_parameters(net, stages, option) if id(p) not in new]

    def backbone_groups(self, n: int = 3) -> list[list[nn.Parameter]]:
        """Backbone parameters in ``n`` consecutive groups, earliest layers first (for layer-wise LRs)."""
        params = self.pretrained_parameters()
        size = -(-len(params) // n)
        return [params[i:i + size] for i in range(0, len(params), size)]
