"""``explain_eval``: faithfulness of several heatmap methods on a labelled split, as one table.

Each method's maps come from the one map pipeline: its settings are the model's stored ones (with
the caller's ``maps`` overrides) resolved for that method, and the images are loaded at the
resolved test-time size, so the ``cam`` scored here is the ``cam`` that ``localize`` draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from weakloc.checks import check_int
from weakloc.config import MapConfig
from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform
from weakloc.data.labels import LabeledImages, check_split, load_labels, resolve_split
from weakloc.evaluate.faithfulness import MethodQuality, check_settings, compare_methods
from weakloc.evaluate.run import check_batch_size, check_maps, check_methods
from weakloc.explain import pipeline
from weakloc.explain.run import model_device
from weakloc.results import Result


@dataclass
class ExplainEvalReport(Result):
    """What :func:`explain_eval` measured.

    Attributes:
        split, images: the split and the images scored.
        steps, baseline: deletion / insertion steps and substrate.
        rows: one :class:`~weakloc.evaluate.faithfulness.MethodQuality` per method, in order.
    """

    split: str
    images: int
    steps: int
    baseline: str
    rows: list[MethodQuality]

    def to_dict(self) -> dict:
        return {"split": self.split, "images": self.images, "steps": self.steps, "baseline": self.baseline,
                "rows": [r.to_dict() for r in self.rows]}


def explain_eval(model, data: str | Path | LabeledImages, methods: list[str], *, split: str = "auto", limit: int | None = 64,
                 target="predicted", steps: int = 50, baseline: str = "blur", batch_size: int = 16, chunk: int = 128,
                 device=None, maps: MapConfig | dict | None = None) -> ExplainEvalReport:
    """Deletion / insertion AUC, Average Drop and Increase in Confidence and time per image of each method.

    Args:
        data: labels (CSV / folder / :class:`LabeledImages`); the labels themselves are not used,
            only the images of ``split`` (``auto``: test, else val, else all), the first ``limit``.
        methods: registry names; unknown ones fail before any work.
        steps, baseline, chunk: see :func:`~weakloc.evaluate.faithfulness.deletion_insertion`.
        maps: map-setting overrides applied to every method (as
            :func:`~weakloc.evaluate.run.evaluate_model` takes them); each method's settings are
            :func:`~weakloc.explain.pipeline.map_settings` of these for that method.

    Returns:
        :class:`ExplainEvalReport`.

    Raises:
        OptionError: before any work, for no or unknown ``methods``, an unknown ``split`` or
            ``baseline``, a ``limit``, ``batch_size`` or ``chunk`` < 1, ``steps`` outside
            ``1..MAX_STEPS`` (:func:`~weakloc.evaluate.faithfulness.check_settings`), or malformed
            ``maps``.
    """
    methods = check_methods(methods)
    check_split(split)
    check_int("limit", limit, 1, allow_none=True)
    check_settings(steps, baseline, chunk)
    batch_size = check_batch_size(batch_size)
    check_maps(maps)
    settings = [pipeline.map_settings(model, maps, method=m) for m in methods]  # one test size: it is no method's own
    device = model_device(model, device)
    model = model.to(device).eval()
    cfg = model.config
    labeled = data if isinstance(data, LabeledImages) else load_labels(data, classes=cfg.classes)
    labeled, split = resolve_split(labeled, split)
    dataset = ImageDataset.from_labels(labeled, eval_transform(settings[0].test_size, cfg.mean, cfg.std))
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_bad)
    rows = compare_methods(model, loader, settings, target=target, steps=steps, device=device, baseline=baseline, chunk=chunk)
    return ExplainEvalReport(split=split, images=len(dataset), steps=steps, baseline=baseline, rows=rows)
