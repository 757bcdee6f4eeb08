"""Calibration from a few boxes: the localization threshold (and optionally the map method) chosen on
K annotated images per class, or a counting model's instance box sizes, stored in the model so
``localize`` and ``evaluate`` use them."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch

from weakloc.checks import check_int
from weakloc.data.annotations import GroundTruth, match_annotations, read_annotations
from weakloc.data.labels import SPLIT_NAMES, LabeledImages, check_split, load_labels, select_split
from weakloc.errors import OptionError, WeaklocError
from weakloc.evaluate.run import check_explain_options, check_gt_class, check_methods, class_mapping, evaluate_model
from weakloc.explain.maps import normalize_maps

CALIBRATION_SPLITS = (*SPLIT_NAMES, "all")
"""Splits calibration may draw its few boxes from; ``all`` takes every image, whatever its split."""

INPUT_SIZES = (16, 8192)
"""Smallest and largest test-time input side ``calibrate`` tries (as the CLI's ``--input-sizes``)."""


def few_box_subset(labeled: LabeledImages, gt: GroundTruth, classes: list[str], per_class: int, seed: int = 0,
                   gt_class: dict[str, str] | None = None, positive: int | None = None) -> list[int]:
    """Indices of up to ``per_class`` images per model class that have boxes of that class (seeded
    draw); for a yes/no model (``positive``: its positive class), of that class alone, the only one
    evaluation localizes."""
    mapping = {g: k for g, k in class_mapping(classes, gt.classes, gt_class).items() if positive is None or k == positive}
    by_class: dict[int, list[int]] = {}
    for i, path in enumerate(labeled.paths):
        ann = gt.find(path)
        if ann is None:
            continue
        for g, k in mapping.items():
            if len(ann.boxes_of(g)):
                by_class.setdefault(k, []).append(i)
    rng = random.Random(seed)
    chosen: set[int] = set()
    for k in sorted(by_class):
        pool = sorted(set(by_class[k]))
        rng.shuffle(pool)
        chosen.update(pool[:per_class])
    return sorted(chosen)


def calibrated_threshold(report: dict) -> float:
    """The box threshold an evaluation report supports: its best IoU-50 threshold (``IoU50_tau``).

    When no threshold gives a single box with IoU >= 0.5, every threshold ties at 0% and the
    sweep's first, 0.00 -- a box around the whole image -- would be "chosen". The best IoU-30
    threshold is taken then (with a warning), and when no threshold reaches IoU 0.3 either,
    none is: the maps miss every object.

    Raises:
        WeaklocError: no threshold localizes any of the report's samples at IoU 0.3.
    """
    loc = report["localization"]
    if loc.get("IoU50", 0.0) > 0.0:
        return float(loc["IoU50_tau"])
    n = report["localization_samples"]
    if loc.get("IoU30", 0.0) > 0.0:
        warnings.warn(f"no threshold gives a box with IoU >= 0.5 on any of the {n} annotated sample(s) (method "
                      f"{loc['method']}); the threshold is the best at IoU 0.3", stacklevel=2)
        return float(loc["IoU30_tau"])
    raise WeaklocError(f"no threshold gives a box with IoU >= 0.3 on any of the {n} annotated sample(s) (method "
                       f"{loc['method']}), so there is no threshold to store; check the annotations or train the model longer")


def _check_common(per_class, split, seed, gt_class) -> None:
    """Arguments both calibrations take, checked before any file is read."""
    check_int("per_class", per_class, 1)
    check_split(split, CALIBRATION_SPLITS)
    check_int("seed", seed)
    check_gt_class(gt_class)


def _check_normalizations(normalizations) -> tuple[str, ...]:
    """Each of ``normalizations`` a map normalisation :func:`~weakloc.explain.maps.normalize_maps` knows."""
    norms = (normalizations,) if isinstance(normalizations, str) else normalizations
    if not isinstance(norms, (list, tuple)):
        raise OptionError(f"normalizations: expected a list of names such as minmax or pas:0.9, got {normalizations!r}")
    for n in norms:
        try:
            normalize_maps(torch.zeros(1, 2, 2), n)  # the parser itself, on a dummy map
        except ValueError as e:
            raise OptionError(f"normalizations: {e}") from None
    return tuple(norms)


def _calibration_split(labeled: LabeledImages, split: str) -> LabeledImages:
    """The images of ``split`` to calibrate on; data without splits (or ``split="all"``) is used whole."""
    if labeled.splits is None or split == "all":
        return labeled
    if split not in labeled.splits:
        raise WeaklocError(f"the data has no {split!r} split (it has {sorted(set(labeled.splits))}); calibrating on "
                           f"other images could leak evaluation images")
    return select_split(labeled, split)


def calibrate(model, data: str | Path | LabeledImages, annotations: str | Path | GroundTruth, *, per_class: int = 5,
              methods: tuple[str, ...] = ("cam",), split: str = "train", seed: int = 0, gt_class: dict[str, str] | None = None,
              explain_options: dict | None = None, input_sizes: tuple[int, ...] | None = None,
              normalizations: tuple[str, ...] | None = None) -> dict:
    """Choose the box threshold (the best IoU-50 threshold) and the best of ``methods`` (by MaxBoxAccV2) on
    ``per_class`` annotated images per class of ``split``, and store them in ``model.config.localization``.

    Args:
        input_sizes: test-time input sizes to choose from as well (a fully convolutional model run
            on a larger input than it was trained on gives denser maps; small objects gain most).
            The chosen size is stored as ``localization["input_size"]`` when it differs from the
            training size (default candidates: the model's current inference size alone).
        normalizations: map normalisations to choose from as well (e.g. ``("minmax", "pas")``:
            percentile normalisation helps many small objects and hurts one large one); the chosen
            one is stored in the method's default options (``localization["options"]``).

    Returns:
        ``{"method", "threshold", "input_size", "normalization", "images",
        "per_method": {method[@size][/normalization]: MaxBoxAccV2}}``.

    Raises:
        OptionError: before any work, for ``per_class`` < 1, no or unknown ``methods``, a ``split``
            not in :data:`CALIBRATION_SPLITS`, ``input_sizes`` outside :data:`INPUT_SIZES`, unknown
            ``normalizations``, or a malformed ``gt_class`` / ``explain_options``.
        WeaklocError: no candidate localizes any calibration box (see :func:`calibrated_threshold`);
            the model is left unchanged.
    """
    _check_common(per_class, split, seed, gt_class)
    methods = tuple(check_methods(methods))
    check_explain_options(explain_options)
    if input_sizes is not None:
        input_sizes = (input_sizes,) if isinstance(input_sizes, int) else input_sizes
        if not isinstance(input_sizes, (list, tuple)):
            raise OptionError(f"input_sizes: expected a list of input sizes, got {input_sizes!r}")
        for z in input_sizes:
            check_int("input_sizes", z, *INPUT_SIZES)
    if normalizations is not None:
        normalizations = _check_normalizations(normalizations)
    cfg = model.config
    labeled = _calibration_split(data if isinstance(data, LabeledImages) else load_labels(data, classes=cfg.classes), split)
    gt = annotations if isinstance(annotations, GroundTruth) else read_annotations(annotations)
    idx = few_box_subset(labeled, gt, cfg.classes, per_class, seed, gt_class, cfg.positive_class)
    if not idx:
        raise WeaklocError(f"{gt.source or 'the annotations'}: no {split} image has a box of a model class to calibrate on")
    subset = labeled.subset(idx)
    current = dict(cfg.localization)
    sizes = tuple(input_sizes) if input_sizes else (cfg.inference_size(),)
    norms: tuple[str | None, ...] = tuple(normalizations) if normalizations else (None,)
    reports = {}
    try:
        for size in sizes:
            cfg.localization = {**current, "input_size": int(size)}
            for m in methods:
                for n in norms:
                    opts = {**(explain_options or {}), **({"normalization": n} if n else {})}
                    reports[(m, int(size), n)] = evaluate_model(model, subset, gt, method=m, split="all", gt_class=gt_class,
                                                                explain_options=opts)
    finally:
        cfg.localization = current
    # a candidate whose IoU-50 curve is all zero has no IoU-50 threshold to give, whatever its MaxBoxAccV2
    best = max(reports, key=lambda key: (reports[key]["localization"]["IoU50"] > 0, reports[key]["localization"]["MaxBoxAccV2"]))
    method, size, norm = best
    tau = calibrated_threshold(reports[best])
    cfg.localization = {**current, "threshold": tau, "method": method, "calibrated_on": len(idx), "per_class": per_class}
    cfg.localization.pop("input_size", None)
    if size != cfg.input_size:
        cfg.localization["input_size"] = size
    if norm:
        stored = {k: dict(v) for k, v in current.get("options", {}).items()}
        stored.setdefault(method, {})["normalization"] = norm
        cfg.localization["options"] = stored

    def label(m: str, z: int, n: str | None) -> str:
        return m + (f"@{z}" if len(sizes) > 1 else "") + (f"/{n}" if len(norms) > 1 else "")

    return {"method": method, "threshold": tau, "input_size": size, "normalization": norm, "images": len(idx),
            "per_method": {label(*key): r["localization"]["MaxBoxAccV2"] for key, r in reports.items()}}


def calibrate_box_sizes(model, data: str | Path | LabeledImages, annotations: str | Path | GroundTruth, *, per_class: int = 5,
                        split: str = "train", seed: int = 0, gt_class: dict[str, str] | None = None) -> dict:
    """Counting models: each class's instance box size, the median width and height (as fractions of
    the image) of that class's boxes on ``per_class`` annotated images per class of ``split``,
    stored in ``model.config.localization["box_sizes"]`` so ``evaluate`` and ``localize`` draw a box
    of that size around each peak.

    A density map marks where each object is, not how far it reaches (its half-peak region spans
    about a cell or two of the map, whatever the object's size), so a few boxes say more about the
    extent than the map does: with
    sizes from 5 images per class, box F1 at IoU 0.5 rose from 0.36 (the widened half-peak region)
    to 0.67 on synthetic shapes and from 0.27 to 0.50 on BCCD WBC + Platelets (docs/results.md).

    Returns:
        ``{"box_sizes": {class: [width, height]}, "boxes": {class: number of boxes}, "images"}``.
    """
    _check_common(per_class, split, seed, gt_class)
    cfg = model.config
    if getattr(model, "counting_head", None) is None:
        raise WeaklocError("box sizes are calibrated for counting models; this model has no counting head")
    from weakloc.data.counts import count_labels_or_annotated

    gt = annotations if isinstance(annotations, GroundTruth) else read_annotations(annotations)
    labeled = _calibration_split(data if isinstance(data, LabeledImages) else count_labels_or_annotated(data, gt, cfg.classes), split)
    idx = few_box_subset(labeled, gt, cfg.classes, per_class, seed, gt_class)
    match_annotations(gt, [labeled.paths[i] for i in idx])  # sizes as fractions need the annotated image's own size
    mapping = class_mapping(cfg.classes, gt.classes, gt_class)
    sizes: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(cfg.classes))}
    for i in idx:
        ann = gt.find(labeled.paths[i])
        for g, k in mapping.items():
            boxes = ann.boxes_of(g)
            wh = (boxes[:, 2:] - boxes[:, :2]) / torch.tensor([float(ann.width), float(ann.height)])
            sizes[k].append(wh[(wh > 0).all(1)])  # zero-size boxes (real annotation slips) say nothing of the size
    found = {k: torch.cat(v) if v else torch.zeros(0, 2) for k, v in sizes.items()}
    missing = [cfg.classes[k] for k, v in found.items() if not len(v)]
    if missing:
        raise WeaklocError(f"no {split} image has a box of {', '.join(map(repr, missing))} to calibrate its box size on "
                           f"(annotation classes: {', '.join(gt.classes)}; map them with --gt-class)")
    box_sizes = {cfg.classes[k]: [round(float(x), 5) for x in v.median(0).values] for k, v in found.items()}
    cfg.localization = {**cfg.localization, "box_sizes": box_sizes, "box_sizes_from": len(idx)}
    return {"box_sizes": box_sizes, "boxes": {cfg.classes[k]: len(v) for k, v in found.items()}, "images": len(idx)}
