"""Models: timm backbones with a class-map head; safetensors checkpoints."""

from weakloc.models.backbone import create_backbone, load_backbone_weights
from weakloc.models.checkpoint import load_config, load_model, save_model
from weakloc.models.classifier import ModelConfig, ModelOutput, WeaklocNet

__all__ = ["ModelConfig", "ModelOutput", "WeaklocNet", "create_backbone", "load_backbone_weights", "load_config", "load_model", "save_model"]
