"""Calibration from a few boxes: the box threshold (and optionally the map method, test-time size
and normalisation) chosen on K annotated images per class, or a counting model's instance box sizes.

This is the one code that writes calibrated settings into a model: :func:`calibrate` and
:func:`calibrate_box_sizes` set ``model.config.maps`` (the values chosen, and in ``maps.sources``
where each came from), which ``localize`` and ``evaluate`` then read through the map pipeline.
Saving the model is the caller's (``weakloc calibrate`` saves it in place).
"""

from __future__ import annotations

import copy
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weakloc.checks import check_float, check_int
from weakloc.config import INPUT_SIZES, MAP_SETTINGS, MapConfig
from weakloc.data.annotations import GroundTruth, match_annotations, read_annotations
from weakloc.data.labels import SPLIT_NAMES, LabeledImages, check_split, load_labels, select_split
from weakloc.errors import OptionError, WeaklocError
from weakloc.evaluate.run import EvaluationReport, check_gt_class, check_maps, check_methods, class_mapping, evaluate_model
from weakloc.explain import pipeline
from weakloc.explain.maps import normalize_maps
from weakloc.results import Result

CALIBRATION_SPLITS = (*SPLIT_NAMES, "all")
"""Splits calibration may draw its few boxes from; ``all`` takes every image, whatever its split."""


@dataclass
class CalibrationResult(Result):
    """What :func:`calibrate` chose (and stored in the model).

    Attributes:
        method: the map method chosen.
        threshold: the box threshold chosen (:func:`calibrated_threshold` of its evaluation).
        test_size: the test-time input side the choice was made at.
        normalization: the normalisation chosen, None when none was asked for.
        images: calibration images.
        per_method: candidate label (``method[@size][/normalization]``) -> its MaxBoxAccV2.
        chosen: the label of the candidate chosen.
        default: the label of the candidate kept unless another beats it by ``margin``: the
            model's own settings where they are among the candidates, else the first of each list.
        margin: the points of MaxBoxAccV2 another candidate had to win by (see :func:`calibrate`).
        standard_error: candidate label -> the standard error of its MaxBoxAccV2 on so few
            samples, in points: how far apart two candidates may be by chance alone.
    """

    method: str
    threshold: float
    test_size: int
    normalization: str | None
    images: int
    per_method: dict[str, float]
    chosen: str = ""
    default: str = ""
    margin: float = 0.0
    standard_error: dict[str, float] = field(default_factory=dict)

    @property
    def kept_default(self) -> bool:
        """Whether the default candidate was kept (no other won by the margin)."""
        return self.chosen == self.default

    def to_dict(self) -> dict:
        """As calibration reported before the typed results (``input_size`` is ``test_size``), with
        the default candidate, the margin and each candidate's standard error."""
        return {"method": self.method, "threshold": self.threshold, "input_size": self.test_size,
                "normalization": self.normalization, "images": self.images, "per_method": dict(self.per_method),
                "chosen": self.chosen, "default": self.default, "margin": self.margin, "standard_error": dict(self.standard_error)}


@dataclass
class BoxSizeCalibration(Result):
    """What :func:`calibrate_box_sizes` chose (and stored in the model).

    Attributes:
        box_sizes: class -> median ``[width, height]`` of its boxes, fractions of the image.
        boxes: class -> boxes measured.
        images: calibration images.
    """

    box_sizes: dict[str, list[float]]
    boxes: dict[str, int]
    images: int


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


def calibrated_threshold(report: EvaluationReport) -> float:
    """The box threshold an evaluation report supports: its best IoU-50 threshold (``iou50_tau``).

    When no threshold gives a single box with IoU >= 0.5, every threshold ties at 0% and the
    sweep's first, 0.00 -- a box around the whole image -- would be "chosen". The best IoU-30
    threshold is taken then (with a warning), and when no threshold reaches IoU 0.3 either,
    none is: the maps miss every object.

    Raises:
        WeaklocError: no threshold localizes any of the report's samples at IoU 0.3.
    """
    loc = report.localization
    if loc.iou50 > 0.0:
        return float(loc.iou50_tau)
    n = report.localization_samples
    if loc.iou30 > 0.0:
        warnings.warn(f"no threshold gives a box with IoU >= 0.5 on any of the {n} annotated sample(s) (method "
                      f"{loc.method}); the threshold is the best at IoU 0.3", stacklevel=2)
        return float(loc.iou30_tau)
    raise WeaklocError(f"no threshold gives a box with IoU >= 0.3 on any of the {n} annotated sample(s) (method "
                       f"{loc.method}), so there is no threshold to store; check the annotations or train the model longer")


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


def _check_test_sizes(test_sizes) -> tuple[int, ...] | None:
    """``test_sizes`` (one side or a sequence of sides) as a tuple of sides in :data:`~weakloc.config.INPUT_SIZES`."""
    if test_sizes is None:
        return None
    sizes = (test_sizes,) if isinstance(test_sizes, int) and not isinstance(test_sizes, bool) else test_sizes
    if not isinstance(sizes, (list, tuple)) or not sizes:
        raise OptionError(f"test_sizes: expected a list of input sizes, got {test_sizes!r}")
    for z in sizes:
        check_int("test_sizes", z, *INPUT_SIZES)
    return tuple(int(z) for z in sizes)


def _flat_overrides(maps: MapConfig | dict | None, method: str) -> dict:
    """The caller's map overrides as one flat dict of settings and ``method``'s options, so a
    candidate's method, size and normalisation can be laid over them."""
    if maps is None:
        return {}
    if isinstance(maps, MapConfig):
        return {**{k: getattr(maps, k) for k in MAP_SETTINGS if getattr(maps, k) is not None}, **maps.method_options(method)}
    return dict(maps)


def _source(split: str, images: int, per_class: int, seed: int) -> dict:
    """``maps.sources`` entry of a value chosen by calibration."""
    return {"by": "calibrate", "split": split, "images": images, "per_class": per_class, "seed": seed}


def calibrate(model, data: str | Path | LabeledImages, annotations: str | Path | GroundTruth, *, per_class: int = 5,
              methods: tuple[str, ...] = ("cam",), split: str = "train", seed: int = 0, gt_class: dict[str, str] | None = None,
              maps: MapConfig | dict | None = None, test_sizes: tuple[int, ...] | None = None,
              normalizations: tuple[str, ...] | None = None, margin: float | str = "auto") -> CalibrationResult:
    """Choose the box threshold (the best IoU-50 threshold) and the best of ``methods`` (by MaxBoxAccV2) on
    ``per_class`` annotated images per class of ``split``, and store them in ``model.config.maps``.

    A few boxes measure each candidate roughly (with 5 images per class, two candidates' MaxBoxAccV2
    may differ by 10 points by chance), and a choice among many candidates on so little picks the
    luckiest. So the model's own settings (the default candidate) are kept unless another candidate
    beats them by ``margin`` points of MaxBoxAccV2: ``auto`` is the larger of 1 point and the
    standard error of the difference (:class:`CalibrationResult` reports each candidate's standard
    error); 0 takes the best candidate whatever the gap.

    Each candidate is scored by :func:`~weakloc.evaluate.run.evaluate_model` with the candidate's
    method, test size and normalisation laid over ``maps`` (the model's configuration is not
    touched while candidates are scored). Then ``maps.threshold`` and ``maps.method`` are set,
    ``maps.test_size`` when ``test_sizes`` were given (None when the training size won), and the
    chosen normalisation as that method's option (``maps.options[method]["normalization"]``) when
    ``normalizations`` were given; ``maps.sources[setting]`` records the split, images, images per
    class and seed behind each value set.

    Args:
        maps: map-setting overrides every candidate is made with (as
            :func:`~weakloc.evaluate.run.evaluate_model` takes them).
        test_sizes: test-time input sizes to choose from as well (a fully convolutional model run
            on a larger input than it was trained on gives denser maps; small objects gain most).
            Default: the model's current test size alone.
        normalizations: map normalisations to choose from as well (e.g. ``("minmax", "pas")``:
            percentile normalisation helps many small objects and hurts one large one).
        margin: ``auto`` or a number of points (>= 0), see above.

    Returns:
        :class:`CalibrationResult`.

    Raises:
        OptionError: before any work, for ``per_class`` < 1, no or unknown ``methods``, a ``split``
            not in :data:`CALIBRATION_SPLITS`, ``test_sizes`` outside
            :data:`~weakloc.config.INPUT_SIZES`, unknown ``normalizations``, or a malformed
            ``gt_class`` / ``maps``.
        WeaklocError: the data has no ``split`` split (other images could be evaluation images), or
            no candidate localizes any calibration box (see :func:`calibrated_threshold`); the
            model is left unchanged.
    """
    _check_common(per_class, split, seed, gt_class)
    if margin != "auto":
        margin = check_float("margin", margin, 0.0, 100.0)
    methods = tuple(check_methods(methods))
    check_maps(maps)
    test_sizes = _check_test_sizes(test_sizes)
    if normalizations is not None:
        normalizations = _check_normalizations(normalizations)
    sizes: tuple[int | None, ...] = test_sizes or (None,)
    norms: tuple[str | None, ...] = tuple(normalizations) if normalizations else (None,)
    # every candidate's settings, resolved and checked before any file is read
    candidates: dict[tuple[str, int | None, str | None], dict] = {}
    made_at: dict[tuple[str, int | None, str | None], int] = {}
    for size in sizes:
        for m in methods:
            for n in norms:
                overrides = {**_flat_overrides(maps, m), **({"test_size": size} if size else {}),
                             **({"normalization": n} if n else {})}
                candidates[(m, size, n)] = overrides
                made_at[(m, size, n)] = pipeline.map_settings(model, overrides, method=m).test_size
    cfg = model.config
    labeled = _calibration_split(data if isinstance(data, LabeledImages) else load_labels(data, classes=cfg.classes), split)
    gt = annotations if isinstance(annotations, GroundTruth) else read_annotations(annotations)
    idx = few_box_subset(labeled, gt, cfg.classes, per_class, seed, gt_class, cfg.positive_class)
    if not idx:
        raise WeaklocError(f"{gt.source or 'the annotations'}: no {split} image has a box of a model class to calibrate on")
    subset = labeled.subset(idx)
    reports = {key: evaluate_model(model, subset, gt, method=key[0], maps=overrides, split="all", gt_class=gt_class)
               for key, overrides in candidates.items()}
    default = _default_candidate(model, list(candidates), made_at)
    errors = {key: _standard_error(r) for key, r in reports.items()}
    best, needed = _choose(reports, errors, default, margin)
    method, size, norm = best
    tau = calibrated_threshold(reports[best])
    chosen_size = made_at[best]
    source = _source(split, len(idx), per_class, seed)
    stored = copy.deepcopy(cfg.maps)
    stored.threshold, stored.method = tau, method
    stored.sources["threshold"], stored.sources["method"] = dict(source), dict(source)
    if test_sizes:
        stored.test_size = chosen_size if chosen_size != cfg.input_size else None
        stored.sources["test_size"] = dict(source)
    if norm:
        stored.options.setdefault(method, {})["normalization"] = norm
        stored.sources["normalization"] = dict(source)
    cfg.maps = stored

    def label(m: str, z: int | None, n: str | None) -> str:
        return m + (f"@{z}" if len(sizes) > 1 else "") + (f"/{n}" if len(norms) > 1 else "")

    return CalibrationResult(method=method, threshold=tau, test_size=chosen_size, normalization=norm, images=len(idx),
                             per_method={label(*key): r.localization.max_box_acc_v2 for key, r in reports.items()},
                             chosen=label(*best), default=label(*default), margin=round(needed, 2),
                             standard_error={label(*key): round(e, 2) for key, e in errors.items()})


def _default_candidate(model, keys: list[tuple], made_at: dict) -> tuple:
    """The candidate of the model's own settings: its stored method, test size and normalisation
    where each is among the candidates, else the first candidate's."""
    maps = model.config.maps
    method = maps.method or "cam"
    size = model.config.inference_size(method)
    norm = (maps.options.get(method) or {}).get("normalization")

    def score(key: tuple) -> tuple:
        return (key[0] == method, made_at[key] == size, key[2] == norm or key[2] is None and norm in (None, "minmax"))

    first = keys[0]
    return max(keys, key=lambda k: (score(k), k == first))


def _standard_error(report: EvaluationReport) -> float:
    """The standard error, in points, of a MaxBoxAccV2 (the mean of three box accuracies, IoU 30 /
    50 / 70) measured on ``report.localization_samples`` samples: each accuracy's binomial variance
    ``p (1 - p) / n``, their mean (the three are made on the same samples), square-rooted."""
    loc, n = report.localization, max(1, report.localization_samples)
    ps = [v / 100 for v in (loc.iou30, loc.iou50, loc.iou70)]
    return 100 * (sum(p * (1 - p) for p in ps) / len(ps) / n) ** 0.5


def _choose(reports: dict, errors: dict, default: tuple, margin) -> tuple[tuple, float]:
    """The candidate to store, and the margin it had to win by: the best MaxBoxAccV2 when it beats the
    default's by more than the margin, else the default. A candidate with no box at IoU 0.5 has no
    threshold to give and is never chosen while another has one."""
    usable = {k: r for k, r in reports.items() if r.localization.iou50 > 0} or reports
    best = max(usable, key=lambda k: usable[k].localization.max_box_acc_v2)
    if default not in usable:
        return best, 0.0
    gap = usable[best].localization.max_box_acc_v2 - usable[default].localization.max_box_acc_v2
    # "auto": at least one point, and at least the standard error of the difference of two such measurements
    needed = max(1.0, (errors[best] ** 2 + errors[default] ** 2) ** 0.5) if margin == "auto" else float(margin)
    return (best if gap > needed else default), needed


def calibrate_box_sizes(model, data: str | Path | LabeledImages, annotations: str | Path | GroundTruth, *, per_class: int = 5,
                        split: str = "train", seed: int = 0, gt_class: dict[str, str] | None = None) -> BoxSizeCalibration:
    """Counting models: each class's instance box size, the median width and height (as fractions of
    the image) of that class's boxes on ``per_class`` annotated images per class of ``split``,
    stored in ``model.config.maps.box_sizes`` (its source in ``maps.sources["box_sizes"]``) so
    ``evaluate`` and ``localize`` draw a box of that size around each peak.

    A density map marks where each object is, not how far it reaches (its half-peak region spans
    about a cell or two of the map, whatever the object's size), so a few boxes say more about the
    extent than the map does (docs/results.md, "Calibrated sizes").

    Returns:
        :class:`BoxSizeCalibration`.

    Raises:
        OptionError: before any work, for ``per_class`` < 1, a ``split`` not in
            :data:`CALIBRATION_SPLITS` or a malformed ``gt_class``.
        WeaklocError: not a counting model, the data has no ``split`` split, or a class has no box
            to measure; the model is left unchanged.
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
    stored = copy.deepcopy(cfg.maps)
    stored.box_sizes = box_sizes
    stored.sources["box_sizes"] = _source(split, len(idx), per_class, seed)
    cfg.maps = stored
    return BoxSizeCalibration(box_sizes=box_sizes, boxes={cfg.classes[k]: len(v) for k, v in found.items()}, images=len(idx))
