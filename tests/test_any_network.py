"""Any timm network from the command line: ``timm:NAME`` with ``--weights``, ``--classes``, ``--num-classes``.

Tiny networks with random weights written to temporary files (timm's ``test_resnet`` and
``test_vit``, torchvision's ResNet-18 in torchvision's key names); the packaged Lite0 weights for the
out-of-the-box case.
"""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from weakloc.cli import app, main
from weakloc.errors import CheckpointError, LabelError, OptionError
from weakloc.models import TimmClassifier, WeaklocNet, is_model_spec, load_model_spec
from weakloc.models import external
from weakloc.models.external import default_class_names, imagenet_class_names, read_class_names


def _save(net: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """A random 3-class timm ``test_resnet`` and its weights as safetensors."""
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=3).eval()
    return net, _save(net, tmp_path_factory.mktemp("w") / "test_resnet.safetensors")


@pytest.fixture(scope="module")
def classes_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "classes.txt"
    path.write_text("triangle\nsquare\nstar\n\n", encoding="utf-8")
    return path


def test_spec_names():
    assert is_model_spec("timm:resnet50") and not is_model_spec("runs/x/model") and not is_model_spec("resnet50")
    assert external.model_spec_name("timm:vit_small_patch16_224") == "vit_small_patch16_224"


def test_safetensors_weights_give_the_networks_own_logits_and_cam(resnet_file, classes_file):
    net, path = resnet_file
    model = load_model_spec("timm:test_resnet", weights=path, classes=classes_file)
    assert isinstance(model, WeaklocNet) and not model.training  # average pooling + linear: the CAM head
    cfg = model.config
    assert cfg.backbone == "test_resnet" and cfg.classes == ["triangle", "square", "star"]
    data = timm.data.resolve_model_data_config(net)
    assert cfg.input_size == data["input_size"][-1] and cfg.mean == tuple(data["mean"]) and cfg.std == tuple(data["std"])
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        theirs, out = net(x), model.forward_maps(x)
    assert torch.allclose(out.logits, theirs, atol=1e-5)
    assert torch.allclose(out.class_maps.mean((2, 3)), theirs, atol=1e-5)  # the class maps are the classifier per position
    assert model.config.maps.method is None  # the model's default: CAM


def test_torchvision_resnet18_names_map_onto_timm(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    # a training checkpoint of a DataParallel model: the weights under "state_dict", every key prefixed
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}, "epoch": 3}, tmp_path / "best.pth")
    model = load_model_spec("timm:resnet18", weights=tmp_path / "best.pth", num_classes=4)
    assert model.config.classes == ["class_0", "class_1", "class_2", "class_3"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), tv(x), atol=1e-4)


def test_a_head_that_is_not_cam_becomes_a_gradcam_model(tmp_path):
    torch.manual_seed(2)
    net = timm.create_model("test_vit", num_classes=2).eval()
    model = load_model_spec("timm:test_vit", weights=_save(net, tmp_path / "vit.safetensors"))
    assert isinstance(model, TimmClassifier)  # the class token, not the patch tokens, reaches the head
    assert model.config.maps.method == "gradcam" and model.config.maps.layer == f"backbone.blocks.{len(net.blocks) - 1}.norm1"
    size = model.config.input_size
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-5)
    assert model.counting_head is None and torch.allclose(model.probabilities(model(x)).sum(-1), torch.ones(1))


def test_imagenet_names():
    names = imagenet_class_names()
    assert len(names) == 1000 == len(set(names))
    assert names[281] == "tabby" and names[967] == "espresso" and names[968] == "cup"
    assert sum(n.startswith("crane (n") for n in names) == 2  # the bird and the machine, told apart
    assert default_class_names(1000) == list(names) and default_class_names(2) == ["class_0", "class_1"]


@pytest.mark.parametrize("text, message", [
    ("a\n\nb\n", "line 2: blank line"),
    ("a\nb\na\n", "line 3: class 'a' is listed twice (first on line 1)"),
    ("a\n../b\n", "line 2: class name '../b' holds a path separator"),
    ("\n\n", "no class names"),
])
def test_classes_file_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "classes.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LabelError, match="line|no class") as e:
        read_class_names(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_weight_and_class_mismatches_are_clear(resnet_file, tmp_path):
    _, path = resnet_file
    with pytest.raises(OptionError, match="--num-classes is 5 class\\(es\\), but the classifier of .* has 3 output"):
        load_model_spec("timm:test_resnet", weights=path, num_classes=5)
    with pytest.raises(OptionError, match="lists 2 class\\(es\\) but --num-classes is 3"):
        (tmp_path / "two.txt").write_text("a\nb\n")
        load_model_spec("timm:test_resnet", weights=path, classes=tmp_path / "two.txt", num_classes=3)
    with pytest.raises(OptionError, match="timm has no model 'no_such_net'"):
        load_model_spec("timm:no_such_net")
    backbone_only = {k: v for k, v in load_file(path).items() if not k.startswith("fc.")}
    save_file(backbone_only, str(tmp_path / "bb.safetensors"))
    with pytest.raises(CheckpointError, match="no classifier weights \\(fc.weight\\): it holds a backbone only"):
        load_model_spec("timm:test_resnet", weights=tmp_path / "bb.safetensors")
    with pytest.raises(CheckpointError, match="do not fit timm's resnet10t"):
        load_model_spec("timm:resnet10t", weights=path)


def test_offline_without_weights_says_weights_are_needed(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(external, "_hub_reachable", lambda _endpoint: False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(CheckpointError, match="timm:resnet10t needs weights \\(offline.*give --weights FILE.*timm:tf_efficientnet_lite0"):
        load_model_spec("timm:resnet10t")


def test_cli_localize_evaluate_explain_eval_with_a_timm_spec(resnet_file, classes_file, synth_single, tmp_path):
    _, path = resnet_file
    spec = ["timm:test_resnet", "--weights", path, "--classes", str(classes_file)]
    run = CliRunner()
    images = sorted((synth_single / "images").iterdir())[:3]
    r = run.invoke(app, ["localize", spec[0], *map(str, images), "-o", str(tmp_path / "loc"), *spec[1:], "--test-size", "64"])
    assert r.exit_code == 0, r.output
    det = json.loads((tmp_path / "loc" / "detections.json").read_text())
    assert len(det["images"]) == 3 and {c["name"] for c in det["categories"]} == {"triangle", "square", "star"}
    r = run.invoke(app, ["evaluate", spec[0], str(synth_single), "-a", str(synth_single / "annotations.json"), "--split", "val",
                         *spec[1:], "--test-size", "64", "-o", str(tmp_path / "report.json")])
    assert r.exit_code == 0, r.output
    assert 0 <= json.loads((tmp_path / "report.json").read_text())["localization"]["MaxBoxAccV2"] <= 100
    r = run.invoke(app, ["explain-eval", spec[0], str(synth_single), "--split", "val", "--limit", "2", "--steps", "4",
                         "--methods", "cam,gradcam", *spec[1:], "--test-size", "64", "-o", str(tmp_path / "faith.json")])
    assert r.exit_code == 0, r.output
    assert [row["method"] for row in json.loads((tmp_path / "faith.json").read_text())["rows"]] == ["cam", "gradcam"]


def test_cli_explain_a_vit_from_a_weights_file(tmp_path, synth_single):
    torch.manual_seed(3)
    weights = _save(timm.create_model("test_vit", num_classes=3).eval(), tmp_path / "vit.safetensors")
    image = sorted((synth_single / "images").iterdir())[0]
    r = CliRunner().invoke(app, ["explain", "timm:test_vit", str(image), "-o", str(tmp_path / "exp"), "--weights", weights,
                                 "--target", "all"])
    assert r.exit_code == 0, r.output
    maps = load_file(str(tmp_path / "exp" / "maps.safetensors"))
    normalized = [v for k, v in maps.items() if k.endswith(".normalized")]
    assert normalized and normalized[0].shape == (3, 160, 160)  # three classes at the network's own input size
    assert json.loads((tmp_path / "exp" / "maps.json").read_text())["method"] == "gradcam"


def test_cli_explain_lite0_offline_out_of_the_box(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skimage_data.chelsea()).save(photos / "chelsea.jpg")
    r = CliRunner().invoke(app, ["explain", "timm:tf_efficientnet_lite0", str(photos), "-o", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    target = json.loads((tmp_path / "exp" / "maps.json").read_text())["images"][0]["targets"][0]
    assert target in ("tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat")


@pytest.mark.parametrize("args, message", [
    (["calibrate", "timm:resnet18", "data", "-a", "ann.json"], "calibrate stores its choices in a model folder"),
    (["explain", "runs/some/model", "x.jpg", "--weights", "w.pth"], "--weights: only with MODEL timm:NAME"),
    (["explain", "timm:no_such_net", "x.jpg"], "timm has no model 'no_such_net'"),
])
def test_cli_errors_are_one_line(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["weakloc", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    out = capsys.readouterr().out
    assert message in " ".join(out.split()) and "Traceback" not in out
