"""Heatmap methods. Each takes ``(model, images, targets_fn, layer)`` and returns low-resolution
raw maps ``(B, T, h, w)``, the targets ``(B, T)`` and the logits ``(B, K)``; :func:`weakloc.explain.explain`
upsamples and normalises them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from weakloc.errors import WeaklocError

TargetsFn = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter for the block, restoring it after.

    Maps then need gradients only with respect to one activation, so no parameter gradient is
    ever computed and the network before the target layer records no autograd graph.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def capture_activation(module: nn.Module) -> Iterator[dict]:
    """Record ``module``'s output as a fresh leaf that requires grad; the hook is always removed.

    Yields a dict whose ``"act"`` entry holds the activation after the forward pass.
    """
    store: dict = {}

    def hook(_m, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise WeaklocError(f"layer {type(_m).__name__} does not output a single tensor")
        leaf = out.detach().requires_grad_(True)
        store["act"] = leaf
        return leaf

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``model.named_modules()``)."""
    modules = dict(model.named_modules())
    if name not in modules:
        hint = [n for n in modules if n.endswith(name.split(".")[-1])][:5]
        raise WeaklocError(f"no layer named {name!r} in the model; similar: {hint}")
    return modules[name]


def cam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
    """Class activation maps from the classifier weights (Zhou et al. 2016): one forward, all classes.

    Returns:
        maps ``(B, T, h, w)``, targets ``(B, T)``, logits ``(B, K)``.
    """
    if layer is not None:
        raise WeaklocError("CAM reads the classifier's own feature map; it takes no layer")
    with torch.no_grad():
        out = model.forward_maps(images)
        maps = out.class_maps
        if model.classifier.bias is not None:  # CAM is sum_c w_kc f_c, without the bias (Zhou et al.)
            maps = maps - model.classifier.bias[None, :, None, None]
    targets = targets_fn(out.logits)
    idx = targets[:, :, None, None].expand(-1, -1, *maps.shape[-2:])
    return maps.gather(1, idx), targets, out.logits


def _activation_and_logits(model, images: torch.Tensor, layer: str | None):
    if layer is None:
        with torch.no_grad():
            feats = model.features(images)
        act = feats.detach().requires_grad_(True)
        logits = model.classifier(model.dropout(act)).mean(dim=(2, 3))
        return act, logits
    with capture_activation(find_layer(model, layer)) as store:
        logits = model(images)
    return store["act"], logits


def gradcam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of d(logit)/d(activation).

    Gradients flow only to the target layer (default: the backbone's last feature map). Several
    targets per image take one backward pass each through the layers after it.

    Returns:
        raw (pre-ReLU) maps ``(B, T, h, w)``, targets ``(B, T)``, logits ``(B, K)``.
    """
    with frozen_parameters(model), torch.enable_grad():
        act, logits = _activation_and_logits(model, images, layer)
        if act.ndim != 4:
            raise WeaklocError(f"Grad-CAM needs a (B, C, h, w) activation; layer {layer!r} gives {tuple(act.shape)}")
        targets = targets_fn(logits.detach())
        maps = []
        for t in range(targets.shape[1]):
            score = logits.gather(1, targets[:, t:t + 1]).sum()
            (grad,) = torch.autograd.grad(score, act, retain_graph=t + 1 < targets.shape[1])
            weights = grad.mean(dim=(2, 3), keepdim=True)
            maps.append((weights * act).sum(1))
    return torch.stack(maps, 1).detach(), targets, logits.detach()
