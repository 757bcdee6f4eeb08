"""Counting metrics (wsol-protocol section 5) and instance localization from counts (section 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from weakloc.checks import check_choice, check_float, check_int
from weakloc.config import COUNT_VIEWS, MapConfig
from weakloc.data.annotations import GroundTruth, match_annotations, read_annotations
from weakloc.data.counts import load_count_labels
from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform
from weakloc.data.labels import LabeledImages, check_split, resolve_split, select_split
from weakloc.errors import OptionError, WeaklocError
from weakloc.evaluate.matching import PIXEL_EXTENT, InstanceMetrics, instance_metrics, match_instances, prf  # noqa: F401 (public here too)
from weakloc.evaluate.run import check_batch_size, check_maps, skipped_images
from weakloc.explain import pipeline
from weakloc.localize.instances import REGION_BOX_SCALE, counting_forward, output_instances, predicted_counts
from weakloc.explain.run import model_device
from weakloc.results import Result



@dataclass
class CountMetrics(Result):
    """Counting errors (Cholakkal et al.), ``to_dict()`` under their usual names.

    Attributes:
        per_class: class -> ``{"MAE", "RMSE"}``.
        mae, rmse: the means over classes of MAE and RMSE (``rmse`` is mRMSE).
        mrmse_nz: mean RMSE over the images where each class is present.
        m_relrmse, m_relrmse_nz: the same with errors relative to ``count + 1``.
    """

    per_class: dict[str, dict[str, float]]
    mae: float
    rmse: float
    mrmse_nz: float
    m_relrmse: float
    m_relrmse_nz: float

    def to_dict(self) -> dict:
        return {"per_class": {c: dict(v) for c, v in self.per_class.items()}, "MAE": self.mae, "RMSE": self.rmse,
                "mRMSE": self.rmse, "mRMSE-nz": self.mrmse_nz, "m-relRMSE": self.m_relrmse, "m-relRMSE-nz": self.m_relrmse_nz}


@dataclass
class CountingReport(Result):
    """What :func:`evaluate_counts` found.

    Attributes:
        split, images: the split evaluated and the images counted.
        count_views: the test-time views counts were averaged over.
        counting: whole counts scored as ILC's evaluation does (rounded, 0 where the classifier
            says absent; :func:`~weakloc.localize.instances.predicted_counts`).
        counting_raw: the model's unrounded counts.
        baseline, baseline_rounded: the mean training count (wsol-protocol section 5), and that
            mean rounded (a stronger baseline when most images hold the same count).
        points, boxes: instance points / boxes against the GT boxes (None without annotations).
        unannotated_images, skipped_images: as in :class:`~weakloc.evaluate.run.EvaluationReport`.
    """

    split: str
    images: int
    count_views: str
    counting: CountMetrics
    counting_raw: CountMetrics
    baseline: CountMetrics
    baseline_rounded: CountMetrics
    points: InstanceMetrics | None
    boxes: InstanceMetrics | None
    unannotated_images: list[str]
    skipped_images: list[dict]

    def to_dict(self) -> dict:
        """The ``counting`` object of ``weakloc evaluate``'s JSON report (the views under ``tta``, as before)."""
        return {"split": self.split, "images": self.images, "tta": self.count_views, "counting": self.counting.to_dict(),
                "counting_raw": self.counting_raw.to_dict(), "baseline": self.baseline.to_dict(),
                "baseline_rounded": self.baseline_rounded.to_dict(),
                "points": None if self.points is None else self.points.to_dict(),
                "boxes": None if self.boxes is None else self.boxes.to_dict(),
                "unannotated_images": list(self.unannotated_images), "skipped_images": [dict(s) for s in self.skipped_images]}


def count_metrics(pred: torch.Tensor, gt: torch.Tensor, classes: list[str]) -> CountMetrics:
    """MAE and RMSE per class and their means; mRMSE, mRMSE-nz, m-relRMSE, m-relRMSE-nz (Cholakkal et al.).

    Args:
        pred, gt: ``(N, K)`` predicted and true counts.

    Returns:
        :class:`CountMetrics`; a class with no image where it is present is left out of the ``-nz`` means.
    """
    if pred.shape != gt.shape:
        raise WeaklocError(f"predicted counts {tuple(pred.shape)} and true counts {tuple(gt.shape)} differ in shape")
    p, c = pred.double(), gt.double()
    err2 = (p - c) ** 2
    mae = (p - c).abs().mean(0)
    rmse = err2.mean(0).sqrt()
    rel = (err2 / (c + 1)).mean(0).sqrt()
    nz = c > 0
    nz_rmse, nz_rel = [], []
    for k in range(c.shape[1]):
        if nz[:, k].any():
            nz_rmse.append(err2[nz[:, k], k].mean().sqrt())
            nz_rel.append((err2[nz[:, k], k] / (c[nz[:, k], k] + 1)).mean().sqrt())
    mean = lambda xs: float(torch.stack(xs).mean()) if xs else float("nan")  # noqa: E731
    return CountMetrics(per_class={name: {"MAE": float(mae[k]), "RMSE": float(rmse[k])} for k, name in enumerate(classes)},
                        mae=float(mae.mean()), rmse=float(rmse.mean()), mrmse_nz=mean(nz_rmse), m_relrmse=float(rel.mean()),
                        m_relrmse_nz=mean(nz_rel))


def evaluate_counts(model, data: str | LabeledImages, annotations: str | GroundTruth | None = None, *, split: str = "auto",
                    train_counts: torch.Tensor | None = None, batch_size: int = 16, device=None, kernel: int | None = None,
                    maps: MapConfig | dict | None = None, count_views: str | None = None, box_scale: float = REGION_BOX_SCALE,
                    progress=None) -> CountingReport:
    """Counting metrics with the mean-count baseline, and instance points/boxes against GT boxes.

    Args:
        model: a :class:`~weakloc.models.WeaklocNet` with a counting head.
        data: counting labels (:func:`~weakloc.data.counts.load_count_labels` source or labels).
        annotations: boxes for instance precision/recall/F1 (optional).
        split: ``auto`` -- test, else val, else all.
        kernel: peak suppression window (default: see :func:`~weakloc.localize.instances.output_instances`).
        maps: map-setting overrides (as :func:`~weakloc.evaluate.run.evaluate_model` takes them);
            counting reads ``test_size`` (the side images are counted at, as ``localize`` does) and
            ``count_views`` from the settings :func:`~weakloc.explain.pipeline.map_settings` resolves.
        count_views: test-time views averaged before counting (``none``, ``flip``, ``dihedral``;
            see :func:`~weakloc.localize.instances.counting_forward`); default: the model's stored
            ``maps.count_views``, else ``none``.
        box_scale: widening of the half-peak region boxes; boxes of calibrated sizes
            (``maps.box_sizes``) take precedence.
        train_counts: ``(N, K)`` training counts for the baseline (default: the ``train`` split of
            ``data`` when it has one, else ``data`` itself).

    Returns:
        :class:`CountingReport`.

    Raises:
        OptionError: before any work, for an unknown ``split`` or ``count_views``, malformed
            ``maps``, a ``batch_size`` < 1, a
            ``kernel`` that is not an odd number >= 1, a ``box_scale`` that is not a positive
            number, or ``train_counts`` that are not ``(N, classes)``.
    """
    if getattr(model, "counting_head", None) is None:
        raise WeaklocError("this model has no counting head (train it with counts: weakloc train DATA --counts)")
    check_split(split)
    batch_size = check_batch_size(batch_size)
    check_choice("count_views", count_views, COUNT_VIEWS, allow_none=True)
    if check_int("kernel", kernel, 1, allow_none=True) is not None and kernel % 2 == 0:
        raise OptionError(f"kernel: the peak window must be odd (a peak is the centre of its window), got {kernel}")
    box_scale = check_float("box_scale", box_scale, 0.0, low_open=True)
    if train_counts is not None and (not isinstance(train_counts, torch.Tensor) or train_counts.ndim != 2
                                     or train_counts.shape[1] != len(model.config.classes) or not len(train_counts)):
        raise OptionError(f"train_counts: expected an (N, {len(model.config.classes)}) tensor of counts, got "
                          f"{tuple(train_counts.shape) if isinstance(train_counts, torch.Tensor) else type(train_counts).__name__}")
    settings = pipeline.map_settings(model, check_maps(maps), count_views=count_views)
    device = model_device(model, device)
    model = model.to(device).eval()
    cfg = model.config
    labeled = data if isinstance(data, LabeledImages) else load_count_labels(data, classes=cfg.classes)
    if labeled.counts is None:
        raise WeaklocError("the labels hold no counts")
    if train_counts is None:
        has_train = labeled.splits is not None and "train" in labeled.splits
        train_counts = select_split(labeled, "train").counts if has_train else labeled.counts
    labeled, split = resolve_split(labeled, split)
    gt = annotations if isinstance(annotations, GroundTruth) or annotations is None else read_annotations(annotations)
    anns, unannotated = match_annotations(gt, labeled.paths) if gt is not None else ([None] * len(labeled), [])
    size, views = settings.test_size, settings.count_views
    box_sizes = cfg.instance_box_sizes()
    loader = DataLoader(ImageDataset.from_labels(labeled, eval_transform(size, cfg.mean, cfg.std)), batch_size=batch_size,
                        shuffle=False, collate_fn=collate_skip_bad)
    k = len(cfg.classes)
    preds, raws, truths = [], [], []
    point_stats = {c: [0, 0, 0] for c in cfg.classes}
    box_stats = {c: [0, 0, 0] for c in cfg.classes}
    done = 0
    seen: set[int] = set()
    for batch in loader:
        done += batch["skipped"] + (0 if batch["index"] is None else len(batch["index"]))
        if batch["image"] is None:
            continue
        seen.update(batch["index"].tolist())
        with torch.no_grad():
            out = counting_forward(model, batch["image"].to(device), views)
        whole = predicted_counts(out, cfg.task)
        preds.append(whole.cpu())
        raws.append(out.counts.float().cpu())
        truths.append(batch["target"][:, k:].float())
        if gt is not None:
            _, found = output_instances(out, size, kernel, counts=whole, box_sizes=box_sizes, box_scale=box_scale)
            found = type(found)(*(t.cpu() for t in found))
            for j, i in enumerate(batch["index"].tolist()):
                ann = anns[i]
                if ann is None:
                    continue
                scale = torch.tensor([size / ann.width, size / ann.height] * 2)
                for c_idx, cname in enumerate(cfg.classes):
                    g = ann.boxes_of(cname) * scale
                    v = found.valid[j, c_idx]
                    for stats, boxes in ((point_stats, None), (box_stats, found.boxes[j, c_idx][v] + PIXEL_EXTENT)):
                        r = match_instances(found.points[j, c_idx][v] + 0.5, found.scores[j, c_idx][v], g, boxes)  # pixel centres
                        stats[cname] = [a + b for a, b in zip(stats[cname], r)]
        if progress is not None:
            progress(done, len(labeled))
    if not preds:
        raise WeaklocError("no image could be read")
    pred, truth = torch.cat(preds), torch.cat(truths)
    baseline = train_counts.float().mean(0, keepdim=True).expand_as(truth)
    instance_scores: dict[str, InstanceMetrics | None] = {"points": None, "boxes": None}
    if gt is not None:
        for key, stats in (("points", point_stats), ("boxes", box_stats)):
            instance_scores[key] = instance_metrics(stats)
    return CountingReport(split=split, images=len(pred), count_views=views, counting=count_metrics(pred, truth, cfg.classes),
                          counting_raw=count_metrics(torch.cat(raws), truth, cfg.classes),
                          baseline=count_metrics(baseline, truth, cfg.classes),
                          baseline_rounded=count_metrics(baseline.round(), truth, cfg.classes), **instance_scores,
                          unannotated_images=unannotated, skipped_images=skipped_images(labeled.paths, seen))
