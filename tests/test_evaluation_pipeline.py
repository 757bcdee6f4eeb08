"""Evaluation through the one map pipeline: explain_eval, evaluate_model and evaluate_counts make or
count maps with the model's stored settings at its test-time size; calibrate is the only writer of
calibrated settings and records where each came from; the typed reports keep the JSON keys."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from weakloc.config import MapConfig
from weakloc.data.labels import load_labels, resolve_split

CLASSES = ["triangle", "square", "star"]  # the synthetic data's classes

OLD_REPORT_KEYS = ["split", "images", "localization_samples", "samples_per_class", "unscored_boxes", "unannotated_images",
                   "skipped_images", "classification", "localization", "centre_baseline"]
BOX_KEYS = ["MaxBoxAcc", "MaxBoxAcc_tau", "MaxBoxAccV2", "IoU30", "IoU30_tau", "IoU50", "IoU50_tau", "IoU70", "IoU70_tau"]
OLD_LOCALIZATION_KEYS = ["method", "step", *BOX_KEYS, "GT-known Loc", "Top-1 Loc", "GT-known_tau", "PxAP"]


def _model(input_size: int = 32, **maps):
    from weakloc.models import ModelConfig, WeaklocNet

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", classes=CLASSES, input_size=input_size, output_stride=8, drop_rate=0.0,
                      maps=MapConfig(**maps))
    return WeaklocNet(cfg, pretrained="none").eval()


def test_evaluate_does_not_import_training_lightning_or_the_writers():
    code = ("import sys, weakloc.evaluate; "
            "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'weakloc.train', 'weakloc.report'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_explain_eval_scores_the_map_localize_draws(synth_single, monkeypatch):
    """Stored method options and test size are applied: the scored cam is the pipeline's cam."""
    from weakloc.data.dataset import ImageDataset, eval_transform
    from weakloc.evaluate.explain_eval import ExplainEvalReport, explain_eval
    from weakloc.explain import explain, pipeline

    model = _model(32, test_size=48, options={"cam": {"positive_weights": True}})
    made = []
    real = pipeline.make_maps

    def recording(model, images, settings, target="predicted", **extra):
        heat = real(model, images, settings, target, **extra)
        made.append((images.clone(), settings, heat))
        return heat

    monkeypatch.setattr(pipeline, "make_maps", recording)
    report = explain_eval(model, synth_single, ["cam"], limit=2, steps=2, batch_size=2)
    assert isinstance(report, ExplainEvalReport) and report.rows[0].method == "cam" and report.images == 2
    assert report.to_dict()["rows"][0]["method"] == "cam" and report["rows"][0]["maps"] == 2
    images, settings, heat = made[-1]
    assert images.shape[-2:] == (48, 48) and settings.options == {"cam": {"positive_weights": True}}
    # the same two images, read and explained independently with the stored settings
    val, _ = resolve_split(load_labels(synth_single), "auto")
    ds = ImageDataset.from_labels(val, eval_transform(48, model.config.mean, model.config.std))
    x = torch.stack([ds[i][0] for i in range(2)])
    assert torch.equal(images, x)
    want = explain(model, x, "cam", positive_weights=True).normalized
    assert torch.allclose(heat.normalized, want, atol=1e-6)
    assert not torch.allclose(explain(model, x, "cam").normalized, want, atol=1e-3)  # the stored option matters here


def test_evaluate_model_is_the_same_at_a_stored_or_a_given_test_size_and_writes_nothing(synth_single):
    from weakloc.evaluate.run import EvaluationReport, evaluate_model
    from weakloc.evaluate.wsol import BoxMetrics, WSOLMetrics

    ann = synth_single / "annotations.json"
    plain = _model(32)
    before = copy.deepcopy(plain.config)
    given = evaluate_model(plain, synth_single, ann, split="val", maps=MapConfig(test_size=48), batch_size=16)
    assert plain.config == before  # evaluation reads the configuration, never changes it
    stored = evaluate_model(_model(32, test_size=48), synth_single, ann, split="val", batch_size=16)
    assert given.to_dict() == stored.to_dict()
    at_32 = evaluate_model(plain, synth_single, ann, split="val", batch_size=16)
    assert at_32.to_dict() != given.to_dict()  # the size is used, not ignored
    # the typed report and the JSON it stands for
    assert isinstance(given, EvaluationReport) and type(given.localization) is WSOLMetrics
    assert type(given.centre_baseline) is BoxMetrics
    d = given.to_dict()
    assert list(d) == [*OLD_REPORT_KEYS, "instances"]  # the old keys unchanged; instance boxes added (issue 18)
    assert list(d["localization"]) == OLD_LOCALIZATION_KEYS and list(d["centre_baseline"]) == [*BOX_KEYS, "PxAP"]
    loc = given.localization
    assert given["localization"]["MaxBoxAccV2"] == loc.max_box_acc_v2 == pytest.approx((loc.iou30 + loc.iou50 + loc.iou70) / 3)
    assert d["localization"]["GT-known Loc"] == loc.gt_known_loc and d["localization"]["IoU50_tau"] == loc.iou50_tau
    assert d["localization"]["method"] == "cam" and loc.gt_known_tau == 0.2 and loc.pxap is not None


@pytest.mark.filterwarnings("ignore:no threshold gives a box with IoU >= 0.5")  # an untrained model may fall back to IoU 0.3
def test_calibrate_is_the_one_writer_and_records_its_sources(synth_single):
    from weakloc.evaluate.calibrate import CalibrationResult, calibrate

    model = _model(32, options={"cam": {"positive_weights": True}})
    ann = synth_single / "annotations.json"
    res = calibrate(model, synth_single, ann, per_class=1, methods=("cam", "gradcam"), test_sizes=(32, 48),
                    normalizations=("minmax", "pas"))
    assert isinstance(res, CalibrationResult)
    assert list(res.to_dict()) == ["method", "threshold", "input_size", "normalization", "images", "per_method", "chosen", "default",
                                   "margin", "standard_error"]
    assert res.default == "cam@32/minmax" and set(res.standard_error) == set(res.per_method) and res.chosen in res.per_method
    assert set(res.per_method) == {f"{m}@{z}/{n}" for m in ("cam", "gradcam") for z in (32, 48) for n in ("minmax", "pas")}
    maps = model.config.maps
    assert (maps.method, maps.threshold) == (res.method, res.threshold)
    assert maps.test_size == (None if res.test_size == 32 else 48) and model.config.inference_size() == res.test_size
    assert maps.options[res.method]["normalization"] == res.normalization
    if res.method == "cam":
        assert maps.options["cam"]["positive_weights"] is True  # the stored option stays beside the chosen normalisation
    source = {"by": "calibrate", "split": "train", "images": res.images, "per_class": 1, "seed": 0}
    assert maps.sources == {"threshold": source, "method": source, "test_size": source, "normalization": source}
    # without candidate sizes or normalisations, neither is touched nor claimed
    model.config.maps.sources.clear()
    stored_size = model.config.maps.test_size
    again = calibrate(model, synth_single, ann, per_class=1, seed=3)
    assert set(model.config.maps.sources) == {"threshold", "method"} and model.config.maps.sources["method"]["seed"] == 3
    assert model.config.maps.test_size == stored_size and again.test_size == model.config.inference_size()
    assert set(again.per_method) == {"cam"}


def test_a_candidate_replaces_the_default_only_by_the_margin():
    """K-shot calibration keeps the model's own settings unless a candidate wins clearly (issue 18)."""
    from types import SimpleNamespace

    from weakloc.evaluate.calibrate import _choose, _standard_error

    def report(v2, iou=(90.0, 60.0, 30.0), n=10):
        return SimpleNamespace(localization=SimpleNamespace(max_box_acc_v2=v2, iou30=iou[0], iou50=iou[1], iou70=iou[2]),
                               localization_samples=n)

    se = _standard_error(report(60.0))
    assert se == pytest.approx(100 * ((0.9 * 0.1 + 0.6 * 0.4 + 0.3 * 0.7) / 3 / 10) ** 0.5)
    reports = {"default": report(60.0), "lucky": report(68.0), "none": report(99.0, iou=(50.0, 0.0, 0.0))}
    errors = {k: _standard_error(r) for k, r in reports.items()}
    assert _choose(reports, errors, "default", "auto") == ("default", pytest.approx((2 * se**2) ** 0.5))  # 8 points < 21
    assert _choose(reports, errors, "default", 0) == ("lucky", 0.0)  # best whatever the gap; never one without IoU-50 boxes
    big = {k: report(r.localization.max_box_acc_v2, n=2000) for k, r in reports.items() if k != "none"}
    assert _choose(big, {k: _standard_error(r) for k, r in big.items()}, "default", "auto")[0] == "lucky"  # 8 points >> 1.3
    from weakloc.errors import OptionError
    from weakloc.evaluate.calibrate import calibrate

    for bad in (-1, "often", float("nan")):
        with pytest.raises(OptionError, match="margin"):  # before any file is read
            calibrate(_model(), "no/such/data", "no/such.json", margin=bad)


def test_calibrated_threshold_reads_the_typed_report():
    import dataclasses

    from weakloc.errors import WeaklocError
    from weakloc.evaluate.calibrate import calibrated_threshold
    from weakloc.evaluate.run import EvaluationReport
    from weakloc.evaluate.wsol import BoxMetrics, WSOLMetrics

    zero = {k: 0.0 for k in ("max_box_acc", "max_box_acc_tau", "max_box_acc_v2", "iou30", "iou30_tau", "iou50", "iou50_tau",
                              "iou70", "iou70_tau")}
    loc = WSOLMetrics(**zero, method="cam", step=0.01, gt_known_loc=0.0, top1_loc=0.0, gt_known_tau=0.2)
    report = EvaluationReport(split="all", images=4, localization_samples=4, samples_per_class={}, unscored_boxes={},
                              unannotated_images=[], skipped_images=[], classification={}, localization=loc,
                              centre_baseline=BoxMetrics(**zero))
    with pytest.raises(WeaklocError, match="no threshold gives a box with IoU >= 0.3 on any of the 4"):
        calibrated_threshold(report)
    fallback = dataclasses.replace(report, localization=dataclasses.replace(loc, iou30=50.0, iou30_tau=0.2))
    with pytest.warns(UserWarning, match="best at IoU 0.3"):
        assert calibrated_threshold(fallback) == 0.2
    good = dataclasses.replace(fallback, localization=dataclasses.replace(fallback.localization, iou50=25.0, iou50_tau=0.35))
    assert calibrated_threshold(good) == 0.35


def test_evaluate_counts_counts_at_the_test_size_with_the_resolved_views(tmp_path, monkeypatch):
    from weakloc.data.counts import load_count_labels
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic
    from weakloc.evaluate import counting
    from weakloc.evaluate.counting import CountingReport, evaluate_counts
    from weakloc.models import ModelConfig, WeaklocNet

    d = write_synthetic(tmp_path / "s", SyntheticConfig(n_images=6, size=64, mode="multi", max_instances=2, seed=4, val_fraction=0.5))
    cfg = ModelConfig(backbone="test_resnet", classes=CLASSES, task="multi", input_size=32, counting="density", density_stage=-1,
                      density_hidden=8, maps=MapConfig(test_size=48, count_views="flip"))
    model = WeaklocNet(cfg, pretrained="none").eval()
    seen = []
    real = counting.counting_forward

    def recording(model, x, views="none"):
        seen.append((tuple(x.shape[-2:]), views))
        return real(model, x, views)

    monkeypatch.setattr(counting, "counting_forward", recording)
    labels = load_count_labels(d)
    rep = evaluate_counts(model, labels, d / "annotations.json", split="all")
    assert isinstance(rep, CountingReport) and seen and set(seen) == {((48, 48), "flip")}
    assert rep.count_views == "flip" and rep.images == 6
    d_rep = rep.to_dict()
    assert list(d_rep) == ["split", "images", "tta", "counting", "counting_raw", "baseline", "baseline_rounded", "points", "boxes",
                           "unannotated_images", "skipped_images"]
    assert list(d_rep["counting"]) == ["per_class", "MAE", "RMSE", "mRMSE", "mRMSE-nz", "m-relRMSE", "m-relRMSE-nz"]
    assert list(d_rep["boxes"]) == ["per_class", "F1"] and rep.boxes.f1 == d_rep["boxes"]["F1"]
    seen.clear()
    rep = evaluate_counts(model, labels, split="all", count_views="none", maps={"test_size": 64})
    assert set(seen) == {((64, 64), "none")} and rep["tta"] == "none" and rep.points is None
