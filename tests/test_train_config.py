"""fine_tune's typed settings: keywords routed onto ModelConfig / TrainConfig, settings given twice or
unknown, the old keyword names, the training and map settings a trained model's config.json
records, and the returned model being the saved one."""

import json
import warnings

import pytest
import torch

from weakloc.config import MapConfig, ModelConfig, TrainConfig
from weakloc.data.labels import LabeledImages, load_labels
from weakloc.errors import OptionError, WeaklocError
from weakloc.models import load_model
from weakloc.train import fine_tune
from weakloc.train.fit import settle_for_data, trained_maps
from weakloc.train.options import DEFAULT_MAP_OPTIONS, TRAINING_DENSITY, settle_settings

TINY_MODEL = {"backbone": "test_resnet", "input_size": 64, "output_stride": 8}
TINY_TRAIN = {"pretrained": "none", "batch_size": 8, "workers": 0, "limit_batches": 2}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth_cfg"), SyntheticConfig(n_images=24, size=64, val_fraction=0.25, seed=4))


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    """A model trained from config objects, with a moving average of the weights (the returned
    model is then the average's module, the hardest case for "returned == saved")."""
    out = tmp_path_factory.mktemp("run_cfg")
    return fine_tune(synth, out, model=ModelConfig(**TINY_MODEL), train=TrainConfig(epochs=2, ema_decay=0.5, **TINY_TRAIN),
                     progress=False)


def _counts_labels(n: int = 4) -> LabeledImages:
    counts = torch.tensor([[1.0, 0.0], [2.0, 1.0]] * (n // 2))
    return LabeledImages([f"{i}.png" for i in range(n)], (counts > 0).float(), ["a", "b"], "multi", counts=counts)


# --- routing -------------------------------------------------------------------------------------

def test_keywords_go_to_the_config_that_has_the_field():
    s = settle_settings(settings={"backbone": "resnet18", "input_size": 96, "drop_rate": 0.1, "epochs": 3, "lr": 1e-3,
                                  "hide_prob": 0.5})
    assert (s.model.backbone, s.model.input_size, s.model.drop_rate) == ("resnet18", 96, 0.1)
    assert (s.train.epochs, s.train.lr, s.train.hide_prob) == (3, 1e-3, 0.5)
    assert s.train.backbone_lr is None and s.maps == MapConfig() and not s.options_given
    assert s.model.train is None and s.model.maps == MapConfig()


def test_config_objects_are_used_as_given_and_not_changed():
    model, train = ModelConfig(backbone="resnet18", counting="density"), TrainConfig(epochs=7)
    s = settle_settings(model, train, settings={})
    assert s.model == model and s.model is not model and s.train == train and s.train is not train
    s.model.input_size, s.train.epochs = 1, 1
    assert model.input_size == 224 and train.epochs == 7
    # a ModelConfig's own density settings, not fine_tune's keyword defaults
    config, _ = settle_for_data(s.model, s.train, _counts_labels())
    assert (config.density_stage, config.density_hidden, config.density_context) == (None, 0, False)


def test_density_defaults_without_a_model_object():
    s = settle_settings(settings={"counting": "both"})
    config, train = settle_for_data(s.model, s.train, _counts_labels())
    assert {k: getattr(config, k) for k in TRAINING_DENSITY} == TRAINING_DENSITY
    assert train.crop_scale == (1.0, 1.0) and train.backbone_lr == (0.3, 1.0)  # the counting defaults
    s = settle_settings(settings={"density_hidden": 0})  # a keyword overrides one default, the others stay
    config, _ = settle_for_data(s.model, s.train, _counts_labels())
    assert (config.counting, config.density_stage, config.density_hidden, config.density_context) == ("density", -3, 0, False)
    labels = LabeledImages(["a.png", "b.png"], torch.tensor([0, 1]), ["cat", "dog"], "single")
    config, train = settle_for_data(settle_settings().model, TrainConfig(epochs=1), labels)  # no counts: no density head
    assert (config.counting, config.density_stage, config.density_hidden, config.density_context) == (None, None, 0, False)
    assert train.crop_scale == (0.35, 1.0) and train.backbone_lr == (0.01, 0.3) and train.freeze_epochs == 0


def test_a_setting_given_twice_is_refused():
    with pytest.raises(OptionError, match=r"backbone: given both as a keyword and in model=ModelConfig"):
        settle_settings(ModelConfig(), settings={"backbone": "resnet18"})
    with pytest.raises(OptionError, match=r"epochs: given both as a keyword and in train=TrainConfig"):
        settle_settings(train=TrainConfig(), settings={"epochs": 2})
    with pytest.raises(OptionError, match=r"train: given both"):
        settle_settings(ModelConfig(train=TrainConfig()), TrainConfig())
    with pytest.raises(OptionError, match=r"maps: given both"):
        settle_settings(ModelConfig(maps=MapConfig(method="gradcam")), maps=MapConfig())
    with pytest.warns(DeprecationWarning), pytest.raises(OptionError, match=r"image_size: the old name of input_size, and input_size"):
        settle_settings(settings={"image_size": 64, "input_size": 64})
    with pytest.warns(DeprecationWarning), pytest.raises(OptionError, match=r"image_size: given both as a keyword and in model="):
        settle_settings(ModelConfig(), settings={"image_size": 64})
    with pytest.warns(DeprecationWarning), pytest.raises(OptionError, match=r"val_data: the old name of val"):
        settle_settings(val="v", settings={"val_data": "w"})
    with pytest.warns(DeprecationWarning), pytest.raises(OptionError, match=r"map_options: .* give maps only"):
        settle_settings(maps=MapConfig(), settings={"map_options": {}})
    with pytest.raises(OptionError, match=r"model: expected a ModelConfig, got dict"):
        settle_settings({"backbone": "resnet18"})


def test_unknown_settings_are_named_before_any_data_is_read(tmp_path):
    with pytest.raises(OptionError, match=r"unknown setting 'epoch' \(did you mean epochs\?\)"):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", epoch=3)
    with pytest.raises(OptionError, match=r"unknown setting 'frobnicate';"):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", frobnicate=1)
    with pytest.raises(OptionError, match=r"'classes' is not a setting; it comes from the data's classes"):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", classes=["a", "b"])
    with pytest.raises(OptionError, match=r"--drop-rate: 1 is out of range"):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", model=ModelConfig(drop_rate=1.0))
    with pytest.raises(OptionError, match=r"--label-smoothing: 2 is out of range"):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", train=TrainConfig(label_smoothing=2.0))
    with pytest.raises(OptionError, match=r"maps\.options: 'nope' is not one of"):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", maps=MapConfig(options={"nope": {}}))
    with pytest.raises(OptionError, match=r"'maps\.fusion' must be null, 'mean', 'max', 'product', got \"sum\""):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", maps=MapConfig(fusion="sum"))
    with pytest.raises(OptionError, match=r"maps\.normalization: "):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", maps=MapConfig(normalization="bogus"))
    with pytest.raises(OptionError, match=r"'maps\.threshold' must be null or a number in \[0, 1\], got 5"):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", maps=MapConfig(threshold=5))
    assert not (tmp_path / "out").exists()


def test_old_keywords_warn_and_name_themselves_in_errors(tmp_path):
    with pytest.warns(DeprecationWarning) as caught:
        s = settle_settings(settings={"image_size": 96, "num_workers": 0, "map_options": {}}, val="v")
    assert [str(w.message) for w in caught] == ["fine_tune(image_size=...) is deprecated: use input_size=...",
                                                "fine_tune(num_workers=...) is deprecated: use workers=...",
                                                "fine_tune(map_options=...) is deprecated: use maps=MapConfig(options=...)"]
    assert {w.filename for w in caught} == {__file__}  # the warnings point at the caller
    assert s.model.input_size == 96 and s.train.workers == 0 and s.maps.options == {} and s.options_given and s.val == "v"
    with pytest.warns(DeprecationWarning), pytest.raises(OptionError, match=r"--input-size \(image_size\): 0 is out of range"):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", image_size=0)
    with pytest.warns(DeprecationWarning), pytest.raises(OptionError, match=r"map_options: 'nope' is not one of"):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", map_options={"nope": {}})


def test_old_keywords_still_train(synth, tmp_path):
    labels = load_labels(synth)
    val = labels.subset([i for i, s in enumerate(labels.splits) if s == "val"])
    train = labels.subset([i for i, s in enumerate(labels.splits) if s == "train"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fine_tune(train, tmp_path, image_size=64, num_workers=0, val_data=val, map_options={"gradcam": {"relu": False}},
                        backbone="test_resnet", pretrained="none", epochs=1, batch_size=8, limit_batches=1, progress=False)
    old = sorted(str(w.message).split("(")[1].split("=")[0] for w in caught if issubclass(w.category, DeprecationWarning)
                 and str(w.message).startswith("fine_tune("))
    assert old == ["image_size", "map_options", "num_workers", "val_data"]
    cfg = res.model.config
    assert cfg.input_size == 64 and cfg.train.workers == 0 and res.metrics["val_images"] == len(val)
    assert cfg.maps.options == {"gradcam": {"relu": False}} and "options" not in cfg.maps.sources  # the caller's, as given


# --- what a trained model records ----------------------------------------------------------------

def test_config_json_holds_the_training_and_map_settings_used(trained):
    raw = json.loads((trained.model_dir / "config.json").read_text())
    train = raw["train"]
    assert train["epochs"] == 2 and train["ema_decay"] == 0.5 and train["pretrained"] == "none" and train["limit_batches"] == 2
    # defaults settled for this data: random crops, the classifier's backbone rates, one frozen epoch
    assert train["crop_scale"] == [0.35, 1.0] and train["backbone_lr"] == [0.01, 0.3] and train["freeze_epochs"] == 1
    maps = raw["maps"]
    assert maps["test_size"] == 128 and maps["options"] == DEFAULT_MAP_OPTIONS and maps["count_views"] is None
    assert maps["refine"] == "guided"
    assert maps["sources"] == {"test_size": {"by": "fine_tune", "test_scale": 2.0}, "options": {"by": "fine_tune"}, "refine": {"by": "fine_tune"}}
    assert raw["format_version"] == 2 and raw["backbone"] == "test_resnet" and raw["input_size"] == 64


def test_returned_model_is_the_saved_one(trained):
    loaded = load_model(trained.model_dir)
    assert trained.model.config == loaded.config
    mine, theirs = trained.model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    assert not trained.model.training and all(p.requires_grad for p in trained.model.parameters())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(trained.model(x), loaded(x))
    from weakloc.explain import explain

    assert explain(trained.model, x, "gradcam").normalized.shape == (2, 1, 64, 64)  # gradients flow through the returned model


def test_stored_map_settings_keep_what_the_caller_set():
    model = ModelConfig(input_size=64, counting="count", classes=["a"])
    given = MapConfig(count_views="none", test_size=96, options={"cam": {}})
    maps = trained_maps(model, TrainConfig(dihedral=True), given, options_given=True, transformer=False)
    assert (maps.count_views, maps.test_size, maps.options, maps.sources) == ("none", 96, {"cam": {}}, {})
    maps = trained_maps(model, TrainConfig(dihedral=True), MapConfig(), options_given=False, transformer=False)
    assert maps.count_views == "dihedral" and maps.sources["count_views"] == {"by": "fine_tune", "dihedral": True}
    assert maps.test_size is None and maps.refine is None  # counting models keep the training size and their peaks' maps
    plain = ModelConfig(input_size=64, classes=["a", "b"])
    assert trained_maps(plain, TrainConfig(test_scale=1.5), MapConfig(), options_given=False, transformer=True).test_size is None
    assert trained_maps(plain, TrainConfig(test_scale=1.5), MapConfig(), options_given=False, transformer=False).test_size == 96
    assert trained_maps(plain, TrainConfig(), MapConfig(), options_given=False, transformer=False).refine == "guided"
    assert trained_maps(plain, TrainConfig(), MapConfig(refine="none"), options_given=False, transformer=False).refine == "none"
    attention = ModelConfig(input_size=64, classes=["a", "b"], head="attention")
    assert trained_maps(attention, TrainConfig(), MapConfig(), options_given=False, transformer=False).refine is None


def test_the_models_classes_must_be_the_datas():
    labels = LabeledImages(["a.png", "b.png"], torch.tensor([0, 1]), ["cat", "dog"], "single")
    with pytest.raises(WeaklocError, match=r"the model's classes \['cat', 'cow'\] differ from the data's \['cat', 'dog'\]"):
        settle_for_data(ModelConfig(classes=["cat", "cow"]), TrainConfig(), labels)
