"""Model folders from anywhere: config.json checked against its schema, weights checked for NaN,
saves atomic with ordinary file modes (issue 16)."""

import errno
import json
import os
import pickle
import stat

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from weakloc.config import CONFIG_SCHEMA, LOCALIZATION_SCHEMA, MAPS_SCHEMA, MapConfig
from weakloc.errors import CheckpointError, WeaklocError
from weakloc.models import ModelConfig, WeaklocNet, load_config, load_model, save_model
from weakloc.models.backbone import for_inference
from weakloc.models.checkpoint import ensure_writable
from weakloc.data.labels import class_name_problem
from weakloc.models.classifier import check_finite


def _tiny(**kw) -> WeaklocNet:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"backbone": "test_resnet", "classes": ["a", "b", "c"], "input_size": 64, "output_stride": 8,
                         "drop_rate": 0.0, **kw})
    return WeaklocNet(cfg, pretrained="none").eval()


@pytest.fixture(scope="module")
def good_config() -> dict:
    """config.json as today's save_model writes it, with the map settings fine_tune and calibrate store."""
    model = _tiny()
    model.config.maps = MapConfig(threshold=0.35, method="gradcam", test_size=96, options={"cam": {"normalization": "pas"}},
                                  sources={"threshold": {"by": "calibrate", "split": "train", "images": 15, "per_class": 5}})
    return json.loads(model.config.to_json())


# format 1 (before the typed configuration): a free-form ``localization`` object
V1_LOCALIZATION = {"threshold": 0.35, "method": "gradcam", "calibrated_on": 15, "per_class": 5, "input_size": 96,
                   "options": {"cam": {"normalization": "pas"}}, "note": "hand note"}


def _dropped(key):
    def edit(c):
        c.pop(key)
    return edit


def _set(key, value):
    def edit(c):
        c[key] = value
    return edit


def _file(text):
    return ("file", text)


def _raw(key, text):
    """``key`` set to raw JSON text: NaN, Infinity, numbers json.dumps cannot write."""
    return ("field", key, text)


def _set_maps(key, value):
    def edit(c):
        c["maps"][key] = value
    return edit


def _v1(edit=None):
    """The good config written as format 1, then ``edit``."""
    def as_v1(c):
        c.pop("maps")
        c.pop("train")
        c.update(format_version=1, localization=json.loads(json.dumps(V1_LOCALIZATION)))
        if edit is not None:
            edit(c)
    return as_v1


def _set_loc(key, value):
    def edit(c):
        c["localization"][key] = value
    return _v1(edit)


# (id, edit of the good config dict or the whole file's text, the field the error must name)
CORRUPTIONS = [
    ("null-file", _file("null"), "JSON object"),
    ("list-file", _file("[1, 2]"), "JSON object"),
    ("string-file", _file('"model"'), "JSON object"),
    ("not-json", _file("{'classes': "), "not valid JSON"),
    ("empty-file", _file(""), "not valid JSON"),
    ("deep-nesting", _file("[" * 100_000 + "]" * 100_000), "not valid JSON"),
    ("unknown-key", _set("evil", 1), "unknown config key"),
    ("classes-missing", _dropped("classes"), "'classes'"),
    ("classes-empty", _set("classes", []), "'classes'"),
    ("classes-string", _set("classes", "abc"), "'classes'"),
    ("classes-number", _set("classes", ["a", 1, "c"]), "'classes'"),
    ("classes-duplicate", _set("classes", ["a", "b", "a"]), "'classes'"),
    ("classes-traversal", _set("classes", ["a", "../../../../some/dir/NAME", "c"]), "'classes'"),
    ("classes-backslash", _set("classes", ["a", "..\\..\\x", "c"]), "'classes'"),
    ("classes-dotdot", _set("classes", ["a", "..", "c"]), "'classes'"),
    ("classes-dot", _set("classes", [".", "b", "c"]), "'classes'"),
    ("classes-blank", _set("classes", ["a", " ", "c"]), "'classes'"),
    ("classes-newline", _set("classes", ["a", "b\nc", "d"]), "'classes'"),
    ("classes-nul", _set("classes", ["a", "b\x00", "c"]), "'classes'"),
    ("classes-surrogate", _raw("classes", '["a", "\\ud800", "c"]'), "'classes'"),
    ("classes-too-long", _set("classes", ["a", "b" * 300, "c"]), "'classes'"),
    ("backbone-hub", _set("backbone", "hf-hub:someone/net"), "'backbone'"),
    ("backbone-path", _set("backbone", "../nets/x"), "'backbone'"),
    ("backbone-null", _set("backbone", None), "'backbone'"),
    ("task-unknown", _set("task", "detect"), "'task'"),
    ("task-null", _set("task", None), "'task'"),
    ("head-unknown", _set("head", "gap"), "'head'"),
    ("counting-unknown", _set("counting", "yes"), "'counting'"),
    ("counting-bool", _set("counting", True), "'counting'"),
    ("mean-short", _set("mean", [0.5, 0.5]), "'mean'"),
    ("mean-strings", _set("mean", ["a", "b", "c"]), "'mean'"),
    ("mean-nan", _raw("mean", '[NaN, 0.5, 0.5]'), "'mean'"),
    ("mean-huge-int", _raw("mean", "[1" + "0" * 400 + ", 0.5, 0.5]"), "'mean'"),
    ("std-zero", _set("std", [0, 0, 0]), "'std' must be 3 positive numbers, got [0, 0, 0]"),
    ("std-negative", _set("std", [0.2, -0.2, 0.2]), "'std'"),
    ("std-inf", _raw("std", '[Infinity, 0.2, 0.2]'), "'std'"),
    ("std-long", _set("std", [0.2, 0.2, 0.2, 0.2]), "'std'"),
    ("input-size-string", _set("input_size", "224"), "'input_size'"),
    ("input-size-zero", _set("input_size", 0), "'input_size'"),
    ("input-size-fraction", _set("input_size", 224.5), "'input_size'"),
    ("input-size-bool", _set("input_size", True), "'input_size'"),
    ("input-size-huge", _set("input_size", 10**6), "'input_size'"),
    ("input-size-digits", _raw("input_size", "9" * 5000), "not valid JSON"),
    ("output-stride-7", _set("output_stride", 7), "'output_stride'"),
    ("output-stride-float", _set("output_stride", 8.0), "'output_stride'"),
    ("drop-rate-negative", _set("drop_rate", -0.5), "'drop_rate'"),
    ("attention-stages-string", _set("attention_stages", "1,2"), "'attention_stages'"),
    ("attention-norm-unknown", _set("attention_norm", "relu"), "'attention_norm'"),
    ("cbam-stages-floats", _set("cbam_stages", [1.5]), "'cbam_stages'"),
    ("adl-stages-null", _set("adl_stages", None), "'adl_stages'"),
    ("tap-threshold-high", _set("tap_threshold", 3), "'tap_threshold'"),
    ("positive-class-three-classes", _set("positive_class", 0), "'positive_class'"),
    ("positive-class-string", _set("positive_class", "yes"), "'positive_class'"),
    ("decision-threshold-high", _set("decision_threshold", 1.5), "'decision_threshold'"),
    ("decision-threshold-string", _set("decision_threshold", "0.5"), "'decision_threshold'"),
    ("density-stage-float", _set("density_stage", 1.0), "'density_stage'"),
    ("density-hidden-negative", _set("density_hidden", -1), "'density_hidden'"),
    ("density-context-string", _set("density_context", "yes"), "'density_context'"),
    ("localizer-int", _set("localizer", 1), "'localizer'"),
    ("box-head-string", _set("box_head", "yes"), "'box_head'"),
    ("box-backbone-path", _set("box_backbone", "../x"), "'box_backbone'"),
    ("box-backbone-number", _set("box_backbone", 3), "'box_backbone'"),
    ("maps-list", _set("maps", []), "'maps'"),
    ("maps-null", _set("maps", None), "'maps'"),
    ("maps-unknown-key", _set_maps("colour", "red"), "'maps'"),
    ("maps-threshold-high", _set_maps("threshold", 2), "'maps.threshold'"),
    ("maps-threshold-string", _set_maps("threshold", "otsu"), "'maps.threshold'"),
    ("maps-method-number", _set_maps("method", 3), "'maps.method'"),
    ("maps-layer-number", _set_maps("layer", 3), "'maps.layer'"),
    ("maps-fusion-unknown", _set_maps("fusion", "sum"), "'maps.fusion'"),
    ("maps-tta-string", _set_maps("tta", "yes"), "'maps.tta'"),
    ("maps-eigen-smooth-int", _set_maps("eigen_smooth", 1), "'maps.eigen_smooth'"),
    ("maps-dtype-unknown", _set_maps("dtype", "fp8"), "'maps.dtype'"),
    ("maps-normalization-number", _set_maps("normalization", 0.9), "'maps.normalization'"),
    ("maps-refine-number", _set_maps("refine", 0.1), "'maps.refine'"),
    ("maps-test-size-zero", _set_maps("test_size", 0), "'maps.test_size'"),
    ("maps-options-list", _set_maps("options", ["cam"]), "'maps.options'"),
    ("maps-options-method-number", _set_maps("options", {"cam": 1}), "'maps.options'"),
    ("maps-box-sizes-zero", _set_maps("box_sizes", {"a": [0, 0.1], "b": [0.1, 0.1], "c": [0.1, 0.1]}), "'maps.box_sizes'"),
    ("maps-count-views-unknown", _set_maps("count_views", "many"), "'maps.count_views'"),
    ("maps-sources-list", _set_maps("sources", {"threshold": []}), "'maps.sources'"),
    ("train-list", _set("train", [1]), "'train'"),
    ("train-unknown-key", _set("train", {"epochs": 2, "speed": 3}), "'train'"),
    ("format-2-with-localization", _set("localization", {"threshold": 0.3}), "'localization'"),
    ("format-1-with-maps", _v1(_set("maps", {})), "'maps'"),
    ("localization-list", _v1(_set("localization", [])), "'localization'"),
    ("localization-null", _v1(_set("localization", None)), "'localization'"),
    ("threshold-high", _set_loc("threshold", 2), "'localization.threshold'"),
    ("threshold-string", _set_loc("threshold", "otsu"), "'localization.threshold'"),
    ("method-number", _set_loc("method", 3), "'localization.method'"),
    ("loc-input-size-zero", _set_loc("input_size", 0), "'localization.input_size'"),
    ("options-list", _set_loc("options", ["cam"]), "'localization.options'"),
    ("options-method-number", _set_loc("options", {"cam": 1}), "'localization.options'"),
    ("box-sizes-zero", _set_loc("box_sizes", {"a": [0, 0.1], "b": [0.1, 0.1], "c": [0.1, 0.1]}), "'localization.box_sizes'"),
    ("box-sizes-short", _set_loc("box_sizes", {"a": [0.1]}), "'localization.box_sizes'"),
    ("box-sizes-over-one", _set_loc("box_sizes", {"a": [2, 0.1]}), "'localization.box_sizes'"),
    ("count-tta-unknown", _set_loc("count_tta", "many"), "'localization.count_tta'"),
    ("format-version-newer", _set("format_version", 3), "'format_version'"),
    ("format-version-string", _set("format_version", "1"), "'format_version'"),
]


def _write_config(folder, good: dict, edit) -> None:
    folder.mkdir(exist_ok=True)
    if callable(edit):
        cfg = json.loads(json.dumps(good))
        edit(cfg)
        text = json.dumps(cfg)
    elif edit[0] == "field":
        _, key, raw = edit
        text = json.dumps({k: v for k, v in good.items() if k != key})[:-1] + f', "{key}": {raw}}}'
    else:
        text = edit[1]
    (folder / "config.json").write_text(text)


@pytest.mark.parametrize("edit,field", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_hand_edited_config_gives_one_line_naming_the_field(tmp_path, good_config, edit, field):
    _write_config(tmp_path / "model", good_config, edit)
    with pytest.raises(CheckpointError) as info:
        load_config(tmp_path / "model")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'model' / 'config.json'}: ")
    assert field in message
    assert "\n" not in message and len(message) < 400


def test_every_schema_field_has_a_corruption_case():
    named = {field.split("'")[1] for _, _, field in CORRUPTIONS if field.startswith("'")}
    assert set(CONFIG_SCHEMA) <= named
    assert {f"maps.{k}" for k in MAPS_SCHEMA} - {"maps.sources"} <= named | {"maps.sources"}
    assert {f"maps.{k}" for k in ("threshold", "method", "layer", "fusion", "tta", "eigen_smooth", "dtype", "normalization",
                                  "refine", "test_size", "options", "box_sizes", "count_views")} <= named
    assert {f"localization.{k}" for k in LOCALIZATION_SCHEMA} <= named


def test_config_not_utf8_or_unreadable(tmp_path, good_config, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes(b'{"classes": ["\xff"]}')
    with pytest.raises(CheckpointError, match="config.json: not a UTF-8 text file"):
        load_config(folder)
    _write_config(folder, good_config, lambda c: None)
    assert load_config(folder).classes == ["a", "b", "c"]

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(type(folder), "read_text", denied)
    with pytest.raises(CheckpointError, match=r"config.json: cannot read \(permission denied\)"):
        load_config(folder)


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: no config.json \(no such folder\)"):
        load_config(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_config(tmp_path)


def test_good_config_loads_with_defaults_and_null_normalisation(tmp_path, good_config):
    cfg = dict(good_config, mean=None, std=None)
    for key in ("head", "counting", "format_version", "maps", "train"):
        cfg.pop(key)
    _write_config(tmp_path / "m", cfg, lambda c: None)
    loaded = load_config(tmp_path / "m")
    assert loaded.head == "cam" and loaded.counting is None and loaded.maps == MapConfig() and loaded.train is None
    assert loaded.mean == (0.485, 0.456, 0.406) and loaded.std == (0.229, 0.224, 0.225)


def test_class_names_that_are_fine():
    for name in ["yes", "Platelets", "red blood cell", "café", "a.b", "...x", "日本"]:
        assert class_name_problem(name) is None
    for name in ["", "a/b", "a\\b", "..", ".", "x\ty", "x\x7f"]:
        assert class_name_problem(name) is not None


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(CONFIG_SCHEMA) + [f"maps.{k}" for k in MAPS_SCHEMA]
                          + [f"localization.{k}" for k in LOCALIZATION_SCHEMA]), value=JSON)
def test_any_json_value_in_any_field_loads_or_names_the_field(good_config, key, value):
    cfg = json.loads(json.dumps(good_config))
    if key.startswith("localization."):
        _v1()(cfg)
        cfg["localization"][key.split(".", 1)[1]] = value
    elif key.startswith("maps."):
        cfg["maps"][key.split(".", 1)[1]] = value
    else:
        cfg[key] = value
    try:
        loaded = ModelConfig.from_json(json.dumps(cfg), "m/config.json")
    except CheckpointError as e:
        assert str(e).startswith("m/config.json: ") and "\n" not in str(e)
        assert key in str(e)
    else:
        assert len(loaded.std) == 3 and all(s > 0 for s in loaded.std)
        assert all(class_name_problem(c) is None for c in loaded.classes) and loaded.task in ("single", "multi")


@pytest.mark.parametrize("kw", [
    {"classes": ["no", "yes"], "positive_class": 1, "decision_threshold": 0.4},
    {"head": "tap", "counting": "both", "localizer": True, "task": "multi"},
], ids=["yes-no", "counting-localizer"])
def test_saved_today_loads_with_identical_outputs(tmp_path, kw):
    model = _tiny(**kw)
    model.config.maps = MapConfig(threshold=0.25, method="cam", test_size=96, options={"cam": {"normalization": "pas"}},
                                  count_views="flip", box_sizes={c: [0.1, 0.2] for c in model.config.classes},
                                  sources={"threshold": {"by": "calibrate", "images": 3, "per_class": 5}, "box_sizes": {"images": 3}})
    folder = save_model(model, tmp_path / "m")
    again = load_model(folder)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        close = model(x)  # the saved layout (NCHW) against the loaded one (channels-last): float rounding apart
        assert torch.allclose(close, again(x), atol=1e-5)
        assert torch.equal(for_inference(model)(x), again(x))  # in the same layout, identical
    assert again.config == model.config


def test_settings_valid_alone_but_not_together_name_the_config(tmp_path):
    folder = save_model(_tiny(), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"head": "attention", "attention_stages": [40]}))
    with pytest.raises(CheckpointError, match=r"config.json: attention stages \[40\]"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(cfg | {"backbone": "no_such_net"}))
    with pytest.raises(CheckpointError, match="config.json: unknown backbone"):
        load_model(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_file_and_tensor(tmp_path, bad):
    folder = save_model(_tiny(), tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    state["classifier.weight"][1, 3] = bad
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'classifier.weight' holds NaN or infinite"):
        load_model(folder)


def test_backbone_weights_file_with_nan_is_refused(tmp_path):
    from weakloc.models.backbone import create_backbone

    state = {k: v.clone() for k, v in create_backbone("test_resnet", "none").state_dict().items()}
    state["conv1.0.weight"][0] = float("nan")
    save_file(state, str(tmp_path / "bb.safetensors"))
    with pytest.raises(CheckpointError, match="bb.safetensors: tensor 'conv1.0.weight' holds NaN"):
        create_backbone("test_resnet", str(tmp_path / "bb.safetensors"))


@pytest.mark.parametrize("damage", ["truncated", "pickle", "empty", "text"])
def test_damaged_weights_file(tmp_path, damage):
    folder = save_model(_tiny(), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "pickle": pickle.dumps({"w": [1.0, 2.0]}), "empty": b"",
                         "text": b"not weights"}[damage])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(folder)


def test_unreadable_weights_file(tmp_path, monkeypatch):
    import safetensors.torch

    folder = save_model(_tiny(), tmp_path / "m")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(safetensors.torch, "load_file", denied)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read the weights \(permission denied\)"):
        load_model(folder)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file modes do not stop root")
def test_unreadable_files_by_mode(tmp_path):
    folder = save_model(_tiny(), tmp_path / "m")
    (folder / "model.safetensors").chmod(0)
    with pytest.raises(CheckpointError, match="permission denied"):
        load_model(folder)
    (folder / "config.json").chmod(0)
    with pytest.raises(CheckpointError, match="permission denied"):
        load_config(folder)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_have_the_ordinary_mode_and_no_temp_files(tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = save_model(_tiny(), tmp_path / "m")
        save_model(_tiny(), folder)  # overwrite in place, as calibrate does
    finally:
        os.umask(old)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}


def test_failed_save_keeps_the_old_model_and_leaves_no_temp_files(tmp_path, monkeypatch):
    first = _tiny()
    folder = save_model(first, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    second = _tiny(classes=["x", "y"])

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=r"cannot write the model to .*m: no space left on device"):
        save_model(second, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert load_model(folder).config.classes == ["a", "b", "c"]


def test_save_into_a_read_only_folder(tmp_path, monkeypatch):
    folder = save_model(_tiny(), tmp_path / "m")
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(CheckpointError, match=f"^cannot write the model to {folder}: permission denied$"):
        ensure_writable(folder)
    with pytest.raises(CheckpointError, match=f"^cannot write the model to {folder}: permission denied$"):
        save_model(_tiny(), folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    ensure_writable(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_save_where_a_file_is_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write the model to .*f/m: not a directory"):
        save_model(_tiny(), tmp_path / "f" / "m")
    with pytest.raises(CheckpointError, match="cannot write the model to .*f: it is a file, not a folder"):
        save_model(_tiny(), tmp_path / "f")


def test_check_finite_names_the_first_bad_row():
    probs = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert check_finite(probs, "model output") is probs
    bad = torch.tensor([[0.2, 0.8], [float("nan"), 0.5], [0.1, float("inf")], [0.5, 0.5]])
    with pytest.raises(WeaklocError, match=r"^model output is NaN or infinite for b\.jpg \(and 1 other\): the model's weights"):
        check_finite(bad, "model output", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    with pytest.raises(WeaklocError, match=r"^counts is NaN or infinite: "):
        check_finite(torch.tensor(float("nan")), "counts")
