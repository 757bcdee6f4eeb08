"""Training: fine-tune a pretrained backbone on image-level labels (Lightning + torchmetrics)."""

from weakloc.config import TrainConfig
from weakloc.train.fit import TrainResult, fine_tune
from weakloc.train.module import ClassifierModule, classification_metrics

__all__ = ["ClassifierModule", "TrainConfig", "TrainResult", "classification_metrics", "fine_tune"]
