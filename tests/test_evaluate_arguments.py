"""Python-API arguments of evaluate_model, evaluate_counts, calibrate, calibrate_box_sizes,
explain_eval and the WSOL sweep: a bad value is an OptionError naming the argument, raised before
any file is read (the data paths below do not exist, so reaching them would be a different error)."""

from __future__ import annotations

import pytest
import torch

from weakloc.data.labels import LabeledImages, resolve_split, select_split
from weakloc.errors import CheckpointError, OptionError
from weakloc.evaluate.wsol import (MIN_STEP, PxAPAccumulator, box_sweep, check_step, gt_known_loc, threshold_list,
                                   wsol_box_metrics)

MISSING = "/nonexistent/weakloc-test/labels.csv"
MISSING_ANN = "/nonexistent/weakloc-test/gt.json"


@pytest.fixture(scope="module")
def model():
    from weakloc.models import ModelConfig, WeaklocNet

    return WeaklocNet(ModelConfig(backbone="test_resnet", classes=["a", "b"], input_size=32), pretrained="none").eval()


@pytest.fixture(scope="module")
def counting_model():
    from weakloc.models import ModelConfig, WeaklocNet

    cfg = ModelConfig(backbone="test_resnet", classes=["a", "b"], task="multi", input_size=32, counting="density",
                      density_stage=-1, density_hidden=8)
    return WeaklocNet(cfg, pretrained="none").eval()


# --- the threshold sweep ---

@pytest.mark.parametrize("step", [0, -0.1, 0.6, 2, float("nan"), float("inf"), 1e-9, MIN_STEP / 2, "0.1", True, None])
def test_threshold_step_out_of_range_is_an_option_error(step):
    with pytest.raises(OptionError, match=r"^step: "):
        threshold_list(step)


def test_threshold_step_bounds_give_the_reference_sweep():
    assert len(threshold_list(MIN_STEP)) == round(1 / MIN_STEP)  # the floor: at most 10,000 thresholds
    assert threshold_list(0.5).tolist() == [0.0, 0.5]
    assert check_step(0.01) == 0.01 and len(threshold_list(0.01)) == 100


@pytest.mark.parametrize("taus", [[0.0, 5.0], [float("nan")], [-0.1], [], [[0.1]], "abc"])
def test_sweep_thresholds_outside_0_1_are_refused(taus):
    maps = torch.rand(1, 8, 8)
    with pytest.raises(OptionError, match="thresholds"):
        box_sweep(maps, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], taus)
    with pytest.raises(OptionError, match="thresholds"):
        PxAPAccumulator(taus)


def test_sweep_accepts_the_ends_of_0_1_and_gt_known_tau_is_checked():
    maps = torch.zeros(1, 8, 8)
    maps[0, 2:6, 2:6] = 1.0
    gt = [torch.tensor([[2.0, 2.0, 6.0, 6.0]])]  # the contour box x + w, as the reference draws it
    sweep = box_sweep(maps, gt, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    # 0 and 0.5 keep the square exactly; 1 cuts at the maximum, so nothing is foreground
    assert sweep.best_iou_all[0].tolist()[:2] == [1.0, 1.0] and sweep.best_iou_all[0, 2] < 0.5
    assert wsol_box_metrics(sweep)["IoU50"] == 100.0
    assert gt_known_loc(maps, gt, 0.5)["GT-known Loc"] == 100.0
    for tau in (5.0, float("nan"), -1.0):
        with pytest.raises(OptionError, match=r"^tau: "):
            gt_known_loc(maps, gt, tau)


# --- evaluate_model ---

@pytest.mark.parametrize("kwargs, name", [
    ({"step": 0}, "step"), ({"step": 2}, "step"), ({"step": float("nan")}, "step"), ({"step": -0.1}, "step"),
    ({"step": 1e-9}, "step"),
    ({"gt_known_tau": 5}, "gt_known_tau"), ({"gt_known_tau": float("nan")}, "gt_known_tau"), ({"gt_known_tau": -1}, "gt_known_tau"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 2.5}, "batch_size"),
    ({"split": "foo"}, "split"), ({"split": None}, "split"),
    ({"method": 3}, "method"), ({"gt_class": ["a"]}, "gt_class"), ({"gt_class": {"a": 1}}, "gt_class"),
    ({"maps": "layer4"}, "maps"), ({"maps": {3: 1}}, "maps"), ({"maps": {"fusion": "sum"}}, "fusion"),
    ({"maps": {"test_size": 8}}, "test_size"), ({"device": "gpu0"}, "device"),
])
def test_evaluate_model_arguments_are_checked_before_any_work(model, kwargs, name):
    from weakloc.evaluate.run import evaluate_model

    with pytest.raises(OptionError, match=rf"^{name}: "):
        evaluate_model(model, MISSING, MISSING_ANN, **kwargs)


def test_evaluate_model_unknown_method_is_named_before_any_work(model):
    from weakloc.errors import WeaklocError
    from weakloc.evaluate.run import evaluate_model

    with pytest.raises(WeaklocError, match="no_such_method"):
        evaluate_model(model, MISSING, MISSING_ANN, method="no_such_method")


def test_a_hand_edited_stored_threshold_is_a_checkpoint_error(model):
    import copy

    from weakloc.config import DEFAULT_GT_KNOWN_THRESHOLD
    from weakloc.evaluate.run import stored_threshold

    cfg = copy.deepcopy(model.config)
    cfg.maps.threshold = 5
    with pytest.raises(CheckpointError, match="maps.threshold"):
        stored_threshold(cfg)
    cfg.maps.threshold = None
    assert stored_threshold(cfg) == DEFAULT_GT_KNOWN_THRESHOLD == 0.2
    cfg.maps.threshold = 0.35
    assert stored_threshold(cfg) == 0.35


# --- splits ---

def _labeled(splits):
    n = 4
    return LabeledImages([f"/x/{i}.png" for i in range(n)], torch.zeros(n, dtype=torch.long), ["a", "b"], "single", splits)


def test_unknown_split_names_never_mean_every_image():
    plain = _labeled(None)
    for bad in ("foo", "Train", "", None):
        with pytest.raises(OptionError, match=r"^split: "):
            resolve_split(plain, bad)
        with pytest.raises(OptionError, match=r"^split: "):
            select_split(plain, bad)
    assert len(resolve_split(plain, "test")[0]) == 4  # a source without splits is used whole, as documented
    split = _labeled(["train", "train", "val", "test"])
    assert resolve_split(split, "auto")[1] == "test" and len(resolve_split(split, "all")[0]) == 4


# --- calibrate ---

@pytest.mark.parametrize("kwargs, name", [
    ({"methods": ()}, "methods"), ({"methods": []}, "methods"), ({"methods": (3,)}, "methods"),
    ({"per_class": 0}, "per_class"), ({"per_class": -1}, "per_class"), ({"per_class": 1.5}, "per_class"),
    ({"split": "auto"}, "split"), ({"split": "foo"}, "split"), ({"seed": 1.5}, "seed"),
    ({"test_sizes": (0,)}, "test_sizes"), ({"test_sizes": (-32,)}, "test_sizes"), ({"test_sizes": ("abc",)}, "test_sizes"),
    ({"test_sizes": (100_000,)}, "test_sizes"), ({"test_sizes": "64"}, "test_sizes"), ({"test_sizes": ()}, "test_sizes"),
    ({"normalizations": ("foo",)}, "normalizations"), ({"normalizations": ("pas:2",)}, "normalizations"),
    ({"normalizations": (None,)}, "normalizations"),
    ({"gt_class": "a=b"}, "gt_class"), ({"maps": ["x"]}, "maps"), ({"maps": {"fusion": "sum"}}, "fusion"),
])
def test_calibrate_arguments_are_checked_before_any_work(model, kwargs, name):
    import copy

    from weakloc.evaluate.calibrate import calibrate

    before = copy.deepcopy(model.config)
    with pytest.raises(OptionError, match=rf"^{name}: "):
        calibrate(model, MISSING, MISSING_ANN, **kwargs)
    assert model.config == before


def test_calibrate_names_an_unknown_method(model):
    from weakloc.errors import WeaklocError
    from weakloc.evaluate.calibrate import calibrate

    with pytest.raises(WeaklocError, match="'nope'"):
        calibrate(model, MISSING, MISSING_ANN, methods=("cam", "nope"))


@pytest.mark.parametrize("kwargs, name", [({"per_class": 0}, "per_class"), ({"split": "foo"}, "split"),
                                          ({"gt_class": 3}, "gt_class")])
def test_calibrate_box_sizes_arguments_are_checked_before_any_work(counting_model, kwargs, name):
    from weakloc.evaluate.calibrate import calibrate_box_sizes

    with pytest.raises(OptionError, match=rf"^{name}: "):
        calibrate_box_sizes(counting_model, MISSING, MISSING_ANN, **kwargs)


def test_calibration_split_all_takes_every_image():
    from weakloc.evaluate.calibrate import _calibration_split

    data = _labeled(["train", "train", "val", "test"])
    assert len(_calibration_split(data, "all")) == 4 and len(_calibration_split(data, "train")) == 2


# --- evaluate_counts ---

@pytest.mark.parametrize("kwargs, name", [
    ({"batch_size": 0}, "batch_size"), ({"split": "foo"}, "split"), ({"count_views": "rot45"}, "count_views"),
    ({"maps": 3}, "maps"), ({"maps": {"test_size": 100_000}}, "test_size"),
    ({"kernel": 0}, "kernel"), ({"kernel": 4}, "kernel"), ({"kernel": 2.0}, "kernel"),
    ({"box_scale": 0}, "box_scale"), ({"box_scale": float("inf")}, "box_scale"),
    ({"train_counts": torch.zeros(3)}, "train_counts"), ({"train_counts": torch.zeros(3, 5)}, "train_counts"),
    ({"device": "tpu"}, "device"),
])
def test_evaluate_counts_arguments_are_checked_before_any_work(counting_model, kwargs, name):
    from weakloc.evaluate.counting import evaluate_counts

    with pytest.raises(OptionError, match=rf"^{name}: "):
        evaluate_counts(counting_model, MISSING, **kwargs)


# --- explain_eval and compare_methods ---

@pytest.mark.parametrize("kwargs, name", [
    ({"methods": []}, "methods"), ({"methods": [None]}, "methods"), ({"limit": 0}, "limit"), ({"limit": -1}, "limit"),
    ({"steps": 0}, "steps"), ({"steps": 10**9}, "steps"), ({"steps": 2.5}, "steps"), ({"baseline": "foo"}, "baseline"),
    ({"baseline": ("zero",)}, "baseline"), ({"batch_size": 0}, "batch_size"), ({"chunk": 0}, "chunk"),
    ({"split": "foo"}, "split"), ({"device": "nope"}, "device"), ({"maps": "tta"}, "maps"), ({"maps": {"fusion": "sum"}}, "fusion"),
])
def test_explain_eval_arguments_are_checked_before_any_work(model, kwargs, name):
    from weakloc.evaluate.explain_eval import explain_eval

    kwargs = {"methods": ["cam"], **kwargs}
    with pytest.raises(OptionError, match=rf"^{name}: "):
        explain_eval(model, MISSING, **kwargs)


def test_compare_methods_checks_its_settings_before_reading_a_batch(model):
    from weakloc.evaluate.faithfulness import compare_methods

    def batches():
        raise AssertionError("a batch was read before the settings were checked")
        yield  # pragma: no cover

    for kwargs, name in [({"steps": 0}, "steps"), ({"baseline": "foo"}, "baseline"), ({"chunk": 0}, "chunk"),
                         ({"methods": []}, "methods")]:
        with pytest.raises(OptionError, match=rf"^{name}: "):
            compare_methods(model, batches(), **{"methods": ["cam"], **kwargs})
