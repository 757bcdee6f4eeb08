"""WSOL metrics exactly as Choe et al. (CVPR 2020) define them: MaxBoxAcc, MaxBoxAccV2, GT-known
and Top-1 Loc, PxAP, and the centre baseline (see ``docs/metrics.md``).

The sweep is vectorised: binarisation cut points for all maps and thresholds are computed at once
on the maps' device; OpenCV contours are traced once per *distinct* cut of each map (a uint8 map has
at most 256, so a 0.001 step needs no more contour calls than a 0.01 one); IoUs of every box
against every GT box, and the per-threshold best, are one batched tensor computation.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from weakloc.checks import check_float
from weakloc.errors import OptionError
from weakloc.evaluate.boxes import box_iou_inclusive, contour_boxes
from weakloc.results import Result

IOU_DELTAS = (30, 50, 70)

MIN_STEP = 1e-4
"""Smallest threshold step of a sweep: at most 10,000 thresholds. A uint8 map has at most 256
distinct cuts, so a finer step adds no information, only ``(maps, thresholds)`` tables that grow
without bound (a step of 1e-9 would ask for a billion thresholds per map)."""

MAX_STEP = 0.5
"""Largest threshold step: the sweep still holds two thresholds (0 and 0.5)."""


def check_step(step, name: str = "step") -> float:
    """``step`` as a float in ``[MIN_STEP, MAX_STEP]``; else :class:`~weakloc.errors.OptionError` naming ``name``."""
    return check_float(name, step, MIN_STEP, MAX_STEP)


def check_thresholds(thresholds, name: str = "thresholds") -> torch.Tensor:
    """``thresholds`` as a 1-D float64 tensor of finite values in [0, 1] (a cut above the map's
    maximum would index past its 256 grey levels); else :class:`~weakloc.errors.OptionError`."""
    try:
        t = torch.as_tensor(thresholds, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise OptionError(f"{name}: expected numbers in [0, 1], got {thresholds!r}") from None
    if t.ndim != 1 or t.numel() == 0:
        raise OptionError(f"{name}: expected a non-empty 1-D list of thresholds, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool(((t < 0) | (t > 1)).any()):
        raise OptionError(f"{name}: thresholds must be finite numbers in [0, 1], got {t.tolist()[:5]}")
    return t


def threshold_list(step: float = 0.01) -> torch.Tensor:
    """``0, step, 2 step, ... < 1`` as the reference's ``np.arange(0, 1, step)`` (float64).

    Raises:
        OptionError: ``step`` not a finite number in ``[MIN_STEP, MAX_STEP]``.
    """
    return torch.from_numpy(np.arange(0, 1, check_step(step)))


def map_to_uint8(maps: torch.Tensor) -> torch.Tensor:
    """``uint8(map * 255)`` (truncation, as the reference's ``astype``), ``(..., H, W)``."""
    if torch.isnan(maps).any():
        raise ValueError("score maps hold NaN; normalise them first (NaN maps become zeros)")
    return (maps.double() * 255).to(torch.uint8)


def binarisation_cuts(u8: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Integer cut of each map at each threshold: ``int(tau * max)``; foreground is ``> cut``.

    Args:
        u8: ``(N, H, W)`` uint8 maps. thresholds: ``(T,)``.

    Returns:
        ``(N, T)`` int64.
    """
    top = u8.flatten(1).amax(1).double()
    return (thresholds.to(u8.device, torch.float64)[None, :] * top[:, None]).floor().long()


@dataclass
class BoxSweep:
    """Best IoU per map and threshold of a sweep.

    Attributes:
        thresholds: ``(T,)``.
        best_iou_largest: ``(N, T)`` best IoU of the largest contour's box (MaxBoxAcc V1).
        best_iou_all: ``(N, T)`` best IoU over all contour boxes (MaxBoxAccV2).
    """

    thresholds: torch.Tensor
    best_iou_largest: torch.Tensor
    best_iou_all: torch.Tensor


def box_sweep(maps: torch.Tensor, gt_boxes: list[torch.Tensor], thresholds: torch.Tensor, workers: int = 1) -> BoxSweep:
    """Best IoU of each map's boxes against its GT boxes at every threshold.

    Two cuts of a map whose foreground pixel counts are equal give the same mask (the foregrounds
    are nested), so contours are traced once per distinct foreground.

    Args:
        maps: ``(N, H, W)`` normalised maps in [0, 1] (any device).
        gt_boxes: N tensors ``(M_i, 4)`` of GT boxes in map pixels (``M_i >= 1``).
        thresholds: ``(T,)``.
        workers: threads tracing contours (more than 1 helps only with large maps and many cores).
    """
    n = maps.shape[0]
    if len(gt_boxes) != n:
        raise ValueError(f"{len(gt_boxes)} GT box sets for {n} maps")
    thresholds = check_thresholds(thresholds)
    u8 = map_to_uint8(maps)
    cuts = binarisation_cuts(u8, thresholds)  # (N, T)
    hist = torch.zeros(n, 257, dtype=torch.long, device=u8.device)
    hist.scatter_add_(1, u8.flatten(1).long() + 1, torch.ones_like(u8.flatten(1), dtype=torch.long))
    above = u8[0].numel() - hist.cumsum(1)  # above[:, c + 1] = pixels with value > c
    fg_count = above.gather(1, cuts + 1).cpu().numpy()  # (N, T): identifies each cut's mask
    cuts_np = cuts.cpu().numpy()
    u8_np = u8.cpu().numpy()
    slot_of = np.zeros(cuts_np.shape, dtype=np.int64)
    firsts = []
    for i in range(n):
        _, first, inverse = np.unique(fg_count[i], return_index=True, return_inverse=True)
        slot_of[i] = inverse
        firsts.append(cuts_np[i, first])

    def trace(i: int):
        boxes, slots, largest = [], [], []
        for u, c in enumerate(firsts[i]):
            _, binary = cv2.threshold(u8_np[i], int(c), 1, cv2.THRESH_BINARY)
            b, areas = contour_boxes(binary)
            if len(b) == 0:
                b, areas = np.zeros((1, 4), np.int64), np.zeros(1)
            flag = np.zeros(len(b), bool)
            flag[int(np.argmax(areas))] = True
            boxes.append(b)
            slots.append(np.full(len(b), u))
            largest.append(flag)
        return np.concatenate(boxes), np.concatenate(slots), np.concatenate(largest)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            traced = list(pool.map(trace, range(n)))
    else:
        traced = [trace(i) for i in range(n)]
    max_u = max(len(f) for f in firsts)
    boxes_t = torch.from_numpy(np.concatenate([t[0] for t in traced]))
    owner_t = torch.from_numpy(np.repeat(np.arange(n), [len(t[0]) for t in traced]))
    slot_t = torch.from_numpy(np.concatenate([t[1] for t in traced]))
    largest_t = torch.from_numpy(np.concatenate([t[2] for t in traced]))
    m_max = max(len(g) for g in gt_boxes)
    gt = torch.zeros(n, m_max, 4, dtype=torch.float64)
    valid = torch.zeros(n, m_max, dtype=torch.bool)
    for i, g in enumerate(gt_boxes):
        if len(g) == 0:
            raise ValueError(f"map {i} has no GT box")
        gt[i, : len(g)] = g.double().cpu()
        valid[i, : len(g)] = True
    ious = box_iou_inclusive(boxes_t[:, None, :], gt[owner_t]).squeeze(1)  # (R, M_max)
    best = ious.masked_fill(~valid[owner_t], -1.0).amax(1)
    flat = owner_t * max_u + slot_t
    table_all = torch.zeros(n * max_u, dtype=torch.float64).scatter_reduce(0, flat, best, "amax", include_self=True)
    table_big = torch.zeros(n * max_u, dtype=torch.float64).scatter_reduce(0, flat[largest_t], best[largest_t], "amax", include_self=True)
    index = torch.arange(n)[:, None] * max_u + torch.from_numpy(slot_of)
    return BoxSweep(thresholds.double(), table_big[index], table_all[index])


def box_accuracy_curves(best_iou: torch.Tensor, deltas=IOU_DELTAS) -> torch.Tensor:
    """BoxAcc(tau, delta) in percent, ``(len(deltas), T)``, from per-map best IoUs ``(N, T)``."""
    d = torch.tensor(deltas, dtype=torch.float64)[:, None, None] / 100
    return (best_iou[None] >= d - 1e-12).double().mean(1) * 100


@dataclass(kw_only=True)
class BoxMetrics(Result):
    """The box metrics of a threshold sweep (percentages) and the threshold that gives each best.

    Attributes:
        max_box_acc, max_box_acc_tau: MaxBoxAcc (V1: IoU 50, largest contour's box) and its threshold.
        max_box_acc_v2: MaxBoxAccV2, the mean of ``iou30``, ``iou50``, ``iou70``.
        iou30, iou50, iou70: the best BoxAcc (all contours' boxes) at IoU 30 / 50 / 70 %, each over
            its own threshold ``iou30_tau`` ...
        pxap: pixel average precision where masks exist, else None.
    """

    max_box_acc: float
    max_box_acc_tau: float
    max_box_acc_v2: float
    iou30: float
    iou30_tau: float
    iou50: float
    iou50_tau: float
    iou70: float
    iou70_tau: float
    pxap: float | None = None

    def to_dict(self) -> dict:
        """The protocol's names: ``MaxBoxAcc``, ``MaxBoxAcc_tau``, ``MaxBoxAccV2``, ``IoU30``,
        ``IoU30_tau``, ... and ``PxAP`` (only where masks exist)."""
        out = {"MaxBoxAcc": self.max_box_acc, "MaxBoxAcc_tau": self.max_box_acc_tau, "MaxBoxAccV2": self.max_box_acc_v2}
        for d in IOU_DELTAS:
            out[f"IoU{d}"] = getattr(self, f"iou{d}")
            out[f"IoU{d}_tau"] = getattr(self, f"iou{d}_tau")
        if self.pxap is not None:
            out["PxAP"] = self.pxap
        return out


@dataclass(kw_only=True)
class WSOLMetrics(BoxMetrics):
    """A map method's localization metrics: :class:`BoxMetrics` of the sweep, and GT-known / Top-1
    Loc at one fixed threshold.

    Attributes:
        method: the map method scored.
        step: threshold step of the sweep.
        gt_known_loc: share of maps whose largest-contour box at ``gt_known_tau`` has IoU >= 0.5 (%).
        top1_loc: the same, counting only samples whose class is also predicted (%).
        gt_known_tau: the fixed threshold of GT-known / Top-1 Loc.
    """

    method: str
    step: float
    gt_known_loc: float
    top1_loc: float
    gt_known_tau: float

    def to_dict(self) -> dict:
        """The evaluation report's ``localization`` object: ``method``, ``step``, the
        :class:`BoxMetrics` names, ``GT-known Loc``, ``Top-1 Loc``, ``GT-known_tau`` and ``PxAP``."""
        boxes = super().to_dict()
        pxap = boxes.pop("PxAP", None)
        out = {"method": self.method, "step": self.step, **boxes, "GT-known Loc": self.gt_known_loc,
               "Top-1 Loc": self.top1_loc, "GT-known_tau": self.gt_known_tau}
        if pxap is not None:
            out["PxAP"] = pxap
        return out


class BoxAccuracyCounts:
    """Running counts of a threshold sweep's hits, so that a test set of any size is scored in
    constant memory: per IoU delta and threshold, how many maps had a box at least that good
    (all contours: V2; the largest contour at IoU 50: V1). :meth:`metrics` equals
    :func:`wsol_box_metrics` of all the sweeps concatenated."""

    def __init__(self, thresholds: torch.Tensor):
        self.thresholds = thresholds.double().cpu()
        self.v2 = torch.zeros(len(IOU_DELTAS), len(self.thresholds), dtype=torch.int64)
        self.v1 = torch.zeros(len(self.thresholds), dtype=torch.int64)
        self.n = 0

    def update(self, sweep: BoxSweep) -> BoxAccuracyCounts:
        d = torch.tensor(IOU_DELTAS, dtype=torch.float64)[:, None, None] / 100
        self.v2 += (sweep.best_iou_all.cpu()[None] >= d - 1e-12).sum(1)
        self.v1 += (sweep.best_iou_largest.cpu() >= 0.5 - 1e-12).sum(0)
        self.n += len(sweep.best_iou_all)
        return self

    def metrics(self, pxap: float | None = None) -> BoxMetrics:
        """MaxBoxAcc (V1) and MaxBoxAccV2 with each IoU's value and best threshold (see :func:`wsol_box_metrics`)."""
        curves_v2 = self.v2.double() / self.n * 100
        curve_v1 = self.v1.double() / self.n * 100
        best_v2, arg_v2 = curves_v2.max(1)
        per_delta = {}
        for d, v, a in zip(IOU_DELTAS, best_v2.tolist(), arg_v2.tolist()):
            per_delta[f"iou{d}"] = v
            per_delta[f"iou{d}_tau"] = float(self.thresholds[a])
        return BoxMetrics(max_box_acc=float(curve_v1.max()), max_box_acc_tau=float(self.thresholds[int(curve_v1.argmax())]),
                          max_box_acc_v2=float(best_v2.mean()), pxap=pxap, **per_delta)


def wsol_box_metrics(sweep: BoxSweep, pxap: float | None = None) -> BoxMetrics:
    """MaxBoxAcc (V1, IoU 50, largest contour) and MaxBoxAccV2 (mean over IoU 30/50/70 of the max
    over tau, all contours, the best tau chosen separately per IoU), with each IoU's value and best tau."""
    return BoxAccuracyCounts(sweep.thresholds).update(sweep).metrics(pxap)


@dataclass
class GTKnownLoc(Result):
    """GT-known Loc (and Top-1 Loc when the predictions' correctness was given) at one threshold, in percent."""

    gt_known_loc: float
    gt_known_tau: float
    top1_loc: float | None = None

    def to_dict(self) -> dict:
        out = {"GT-known Loc": self.gt_known_loc, "GT-known_tau": self.gt_known_tau}
        if self.top1_loc is not None:
            out["Top-1 Loc"] = self.top1_loc
        return out


def gt_known_loc(maps: torch.Tensor, gt_boxes: list[torch.Tensor], tau: float, correct_class: torch.Tensor | None = None) -> GTKnownLoc:
    """GT-known Loc at one fixed ``tau`` (largest contour, IoU >= 0.5), and Top-1 Loc when the
    per-map top-1 correctness ``(N,)`` bool is given. Percentages.

    Args:
        maps: ``(N, H, W)`` normalised maps; gt_boxes: N tensors ``(M_i, 4)`` in map pixels.
    """
    tau = check_float("tau", tau, 0.0, 1.0)
    sweep = box_sweep(maps, gt_boxes, torch.tensor([tau], dtype=torch.float64))
    hit = sweep.best_iou_largest[:, 0] >= 0.5
    top1 = None if correct_class is None else float((hit & correct_class.cpu().bool()).double().mean() * 100)
    return GTKnownLoc(float(hit.double().mean() * 100), tau, top1)


class PxAPAccumulator:
    """Pixel average precision (PxAP) of Choe et al.: score histograms of foreground and background
    pixels over the threshold bins ``[tau_i, tau_{i+1})``, then AP of the precision-recall curve.

    Mask values: 1 foreground, 0 background, anything else ignored.
    """

    def __init__(self, thresholds: torch.Tensor, device=None):
        thresholds = check_thresholds(thresholds)
        self.edges = torch.cat([thresholds.double(), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)]).to(device)
        nbins = len(self.edges) - 1
        self.fg = torch.zeros(nbins, dtype=torch.float64, device=device)
        self.bg = torch.zeros(nbins, dtype=torch.float64, device=device)

    def _hist(self, values: torch.Tensor) -> torch.Tensor:
        idx = torch.bucketize(values.double(), self.edges, right=True) - 1
        idx = idx.clamp(0, len(self.edges) - 2)
        return torch.bincount(idx, minlength=len(self.edges) - 1).double()

    def update(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        """Add ``(N, H, W)`` normalised maps and their ``(N, H, W)`` masks."""
        maps = maps.to(self.edges.device)
        masks = masks.to(self.edges.device)
        self.fg += self._hist(maps[masks == 1])
        self.bg += self._hist(maps[masks == 0])

    def compute(self) -> float:
        """PxAP in percent."""
        tp = self.fg.flip(0).cumsum(0)
        fp = self.bg.flip(0).cumsum(0)
        n_fg = self.fg.sum()
        if n_fg <= 0:
            raise ValueError("no foreground pixel in the masks")
        nonzero = (tp + fp) != 0
        precision = torch.where(nonzero, tp / (tp + fp).clamp_min(1e-12), torch.zeros_like(tp))
        recall = tp / n_fg
        ap = (precision[1:] * recall.diff())[nonzero[1:]].sum()
        return float(ap * 100)


def pxap(maps: torch.Tensor, masks: torch.Tensor, thresholds: torch.Tensor) -> float:
    """PxAP in percent of normalised maps ``(N, H, W)`` against masks ``(N, H, W)``."""
    acc = PxAPAccumulator(thresholds, maps.device)
    acc.update(maps, masks)
    return acc.compute()
