"""Conceptor-CAM (Qian et al. 2022, "Conceptor Learning for Class Activation Mapping", arXiv
2201.08636) and the conceptor algebra it rests on (Jaeger 2014, "Controlling Recurrent Neural
Networks by Conceptors", arXiv 1403.3369).

A CAM method fuses the channels of a feature map with one weight per channel. Conceptor-CAM keeps a
CAM method's channel weights ``w`` but lets a conceptor matrix ``K`` (channels x channels) move
credit between channels that fire together: the map at position ``i`` is ``w^T K x_i`` instead of
``w^T x_i``. ``K`` is learnt per image and target from the feature map's own states (the channel
vectors ``x_i`` of its positions): the conceptor of the states the base map marks as positive
evidence, AND NOT the conceptor of the states it marks as pseudo-negative evidence. The derivation,
the equations and the choices the paper leaves open are in ``docs/explain.md`` (Conceptor-CAM).

Everything is batched: the ``(C, C)`` algebra is done in the ``k = min(C, h*w)``-dimensional span of
each image's states (one batched SVD per batch), which gives the same ``K x_i`` as the full
``(C, C)`` matrices (tested), for ``B x T`` problems at once, in float64 outside autocast.

Methods (signature as in :mod:`weakloc.explain.methods`): ``conceptorcam`` (CAM's weights),
``conceptor-gradcam``, ``conceptor-gradcam++`` and ``conceptor-scorecam``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from weakloc.checks import check_choice, check_float
from weakloc.explain.layers import activation_grid, is_weakloc_net
from weakloc.explain.methods import TargetsFn, _gradcam_pp_weights, activations_and_gradients
from weakloc.explain.perturbation import masked_scores
from weakloc.explain.registry import ExplainMethod, register

__all__ = ["EVIDENCE", "conceptor", "conceptor_and", "conceptor_gradcam", "conceptor_gradcam_pp", "conceptor_maps",
           "conceptor_not", "conceptor_or", "conceptor_scorecam", "conceptorcam", "evidence_weights"]

#: how the positive and pseudo-negative conceptors combine: ``and-not`` (C+ AND NOT C-) or ``positive`` (C+ alone)
EVIDENCE = ("and-not", "positive")
#: the states are scaled to unit mean squared norm, so directions holding less than about
#: ``aperture ** -2`` (1%) of an image's mean state energy are the ones a conceptor attenuates
DEFAULT_APERTURE = 10.0

# (B, T, k, max(k, h*w)) float64 elements per target chunk: bounds the memory of all-class maps
_CHUNK_ELEMENTS = 1 << 24


# --- conceptor algebra (Jaeger 2014), batched over any leading dimensions ---------------------
# Equation numbers: arXiv 1403.3369 v1 (docs/explain.md says why v1).

def _eye(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand(m.shape)


def _sym(m: torch.Tensor) -> torch.Tensor:
    return (m + m.transpose(-1, -2)) / 2


def conceptor(r: torch.Tensor, aperture: float) -> torch.Tensor:
    """The conceptor of a correlation matrix: ``C = R (R + aperture^-2 I)^-1`` (Jaeger eq. (7)).

    ``(..., n, n)`` symmetric positive semi-definite -> ``(..., n, n)``, eigenvalues ``r / (r +
    aperture^-2)`` in [0, 1) on ``R``'s eigenvectors. ``R`` may be singular.
    """
    check_float("aperture", aperture, 0.0, None, low_open=True)
    shifted = r + _eye(r) * aperture ** -2
    return _sym(torch.linalg.solve(shifted, r))  # (R + a^-2 I)^-1 R, which commutes with R


def conceptor_not(c: torch.Tensor) -> torch.Tensor:
    """``NOT C = I - C`` (Jaeger eq. (28))."""
    return _eye(c) - c


def _range(c: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The projector onto the range of a symmetric ``c`` and its pseudo-inverse, both ``(..., n, n)``."""
    e, v = torch.linalg.eigh(_sym(c))
    keep = e > tol
    inv = torch.where(keep, 1 / torch.where(keep, e, torch.ones_like(e)), torch.zeros_like(e))
    return (v * keep.to(v.dtype)[..., None, :]) @ v.transpose(-1, -2), (v * inv[..., None, :]) @ v.transpose(-1, -2)


def conceptor_and(c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``C AND B``: ``(C^-1 + B^-1 - I)^-1`` (Jaeger eq. (30)), and for singular conceptors its general
    form ``P (P^T (C^+ + B^+ - I) P)^-1 P^T`` (eq. (32)) with ``^+`` the pseudo-inverse and ``P`` an
    orthonormal basis of the intersection of the ranges of ``C`` and ``B``.

    ``(..., n, n)`` x ``(..., n, n)`` -> ``(..., n, n)``. Eigenvalues below ``n`` machine epsilons
    count as zero (a conceptor's spectrum lies in [0, 1]); two directions are one when the cosine of
    their angle is within the square root of machine epsilon of 1. No per-matrix rank is needed:
    the restriction to the intersection is done with projectors, so every matrix of a batch has
    the same shape whatever its rank.
    """
    n = c.shape[-1]
    eps = torch.finfo(c.dtype).eps
    proj_c, pinv_c = _range(c, n * eps)
    proj_b, pinv_b = _range(b, n * eps)
    # the intersection of the ranges: eigenvalue 2 of P_C + P_B (1 + cos of the principal angle elsewhere)
    e, v = torch.linalg.eigh(_sym(proj_c + proj_b))
    both = (e > 2 - math.sqrt(eps)).to(v.dtype)
    pi = (v * both[..., None, :]) @ v.transpose(-1, -2)
    rest = _eye(pi) - pi
    # block diagonal: the restricted (C^+ + B^+ - I) on the intersection (>= I there), the identity off it
    m = pi @ (pinv_c + pinv_b - _eye(c)) @ pi + rest
    return _sym(torch.linalg.inv(_sym(m)) - rest)


def conceptor_or(c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``C OR B = NOT (NOT C AND NOT B)`` (de Morgan; Jaeger 2014, Definition 4)."""
    return conceptor_not(conceptor_and(conceptor_not(c), conceptor_not(b)))


# --- Conceptor-CAM -----------------------------------------------------------------------------

def evidence_weights(base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and pseudo-negative evidence of each position from the base map: ``p`` = the base map
    min-max scaled to [0, 1], ``q = 1 - p``, each divided by its sum (weights of a mean).

    ``(..., N)`` -> two ``(..., N)``. A constant base map has no positive evidence (``p`` all zero).
    """
    lo, hi = base.amin(-1, keepdim=True), base.amax(-1, keepdim=True)
    span = hi - lo
    p = torch.where(span > 0, (base - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(base))
    q = 1 - p
    tiny = torch.finfo(base.dtype).tiny
    return p / p.sum(-1, keepdim=True).clamp_min(tiny), q / q.sum(-1, keepdim=True).clamp_min(tiny)


def _check_options(aperture, evidence) -> None:
    check_float("option aperture", aperture, 0.0, None, low_open=True)
    check_choice("option evidence", evidence, EVIDENCE)


def conceptor_maps(act: torch.Tensor, weights: torch.Tensor, aperture: float = DEFAULT_APERTURE,
                   evidence: str = "and-not") -> torch.Tensor:
    """Conceptor-CAM maps from a feature map and a CAM method's channel weights.

    For image ``b`` and target ``t``, with states ``x_i`` (the ``C`` channels at position ``i``,
    scaled to unit mean squared norm) and base map ``s_i = w^T x_i``:
    ``R+ = sum_i p_i x_i x_i^T``, ``R- = sum_i q_i x_i x_i^T`` (:func:`evidence_weights`),
    ``C+ = conceptor(R+)``, ``C- = conceptor(R-)``, ``K = C+ AND NOT C-`` (``evidence="and-not"``)
    or ``K = C+`` (``"positive"``), and the map is ``w^T K x_i``.

    Args:
        act: ``(B, C, h, w)`` activations.
        weights: ``(B, T, C)`` the base method's channel weights of each target.
        aperture: the conceptors' aperture (> 0).
        evidence: ``and-not`` or ``positive`` (see :data:`EVIDENCE`).

    Returns:
        ``(B, T, h, w)`` float32 maps (NaN for an image whose activations or weights are not finite).
    """
    _check_options(aperture, evidence)
    b, c, h, w = act.shape
    t = weights.shape[1]
    dt = torch.float32 if act.device.type == "mps" else torch.float64  # MPS has no float64
    with torch.autocast(act.device.type, enabled=False):
        x = act.detach().to(dt).flatten(2)  # (B, C, N)
        wt = weights.detach().to(dt)  # (B, T, C)
        finite = torch.isfinite(x).flatten(1).all(1) & torch.isfinite(wt).flatten(1).all(1)  # (B,)
        x = torch.where(finite[:, None, None], x, torch.zeros_like(x))
        wt = torch.where(finite[:, None, None], wt, torch.zeros_like(wt))
        # States in an orthonormal basis u of their span: x_i = u z_i. Every conceptor below lives in
        # that span (and ¬C- is never singular), so K x_i = u (k-dimensional K) z_i exactly.
        u, s, vh = torch.linalg.svd(x, full_matrices=False)  # (B, C, k), (B, k), (B, k, N)
        z = s[..., None] * vh
        energy = z.pow(2).sum(1).mean(1)  # (B,) mean squared norm of the states
        z = z / energy.clamp_min(torch.finfo(dt).tiny).sqrt()[:, None, None]
        omega = torch.einsum("bck,btc->btk", u, wt)  # the weights in the same basis
        k, n = z.shape[1], z.shape[2]
        out = torch.empty(b, t, n, dtype=dt, device=x.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, b * k * max(k, n)))
        for start in range(0, t, step):  # target chunks, so that all-class maps fit in memory
            om = omega[:, start:start + step]
            base = torch.einsum("btk,bkn->btn", om, z)
            p, q = evidence_weights(base)
            positive = conceptor(torch.einsum("bkn,btn,bln->btkl", z, p, z), aperture)
            if evidence == "positive":
                kmat = positive
            else:
                negative = conceptor(torch.einsum("bkn,btn,bln->btkl", z, q, z), aperture)
                kmat = conceptor_and(positive, conceptor_not(negative))
            out[:, start:start + step] = torch.einsum("btk,btkl,bln->btn", om, kmat, z)
        out = torch.where(finite[:, None, None], out, torch.full_like(out, float("nan")))
    return out.float().view(b, t, h, w)


WeightsFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _cam_weights(model, images, targets_fn, layer):
    """CAM's weights: the classifier's, for a weakloc model's own feature map (one forward); else Grad-CAM's."""
    if layer is not None or not is_weakloc_net(model):
        return _gradcam_weights(model, images, targets_fn, layer)
    act, logits = activation_grid(model, images, None)
    targets = targets_fn(logits)
    return act, model.classifier.weight[:, :, 0, 0].detach()[targets], targets, logits


def _gradcam_weights(model, images, targets_fn, layer):
    act, grads, targets, logits = activations_and_gradients(model, images, targets_fn, layer)
    return act, grads.float().mean(dim=(-2, -1)), targets, logits


def _gradcam_pp_channel_weights(model, images, targets_fn, layer):
    act, g, targets, logits = activations_and_gradients(model, images, targets_fn, layer)
    g = g.float()
    return act, _gradcam_pp_weights(act[:, None].float(), g, g.pow(2), g.pow(3))[..., 0, 0], targets, logits


def _scorecam_weights(model, images, targets_fn, layer, chunk: int = 64):
    act, logits = activation_grid(model, images, layer)
    targets = targets_fn(logits)
    return act, masked_scores(model, images, act, targets, chunk=chunk).softmax(-1), targets, logits


def _conceptor_method(weights_fn: WeightsFn, doc: str):
    def method(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *,
               aperture: float = DEFAULT_APERTURE, evidence: str = "and-not"):
        _check_options(aperture, evidence)  # before any forward
        act, weights, targets, logits = weights_fn(model, images, targets_fn, layer)
        return conceptor_maps(act, weights, aperture, evidence), targets, logits

    method.__doc__ = doc
    return method


_OPTIONS_DOC = """

Options: ``aperture`` (> 0, default 10) of the conceptors; ``evidence`` ``and-not`` (C+ AND NOT C-,
default) or ``positive`` (C+ alone). Returns raw maps ``(B, T, h, w)``, targets ``(B, T)``, logits
``(B, K)``; see :func:`conceptor_maps`."""

conceptorcam = _conceptor_method(_cam_weights, """Conceptor-CAM on CAM's channel weights: the
classifier's weights for a weakloc model's own feature map (one forward, no gradient); for another
model or a named layer, the spatial mean of the gradient (Grad-CAM's weights, which are the
classifier's divided by h*w for a global-average-pooling + linear head).""" + _OPTIONS_DOC)
conceptor_gradcam = _conceptor_method(_gradcam_weights, "Conceptor-CAM on Grad-CAM's channel weights." + _OPTIONS_DOC)
conceptor_gradcam_pp = _conceptor_method(_gradcam_pp_channel_weights, "Conceptor-CAM on Grad-CAM++'s channel weights." + _OPTIONS_DOC)


def conceptor_scorecam(model, images: torch.Tensor, targets_fn: TargetsFn, layer: str | None = None, *,
                       aperture: float = DEFAULT_APERTURE, evidence: str = "and-not", chunk: int = 64):
    """Conceptor-CAM on Score-CAM's channel weights (``chunk`` masked copies per forward)."""
    _check_options(aperture, evidence)
    act, weights, targets, logits = _scorecam_weights(model, images, targets_fn, layer, chunk)
    return conceptor_maps(act, weights, aperture, evidence), targets, logits


conceptor_scorecam.__doc__ += _OPTIONS_DOC

for _name, _fn, _grad, _summary in [
    ("conceptorcam", conceptorcam, False, "Conceptor-CAM: CAM's weights moved between co-firing channels by a conceptor "
                                          "(positive AND NOT pseudo-negative evidence); Grad-CAM's weights beyond weakloc models"),
    ("conceptor-gradcam", conceptor_gradcam, True, "Conceptor-CAM on Grad-CAM's channel weights"),
    ("conceptor-gradcam++", conceptor_gradcam_pp, True, "Conceptor-CAM on Grad-CAM++'s channel weights"),
    ("conceptor-scorecam", conceptor_scorecam, False, "Conceptor-CAM on Score-CAM's channel weights"),
]:
    register(ExplainMethod(_name, _fn, _grad, True, _summary))
