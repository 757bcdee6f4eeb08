"""Maps that follow object boundaries (the guided filter, the ``refine`` map setting) and instance boxes on crowded photos (issue 18)."""

import json

import pytest
import torch
import torch.nn.functional as F

from weakloc.errors import OptionError, WeaklocError
from weakloc.explain.maps import box_mean, guided_filter, parse_refine, refine_maps


@pytest.mark.parametrize("radius", [1, 2, 5])
def test_box_mean_is_the_border_cut_window_mean(radius):
    x = torch.rand(2, 3, 13, 17)
    want = F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
    assert torch.allclose(box_mean(x, radius), want, atol=1e-5)


def test_flat_guide_gives_a_double_box_mean_and_the_filter_is_linear_in_the_maps():
    p = torch.rand(2, 4, 20, 20)
    flat = torch.full((2, 1, 20, 20), 0.5)
    assert torch.allclose(guided_filter(flat, p, 3, 0.01), box_mean(box_mean(p, 3), 3), atol=1e-5)
    g = torch.rand(2, 1, 20, 20)
    assert torch.allclose(guided_filter(g, 3 * p - 1, 3, 0.01), 3 * guided_filter(g, p, 3, 0.01) - 1, atol=1e-4)


def test_a_blurred_map_snaps_back_onto_the_image_edge():
    """An object whose map was blurred across its edge (as an upsampled stride-16 map is): with the
    image as guide, one threshold separates the object from the background again (no threshold does
    on the blurred map: its corners fall below its outside rim)."""
    guide = torch.zeros(1, 1, 40, 40)
    guide[..., 10:30, 10:30] = 1.0  # the object
    blurred = box_mean(guide, 5)  # the classifier's coarse map of it
    out = guided_filter(guide, blurred, 4, 1e-4)
    inside, outside = guide.bool(), ~guide.bool()
    assert out[inside].min() > out[outside].max()  # one threshold separates the object exactly
    assert not blurred[inside].min() > blurred[outside].max()


def test_parse_refine_and_its_errors():
    assert parse_refine(None) == ("none", ())
    assert parse_refine("none") == ("none", ())
    assert parse_refine("guided") == ("guided", (0.1, 0.001))
    assert parse_refine("guided:0.2") == ("guided", (0.2, 0.001))
    assert parse_refine("guided:0.1,0.001") == ("guided", (0.1, 0.001))
    for bad in ("slic", "guided:2", "guided:0.1,0.1,0.1", "guided:x", "guided:nan", 3):
        with pytest.raises(ValueError):
            parse_refine(bad)


def test_refine_maps_uses_the_images_at_the_maps_size():
    images = torch.randn(2, 3, 32, 32)
    maps = torch.rand(2, 3, 64, 64)
    out = refine_maps(maps, images, "guided:0.1")
    assert out.shape == maps.shape and torch.isfinite(out).all()
    assert refine_maps(maps, images, "none") is maps


def test_explain_refines_and_refuses_native_size(tiny_model):
    from weakloc.explain import explain

    x = torch.randn(2, 3, 64, 64)
    plain = explain(tiny_model, x, "cam")
    refined = explain(tiny_model, x, "cam", refine="guided:0.1,0.01")
    assert refined.normalized.shape == plain.normalized.shape
    assert not torch.allclose(refined.normalized, plain.normalized)
    assert torch.equal(refined.targets, plain.targets)
    with pytest.raises(WeaklocError, match="native"):
        explain(tiny_model, x, "cam", size="native", refine="guided")
    with pytest.raises(OptionError, match="refinement"):
        explain(tiny_model, x, "cam", refine="bilateral")


def test_refine_is_a_stored_map_setting(tiny_model, tmp_path):
    from weakloc.explain.pipeline import explain_arguments, map_settings
    from weakloc.models import load_model, save_model

    tiny_model.config.maps.refine = "guided:0.08"
    save_model(tiny_model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["maps"]["refine"] == "guided:0.08"
    model = load_model(tmp_path / "m")
    assert explain_arguments(map_settings(model))["refine"] == "guided:0.08"
    assert explain_arguments(map_settings(model, refine="none"))["refine"] == "none"
    with pytest.raises(OptionError, match="refine"):
        map_settings(model, refine="guided:5")



def test_region_instances_count_a_merged_school_as_one_false_box_and_misses():
    """Two separate blobs and two GT boxes: both found. The same two objects under one region that
    joins them: one false box, two misses (MaxBoxAccV2 would not see the difference)."""
    from weakloc.evaluate.matching import instance_metrics, region_instances

    maps = torch.zeros(2, 40, 40)
    maps[0, 5:15, 5:15] = 1.0
    maps[0, 25:35, 25:35] = 0.8
    maps[1, 5:35, 5:35] = 1.0
    gt = torch.tensor([[5, 5, 14, 14], [25, 25, 34, 34]])
    apart, merged = region_instances(maps, [gt, gt], threshold=0.5)
    assert apart == (2, 0, 0)
    assert merged == (0, 1, 2)
    m = instance_metrics({"fish": [a + b for a, b in zip(apart, merged)]})
    assert m.per_class["fish"]["precision"] == 2 / 3 and m.per_class["fish"]["recall"] == 0.5


def test_evaluate_reports_instances_for_every_gt_box(synth_single):
    from weakloc.data.labels import load_labels
    from weakloc.evaluate.run import evaluate_model
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", classes=load_labels(synth_single).classes, input_size=64, output_stride=8, drop_rate=0.0)
    net = WeaklocNet(cfg, pretrained="none").eval()
    found = {}
    for keep in ("all", "peaks"):
        rep = evaluate_model(net, synth_single, synth_single / "annotations.json", split="val", keep=keep)
        inst = rep.to_dict()["instances"]
        per = inst["per_class"]
        assert inst["keep"] == keep
        assert sum(v["tp"] + v["fn"] for v in per.values()) == rep.localization_samples  # one shape per synthetic image
        assert all(0 <= v["F1"] <= 1 for v in per.values())
        found[keep] = sum(v["tp"] + v["fp"] for v in per.values())
    assert found["peaks"] >= found["all"]  # splitting never merges regions


def test_a_never_calibrated_model_thresholds_refined_maps_at_their_own_default(tiny_model, tmp_path):
    """Refined maps keep a spread of the map around the object, so the customary 0.3 / 0.2 would cut
    far outside it: an uncalibrated model's refined maps use REFINED_THRESHOLD; a calibrated
    threshold always wins."""
    from weakloc.config import DEFAULT_BOX_THRESHOLD, DEFAULT_GT_KNOWN_THRESHOLD, REFINED_THRESHOLD
    from weakloc.evaluate.run import stored_threshold
    from weakloc.localize.run import localize_batches

    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (120, 30, 200)).save(image)
    assert localize_batches(tiny_model, [image]).threshold == DEFAULT_BOX_THRESHOLD
    assert localize_batches(tiny_model, [image], maps={"refine": "guided"}).threshold == REFINED_THRESHOLD
    tiny_model.config.maps.refine = "guided"
    assert localize_batches(tiny_model, [image]).threshold == REFINED_THRESHOLD
    assert localize_batches(tiny_model, [image], maps={"refine": "none"}).threshold == DEFAULT_BOX_THRESHOLD
    assert stored_threshold(tiny_model.config, "guided") == REFINED_THRESHOLD
    assert stored_threshold(tiny_model.config, "none") == DEFAULT_GT_KNOWN_THRESHOLD
    tiny_model.config.maps.threshold = 0.42
    assert localize_batches(tiny_model, [image]).threshold == "calibrated" and stored_threshold(tiny_model.config, "guided") == 0.42
