"""Heatmap methods that read activations and gradients.

Each method takes ``(model, images, targets_fn, layer=None, **options)`` and returns low-resolution
raw maps ``(B, T, h, w)``, the targets ``(B, T)`` and the logits ``(B, K)``;
:func:`weakloc.explain.explain` upsamples, fuses and normalises them. Options every channel-weighted
method understands: ``eigen_smooth`` (first principal component of the weighted activations instead
of their sum) and ``differentiable`` (keep the autograd graph so the maps can be a training signal).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from weakloc.errors import WeaklocError
from weakloc.explain.layers import activation_grid, capture_activation, find_layer, forward_to_layer, is_weakloc_net, to_grid
from weakloc.explain.maps import at_size, normalize_minmax, upsample

TargetsFn = Callable[[torch.Tensor], torch.Tensor]
#: ``(logits (B, K), targets (B, T)) -> scores (B, T)``: what a gradient method differentiates.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["activations_and_gradients", "attention_maps", "cam", "capture_activation", "eigencam", "eigengradcam", "find_layer", "finer_score", "finercam",
           "frozen_parameters", "gradcam", "gradcam_elementwise", "gradcam_pp", "hirescam", "layercam", "principal_projection",
           "random_baseline", "smooth_gradcam_pp", "sobel_baseline", "target_logits", "xgradcam"]


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


def target_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default score: the logit of each target, ``(B, K), (B, T) -> (B, T)``."""
    return logits.gather(1, targets)


def finer_score(alpha: float = 1.0, n_compare: int = 3) -> ScoreFn:
    """Finer-CAM's score (Zhang et al., CVPR 2025): the target's logit against its look-alikes.

    For target ``t`` the comparison classes are the ``n_compare`` classes whose logits are closest to
    ``y_t``; the score is ``sum_j p_j (y_t - alpha * y_j) / sum_j p_j`` with ``p`` the softmax, so
    the map shows what separates the class from the classes it is most easily confused with.
    """

    def score(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        yt = logits.gather(1, targets)  # (B, T)
        dist = (logits[:, None, :] - yt[..., None]).abs()  # (B, T, K)
        dist = dist.scatter(2, targets[..., None], float("inf"))  # never compare a class with itself
        k = min(n_compare, logits.shape[1] - 1)
        if k < 1:
            return yt
        comp = dist.topk(k, dim=2, largest=False).indices  # (B, T, k)
        probs = logits.softmax(-1)
        pj = probs.gather(1, comp.flatten(1)).view_as(comp)
        yj = logits.gather(1, comp.flatten(1)).view_as(comp)
        return (pj * (yt[..., None] - alpha * yj)).sum(-1) / (pj.sum(-1) + 1e-9)

    return score


def _gradients(scores: torch.Tensor, act: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """d(scores[:, t].sum())/d(act) for every t: ``(B, T)`` -> ``(T, *act.shape)``.

    Several targets share one batched backward pass (``is_grads_batched``) when the network's
    operations allow it, else one pass each.
    """
    t = scores.shape[1]
    if t == 1:
        return torch.autograd.grad(scores.sum(), act, create_graph=create_graph)[0][None]
    eye = torch.eye(t, device=scores.device, dtype=scores.dtype)[:, None, :].expand(t, *scores.shape)
    try:
        return torch.autograd.grad(scores, act, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                   create_graph=create_graph)[0]
    except RuntimeError:  # an op without a batching rule: fall back to a pass per target
        return torch.stack([torch.autograd.grad(scores[:, i].sum(), act, retain_graph=True, create_graph=create_graph)[0]
                            for i in range(t)])


def activations_and_gradients(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None,
                              score_fn: ScoreFn = target_logits, differentiable: bool = False):
    """Activation of the target layer and d(score)/d(activation) for every target, as grids.

    Gradients flow only to the target layer (default: see :func:`~weakloc.explain.layers.default_layer`);
    parameters get none, and the layers before it record no graph. With ``differentiable`` the
    graph from the input and the parameters is kept (and the gradients are themselves
    differentiable), for using maps as a training signal.

    Returns:
        activation ``(B, C, h, w)``, gradients ``(B, T, C, h, w)``, targets ``(B, T)``, logits ``(B, K)``.
    """
    hw = tuple(images.shape[-2:])
    with (nullcontext() if differentiable else frozen_parameters(model)), torch.enable_grad():
        act, logits = forward_to_layer(model, images, layer, keep_graph=differentiable)
        targets = targets_fn(logits.detach())
        scores = score_fn(logits, targets)
        grads = _gradients(scores, act, create_graph=differentiable)  # (T, *raw)
    grid = to_grid(act, model, hw)
    ggrid = to_grid(grads.flatten(0, 1), model, hw).unflatten(0, grads.shape[:2]).transpose(0, 1)
    if not differentiable:
        grid, ggrid, logits = grid.detach(), ggrid.detach(), logits.detach()
    return grid, ggrid, targets, logits


def reduce_channels(weighted: torch.Tensor, eigen_smooth: bool = False) -> torch.Tensor:
    """``(B, T, C, h, w)`` weighted activations -> ``(B, T, h, w)`` maps: their sum over channels, or
    with ``eigen_smooth`` their first principal component (pytorch-grad-cam's ``eigen_smooth``)."""
    if not eigen_smooth:
        return weighted.sum(2)
    b, t = weighted.shape[:2]
    return principal_projection(weighted.flatten(0, 1)).reshape(b, t, *weighted.shape[-2:])


def _gradient_method(weigh: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], doc: str):
    """A method whose map sums ``weigh(activation (B,1,C,h,w), gradients (B,T,C,h,w)) -> (B,T,C,h,w)`` over channels."""

    def method(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *,
               eigen_smooth: bool = False, differentiable: bool = False):
        act, grads, targets, logits = activations_and_gradients(model, images, targets_fn, layer, target_logits, differentiable)
        return reduce_channels(weigh(act[:, None].float(), grads.float()), eigen_smooth), targets, logits

    method.__doc__ = doc
    return method


def _gradcam(a, g):
    return g.mean(dim=(-2, -1), keepdim=True) * a


def _gradcam_pp_weights(a, g, g2, g3, eps: float = 1e-6):
    alpha = g2 / (2 * g2 + a.sum(dim=(-2, -1), keepdim=True) * g3 + eps)
    alpha = torch.where(g2 != 0, alpha, torch.zeros_like(alpha))
    return (g.clamp_min(0) * alpha).sum(dim=(-2, -1), keepdim=True)


def _gradcam_pp(a, g):
    return _gradcam_pp_weights(a, g, g.pow(2), g.pow(3)) * a


def _xgradcam(a, g, eps: float = 1e-7):
    return (g * a / (a.sum(dim=(-2, -1), keepdim=True) + eps)).sum(dim=(-2, -1), keepdim=True) * a


gradcam = _gradient_method(_gradcam, """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of d(logit)/d(activation).

Returns raw (pre-ReLU) maps ``(B, T, h, w)``, targets ``(B, T)``, logits ``(B, K)``.""")
gradcam_pp = _gradient_method(_gradcam_pp, "Grad-CAM++ (Chattopadhay et al. 2018): positive gradients weighted by the closed-form alphas.")
hirescam = _gradient_method(lambda a, g: g * a, "HiResCAM (Draelos & Carin 2020): element-wise gradient x activation, summed over channels.")
gradcam_elementwise = _gradient_method(lambda a, g: (g * a).clamp_min(0),
                                       "Grad-CAM element-wise: ReLU of gradient x activation per element, summed over channels.")
xgradcam = _gradient_method(_xgradcam, "XGrad-CAM (Fu et al. 2020): weights = sum(g * A) / sum(A) per channel.")
layercam = _gradient_method(lambda a, g: g.clamp_min(0) * a, "Layer-CAM (Jiang et al. 2021): ReLU(gradient) x activation per element.")
def finercam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *, alpha: float = 1.0,
             n_compare: int = 3, eigen_smooth: bool = False, differentiable: bool = False):
    """Finer-CAM (Zhang et al., CVPR 2025): Grad-CAM of the target's logit minus those of the
    ``n_compare`` most similar classes, weighted by their probabilities and ``alpha`` (see :func:`finer_score`)."""
    act, grads, targets, logits = activations_and_gradients(model, images, targets_fn, layer, finer_score(alpha, n_compare), differentiable)
    return reduce_channels(_gradcam(act[:, None].float(), grads.float()), eigen_smooth), targets, logits


def smooth_gradcam_pp(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *,
                      num_samples: int = 4, std: float = 0.3, seed: int = 0, eigen_smooth: bool = False):
    """Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ with gradient moments averaged over noisy inputs.

    The first, second and third powers of the gradient are averaged over ``num_samples`` copies of
    the input with Gaussian noise of standard deviation ``std`` (in normalised-input units, seeded);
    the alphas use the clean input's activations (one forward, no backward). Then one forward and
    backward per noise sample, for the whole batch at once.
    """
    act, logits = activation_grid(model, images, layer)
    targets = targets_fn(logits)
    fixed = lambda _logits: targets  # noqa: E731 -- the noisy copies explain the clean image's targets
    gen = torch.Generator(device=images.device).manual_seed(seed)
    g1 = g2 = g3 = 0.0
    for _ in range(num_samples):
        noisy = images + std * torch.randn(images.shape, generator=gen, device=images.device, dtype=images.dtype)
        _, g, _, _ = activations_and_gradients(model, noisy, fixed, layer)
        g = g.float()
        g1 += g / num_samples
        g2 += g.pow(2) / num_samples
        g3 += g.pow(3) / num_samples
    a = act[:, None].float()
    return reduce_channels(_gradcam_pp_weights(a, g1, g2, g3) * a, eigen_smooth), targets, logits


def cam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *, differentiable: bool = False,
        positive_weights: bool = False, output=None):
    """Class activation maps from the classifier weights (Zhou et al. 2016): one forward, all classes.

    With ``positive_weights`` the classifier's negative weights are truncated to 0 first (Bae et al.
    2020: negative evidence from other parts of the object otherwise carves holes in the map).
    ``output``: the model's :meth:`forward_maps` output for ``images`` when the caller already ran
    it (a fused method reading the same pass); no forward is run then.

    Returns:
        maps ``(B, T, h, w)``, targets ``(B, T)``, logits ``(B, K)``.
    """
    if layer is not None:
        raise WeaklocError("CAM reads the classifier's own feature map; it takes no layer")
    if not is_weakloc_net(model):
        raise WeaklocError("CAM needs a weakloc model (a 1x1 classifier over the feature map); for another classifier "
                           "use gradcam, which equals CAM for a global-average-pooling + linear head")
    with (torch.enable_grad() if differentiable else torch.no_grad()):
        out = output if output is not None else model.forward_maps(images)
        if positive_weights:
            maps = torch.nn.functional.conv2d(out.features, model.classifier.weight.clamp_min(0))
        else:
            maps = out.class_maps
            if model.classifier.bias is not None:  # CAM is sum_c w_kc f_c, without the bias (Zhou et al.)
                maps = maps - model.classifier.bias[None, :, None, None]
    targets = targets_fn(out.logits.detach())
    idx = targets[:, :, None, None].expand(-1, -1, *maps.shape[-2:])
    return maps.gather(1, idx), targets, out.logits


def _head_forward(model, images: torch.Tensor, layer: str | None, attribute: str, head: str, how: str):
    """One no-grad forward of a model whose maps come from its own ``head`` (checked to exist)."""
    if layer is not None:
        raise WeaklocError(f"{head} maps come from the {head} head; they take no layer")
    if getattr(model, attribute, None) is None:
        raise WeaklocError(f"this model has no {head} head ({how})")
    with torch.no_grad():
        return model.forward_maps(images, with_box=attribute == "box_head")


def attention_maps(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *, stage: int | None = None):
    """The attention head's own maps (class-agnostic): one forward pass.

    Args:
        stage: which attended stage (index into the model's ``attention_stages``); default: the
            mean of all stages' maps, each scaled to [0, 1] and resized to the finest grid.
    """
    out = _head_forward(model, images, layer, "attention_head", "attention", "train with --head attention")
    maps = list(out.attention)
    if stage is not None:
        if not -len(maps) <= stage < len(maps):
            raise WeaklocError(f"attention stage {stage} out of range 0..{len(maps) - 1}")
        fused = maps[stage]
    else:
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        fused = torch.stack([normalize_minmax(upsample(m, tuple(size), "bilinear")) for m in maps]).mean(0)
    targets = targets_fn(out.logits)
    return fused[:, None].expand(-1, targets.shape[1], -1, -1).contiguous(), targets, out.logits


def localizer_maps(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
    """The second-stage localizer's object probability maps (sigmoid) for each target: one forward pass."""
    out = _head_forward(model, images, layer, "localizer", "localizer", "train a second stage: weakloc train DATA --teacher FIRST_MODEL")
    targets = targets_fn(out.logits)
    probs = out.localizer.float().sigmoid()
    return probs.gather(1, targets[..., None, None].expand(-1, -1, *probs.shape[-2:])), targets, out.logits


def box_map(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, 4)`` boxes ``x0, y0, x1, y1`` in image coordinates (``[0, 1]`` is the image; a box may pass
    its border) -> ``(B, H, W)`` maps, 1 on the pixels whose centre lies inside the box, 0 elsewhere."""
    h, w = size
    ys = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) / w
    b = boxes.float()[:, :, None]
    inside_x = (xs[None] >= b[:, 0]) & (xs[None] <= b[:, 2])  # (B, W)
    inside_y = (ys[None] >= b[:, 1]) & (ys[None] <= b[:, 3])  # (B, H)
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()


def box_maps(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
    """The second-stage box regressor's class-agnostic box, as a map at the images' size (1 inside the
    box): the same box for every target, whose class the classifier gives (PSOL's combination).

    The regressor reads the images resized to the model's training size: it learnt the sides'
    distances from objects at that scale, and at twice the size its boxes shrink towards the centre."""
    out = _head_forward(model, at_size(images, model.config.input_size), layer, "box_head", "box", "train a second stage: weakloc train DATA --teacher FIRST_MODEL")
    targets = targets_fn(out.logits)
    maps = box_map(out.box, tuple(images.shape[-2:]))
    return maps[:, None].expand(-1, targets.shape[1], -1, -1).contiguous(), targets, out.logits


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
    act, logits = activation_grid(model, images, layer)
    targets = targets_fn(logits)
    proj = principal_projection(act)
    return proj[:, None].expand(-1, targets.shape[1], -1, -1).contiguous(), targets, logits


def eigengradcam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None):
    """EigenGrad-CAM: first principal component of gradient x activation, per target."""
    act, grads, targets, logits = activations_and_gradients(model, images, targets_fn, layer)
    return reduce_channels(grads * act[:, None], eigen_smooth=True), targets, logits


def random_baseline(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *, seed: int = 0):
    """A uniform random map per image and target (a floor for explanation-quality metrics).

    Deterministic for a batch: seeded from ``seed``, the batch size and the image size.
    """
    with torch.no_grad():
        logits = model(images)
    targets = targets_fn(logits)
    gen = torch.Generator(device=images.device).manual_seed(seed + images.shape[0] * 7919 + images.shape[-1])
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
