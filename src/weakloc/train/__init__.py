"""Training: fine-tune a pretrained backbone on image-level labels (Lightning + torchmetrics)."""

from weakloc.train.fit import TrainResult, fine_tune
from weakloc.train.module import ClassifierModule, OptimConfig, classification_metrics

__all__ = ["ClassifierModule", "OptimConfig", "TrainResult", "classification_metrics", "fine_tune"]
