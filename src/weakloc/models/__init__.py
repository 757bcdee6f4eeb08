"""Models: timm backbones with a class-map head; safetensors checkpoints."""

from weakloc.models.backbone import create_backbone, load_backbone_weights
from weakloc.models.checkpoint import load_config, load_model, save_model
from weakloc.models.classifier import ModelConfig, ModelOutput, WeaklocNet
from weakloc.models.external import TimmClassifier, is_model_spec, load_model_spec

__all__ = ["ModelConfig", "ModelOutput", "TimmClassifier", "WeaklocNet", "create_backbone", "is_model_spec", "load_backbone_weights", "load_config",
           "load_model", "load_model_spec", "save_model"]
