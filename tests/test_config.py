"""The typed configuration: config.json format 2, format-1 folders upgraded, one resolution of map settings."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weakloc.config import (FORMAT_VERSION, MAP_SETTINGS, MapConfig, ModelConfig, TrainConfig, resolve_maps, upgrade_v1,
                            validate_config)
from weakloc.errors import CheckpointError, OptionError
from weakloc.models import load_model, save_model

FIXTURES = Path(__file__).parent / "fixtures"


def test_format_1_classifier_loads_with_every_setting_mapped():
    net = load_model(FIXTURES / "model_v1")
    cfg = net.config
    assert cfg.format_version == FORMAT_VERSION
    assert (cfg.backbone, cfg.classes, cfg.input_size, cfg.output_stride) == ("test_resnet", ["a", "b", "c"], 64, 8)
    m = cfg.maps
    assert (m.threshold, m.method, m.test_size) == (0.35, "gradcam", 96)
    # the calibrated normalisation stays the option of the method it was chosen for
    assert m.options == {"cam": {"positive_weights": True}, "gradcam": {"normalization": "pas"}}
    assert m.sources["threshold"] == {"by": "calibration (format 1)", "images": 15, "per_class": 5}
    assert m.sources["localization"]["note"].startswith("written by weakloc 0.x")
    assert cfg.inference_size() == 96 and cfg.train is None


def test_format_1_counting_model_loads_with_views_and_box_sizes():
    cfg = load_model(FIXTURES / "counting_v1").config
    assert cfg.counting == "density" and cfg.density_stage == -3 and cfg.density_hidden == 8
    assert cfg.maps.count_views == "flip"
    assert cfg.maps.box_sizes == {"cell": [0.2, 0.25], "dot": [0.05, 0.05]}
    assert cfg.instance_box_sizes() == [[0.2, 0.25], [0.05, 0.05]]
    assert cfg.maps.sources["box_sizes"]["images"] == 6


def test_format_1_models_give_the_outputs_they_gave_when_written():
    ref = load_file(str(FIXTURES / "reference_outputs.safetensors"))
    for name in ("model_v1", "counting_v1"):
        with torch.no_grad():
            out = load_model(FIXTURES / name).eval().forward_maps(ref["input"])
        assert torch.allclose(out.logits, ref[f"{name}.logits"], atol=1e-5)
        if f"{name}.counts" in ref:
            assert torch.allclose(out.counts, ref[f"{name}.counts"], atol=1e-5)


def test_an_upgraded_folder_is_saved_as_format_2_and_reads_back_equal(tmp_path):
    net = load_model(FIXTURES / "model_v1")
    save_model(net, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["format_version"] == 2 and "localization" not in raw
    assert raw["maps"]["threshold"] == 0.35 and raw["maps"]["test_size"] == 96
    again = load_model(tmp_path / "m").config
    assert again == net.config


def test_train_config_round_trips_through_config_json(tmp_path):
    net = load_model(FIXTURES / "model_v1")
    net.config.train = TrainConfig(epochs=3, backbone_lr=(0.1, 0.5), crop_scale=(0.5, 1.0), pretrained="none")
    save_model(net, tmp_path / "m")
    back = load_model(tmp_path / "m").config.train
    assert back == net.config.train and isinstance(back.backbone_lr, tuple)


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(localization={"threshold": 0.3}), "'localization' is the format 1 key"),
    (lambda c: c["maps"].update(threshold=2), "'maps.threshold' must be null or a number in [0, 1]"),
    (lambda c: c["maps"].update(count_views="all"), "'maps.count_views'"),
    (lambda c: c["maps"].update(colour="red"), "unknown key(s) in 'maps'"),
    (lambda c: c.update(train={"epochs": 2, "speed": 3}), "unknown key(s) in 'train'"),
    (lambda c: c.update(format_version=3), "'format_version' must be one of [1, 2]"),
])
def test_bad_format_2_fields_are_named(edit, words):
    raw = json.loads(ModelConfig(classes=["a", "b"]).to_json())
    edit(raw)
    with pytest.raises(CheckpointError, match=None) as e:
        validate_config(raw, "m/config.json")
    assert words in str(e.value) and str(e.value).startswith("m/config.json: ")


def test_format_1_with_format_2_keys_is_refused():
    with pytest.raises(CheckpointError, match="format 2 keys"):
        validate_config({"classes": ["a", "b"], "maps": {}}, "c")


def test_upgrade_v1_keeps_unknown_notes_and_maps_known_keys():
    out = upgrade_v1({"classes": ["a"], "localization": {"count_tta": "dihedral", "input_size": 320, "calibrated_on": 4,
                                                         "threshold": 0.4, "note": "x"}})
    assert out["maps"]["count_views"] == "dihedral" and out["maps"]["test_size"] == 320 and out["maps"]["threshold"] == 0.4
    assert out["maps"]["sources"]["threshold"] == {"by": "calibration (format 1)", "images": 4}
    assert out["maps"]["sources"]["localization"] == {"by": "format 1 notes", "note": "x"}


def _cfg(**maps) -> ModelConfig:
    return ModelConfig(classes=["a", "b"], input_size=64, maps=MapConfig(**maps))


def test_resolve_maps_takes_the_caller_then_the_model_then_the_defaults():
    cfg = _cfg(method="gradcam", fusion="max", test_size=128, threshold=0.4, options={"gradcam": {"chunk": 4}})
    plain = resolve_maps(cfg)
    assert (plain.method, plain.fusion, plain.tta, plain.normalization, plain.test_size) == ("gradcam", "max", False, "minmax", 128)
    assert plain.options == {"gradcam": {"chunk": 4}} and plain.threshold == 0.4
    given = resolve_maps(cfg, {"fusion": "mean", "chunk": 8, "tta": True}, test_size=96)
    assert (given.fusion, given.tta, given.test_size, given.method_options()) == ("mean", True, 96, {"chunk": 8})
    other = resolve_maps(cfg, method="cam")  # another method: not gradcam's options
    assert other.options == {} and other.test_size == 128
    assert resolve_maps(_cfg()).test_size == 64  # no test-time size: the training size
    assert set(MAP_SETTINGS) <= set(vars(plain))


def test_a_methods_stored_normalization_is_its_setting_unless_the_caller_gives_one():
    cfg = _cfg(method="cam", normalization="max", options={"cam": {"normalization": "pas", "positive_weights": True}})
    assert resolve_maps(cfg).normalization == "pas" and resolve_maps(cfg).method_options() == {"positive_weights": True}
    assert resolve_maps(cfg, normalization="ivr").normalization == "ivr"
    assert resolve_maps(cfg, {"normalization": "minmax"}).normalization == "minmax"
    assert resolve_maps(cfg, method="gradcam").normalization == "max"  # the method-independent setting


def test_resolve_maps_accepts_a_map_config_and_refuses_unknown_settings():
    cfg = _cfg(method="cam", fusion="max")
    assert resolve_maps(cfg, MapConfig(fusion="product", options={"cam": {"chunk": 2}})).fusion == "product"
    assert resolve_maps(cfg, MapConfig(options={"cam": {"chunk": 2}})).method_options() == {"chunk": 2}
    with pytest.raises(OptionError, match="unknown"):
        resolve_maps(cfg, colour="red")


def test_copying_a_model_folder_keeps_its_config(tmp_path):
    shutil.copytree(FIXTURES / "model_v1", tmp_path / "m")
    assert load_model(tmp_path / "m").config == load_model(FIXTURES / "model_v1").config


def test_a_keyword_left_none_keeps_the_callers_override():
    cfg = _cfg(method="cam")
    assert resolve_maps(cfg, {"method": "gradcam"}, method=None).method == "gradcam"
    assert resolve_maps(cfg, {"method": "gradcam"}, method="layercam").method == "layercam"  # the keyword wins


def test_an_unknown_method_option_is_refused_before_any_image_is_read():
    from weakloc.explain.pipeline import map_settings
    from weakloc.models import WeaklocNet

    net = WeaklocNet(ModelConfig(backbone="test_resnet", classes=["a", "b"], input_size=32), pretrained="none")
    with pytest.raises(OptionError, match="option: method 'cam' takes no option"):
        map_settings(net, {"num_samples": 4}, method="cam")
    assert map_settings(net, {"chunk": 4}, method="scorecam").method_options() == {"chunk": 4}


def test_old_option_spellings_are_renamed_for_their_command_only():
    import warnings

    from weakloc.cli import renamed_arguments

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert renamed_arguments(["--max-pixels", "10", "train", "d", "--image-size=64", "--cutmix", "1"]) == \
            ["--max-pixels", "10", "train", "d", "--input-size=64", "--cutmix-alpha", "1"]
        # an image folder named like a command is not the command
        assert renamed_arguments(["explain", "timm:resnet50", "train", "--weights", "w.pth"]) == \
            ["explain", "timm:resnet50", "train", "--weights", "w.pth"]
        assert renamed_arguments(["localize", "m", "x", "--", "--input-size"]) == ["localize", "m", "x", "--", "--input-size"]
    assert [str(w.message).split(";")[0] for w in seen] == ["train --image-size is deprecated", "train --cutmix is deprecated"]
    with pytest.raises(OptionError, match="weakloc calibrate"):
        renamed_arguments(["evaluate", "m", "d", "-a", "a.json", "--calibrate"])
