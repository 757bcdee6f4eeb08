"""Calibration from a few boxes: the localization threshold (and optionally the map method) chosen on
K annotated images per class and stored in the model, so ``localize`` uses it."""

from __future__ import annotations

import random
from pathlib import Path

from weakloc.data.annotations import GroundTruth, read_annotations
from weakloc.data.labels import LabeledImages, load_labels, select_split
from weakloc.errors import WeaklocError
from weakloc.evaluate.run import class_mapping, evaluate_model


def few_box_subset(labeled: LabeledImages, gt: GroundTruth, classes: list[str], per_class: int, seed: int = 0,
                   gt_class: dict[str, str] | None = None) -> list[int]:
    """Indices of up to ``per_class`` images per model class that have boxes of that class (seeded draw)."""
    mapping = class_mapping(classes, gt.classes, gt_class)
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
    """
    if per_class < 1:
        raise WeaklocError("--per-class must be at least 1")
    cfg = model.config
    labeled = data if isinstance(data, LabeledImages) else load_labels(data, classes=cfg.classes)
    if labeled.splits is not None:
        if split not in labeled.splits:
            raise WeaklocError(f"the data has no {split!r} split (it has {sorted(set(labeled.splits))}); calibrating on "
                               f"other images could leak evaluation images")
        labeled = select_split(labeled, split)
    gt = annotations if isinstance(annotations, GroundTruth) else read_annotations(annotations)
    idx = few_box_subset(labeled, gt, cfg.classes, per_class, seed, gt_class)
    if not idx:
        raise WeaklocError(f"no {split} image has a box of a model class to calibrate on")
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
    best = max(reports, key=lambda key: reports[key]["localization"]["MaxBoxAccV2"])
    method, size, norm = best
    tau = reports[best]["localization"]["IoU50_tau"]
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
