"""One map pipeline: for one model and one set of options, the maps behind `explain`, `localize`,
`evaluate` and `explain-eval` are the same tensors (issue 17)."""

import csv

import pytest
import torch

from weakloc.config import MapConfig
from weakloc.explain import pipeline


@pytest.fixture()
def model_and_data(tmp_path, synth_single):
    """A model whose stored map settings differ from every default (method options, normalisation,
    test-time size), and two annotated images of one class."""
    from weakloc.models import ModelConfig, WeaklocNet

    with open(synth_single / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cls = rows[0]["label"]
    chosen = [r for r in rows if r["label"] == cls][:2]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{synth_single / r['path']},{r['label']}\n" for r in chosen))
    torch.manual_seed(0)
    classes = sorted({r["label"] for r in rows})
    cfg = ModelConfig(backbone="test_resnet", classes=classes, input_size=64, output_stride=8, drop_rate=0.0,
                      maps=MapConfig(method="cam", normalization="pas", test_size=96, options={"cam": {"positive_weights": True}}))
    net = WeaklocNet(cfg, pretrained="none").eval()
    return net, labels, [synth_single / r["path"] for r in chosen], cls, synth_single / "annotations.json"


def _recording(monkeypatch):
    """Wrap the pipeline's make_maps: every call's settings, input batch and normalised maps."""
    calls = []
    original = pipeline.make_maps

    def recorder(model, images, settings, target="predicted", **extra):
        heat = original(model, images, settings, target, **extra)
        calls.append({"settings": settings, "images": images.detach().cpu(), "maps": heat.normalized.detach().cpu(),
                      "targets": heat.targets.detach().cpu()})
        return heat

    monkeypatch.setattr(pipeline, "make_maps", recorder)
    return calls


def _first_map(calls, k: int) -> tuple[torch.Tensor, torch.Tensor, MapConfig]:
    """The first recorded call's input and its map of class ``k`` for the first image."""
    call = calls[0]
    column = (call["targets"][0] == k).nonzero()[0, 0]
    return call["images"][0], call["maps"][0, column], call["settings"]


def test_explain_localize_evaluate_and_explain_eval_draw_the_same_maps(model_and_data, monkeypatch, tmp_path):
    from weakloc.evaluate.explain_eval import explain_eval
    from weakloc.evaluate.run import evaluate_model
    from weakloc.report.explanation import explain_images
    from weakloc.report.localization import localize_images

    net, labels, paths, cls, annotations = model_and_data
    k = net.config.classes.index(cls)
    options = {"fusion": "max", "tta": True}  # one set of caller options, passed to every command
    got = {}
    runs = {
        "explain": lambda: explain_images(net, paths, tmp_path / "explain", target=cls, maps=options),
        "localize": lambda: localize_images(net, paths, None, target=cls, maps=options),
        "evaluate": lambda: evaluate_model(net, labels, annotations, split="all", maps=options),
        "explain-eval": lambda: explain_eval(net, labels, ["cam"], split="all", target=cls, steps=2, maps=options),
    }
    for name, run in runs.items():
        calls = _recording(monkeypatch)
        run()
        assert calls, f"{name} made no map through the pipeline"
        got[name] = _first_map(calls, k)
        monkeypatch.undo()
    image, heat, settings = got["localize"]
    assert settings.test_size == 96 and settings.normalization == "pas" and settings.method_options() == {"positive_weights": True}
    assert settings.tta and settings.fusion == "max"
    assert heat.shape == (96, 96)
    for name, (other_image, other_heat, other_settings) in got.items():
        assert other_settings == settings, f"{name} resolved other settings: {other_settings}"
        assert torch.equal(other_image, image), f"{name} read the image differently"
        assert torch.equal(other_heat, heat), f"{name}'s map differs from localize's"


def test_counting_evaluation_and_localize_count_at_the_same_test_size(tmp_path):
    from weakloc.explain.pipeline import map_settings
    from weakloc.models import ModelConfig, WeaklocNet

    net = WeaklocNet(ModelConfig(backbone="test_resnet", classes=["a", "b"], task="multi", input_size=64, counting="density",
                                 maps=MapConfig(test_size=96, count_views="flip")), pretrained="none")
    assert map_settings(net).test_size == 96 and map_settings(net).count_views == "flip"
    assert map_settings(net, count_views="none").count_views == "none"
