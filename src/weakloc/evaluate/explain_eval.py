"""``explain_eval``: faithfulness of several heatmap methods on a labelled split, as one table."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from weakloc.checks import check_device, check_int
from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform
from weakloc.data.labels import LabeledImages, check_split, load_labels, resolve_split
from weakloc.evaluate.faithfulness import check_settings, compare_methods
from weakloc.evaluate.run import check_batch_size, check_methods


def explain_eval(model, data: str | Path | LabeledImages, methods: list[str], *, split: str = "auto", limit: int | None = 64,
                 target="predicted", steps: int = 50, baseline: str = "blur", batch_size: int = 16, chunk: int = 128,
                 device=None, **explain_kwargs) -> dict:
    """Deletion / insertion AUC, Average Drop and Increase in Confidence and time per image of each method.

    Args:
        data: labels (CSV / folder / :class:`LabeledImages`); the labels themselves are not used,
            only the images of ``split`` (``auto``: test, else val, else all), the first ``limit``.
        methods: registry names; unknown ones fail before any work.
        steps, baseline, chunk: see :func:`~weakloc.evaluate.faithfulness.deletion_insertion`.
        **explain_kwargs: passed to :func:`~weakloc.explain.explain` (layer, tta, dtype, options).

    Returns:
        ``{"split", "images", "steps", "baseline", "rows": [one dict per method]}``.

    Raises:
        OptionError: before any work, for no or unknown ``methods``, an unknown ``split`` or
            ``baseline``, a ``limit``, ``batch_size`` or ``chunk`` < 1, or ``steps`` outside
            ``1..MAX_STEPS`` (:func:`~weakloc.evaluate.faithfulness.check_settings`).
    """
    methods = check_methods(methods)
    check_split(split)
    check_int("limit", limit, 1, allow_none=True)
    check_settings(steps, baseline, chunk)
    batch_size = check_batch_size(batch_size)
    if device is not None:
        device = check_device("device", device)
    device = torch.device(device or next(model.parameters()).device)
    model = model.to(device).eval()
    cfg = model.config
    labeled = data if isinstance(data, LabeledImages) else load_labels(data, classes=cfg.classes)
    labeled, split = resolve_split(labeled, split)
    dataset = ImageDataset.from_labels(labeled, eval_transform(cfg.input_size, cfg.mean, cfg.std))
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_bad)
    rows = compare_methods(model, loader, methods, target=target, steps=steps, device=device, baseline=baseline,
                           chunk=chunk, **explain_kwargs)
    return {"split": split, "images": len(dataset), "steps": steps, "baseline": baseline, "rows": rows}
