"""Heads and blocks that make a CNN show where it looks: trainable attention (Jetley et al. 2018,
Yan et al. 2019), CBAM (Woo et al. 2018), ADL (Choe & Shim 2019), thresholded average pooling
(Bae et al. 2020) and counting heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from weakloc.config import COUNTING, HEADS  # noqa: F401 -- HEADS re-exported; its home is weakloc.config
from weakloc.errors import WeaklocError


def thresholded_average_pool(features: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Thresholded average pooling (TAP, Bae, Noh & Kim, ECCV 2020).

    Each channel is averaged only over the positions where it exceeds ``threshold`` times its own
    maximum, so weak background activation does not dilute it (and the CAM can spread over the
    whole object instead of its most discriminative part).

    Args:
        features: ``(B, C, h, w)``.

    Returns:
        ``(B, C)``; a channel with no position above the cut pools to 0.
    """
    flat = features.flatten(2)
    cut = threshold * flat.amax(-1, keepdim=True)
    keep = (flat > cut).to(flat.dtype)
    return (flat * keep).sum(-1) / keep.sum(-1).clamp_min(1.0)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018): channel, then spatial attention.

    Args:
        channels: input channels.
        reduction: channel-MLP bottleneck ratio.
        kernel_size: spatial attention convolution size.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channel_mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> (spatial attention ``(B, 1, h, w)`` in (0, 1), channel-attended input)."""
        x = x * torch.sigmoid(self.channel_mlp(x.mean((2, 3), keepdim=True)) + self.channel_mlp(x.amax((2, 3), keepdim=True)))
        return torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1))), x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, x = self.spatial_attention(x)
        return x * attn


class ADL(nn.Module):
    """Attention-based Dropout Layer (Choe & Shim, CVPR 2019); identity at evaluation.

    During training the self-attention map (the channel mean) either hides the most discriminative
    region -- positions above ``drop_threshold`` × its maximum are zeroed, with probability
    ``drop_rate`` -- or, otherwise, weights positions by its sigmoid (highlighting the object).
    No parameters.
    """

    def __init__(self, drop_rate: float = 0.75, drop_threshold: float = 0.8):
        super().__init__()
        self.drop_rate = drop_rate
        self.drop_threshold = drop_threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        attn = x.mean(1, keepdim=True)
        peak = attn.flatten(1).amax(1).view(-1, 1, 1, 1)
        drop_mask = (attn < self.drop_threshold * peak).to(x.dtype)
        importance = torch.sigmoid(attn)
        use_drop = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.drop_rate).to(x.dtype)
        return x * (use_drop * drop_mask + (1 - use_drop) * importance)


def insert_after_stages(backbone: nn.Module, stages: list[int], make_block, option: str = "stages") -> list[str]:
    """Put ``make_block(channels)`` after each chosen stage (indices into ``backbone.feature_info``).

    The stage module ``m`` becomes ``nn.Sequential(m, block)``; call this after loading pretrained
    weights (the stage's own keys gain a ``.0``).

    Returns:
        the names of the modules that were wrapped.
    """
    info = backbone.feature_info
    dicts = info if isinstance(info, list) else info.get_dicts()
    names = []
    for s in stages:
        if not -len(dicts) <= s < len(dicts):
            raise WeaklocError(f"{option}: stage {s} out of range: the backbone has stages 0..{len(dicts) - 1} "
                               f"(or -{len(dicts)}..-1 from the end)")
        name, channels = dicts[s]["module"], dicts[s]["num_chs"]
        backbone.set_submodule(name, nn.Sequential(backbone.get_submodule(name), make_block(channels)))
        names.append(name)
    return names


def insert_cbam(backbone: nn.Module, stages: list[int]) -> list[str]:
    """A :class:`CBAM` after each chosen stage (see :func:`insert_after_stages`)."""
    return insert_after_stages(backbone, stages, CBAM, "--cbam (cbam_stages)")


def insert_adl(backbone: nn.Module, stages: list[int], drop_rate: float = 0.75, drop_threshold: float = 0.8) -> list[str]:
    """An :class:`ADL` after each chosen stage (see :func:`insert_after_stages`)."""
    return insert_after_stages(backbone, stages, lambda _c: ADL(drop_rate, drop_threshold), "--adl (adl_stages)")


class AttentionHead(nn.Module):
    """Trainable attention on intermediate stages ("Learn to Pay Attention", Jetley et al., ICLR 2018,
    in the form of Yan et al., IPMI 2019).

    For each local feature map ``L_s`` the compatibility with the global feature map ``G`` is
    ``c_s = u_s(ReLU(P_s L_s + up(Q G)))`` (1x1 projections to ``dim`` channels; ``G``'s projection
    is upsampled to ``L_s``'s grid when they differ), normalised over positions by a softmax (the
    attention sums to 1) or a sigmoid. The attention-pooled local features are ``sum a_s L_s``
    (softmax) or ``mean a_s L_s`` (sigmoid); the classifier reads them concatenated with the global
    average of ``G`` -- here split as a 1x1 classifier on ``G`` (which keeps CAM) plus
    :attr:`local_classifier` on the pooled local features.

    Args:
        local_channels: channels of each attended stage.
        global_channels: channels of ``G``.
        num_classes: classes.
        dim: projection width.
        normalize: ``softmax`` or ``sigmoid``.
    """

    def __init__(self, local_channels: list[int], global_channels: int, num_classes: int, dim: int = 256,
                 normalize: str = "softmax"):
        super().__init__()
        if normalize not in ("softmax", "sigmoid"):
            raise WeaklocError(f"attention normalisation must be softmax or sigmoid, got {normalize!r}")
        self.normalize = normalize
        self.local_proj = nn.ModuleList(nn.Conv2d(c, dim, 1, bias=False) for c in local_channels)
        self.global_proj = nn.Conv2d(global_channels, dim, 1, bias=False)
        self.score = nn.ModuleList(nn.Conv2d(dim, 1, 1) for _ in local_channels)
        self.local_classifier = nn.Linear(sum(local_channels), num_classes, bias=False)

    def forward(self, local_maps: list[torch.Tensor], global_map: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Local features ``[(B, C_s, h_s, w_s)]`` and ``G (B, C, h, w)`` -> the local branch's logits
        ``(B, K)`` and the attention maps ``[(B, h_s, w_s)]``."""
        g = self.global_proj(global_map)
        pooled, maps = [], []
        for local, proj, score in zip(local_maps, self.local_proj, self.score):
            gu = g if g.shape[-2:] == local.shape[-2:] else F.interpolate(g, size=local.shape[-2:], mode="bilinear", align_corners=False)
            c = score(F.relu(proj(local) + gu))[:, 0]  # (B, h, w)
            if self.normalize == "softmax":
                a = c.flatten(1).softmax(-1).view_as(c)
                pooled.append((a[:, None] * local).sum((2, 3)))
            else:
                a = torch.sigmoid(c)
                pooled.append((a[:, None] * local).mean((2, 3)))
            maps.append(a)
        return self.local_classifier(torch.cat(pooled, 1)), maps


class CountingHead(nn.Module):
    """Per-class counts beside the classifier.

    ``density``: a 1x1 convolution (after a 3x3 convolution of ``hidden`` channels, when given) and a
    softplus give a non-negative map per class whose sum over positions is the predicted count (the
    instances are its peaks). ``count``: a linear layer and a softplus on the pooled features.
    ``both``: both, the density's sum being the prediction.

    Args:
        channels: channels of the last feature map; num_classes: classes; kind: one of :data:`COUNTING`.
        density_channels: channels of the map the density reads (default: ``channels``).
        hidden: width of the density's 3x3 convolution (0: none).
        context: with ``hidden`` and a separate density input, the last feature map is also read
            (a 1x1 convolution to ``hidden`` channels, upsampled bilinearly and added before the
            ReLU): the early stage says *where* each object is, the last map *what* it is.
        positions: ``h' * w'`` of the density map at the training size: the density's bias then
            starts every map at one object in all (a fixed bias would start a 32x32 map at 16x the
            count of an 8x8 one); None keeps a fixed bias of -4.5.
    """

    def __init__(self, channels: int, num_classes: int, kind: str = "density", density_channels: int | None = None,
                 hidden: int = 0, positions: int | None = None, context: bool = False):
        super().__init__()
        if kind not in COUNTING:
            raise WeaklocError(f"unknown counting head {kind!r}: use one of {', '.join(COUNTING)}")
        if context and not hidden:
            raise WeaklocError("a density head with context needs a hidden width (density_hidden > 0)")
        self.kind = kind
        self.density = last = self.context = None
        if kind in ("density", "both"):
            c_in = density_channels or channels
            last = nn.Conv2d(hidden or c_in, num_classes, 1)
            self.density = nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                         last) if hidden else last
            self.context = nn.Conv2d(channels, hidden, 1, bias=False) if context else None
        self.count = nn.Linear(channels, num_classes) if kind in ("count", "both") else None
        if self.count is not None:
            nn.init.constant_(self.count.bias, -4.5)
        if last is not None:
            nn.init.constant_(last.bias, math.log(math.expm1(1.0 / positions)) if positions else -4.5)  # softplus^-1

    def forward(self, features: torch.Tensor, density_features: torch.Tensor | None = None):
        """Last features ``(B, C, h, w)`` (and the density's own input ``(B, C', h', w')``, default the
        same) -> counts ``(B, K)``, density ``(B, K, h', w')`` or None, the count head's own counts
        ``(B, K)`` or None."""
        src = features if density_features is None else density_features
        density = None
        if self.context is not None:  # conv + BN of the stage, plus the last map's context, then ReLU and the 1x1
            h = self.density[1](self.density[0](src))
            h = h + F.interpolate(self.context(features), size=h.shape[-2:], mode="bilinear", align_corners=False)
            density = F.softplus(self.density[3](self.density[2](h)))
        elif self.density is not None:
            density = F.softplus(self.density(src))
        head = F.softplus(self.count(features.mean((2, 3)))) if self.count is not None else None
        counts = density.sum((2, 3)) if density is not None else head
        return counts, density, head


class BoxHead(nn.Module):
    """A class-agnostic box regressor on a feature map (the second stage of PSOL, Zhang et al. CVPR
    2020, made fully convolutional so it answers at any input size).

    A 1x1 convolution gives each position an objectness logit and its distances to the box's four
    sides (softplus, in fractions of the image side, as FCOS regresses them); the box is the
    softmax-objectness-weighted mean of the positions' boxes, in image coordinates (``[0, 1]`` is the
    image). It is not clamped to the image: a clamp would stop the gradient of a side that overshoots
    the border, and that side would stay there for good.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 5, 1)
        nn.init.zeros_(self.conv.weight)
        # softplus(b) = 0.25: an untrained head answers a box half the image wide around each position
        nn.init.constant_(self.conv.bias[1:], math.log(math.expm1(0.25)))
        nn.init.zeros_(self.conv.bias[:1])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, 4)`` boxes ``x0, y0, x1, y1`` in image coordinates (may pass the border)."""
        out = self.conv(features).float()
        b, _, h, w = out.shape
        weight = out[:, 0].flatten(1).softmax(-1)  # (B, h*w)
        dist = F.softplus(out[:, 1:]).flatten(2)  # (B, 4, h*w): left, top, right, bottom
        ys = (torch.arange(h, device=out.device, dtype=out.dtype) + 0.5) / h
        xs = (torch.arange(w, device=out.device, dtype=out.dtype) + 0.5) / w
        cy, cx = (v.reshape(-1) for v in torch.meshgrid(ys, xs, indexing="ij"))
        boxes = torch.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], 1)  # (B, 4, h*w)
        return (boxes * weight[:, None]).sum(-1)
