"""Where a model looked when it was wrong: the confusion matrix, the top losses and, per class, the
most and least confident correct images, each with the heatmaps of the classes it is about.

:func:`interpret` computes a typed :class:`Interpretation` (no file written);
:mod:`weakloc.report.interpretation` draws it as ``interpretation.html``.

Two passes over the images, both batched on the model's device: the first computes every image's
loss and prediction (the model at ``settings.test_size``, the size every map command runs it at, as
``weakloc evaluate`` does); the second reads only the chosen images again and makes their maps with
the one pipeline (:func:`~weakloc.explain.pipeline.make_maps`), all classes an image needs in one
call. What a case, its loss and its maps are for each kind of model is in docs/interpretation.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_confusion_matrix, multilabel_confusion_matrix

from weakloc.checks import check_int
from weakloc.config import MapConfig
from weakloc.data.counts import counts_csv_of, read_counts_csv
from weakloc.data.dataset import ImageDataset, PredictDataset, collate_list, collate_skip_bad, eval_transform
from weakloc.data.labels import LabeledImages, check_split, load_labels, resolve_split
from weakloc.errors import OptionError, WeaklocError
from weakloc.evaluate.run import check_batch_size
from weakloc.explain import pipeline
from weakloc.explain.run import SkippedFile, check_maps, check_progress, model_device
from weakloc.models.classifier import check_finite
from weakloc.results import Result
from weakloc.text import escape_text

#: the probability from which a multi-label model calls a class present (as localize and evaluate do)
PRESENT = 0.5


@dataclass
class MapPanel(Result):
    """One heatmap of a case: the class it is for and why it is shown.

    Attributes:
        role: ``predicted``, ``true``, ``predicted and true`` (a correct case), ``positive`` (a yes/no
            model: its positive class) or ``most probable other`` (a multi-label miss: the class the
            model found most likely instead, though below the presence threshold).
        class_name, class_index: the map's class.
    """

    role: str
    class_name: str
    class_index: int


@dataclass
class Case(Result):
    """One image (single-label and yes/no models) or one (image, class) pair (multi-label models).

    Attributes:
        file: the image file (undecodable bytes as ``\\xNN``).
        image: its index in the labels the interpretation read.
        label: multi-label: the class of the pair; else None.
        true, predicted: the image's labelled and predicted classes (multi-label: every class
            labelled / called present).
        loss: the case's loss: cross-entropy of the true class (single-label, yes/no), or the
            binary cross-entropy of ``label`` (multi-label).
        probability_true: the probability the model gave the truth (``exp(-loss)``).
        confidence: the probability of the model's decision (the predicted class; multi-label:
            ``label`` present, or absent).
        correct: the decision was right.
        panels: the heatmaps shown for the case.
    """

    file: str
    image: int
    label: str | None
    true: list[str]
    predicted: list[str]
    loss: float
    probability_true: float
    confidence: float
    correct: bool
    panels: list[MapPanel]


@dataclass
class Interpretation(Result):
    """What :func:`interpret` found; :meth:`to_dict` is its JSON (the maps and pictures left out).

    Attributes:
        task: ``single``, ``yes/no`` or ``multi``.
        classes: the model's classes.
        split: the split read; images: the images scored.
        method, test_size: how the maps were made.
        decision: how a prediction is made (arg-max, the yes/no cut, presence per class).
        confusion: ``(K, K)`` counts, rows the true class and columns the predicted one
            (single-label, yes/no), or ``(K, 2, 2)`` per class ``[[TN, FP], [FN, TP]]`` (multi-label).
        accuracy: in percent (multi-label: over all (image, class) decisions).
        top_losses: the cases with the highest losses, highest first.
        most_confident, least_confident: per class name, the correct cases of that class with the
            highest / lowest confidence (the two lists share no case).
        skipped: images that could not be read.
        notes: what the interpretation leaves out (e.g. a counting model's counts).
        maps: ``(image, class)`` -> ``(S, S)`` normalised map on the model's device, for every panel
            (an image unreadable in the second pass has none).
        pictures: image -> its ``(3, h, w)`` uint8 picture for overlays (CPU).
    """

    task: str
    classes: list[str]
    split: str
    images: int
    method: str
    test_size: int
    decision: str
    confusion: torch.Tensor
    accuracy: float
    top_losses: list[Case]
    most_confident: dict[str, list[Case]]
    least_confident: dict[str, list[Case]]
    skipped: list[SkippedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    maps: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    pictures: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"task": self.task, "classes": list(self.classes), "split": self.split, "images": self.images,
                "method": self.method, "test_size": self.test_size, "decision": self.decision,
                "confusion": self.confusion.tolist(), "accuracy": self.accuracy,
                "top_losses": [c.to_dict() for c in self.top_losses],
                "most_confident": {k: [c.to_dict() for c in v] for k, v in self.most_confident.items()},
                "least_confident": {k: [c.to_dict() for c in v] for k, v in self.least_confident.items()},
                "skipped": [s.to_dict() for s in self.skipped], "notes": list(self.notes)}

    def cases(self) -> list[Case]:
        """Every case shown: the top losses, then each class's most and least confident ones."""
        return self.top_losses + [c for d in (self.most_confident, self.least_confident) for v in d.values() for c in v]


@dataclass
class Scores:
    """The first pass: per readable image its logits and labels, on the device.

    Attributes:
        logits: ``(N, K)``; targets: ``(N,)`` class indices or ``(N, K)`` multi-hot;
        index: ``(N,)`` each row's index in the labels; skipped: unreadable images.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor
    skipped: list[SkippedFile]


def read_labels(model, data) -> LabeledImages:
    """``data`` (labels CSV / folder / :class:`LabeledImages`) as image-level labels of ``model``'s
    classes; a counting model also reads a counts CSV (its presence columns). Counts are dropped:
    the interpretation is of the classifier."""
    cfg = model.config
    if isinstance(data, LabeledImages):
        labeled = data
    elif getattr(model, "counting_head", None) is not None and counts_csv_of(data) is not None:
        labeled = read_counts_csv(counts_csv_of(data), cfg.classes)
    else:
        labeled = load_labels(data, classes=cfg.classes)
    if labeled.counts is not None:
        labeled = dataclasses.replace(labeled, counts=None)
    if list(labeled.classes) != list(cfg.classes):
        raise WeaklocError(f"the labels' classes ({', '.join(labeled.classes)}) are not the model's ({', '.join(cfg.classes)})")
    if labeled.task != cfg.task:
        raise WeaklocError(f"labels are {labeled.task}-label but the model is {cfg.task}-label")
    return labeled


def score_images(model, labeled: LabeledImages, size: int, batch_size: int, device: torch.device, progress=None,
                 total: int | None = None) -> Scores:
    """Logits of every readable image of ``labeled`` at ``size × size`` (no gradients)."""
    cfg = model.config
    loader = DataLoader(ImageDataset.from_labels(labeled, eval_transform(size, cfg.mean, cfg.std)), batch_size=batch_size,
                        shuffle=False, collate_fn=collate_skip_bad)
    logits, targets, index, skipped = [], [], [], []
    done = 0
    for batch in loader:
        skipped += [SkippedFile(escape_text(str(s.path), controls=False), escape_text(s.reason, controls=False))
                    for s in batch["skipped_images"]]
        done += batch["skipped"] + (0 if batch["index"] is None else len(batch["index"]))
        if batch["image"] is not None:
            with torch.no_grad():
                out = model(batch["image"].to(device)).float()
            logits.append(check_finite(out, "the model's logit", [str(labeled.paths[i]) for i in batch["index"].tolist()]))
            targets.append(batch["target"].to(device))
            index.append(batch["index"].to(device))
        if progress is not None:
            progress(done, total or len(labeled))
    if not logits:
        raise WeaklocError(f"none of the {len(labeled)} image(s) could be read" +
                           (f" (first: {skipped[0].file}: {skipped[0].reason})" if skipped else ""))
    return Scores(torch.cat(logits), torch.cat(targets), torch.cat(index), skipped)


def _ranked(values: torch.Tensor, mask: torch.Tensor, n: int, descending: bool) -> list[int]:
    """Positions of the ``n`` highest (``descending``) or lowest ``values`` where ``mask`` holds,
    ties in position order."""
    pos = mask.nonzero().flatten()
    if n <= 0 or len(pos) == 0:
        return []
    order = torch.sort(values[pos], descending=descending, stable=True).indices[:n]
    return pos[order].tolist()


def _both_lists(conf: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[list[int], list[int]]:
    """The ``n`` most confident positions where ``mask`` holds, and the ``n`` least confident of the rest."""
    most = _ranked(conf, mask, n, descending=True)
    rest = mask.clone()
    rest[most] = False
    return most, _ranked(conf, rest, n, descending=False)


class _Cases:
    """Builds :class:`Case` records of one task from the first pass's tensors."""

    def __init__(self, model, labeled: LabeledImages, scores: Scores):
        cfg = model.config
        self.classes, self.labeled, self.scores = list(cfg.classes), labeled, scores
        self.positive = cfg.positive_class if cfg.task == "single" and len(cfg.classes) == 2 else None
        self.task = "multi" if cfg.task == "multi" else ("yes/no" if self.positive is not None else "single")
        self.probs = model.probabilities(scores.logits)
        logits, y = scores.logits, scores.targets
        if self.task == "multi":
            self.y = y.float()
            self.loss = F.binary_cross_entropy_with_logits(logits, self.y, reduction="none")  # (N, K)
            self.pred = self.probs >= PRESENT
            self.decision = f"a class is present from probability {PRESENT}"
        else:
            self.y = y.long()
            self.loss = F.cross_entropy(logits, self.y, reduction="none")  # (N,)
            cut = cfg.decision_threshold if self.positive is not None else None
            if cut is not None:
                p = self.positive
                self.pred = torch.where(self.probs[:, p] >= cut, p, 1 - p)
                self.decision = f"{self.classes[p]!r} when its probability is at least {cut:.3f} (chosen on validation)"
            else:
                self.pred = self.probs.argmax(-1)
                self.decision = "the most probable class"

    def _names(self, row: torch.Tensor) -> list[str]:
        return [self.classes[k] for k in row.nonzero().flatten().tolist()]

    def _panel(self, role: str, k: int) -> MapPanel:
        return MapPanel(role, self.classes[k], k)

    def image_case(self, n: int) -> Case:
        """The case of row ``n`` (single-label, yes/no)."""
        t, p = int(self.y[n]), int(self.pred[n])
        if self.task == "yes/no":
            panels = [self._panel("positive", self.positive)]
        elif t == p:
            panels = [self._panel("predicted and true", t)]
        else:
            panels = [self._panel("predicted", p), self._panel("true", t)]
        loss = float(self.loss[n])
        return self._case(n, None, [self.classes[t]], [self.classes[p]], loss, float(self.probs[n, p]), t == p, panels)

    def pair_case(self, n: int, k: int) -> Case:
        """The case of row ``n``'s class ``k`` (multi-label)."""
        probs, y, pred = self.probs[n], self.y[n] > 0.5, self.pred[n]
        others = probs.clone()
        others[k] = -1.0
        if bool(y[k]) and bool(pred[k]):
            panels = [self._panel("predicted and true", k)]
        elif bool(pred[k]):  # a false positive: beside it, the most probable class that is really there
            truth = torch.where(y, probs, torch.full_like(probs, -1.0))
            truth[k] = -1.0
            panels = [self._panel("predicted", k)] + ([self._panel("true", int(truth.argmax()))] if bool(truth.max() >= 0) else [])
        else:  # a miss: beside it, what the model found most likely instead
            other = int(others.argmax())
            panels = ([self._panel("predicted" if bool(pred[other]) else "most probable other", other)] if len(self.classes) > 1 else [])
            panels.append(self._panel("true", k))
        confidence = float(probs[k]) if bool(pred[k]) else 1.0 - float(probs[k])
        return self._case(n, k, self._names(y), self._names(pred), float(self.loss[n, k]), confidence, bool(y[k]) == bool(pred[k]), panels)

    def _case(self, n: int, k: int | None, true: list[str], predicted: list[str], loss: float, confidence: float, correct: bool,
              panels: list[MapPanel]) -> Case:
        image = int(self.scores.index[n])
        return Case(escape_text(str(self.labeled.paths[image]), controls=False), image, None if k is None else self.classes[k],
                    true, predicted, round(loss, 6), round(float(torch.exp(torch.tensor(-loss))), 6), round(confidence, 6),
                    correct, panels)

    def accuracy(self) -> float:
        """Percent of right decisions: images (single-label, yes/no, by :attr:`decision`), or
        (image, class) presence decisions (multi-label)."""
        truth = self.y > 0.5 if self.task == "multi" else self.y
        return float((self.pred == truth).float().mean() * 100)

    def confusion(self) -> torch.Tensor:
        """Confusion counts (torchmetrics), on the CPU."""
        k = len(self.classes)
        if self.task == "multi":
            return multilabel_confusion_matrix(self.probs, self.y.long(), num_labels=k, threshold=PRESENT).cpu()
        return multiclass_confusion_matrix(self.pred, self.y, num_classes=k).cpu()

    def select(self, k: int, per_class: int) -> tuple[list[Case], dict[str, list[Case]], dict[str, list[Case]]]:
        """The top ``k`` losses and, per class, ``per_class`` most and least confident correct cases."""
        most: dict[str, list[Case]] = {}
        least: dict[str, list[Case]] = {}
        if self.task == "multi":
            # (image, class) pairs that are labelled or predicted: a pair neither is (a true negative)
            # has a loss below log 2, below any wrong pair's, so leaving them out changes no top-k
            # made of mistakes; it keeps the page about what the model saw or should have seen.
            shown = (self.y > 0.5) | self.pred
            k_cls = len(self.classes)
            flat = _ranked(self.loss.flatten(), shown.flatten(), k, descending=True)
            top = [self.pair_case(p // k_cls, p % k_cls) for p in flat]
            for c, name in enumerate(self.classes):
                hit = (self.y[:, c] > 0.5) & self.pred[:, c]
                a, b = _both_lists(self.probs[:, c], hit, per_class)
                most[name], least[name] = [self.pair_case(n, c) for n in a], [self.pair_case(n, c) for n in b]
            return top, most, least
        top = [self.image_case(n) for n in _ranked(self.loss, torch.ones_like(self.loss, dtype=torch.bool), k, descending=True)]
        conf = self.probs.gather(1, self.pred[:, None])[:, 0]
        for c, name in enumerate(self.classes):
            a, b = _both_lists(conf, (self.pred == self.y) & (self.y == c), per_class)
            most[name], least[name] = [self.image_case(n) for n in a], [self.image_case(n) for n in b]
        return top, most, least


def make_case_maps(model, labeled: LabeledImages, cases: list[Case], settings: MapConfig, batch_size: int, device: torch.device,
                   display_size: int = 512, progress=None, done: int = 0, total: int | None = None
                   ) -> tuple[dict[tuple[int, int], torch.Tensor], dict[int, torch.Tensor], list[SkippedFile]]:
    """The maps every case's panels need, ``batch_size`` images at a time: each image is read once
    at ``settings.test_size`` and all its classes' maps come from one
    :func:`~weakloc.explain.pipeline.make_maps` call (targets ``(B, T)``).

    Returns:
        ``(image, class)`` -> ``(S, S)`` normalised map (device), image -> display picture
        ``(3, h, w)`` uint8 (CPU), and the images that could not be read this time.
    """
    wanted: dict[int, list[int]] = {}
    for case in cases:
        for panel in case.panels:
            cls = wanted.setdefault(case.image, [])
            if panel.class_index not in cls:
                cls.append(panel.class_index)
    images = sorted(wanted)
    cfg = model.config
    loader = DataLoader(PredictDataset([labeled.paths[i] for i in images], settings.test_size, cfg.mean, cfg.std, display_size),
                        batch_size=batch_size, collate_fn=collate_list)
    maps: dict[tuple[int, int], torch.Tensor] = {}
    pictures: dict[int, torch.Tensor] = {}
    skipped: list[SkippedFile] = []
    total = total or len(images)
    for batch in loader:
        good = [b for b in batch if b[1] is not None]
        skipped += [SkippedFile(escape_text(str(labeled.paths[images[i]]), controls=False), escape_text(msg, controls=False))
                    for i, x, msg, _ in batch if x is None]
        if good:
            rows = [images[i] for i, *_ in good]
            width = max(len(wanted[r]) for r in rows)
            # pad each image's classes to the widest by repeating its first (their maps are dropped)
            targets = torch.tensor([(wanted[r] * width)[:width] for r in rows], dtype=torch.long, device=device)
            heat = pipeline.make_maps(model, torch.stack([b[1] for b in good]).to(device), settings, targets)
            for j, r in enumerate(rows):
                pictures[r] = good[j][3]
                for t, c in enumerate(wanted[r]):
                    maps[(r, c)] = heat.normalized[j, t].detach()
        done += len(batch)
        if progress is not None:
            progress(done, total)
    return maps, pictures, skipped


def interpret(model, data: str | Path | LabeledImages, *, k: int = 12, per_class: int = 3, split: str = "auto",
              method: str | None = None, maps: MapConfig | dict | None = None, batch_size: int = 16, device=None,
              progress=None) -> Interpretation:
    """Where the model looked when it was wrong (and when it was right): computed, not written.

    Args:
        model: a :class:`~weakloc.models.WeaklocNet` (a counting model: its classifier).
        data: labels (CSV / folder / :class:`~weakloc.data.labels.LabeledImages`); a counting model
            also takes a counts CSV. With splits, ``split`` chooses one (``auto``: test, else val,
            else all).
        k: how many top losses.
        per_class: how many most, and least, confident correct cases per class (0: none).
        method, maps: the map settings over the model's stored ones
            (:func:`~weakloc.explain.pipeline.map_settings`).
        batch_size: images per batch, in both passes.
        device: where to run (default: the model's device).
        progress: optional callable ``(done, total)``.

    Returns:
        an :class:`Interpretation`.

    Raises:
        OptionError: a bad argument, before any image is read.
        WeaklocError: labels that do not fit the model, or no readable image.
    """
    check_int("k", k, 1, 100_000)
    check_int("per_class", per_class, 0, 10_000)
    check_split(split)
    batch_size = check_batch_size(batch_size)
    check_progress(progress)
    if method is not None and not isinstance(method, str):
        raise OptionError(f"method: expected a method name, got {method!r}")
    settings = pipeline.map_settings(model, check_maps(maps), method=method)
    device = model_device(model, device)
    model = model.to(device).eval()
    labeled, split = resolve_split(read_labels(model, data), split)
    scores = score_images(model, labeled, settings.test_size, batch_size, device, progress)
    built = _Cases(model, labeled, scores)
    top, most, least = built.select(k, per_class)
    every = top + [c for d in (most, least) for v in d.values() for c in v]
    n_images = len({c.image for c in every})
    case_maps, pictures, lost = make_case_maps(model, labeled, every, settings, batch_size, device, progress=progress,
                                               done=len(labeled), total=len(labeled) + n_images)
    notes = []
    if getattr(model, "counting_head", None) is not None:
        notes.append("a counting model: this page is about its classifier (which classes are present); "
                     "its counts are not shown (weakloc evaluate scores them)")
    if lost:
        notes.append(f"{len(lost)} image(s) could not be read again for their maps: " + "; ".join(f"{s.file}: {s.reason}" for s in lost))
    accuracy = built.accuracy()
    return Interpretation(task=built.task, classes=list(model.config.classes), split=split, images=len(scores.index),
                          method=settings.method, test_size=settings.test_size, decision=built.decision,
                          confusion=built.confusion(), accuracy=accuracy, top_losses=top, most_confident=most,
                          least_confident=least, skipped=scores.skipped, notes=notes, maps=case_maps, pictures=pictures)
