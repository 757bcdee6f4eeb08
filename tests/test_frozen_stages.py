"""``frozen_stages``: the stem and the first stages of the backbone never train (Detectron2's FREEZE_AT)."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from weakloc.errors import OptionError
from weakloc.models.backbone import early_parameters
from weakloc.train import fine_tune


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("frozen"), SyntheticConfig(n_images=24, size=64, mode="binary", val_fraction=0.25, seed=3))


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    """A test_resnet's random weights as a weights file, so a run's starting point is known exactly."""
    torch.manual_seed(5)
    net = timm.create_model("test_resnet", num_classes=0, global_pool="", output_stride=8)
    path = tmp_path_factory.mktemp("weights") / "start.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, {k: v.clone() for k, v in net.state_dict().items()}


def test_early_parameters_are_the_stem_and_the_first_stages_in_order():
    net = timm.create_model("test_resnet", num_classes=0, global_pool="")
    names = {id(p): n for n, p in net.named_parameters()}
    assert early_parameters(net, 0) == []
    stem = [n for n in names.values() if n.startswith(("conv1.", "bn1."))]  # stage 0 is act1: the stem's end
    assert stem and [names[id(p)] for p in early_parameters(net, 1)] == stem
    layer1 = [n for n in names.values() if n.startswith("layer1.")]
    assert layer1 and [names[id(p)] for p in early_parameters(net, 2)] == stem + layer1
    assert len(early_parameters(net, 5)) == len(names)  # every stage: the whole backbone
    with pytest.raises(Exception, match="6 stages, but the backbone has 5"):
        early_parameters(net, 6)


def test_frozen_stages_keep_their_start_weights_and_the_rest_trains(shapes, start_weights, tmp_path):
    path, start = start_weights
    res = fine_tune(shapes, tmp_path, backbone="test_resnet", pretrained=str(path), input_size=64, output_stride=8, epochs=2,
                    freeze_epochs=1, batch_size=8, progress=False, workers=0, frozen_stages=2, cbam_stages=[1])
    assert res.model.config.train.frozen_stages == 2
    trained = res.model.state_dict()
    frozen = {k for k in start if k.startswith(("conv1.", "bn1.", "layer1.")) and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    moved = {k for k in start if k.startswith(("layer2.", "layer3.", "layer4.")) and k.endswith("weight")}
    assert frozen and moved
    # layer1 is wrapped by the CBAM block inserted after it: its own keys gain ".0"
    key = {k: k.replace("layer1.", "layer1.0.", 1) if k.startswith("layer1.") else k for k in start}
    assert all(torch.equal(trained["backbone." + key[k]], start[k]) for k in frozen)
    assert any(not torch.equal(trained["backbone." + k], start[k]) for k in moved)
    # the CBAM block after a frozen stage is new, so it is not frozen with it
    names = {id(p): n for n, p in res.model.named_parameters()}
    frozen_names = {names[id(p)] for p in res.model.frozen_stage_parameters(2)}
    assert "backbone.layer1.0.0.conv1.weight" in frozen_names
    assert [n for n in names.values() if n.startswith("backbone.layer1.1.")] and not any(n.startswith("backbone.layer1.1.") for n in frozen_names)
    # the layout load_model gives (channels-last 4-D weights), whatever the frozen stages' layout was in training
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in res.model.parameters() if t.ndim == 4)


def test_frozen_stages_beyond_the_backbone_are_refused_in_one_line(shapes, tmp_path):
    with pytest.raises(OptionError, match=r"^--frozen-stages: 9 stages, but the backbone has 5 \(feature_info\); use 0\.\.5$"):
        fine_tune(shapes, tmp_path, backbone="test_resnet", pretrained="none", input_size=64, epochs=1, progress=False, frozen_stages=9)
    with pytest.raises(OptionError, match="frozen-stages"):
        fine_tune(shapes, tmp_path, backbone="test_resnet", pretrained="none", input_size=64, epochs=1, progress=False, frozen_stages=-1)


def test_with_a_separate_box_network_its_early_stages_are_the_frozen_ones():
    from weakloc.config import ModelConfig
    from weakloc.models.classifier import WeaklocNet

    net = WeaklocNet(ModelConfig(backbone="test_resnet", classes=["a", "b"], input_size=64, box_head=True,
                                 box_backbone="test_resnet"), pretrained="none")
    frozen = {id(p) for p in net.frozen_stage_parameters(2)}
    assert frozen == {id(p) for p in early_parameters(net.box_backbone, 2)}
    assert not frozen & {id(p) for p in net.backbone.parameters()}  # the classifier's copy is frozen anyway, as the teacher's
