"""Classification metrics of predicted probabilities (torchmetrics): shared by evaluation and by
training's validation, which imports them from here (evaluation does not import training)."""

from __future__ import annotations

import torch
import torchmetrics.functional as TMF


def classification_metrics(probs: torch.Tensor, targets: torch.Tensor, task: str, positive: int | None = None) -> dict[str, float]:
    """Accuracy, and ROC-AUC and PR-AUC (yes/no) or mAP (multi-label), computed with torchmetrics.

    Args:
        probs: ``(N, K)`` probabilities.
        targets: ``(N,)`` class indices (single) or ``(N, K)`` multi-hot (multi).
        task: ``single`` or ``multi``.
        positive: the positive class of a two-class task.

    Returns:
        ``{"acc"}`` plus ``"auroc"`` and ``"prauc"`` (a yes/no task whose targets hold both
        classes) or ``"map"`` (multi-label, over the classes present in ``targets``).
    """
    k = probs.shape[1]
    out: dict[str, float] = {}
    if task == "single":
        out["acc"] = float(TMF.accuracy(probs, targets, task="multiclass", num_classes=k))
        if k == 2 and positive is not None and targets.unique().numel() == 2:
            is_pos = (targets == positive).long()
            out["auroc"] = float(TMF.auroc(probs[:, positive], is_pos, task="binary"))
            out["prauc"] = float(TMF.average_precision(probs[:, positive], is_pos, task="binary"))
    else:
        t = targets.long()
        # micro accuracy is the binary accuracy of every (image, class) pair; torchmetrics'
        # multilabel task refuses a single label (one counted class)
        out["acc"] = float(TMF.accuracy(probs.flatten(), t.flatten(), task="binary"))
        present = t.sum(0) > 0
        if present.sum() == 1:
            out["map"] = float(TMF.average_precision(probs[:, present].flatten(), t[:, present].flatten(), task="binary"))
        elif present.any():
            ap = TMF.average_precision(probs[:, present], t[:, present], task="multilabel", num_labels=int(present.sum()), average="macro")
            out["map"] = float(ap)
    return out
