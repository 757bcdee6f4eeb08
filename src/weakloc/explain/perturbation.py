"""Gradient-free methods that weigh each channel by what happens to the score when the input or the
activation is perturbed: Score-CAM, SS-CAM, IS-CAM and Ablation-CAM.

All work on the device in chunks of at most ``chunk`` perturbed copies. Every copy's logits come out
of one forward, so all targets of an image share its forwards; scores are written into a
preallocated tensor, with no per-image host synchronisation. Signature as in
:mod:`weakloc.explain.methods`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from weakloc.explain.layers import activation_grid, channel_dim, forward_to_layer, logits_after_layer, to_grid
from weakloc.explain.methods import TargetsFn, reduce_channels

__all__ = ["ablationcam", "channel_masks", "iscam", "masked_scores", "scorecam", "sscam"]


def channel_masks(act: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each channel upsampled (bilinear, corners aligned) to ``size`` and min-max scaled to [0, 1].

    ``(N, h, w)`` -> ``(N, H, W)``; the scaling uses the upsampled map's own range, eps 1e-8, as
    pytorch-grad-cam's Score-CAM does. A constant channel gives an all-zero mask (interpolation
    rounding would otherwise turn its 1e-7 ripples into a mask of arbitrary values).
    """
    up = F.interpolate(act[:, None].float(), size=size, mode="bilinear", align_corners=True)[:, 0]
    lo = up.amin(dim=(-2, -1), keepdim=True)
    hi = up.amax(dim=(-2, -1), keepdim=True)
    flat = act.flatten(1)
    constant = (flat.amax(1) == flat.amin(1))[:, None, None]
    return torch.where(constant, torch.zeros_like(up), (up - lo) / (hi - lo + 1e-8))


def masked_scores(model, images: torch.Tensor, act: torch.Tensor, targets: torch.Tensor, *, chunk: int = 64,
                  scales: tuple[float, ...] = (1.0,), noise_std: float = 0.0, num_noise: int = 1, seed: int = 0) -> torch.Tensor:
    """Mean target logit over the inputs ``images[b] * (s * mask_c + noise)`` for every image b, channel c.

    Args:
        images: ``(B, 3, H, W)``.
        act: ``(B, C, h, w)`` activations whose channels become the masks (:func:`channel_masks`).
        targets: ``(B, T)``.
        chunk: perturbed copies per forward (one reused input buffer of this many images).
        scales: mask multipliers averaged over (IS-CAM's integration path; ``(1.0,)`` for Score-CAM).
        noise_std, num_noise: Gaussian noise added to the masks, ``num_noise`` draws averaged (SS-CAM).

    Returns:
        ``(B, T, C)`` averaged scores.
    """
    b, c = act.shape[:2]
    size = tuple(images.shape[-2:])
    flat_act = act.flatten(0, 1)  # (B*C, h, w)
    owner = torch.arange(b, device=images.device).repeat_interleave(c)  # image of each copy
    tgt = targets[owner]  # (B*C, T)
    out = torch.zeros(b * c, targets.shape[1], device=images.device, dtype=torch.float32)
    gen = torch.Generator(device=images.device).manual_seed(seed) if noise_std > 0 else None
    draws = num_noise if noise_std > 0 else 1
    # A constant channel (often all zero after a ReLU) normalises to an all-zero mask: every such copy
    # is the black image, scored once. Finding them costs one host sync per batch, not per image.
    if noise_std > 0:
        todo = torch.arange(b * c, device=images.device)
    else:
        flat = flat_act.flatten(1)
        constant = flat.amax(1) == flat.amin(1)
        todo = (~constant).nonzero()[:, 0]
        with torch.no_grad():
            black = model(torch.zeros_like(images[:1])).float()[0]  # (K,)
        out[constant] = black[tgt[constant]] * (draws * len(scales))
    buf = images.new_empty((max(1, min(chunk, len(todo))), *images.shape[1:]))
    with torch.no_grad():
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            n = len(idx)
            masks = channel_masks(flat_act[idx], size)[:, None]  # (n, 1, H, W)
            src = images[owner[idx]]
            for _ in range(draws):
                m = masks
                if gen is not None:
                    m = masks + noise_std * torch.randn(masks.shape, generator=gen, device=masks.device)
                for s in scales:
                    x = torch.mul(src, (s * m).to(images.dtype), out=buf[:n])
                    out[idx] += model(x).float().gather(1, tgt[idx])
    return (out / (draws * len(scales))).view(b, c, -1).transpose(1, 2)


def _score_family(model, images, targets_fn, layer, eigen_smooth, **kwargs):
    act, logits = activation_grid(model, images, layer)
    targets = targets_fn(logits)
    weights = masked_scores(model, images, act, targets, **kwargs).softmax(-1)  # (B, T, C)
    weighted = weights[..., None, None] * act[:, None].float()
    return reduce_channels(weighted, eigen_smooth), targets, logits


def scorecam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *,
             chunk: int = 64, eigen_smooth: bool = False):
    """Score-CAM (Wang et al., CVPRW 2020): channel weights = softmax over channels of the target logit
    of the input masked by each upsampled, normalised channel. ``B * C`` forwards, chunked."""
    return _score_family(model, images, targets_fn, layer, eigen_smooth, chunk=chunk)


def sscam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *,
          chunk: int = 64, num_samples: int = 35, std: float = 2.0, seed: int = 0, eigen_smooth: bool = False):
    """SS-CAM (Wang et al. 2020): Score-CAM with each mask's score averaged over ``num_samples`` draws of
    Gaussian noise (``std``) added to the mask. ``num_samples * B * C`` forwards."""
    return _score_family(model, images, targets_fn, layer, eigen_smooth, chunk=chunk, noise_std=std,
                         num_noise=num_samples, seed=seed)


def iscam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *,
          chunk: int = 64, num_samples: int = 10, eigen_smooth: bool = False):
    """IS-CAM (Naidu et al. 2020): Score-CAM with each mask's score integrated along a path from the
    black image: the mask is scaled by the running sums ``M_i = sum_{j<=i} j / N`` (0.1, 0.3, ... 5.5
    for N = 10), as the paper's equation and TorchCAM have it."""
    scales = tuple(itertools.accumulate((i + 1) / num_samples for i in range(num_samples)))
    return _score_family(model, images, targets_fn, layer, eigen_smooth, chunk=chunk, scales=scales)


def ablationcam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *,
                chunk: int = 256, eigen_smooth: bool = False):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): channel weight = relative drop of the target logit
    when that channel is ablated, ``(y - y_ablated) / y``.

    Only the network after the target layer runs on the ablated copies (for weakloc's default layer:
    the head alone, all images at once; for an inner layer, image by image, the layers before it on
    that one image). An ablated channel is set to 0 when the image's activations have minimum 0 (after
    a ReLU), else to that minimum minus 1e7, as in pytorch-grad-cam.
    """
    with torch.no_grad():
        raw, logits = forward_to_layer(model, images, layer)
        raw = raw.detach()
        targets = targets_fn(logits)
        base = logits.float().gather(1, targets)  # (B, T)
        cdim = channel_dim(raw, model)
        b, c = raw.shape[0], raw.shape[cdim]
        lows = raw.flatten(1).amin(1)
        fill = torch.where(lows == 0, torch.zeros_like(lows), lows - 1e7)  # (B,)
        onehot_shape = [1] * raw.ndim
        onehot_shape[cdim] = c
        channels = torch.arange(c, device=raw.device).view(onehot_shape)
        ablated = torch.empty(b, c, targets.shape[1], device=raw.device)
        # The copies of one image go through the rest of the network together, so anything the later
        # layers read from before the target layer (a skip connection) is that image's own. In float32:
        # the ablation value (min - 1e7) does not exist in fp16.
        head_only = layer is None
        groups = [(None, torch.arange(b * c, device=raw.device))] if head_only else [(i, None) for i in range(b)]
        with torch.autocast(raw.device.type, enabled=False):
            for image, flat in groups:
                total = b * c if head_only else c
                for start in range(0, total, chunk):
                    stop = min(start + chunk, total)
                    if head_only:
                        owner, chan = flat[start:stop] // c, flat[start:stop] % c
                    else:
                        owner = torch.full((stop - start,), image, device=raw.device, dtype=torch.long)
                        chan = torch.arange(start, stop, device=raw.device)
                    copies = raw[owner].float()
                    hit = channels == chan.view(-1, *[1] * (raw.ndim - 1))
                    copies = torch.where(hit, fill[owner].view(-1, *[1] * (raw.ndim - 1)).float(), copies)
                    src = images if head_only else images[image:image + 1].float()
                    scores = logits_after_layer(model, src, layer, copies).float().gather(1, targets[owner])
                    ablated.view(b * c, -1)[owner * c + chan] = scores
        ablated = ablated.flatten(0, 1)
        weights = (base[:, :, None] - ablated.view(b, c, -1).transpose(1, 2)) / base[:, :, None]  # (B, T, C)
    act = to_grid(raw, model, tuple(images.shape[-2:]))
    return reduce_channels(weights[..., None, None] * act[:, None].float(), eigen_smooth), targets, logits
