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


def activations_and_gradients(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
    """Activation of the target layer and d(logit)/d(activation) for every target.

    Gradients flow only to the target layer (default: the backbone's last feature map); parameters
    get none. Several targets per image take one backward pass each through the layers after it.

    Returns:
        activation ``(B, C, h, w)``, gradients ``(B, T, C, h, w)``, targets ``(B, T)``, logits ``(B, K)``.
    """
    with frozen_parameters(model), torch.enable_grad():
        act, logits = _activation_and_logits(model, images, layer)
        if act.ndim != 4:
            raise WeaklocError(f"gradient maps need a (B, C, h, w) activation; layer {layer!r} gives {tuple(act.shape)}")
        targets = targets_fn(logits.detach())
        grads = []
        for t in range(targets.shape[1]):
            score = logits.gather(1, targets[:, t:t + 1]).sum()
            (g,) = torch.autograd.grad(score, act, retain_graph=t + 1 < targets.shape[1])
            grads.append(g)
    return act.detach(), torch.stack(grads, 1), targets, logits.detach()


def _gradient_method(combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], doc: str):
    """A method whose map is ``combine(activation (B,1,C,h,w), gradients (B,T,C,h,w)) -> (B,T,h,w)``."""

    def method(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
        act, grads, targets, logits = activations_and_gradients(model, images, targets_fn, layer)
        return combine(act[:, None].float(), grads.float()), targets, logits

    method.__doc__ = doc
    return method


def _gradcam(a, g):
    return (g.mean(dim=(-2, -1), keepdim=True) * a).sum(2)


def _gradcam_pp(a, g, eps: float = 1e-6):
    g2 = g.pow(2)
    alpha = g2 / (2 * g2 + a.sum(dim=(-2, -1), keepdim=True) * g2 * g + eps)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = (g.clamp_min(0) * alpha).sum(dim=(-2, -1), keepdim=True)
    return (weights * a).sum(2)


def _xgradcam(a, g, eps: float = 1e-7):
    weights = (g * a / (a.sum(dim=(-2, -1), keepdim=True) + eps)).sum(dim=(-2, -1), keepdim=True)
    return (weights * a).sum(2)


gradcam = _gradient_method(_gradcam, """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of d(logit)/d(activation).

Returns raw (pre-ReLU) maps ``(B, T, h, w)``, targets ``(B, T)``, logits ``(B, K)``.""")
gradcam_pp = _gradient_method(_gradcam_pp, "Grad-CAM++ (Chattopadhay et al. 2018): positive gradients weighted by the closed-form alphas.")
hirescam = _gradient_method(lambda a, g: (g * a).sum(2), "HiResCAM (Draelos & Carin 2020): element-wise gradient x activation, summed over channels.")
gradcam_elementwise = _gradient_method(lambda a, g: (g * a).clamp_min(0).sum(2),
                                       "Grad-CAM element-wise: ReLU of gradient x activation per element, summed over channels.")
xgradcam = _gradient_method(_xgradcam, "XGrad-CAM (Fu et al. 2020): weights = sum(g * A) / sum(A) per channel.")
layercam = _gradient_method(lambda a, g: (g.clamp_min(0) * a).sum(2), "Layer-CAM (Jiang et al. 2021): ReLU(gradient) x activation per element.")


def principal_projection(x: torch.Tensor) -> torch.Tensor:
    """First principal component of each map's channel vectors, as a map.

    Args:
        x: ``(N, C, h, w)``.

    Returns:
        ``(N, h, w)``: the centred ``(h*w, C)`` matrix projected on its first right singular vector
        (batched SVD on the input's device). The sign is chosen so the projection correlates
        positively with the channel sum (SVD's sign is arbitrary; pytorch-grad-cam leaves it to
        chance, which can invert a map).
    """
    n, c, h, w = x.shape
    m = torch.nan_to_num(x.float()).flatten(2).transpose(1, 2)  # (N, hw, C)
    m = m - m.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    proj = m @ vh[:, 0, :, None]  # (N, hw, 1)
    ref = x.float().sum(1).flatten(1)
    ref = ref - ref.mean(1, keepdim=True)
    sign = torch.sign((proj[..., 0] * ref).sum(1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (proj[..., 0] * sign[:, None]).reshape(n, h, w)


def eigencam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
    """Eigen-CAM (Muhammad & Yeasin 2020): first principal component of the activations.

    Class-agnostic: every target of an image gets the same map. One forward pass, no gradients.
    """
    with torch.no_grad():
        if layer is None:
            act = model.features(images)
            logits = model.classifier(act).mean(dim=(2, 3))
        else:
            with capture_activation(find_layer(model, layer)) as store:
                logits = model(images)
            act = store["act"].detach()
    targets = targets_fn(logits)
    proj = principal_projection(act)
    return proj[:, None].expand(-1, targets.shape[1], -1, -1).contiguous(), targets, logits


def eigengradcam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
    """EigenGrad-CAM: first principal component of gradient x activation, per target."""
    act, grads, targets, logits = activations_and_gradients(model, images, targets_fn, layer)
    b, t = targets.shape
    prod = (grads * act[:, None]).flatten(0, 1)  # (B*T, C, h, w)
    return principal_projection(prod).reshape(b, t, *act.shape[-2:]), targets, logits


def random_baseline(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
    """A uniform random map per image and target (a floor for explanation-quality metrics).

    Deterministic for a batch: seeded from the batch size and image size.
    """
    with torch.no_grad():
        logits = model(images)
    targets = targets_fn(logits)
    gen = torch.Generator(device=images.device).manual_seed(images.shape[0] * 7919 + images.shape[-1])
    maps = torch.rand(*targets.shape, *images.shape[-2:], generator=gen, device=images.device)
    return maps, targets, logits


def sobel_baseline(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
    """Edge magnitude of the (grey) image: a model-free baseline that "finds" any high-contrast thing."""
    with torch.no_grad():
        logits = model(images)
        grey = images.float().mean(1, keepdim=True)
        kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=images.device)[None, None]
        gx = torch.nn.functional.conv2d(grey, kx, padding=1)
        gy = torch.nn.functional.conv2d(grey, kx.transpose(-1, -2), padding=1)
        mag = (gx.pow(2) + gy.pow(2)).sqrt()[:, 0]
    targets = targets_fn(logits)
    return mag[:, None].expand(-1, targets.shape[1], -1, -1).contiguous(), targets, logits
