"""Explanation quality ("faithfulness"): does the map point at what the *model* uses?

Metrics, all computed in batches on the images' device:

- **Deletion / insertion** (Petsiuk et al., RISE, BMVC 2018): remove (insert) pixels in order of
  decreasing map value and follow the model's probability of the target class. A faithful map
  makes the probability fall fast under deletion (low AUC) and rise fast under insertion (high AUC).
- **Average Drop / Increase in Confidence** (Chattopadhay et al., Grad-CAM++, WACV 2018): show the
  model only the image weighted by the map and compare its confidence with that on the full image.

:func:`compare_methods` runs every metric for several heatmap methods over a data loader and gives
one row per method.

>>> q = explanation_quality(model, images, "gradcam", steps=50)
>>> q["deletion"].shape   # (B, T)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from weakloc.checks import check_int
from weakloc.config import MapConfig
from weakloc.errors import OptionError, WeaklocError
from weakloc.explain import Heatmaps, explain, get_method, pipeline
from weakloc.explain.targets import TargetSpec
from weakloc.results import Result

BASELINES = ("blur", "zero", "mean", "black")
"""Kinds of substrate for deletion/insertion (see :func:`baseline_images`)."""

MAX_STEPS = 10_000
"""Most deletion / insertion steps: each step is one forward pass per map, so the work grows with
``steps`` (the CLI's ``--steps`` has the same bound)."""

BLUR_KERNEL = 11
BLUR_SIGMA = 5.0
"""RISE's blur: an 11-tap Gaussian with sigma 5 pixels (``gkern(11, 5)`` in the reference code)."""


class DeletionInsertion(NamedTuple):
    """Result of :func:`deletion_insertion`.

    Attributes:
        deletion: ``(B, T)`` area under the deletion curve (lower is better).
        insertion: ``(B, T)`` area under the insertion curve (higher is better).
        deletion_curve: ``(B, T, steps + 1)`` target probability after removing ``k / steps`` of
            the pixels, ``k = 0..steps``; None unless asked for.
        insertion_curve: ``(B, T, steps + 1)`` the same for insertion; None unless asked for.
    """

    deletion: torch.Tensor
    insertion: torch.Tensor
    deletion_curve: torch.Tensor | None = None
    insertion_curve: torch.Tensor | None = None


class DropIncrease(NamedTuple):
    """Result of :func:`average_drop_increase`, per map.

    Attributes:
        drop: ``(B, T)`` ``max(0, Y - O) / Y`` as a fraction (multiply the mean by 100 for Average Drop %).
        increase: ``(B, T)`` bool, ``O > Y`` (its mean x 100 is Increase in Confidence %).
        score: ``(B, T)`` ``Y``, the target probability on the image.
        explanation_score: ``(B, T)`` ``O``, the target probability on the explanation image.
    """

    drop: torch.Tensor
    increase: torch.Tensor
    score: torch.Tensor
    explanation_score: torch.Tensor


@dataclass
class MethodQuality(Result):
    """One method's row of :func:`compare_methods`: mean faithfulness over its maps.

    Attributes:
        method: the method's name.
        deletion_auc: area under the deletion curve (lower is better).
        insertion_auc: area under the insertion curve (higher is better).
        average_drop_pct: Average Drop, % (lower is better).
        increase_in_confidence_pct: Increase in Confidence, % (higher is better).
        ms_per_image: time to make the maps, milliseconds per image.
        maps, images: maps scored and images they were made for.
    """

    method: str
    deletion_auc: float
    insertion_auc: float
    average_drop_pct: float
    increase_in_confidence_pct: float
    ms_per_image: float
    maps: int
    images: int


def _make_maps(model, images: torch.Tensor, method: str | MapConfig, target: TargetSpec, explain_kwargs: dict) -> Heatmaps:
    """Maps of ``method``: resolved map settings go through the map pipeline
    (:func:`~weakloc.explain.pipeline.make_maps`); a bare name is :func:`~weakloc.explain.explain`
    with its defaults (any classifier, stored settings or not)."""
    if isinstance(method, MapConfig):
        return pipeline.make_maps(model, images, method, target, **explain_kwargs)
    return explain(model, images, method, target=target, **explain_kwargs)


def _normalization(model, channels: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, C, 1, 1)`` mean and std of the model's input normalisation (``model.config.mean/std``)."""
    cfg = getattr(model, "config", None)
    mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    if mean is None or std is None:
        raise WeaklocError("the model's config has no input mean/std; they are needed to un-normalise images")
    if len(mean) != channels or len(std) != channels:
        raise WeaklocError(f"images have {channels} channels but the model's mean/std have {len(mean)}/{len(std)}")
    m = torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1)
    return m, s


def gaussian_blur(images: torch.Tensor, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` images, each channel on its own.

    ``kernel`` taps (odd), weights ``exp(-d^2 / (2 sigma^2))`` normalised to sum 1 -- RISE's kernel.
    Borders are replicate-padded (RISE pads with zeros, which darkens the frame towards the mean
    colour); so a constant image stays exactly constant.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise WeaklocError(f"blur kernel size must be a positive odd number, got {kernel}")
    if sigma <= 0:
        raise WeaklocError(f"blur sigma must be positive, got {sigma}")
    c = images.shape[1]
    d = torch.arange(kernel, device=images.device, dtype=torch.float32) - kernel // 2
    g = torch.exp(-d.square() / (2 * sigma**2))
    g = (g / g.sum()).to(images.dtype)
    p = kernel // 2
    x = F.pad(images, (p, p, p, p), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(x, g.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


def baseline_images(images: torch.Tensor, kind: str = "blur", model=None, kernel: int = BLUR_KERNEL,
                    sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """The substrate that deleted pixels become and insertion starts from, ``(B, C, H, W)``.

    All in the model's (normalised) input space:

    - ``blur``: :func:`gaussian_blur` of the image (RISE's insertion substrate).
    - ``zero``: the zero tensor of the normalised input -- RISE's deletion substrate
      (``torch.zeros_like`` on normalised images); in pixel space, the normalisation's mean colour.
    - ``mean``: each image's own per-channel mean colour.
    - ``black``: black pixels, normalised: ``-mean / std`` (needs ``model.config.mean/std``).
    """
    if kind == "blur":
        return gaussian_blur(images, kernel, sigma)
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
    if kind == "black":
        if model is None:
            raise WeaklocError("the 'black' baseline needs the model (for its input mean/std)")
        m, s = _normalization(model, images.shape[1], images.device, images.dtype)
        return (-m / s).expand_as(images).contiguous()
    raise WeaklocError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


def _check_inputs(images: torch.Tensor, maps: torch.Tensor, targets) -> torch.Tensor:
    """Validate shapes; return targets as ``(B, T)`` long on the images' device."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise WeaklocError(f"images must be a (B, C, H, W) tensor, got shape {tuple(getattr(images, 'shape', ()))}")
    if not isinstance(maps, torch.Tensor) or maps.ndim != 4:
        raise WeaklocError(f"maps must be a (B, T, H, W) tensor, got shape {tuple(getattr(maps, 'shape', ()))}")
    b, _, h, w = images.shape
    if maps.shape[0] != b or tuple(maps.shape[-2:]) != (h, w):
        raise WeaklocError(f"maps of shape {tuple(maps.shape)} do not match images of shape {tuple(images.shape)}: "
                           f"need ({b}, T, {h}, {w})")
    targets = torch.as_tensor(targets, device=images.device)
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise WeaklocError("targets must be integer class indices")
    targets = targets.long()
    if targets.ndim == 1 and maps.shape[1] == 1:
        targets = targets[:, None]
    if tuple(targets.shape) != tuple(maps.shape[:2]):
        raise WeaklocError(f"targets of shape {tuple(targets.shape)} do not match maps of shape {tuple(maps.shape)}: "
                           f"need one class index per map, ({maps.shape[0]}, {maps.shape[1]})")
    return targets


def _check_classes(model, targets: torch.Tensor) -> None:
    """Targets in ``0..K-1`` when the model says how many classes it has (one check, before any work)."""
    classes = getattr(getattr(model, "config", None), "classes", None)
    if classes and targets.numel() and bool(((targets < 0) | (targets >= len(classes))).any()):
        raise WeaklocError(f"target class indices must be in 0..{len(classes) - 1}")


def _chunked_scores(model, total: int, fill: Callable[[int, int, torch.Tensor], None], targets: torch.Tensor,
                    like: torch.Tensor, chunk: int) -> torch.Tensor:
    """Target probabilities of ``total`` model inputs made ``chunk`` at a time in one reused buffer.

    Args:
        fill: ``(start, end, buffer)`` writes inputs ``start..end-1`` into ``buffer`` ``(end-start, C, H, W)``.
        targets: ``(total, R)`` class indices read for each input.
        like: an image tensor ``(B, C, H, W)`` giving the inputs' shape, dtype and device.

    Returns:
        ``(total, R)`` float32 probabilities (``model.probabilities``).
    """
    out = torch.empty(targets.shape, device=like.device, dtype=torch.float32)
    if total == 0:
        return out
    buf = like.new_empty((min(chunk, total), *like.shape[1:]))
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        x = buf[: end - start]
        fill(start, end, x)
        probs = model.probabilities(model(x).float())
        out[start:end] = probs.gather(1, targets[start:end])
    return out


def _check_chunk(chunk: int) -> None:
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise OptionError(f"chunk: must be a positive integer, got {chunk!r}")


def check_settings(steps, baseline, chunk) -> tuple[str, str]:
    """Check deletion / insertion's ``steps`` (1..MAX_STEPS), ``baseline`` (a name of
    :data:`BASELINES` or a ``(deletion, insertion)`` pair) and ``chunk`` (>= 1) before any work.

    Returns:
        the ``(deletion, insertion)`` baseline kinds.

    Raises:
        OptionError: naming the argument.
    """
    check_int("steps", steps, 1, MAX_STEPS)
    _check_chunk(chunk)
    kinds = (baseline, baseline) if isinstance(baseline, str) else tuple(baseline) if isinstance(baseline, (tuple, list)) else ()
    if len(kinds) != 2 or any(k not in BASELINES for k in kinds):
        raise OptionError(f"baseline: unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)} or a (deletion, insertion) pair")
    return kinds


def trapezoid_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under ``(..., S + 1)`` curves sampled at ``x = 0, 1/S, ..., 1``: the trapezoid mean
    ``(sum(y) - (y_0 + y_S) / 2) / S``. ``(...)``."""
    s = curves.shape[-1] - 1
    if s < 1:
        raise WeaklocError("a curve needs at least two points")
    return (curves.sum(-1) - (curves[..., 0] + curves[..., -1]) / 2) / s


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel of each map in decreasing order of map value, ``(B, T, H, W)`` -> ``(B, T, H*W)``.

    Rank 0 is the highest value. Ties keep raster order (row-major: the earlier pixel ranks first);
    NaN ranks last.
    """
    flat = maps.detach().flatten(-2).float()
    flat = torch.where(torch.isnan(flat), torch.full_like(flat, -math.inf), flat)
    order = flat.argsort(dim=-1, descending=True, stable=True)
    ar = torch.arange(flat.shape[-1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def step_counts(pixels: int, steps: int, device=None) -> torch.Tensor:
    """Pixels changed after each step: ``floor(k * pixels / steps)``, ``k = 0..steps`` -> ``(steps + 1,)``.

    Starts at 0 and ends at ``pixels``; equal increments when ``steps`` divides ``pixels``.
    """
    return torch.arange(steps + 1, device=device, dtype=torch.long) * pixels // steps


def deletion_insertion(
    model,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 100,
    baseline: str | tuple[str, str] = "blur",
    chunk: int = 128,
    return_curves: bool = False,
    *,
    blur_kernel: int = BLUR_KERNEL,
    blur_sigma: float = BLUR_SIGMA,
    check_targets: bool = True,
) -> DeletionInsertion:
    """RISE's deletion and insertion metrics (Petsiuk et al., BMVC 2018) of every map.

    Pixels are ranked by decreasing map value (:func:`pixel_ranks`; ties in raster order). At step
    ``k = 0..steps`` the ``n_k = floor(k * H * W / steps)`` top-ranked pixels (all channels) are
    changed (:func:`step_counts`):

    - deletion: the image with those pixels replaced by the baseline (``k = 0``: the image,
      ``k = steps``: the baseline);
    - insertion: the baseline with those pixels taken from the image (``k = 0``: the baseline,
      ``k = steps``: the image).

    The score is ``model.probabilities(model(x))`` of the map's target class. The AUC is the
    trapezoid mean of the ``steps + 1`` scores over ``x = k / steps`` in [0, 1]
    (:func:`trapezoid_auc`), as in the RISE code.

    All perturbed inputs are made by tensor ops on the images' device from one ``argsort`` per map
    (``mask = rank < n_k``) and go through the model ``chunk`` at a time in one reused buffer, under
    ``torch.no_grad``. The model should be in eval mode.

    Args:
        model: a :class:`~weakloc.models.WeaklocNet` or anything with ``model(x) -> (N, K)`` logits
            and ``model.probabilities(logits)``.
        images: ``(B, C, H, W)`` normalised model inputs.
        maps: ``(B, T, H, W)`` heatmaps at the images' size (only their order matters).
        targets: ``(B, T)`` class index of each map (``(B,)`` when ``T == 1``).
        steps: number of increments (``steps + 1`` points per curve).
        baseline: the substrate (:func:`baseline_images`): ``"blur"`` (default, RISE's insertion
            substrate), ``"zero"`` (the zero normalised tensor, RISE's deletion substrate),
            ``"mean"`` or ``"black"``; or a pair ``(deletion, insertion)``, e.g. ``("zero", "blur")``
            for RISE's exact protocol.
        chunk: most inputs per forward pass.
        return_curves: also return the curves ``(B, T, steps + 1)``.
        blur_kernel, blur_sigma: the blur baseline's Gaussian (pixels).
        check_targets: check that targets are in ``0..K-1`` (``K = len(model.config.classes)``);
            one device-to-host sync. Off when the targets come from :func:`~weakloc.explain.explain`.

    Returns:
        :class:`DeletionInsertion`, tensors float32 on the images' device.

    Raises:
        WeaklocError: shapes that do not match; OptionError (a subclass): an unknown baseline,
            ``steps`` outside ``1..MAX_STEPS`` or ``chunk`` < 1 (:func:`check_settings`).
    """
    targets = _check_inputs(images, maps, targets)
    kinds = check_settings(steps, baseline, chunk)
    if check_targets:
        _check_classes(model, targets)
    b, t = targets.shape
    h, w = images.shape[-2:]
    s1 = steps + 1
    dev = images.device
    with torch.no_grad():
        x = images.detach()
        base_del = baseline_images(x, kinds[0], model, blur_kernel, blur_sigma).to(x.dtype)
        base_ins = base_del if kinds[1] == kinds[0] else baseline_images(x, kinds[1], model, blur_kernel, blur_sigma).to(x.dtype)
        rank = pixel_ranks(maps.to(dev))  # (B, T, N)
        counts = step_counts(h * w, steps, dev)  # (S+1,)
        # Input j = ((mode * B + b) * T + t) * (S+1) + k, mode 0 = deletion, 1 = insertion. The
        # n_k top-ranked pixels show `top`, the others `rest`; both indexed by mode * B + b.
        top = torch.cat([base_del, x])
        rest = torch.cat([x, base_ins])
        total = 2 * b * t * s1
        tgt = targets[None, :, :, None].expand(2, b, t, s1).reshape(-1, 1)

        def fill(start: int, end: int, buf: torch.Tensor) -> None:
            j = torch.arange(start, end, device=dev)
            k = j % s1
            bt = j // s1
            ti = bt % t
            mb = bt // t
            mask = (rank[mb % b, ti] < counts[k][:, None]).view(-1, 1, h, w)
            torch.where(mask, top.index_select(0, mb), rest.index_select(0, mb), out=buf)

        scores = _chunked_scores(model, total, fill, tgt, x, chunk).view(2, b, t, s1)
    auc = trapezoid_auc(scores)
    if return_curves:
        return DeletionInsertion(auc[0], auc[1], scores[0], scores[1])
    return DeletionInsertion(auc[0], auc[1])


def average_drop_increase(model, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 128, *, check_targets: bool = True) -> DropIncrease:
    """Average Drop and Increase in Confidence (Chattopadhay et al., Grad-CAM++, WACV 2018), per map.

    The explanation image multiplies the *pixel values* (not the normalised ones) by the map,
    broadcast over channels: with ``mean``/``std`` from ``model.config``,
    ``u = x * std + mean``, ``E = ((u * map) - mean) / std``, computed as the equal
    ``x * map + (mean / std) * (map - 1)`` (exactly ``x`` where the map is 1; normalised black where
    it is 0). ``Y`` is the target probability on the image, ``O`` on ``E``:
    ``drop = max(0, Y - O) / Y`` and ``increase = O > Y``. Average Drop % is ``100 * drop.mean()``,
    Increase in Confidence % is ``100 * increase.float().mean()``; the caller averages.

    Forward passes run ``chunk`` images at a time in one reused buffer, under ``torch.no_grad``.

    Args:
        images: ``(B, C, H, W)`` normalised model inputs.
        maps: ``(B, T, H, W)`` heatmaps in [0, 1] (e.g. ``Heatmaps.normalized``; not clamped).
        targets: ``(B, T)`` class index of each map (``(B,)`` when ``T == 1``).
        chunk, check_targets: see :func:`deletion_insertion`.

    Returns:
        :class:`DropIncrease` of ``(B, T)`` tensors on the images' device.
    """
    targets = _check_inputs(images, maps, targets)
    _check_chunk(chunk)
    if check_targets:
        _check_classes(model, targets)
    b, t = targets.shape
    c = images.shape[1]
    dev = images.device
    with torch.no_grad():
        x = images.detach()
        m, s = _normalization(model, c, dev, x.dtype)
        shift = m / s
        mp = maps.detach().to(dev, x.dtype)  # (B, T, H, W)

        def fill_images(start: int, end: int, buf: torch.Tensor) -> None:
            buf.copy_(x[start:end])

        def fill_explained(start: int, end: int, buf: torch.Tensor) -> None:
            j = torch.arange(start, end, device=dev)
            bi, ti = j // t, j % t
            mj = mp[bi, ti][:, None]  # (n, 1, H, W)
            torch.mul(x.index_select(0, bi), mj, out=buf)
            buf.add_(shift * (mj - 1))

        y = _chunked_scores(model, b, fill_images, targets, x, chunk)  # (B, T)
        o = _chunked_scores(model, b * t, fill_explained, targets.reshape(-1, 1), x, chunk).view(b, t)
    drop = (y - o).clamp_min(0) / y.clamp_min(torch.finfo(torch.float32).tiny)
    return DropIncrease(drop, o > y, y, o)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def explanation_quality(
    model,
    images: torch.Tensor,
    method: str | MapConfig,
    target: TargetSpec = "predicted",
    *,
    steps: int = 100,
    baseline: str | tuple[str, str] = "blur",
    chunk: int = 128,
    **explain_kwargs,
) -> dict:
    """Maps of ``method`` for a batch and all faithfulness metrics of each map.

    Makes the maps -- with :func:`weakloc.explain.pipeline.make_maps` when ``method`` is resolved
    map settings (:func:`~weakloc.explain.pipeline.map_settings`), else with
    :func:`weakloc.explain.explain` (``**explain_kwargs``: ``layer``, ``relu``) -- and scores their
    ``normalized`` maps with :func:`deletion_insertion` and :func:`average_drop_increase`. The time
    spent making the maps is measured with the device synchronised before and after (CUDA).

    Args:
        images: ``(B, C, H, W)`` normalised, on the model's device.
        method: a method name, or a model's resolved map settings.
        target: which class each map is for (see :func:`weakloc.explain.resolve_targets`).

    Returns:
        dict of ``(B, T)`` tensors on the images' device -- ``deletion``, ``insertion`` (AUCs),
        ``drop`` (fraction), ``increase`` (bool), ``score`` (target probability on the image),
        ``targets`` -- and ``seconds`` (float, time in ``explain``).
    """
    dev = images.device
    _sync(dev)
    t0 = time.perf_counter()
    heat = _make_maps(model, images, method, target, explain_kwargs)
    _sync(dev)
    seconds = time.perf_counter() - t0
    di = deletion_insertion(model, images, heat.normalized, heat.targets, steps=steps, baseline=baseline, chunk=chunk,
                            check_targets=False)
    ad = average_drop_increase(model, images, heat.normalized, heat.targets, chunk=chunk, check_targets=False)
    return {
        "deletion": di.deletion, "insertion": di.insertion, "drop": ad.drop, "increase": ad.increase,
        "score": ad.score, "targets": heat.targets, "seconds": seconds,
    }


def _batch_images(batch) -> torch.Tensor | None:
    """The ``(B, C, H, W)`` images of a batch: a tensor, a dict with ``image`` (as
    :func:`weakloc.data.dataset.collate_skip_bad` makes; None when every image failed), or a
    tuple/list whose first item is the images."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise WeaklocError("a dict batch must hold the images under 'image'")
        x = batch["image"]
    elif isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    else:
        x = batch
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise WeaklocError(f"a batch must give images as a (B, C, H, W) tensor, got {type(x).__name__}"
                           f"{' of shape ' + str(tuple(x.shape)) if isinstance(x, torch.Tensor) else ''}")
    return x


def compare_methods(
    model,
    loader_or_batches: Iterable,
    methods: Sequence[str | MapConfig] = ("cam", "gradcam", "random"),
    target: TargetSpec = "predicted",
    steps: int = 100,
    device: str | torch.device | None = None,
    *,
    baseline: str | tuple[str, str] = "blur",
    chunk: int = 128,
    warmup: bool = True,
    **explain_kwargs,
) -> list[MethodQuality]:
    """Faithfulness of several heatmap methods on the same images, one row per method.

    Data are read once; every batch is explained by every method (:func:`explanation_quality`).
    Sums stay on the device; each method's totals come to the host once, at the end.

    Args:
        model: a :class:`~weakloc.models.WeaklocNet`; moved to ``device`` and put in eval mode.
        loader_or_batches: an iterable of batches -- a ``DataLoader`` over
            :class:`~weakloc.data.dataset.ImageDataset` with ``collate_skip_bad`` (as
            :func:`~weakloc.evaluate.evaluate_model` builds), ``(images, ...)`` tuples, or tensors
            ``(B, C, H, W)`` of normalised images.
        methods: registered method names (:data:`weakloc.explain.METHODS`), or resolved map
            settings (:func:`~weakloc.explain.pipeline.map_settings`), whose maps are the map
            pipeline's (``explain_eval`` passes these).
        target: which class each map is for (default: the predicted class).
        steps, baseline, chunk: see :func:`deletion_insertion`.
        device: default: the model's.
        warmup: explain the first batch once per method, untimed, before measuring (lazy CUDA
            initialisation and cuDNN autotuning would otherwise be charged to the first method).
        **explain_kwargs: passed to :func:`~weakloc.explain.explain` (``layer``, ``relu``).

    Returns:
        one :class:`MethodQuality` per method, in ``methods`` order.

    Raises:
        WeaklocError: an unknown method, no methods, or no images.
    """
    methods = [methods] if isinstance(methods, (str, MapConfig)) else list(methods)
    if not methods:
        raise OptionError("methods: no explanation methods to compare")
    for m in methods:
        if isinstance(m, MapConfig):
            pipeline.check_map_settings(m, "methods: ")
        elif isinstance(m, str):
            get_method(m)  # unknown names fail before any work
        else:
            raise OptionError(f"methods: method names are strings, got {m!r}")
    names = [m.method if isinstance(m, MapConfig) else m for m in methods]
    check_settings(steps, baseline, chunk)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    dtype = torch.float32 if device.type == "mps" else torch.float64
    sums = [torch.zeros(4, device=device, dtype=dtype) for _ in methods]  # deletion, insertion, drop, increase
    seconds = [0.0] * len(methods)
    n_maps = [0] * len(methods)
    n_images = 0
    for batch in loader_or_batches:
        x = _batch_images(batch)
        if x is None or x.shape[0] == 0:
            continue
        x = x.to(device, non_blocking=True)
        if warmup and n_images == 0:
            for m in methods:
                _make_maps(model, x, m, target, explain_kwargs)
        n_images += x.shape[0]
        for i, m in enumerate(methods):
            q = explanation_quality(model, x, m, target=target, steps=steps, baseline=baseline, chunk=chunk, **explain_kwargs)
            parts = (q["deletion"], q["insertion"], q["drop"], q["increase"])
            sums[i] += torch.stack([p.to(dtype).sum() for p in parts])
            seconds[i] += q["seconds"]
            n_maps[i] += q["deletion"].numel()
    if n_images == 0:
        raise WeaklocError("no images to compare the methods on (every batch was empty or unreadable)")
    rows = []
    for i, name in enumerate(names):
        deletion, insertion, drop, increase = sums[i].tolist()  # the one host transfer per method
        n = n_maps[i]
        rows.append(MethodQuality(method=name, deletion_auc=deletion / n, insertion_auc=insertion / n,
                                  average_drop_pct=100 * drop / n, increase_in_confidence_pct=100 * increase / n,
                                  ms_per_image=1000 * seconds[i] / n_images, maps=n, images=n_images))
    return rows


__all__ = [
    "BASELINES", "MAX_STEPS", "DeletionInsertion", "DropIncrease", "MethodQuality", "average_drop_increase", "baseline_images", "check_settings", "compare_methods",
    "deletion_insertion", "explanation_quality", "gaussian_blur", "pixel_ranks", "step_counts", "trapezoid_auc",
]
