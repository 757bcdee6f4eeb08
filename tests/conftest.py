import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def synth_single(tmp_path_factory):
    """48 synthetic 64-px single-label images with train/val splits and COCO ground truth."""
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth_single"), SyntheticConfig(n_images=48, size=64, val_fraction=0.25, seed=1))


@pytest.fixture()
def tiny_model():
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", classes=["a", "b", "c"], input_size=64, output_stride=8, drop_rate=0.0)
    return WeaklocNet(cfg, pretrained="none").eval()
