"""Train -> localize -> evaluate on synthetic data, from Python and from the CLI (tiny model)."""

import json

import pytest
from typer.testing import CliRunner

from weakloc.cli import app
from weakloc.evaluate import evaluate_model
from weakloc.report.localization import localize_images
from weakloc.train import fine_tune

TINY = {"backbone": "test_resnet", "pretrained": "none", "input_size": 64, "output_stride": 8, "batch_size": 16, "progress": False}


@pytest.fixture(scope="module")
def trained(synth_single, tmp_path_factory):
    return fine_tune(synth_single, tmp_path_factory.mktemp("run"), epochs=2, **TINY)


def test_train_localize_evaluate(trained, synth_single, tmp_path):
    assert (trained.model_dir / "model.safetensors").is_file()
    assert trained.metrics["train_images"] + trained.metrics["val_images"] == 48
    assert 0 <= trained.metrics["val_acc"] <= 1 and len(trained.history) == 2
    report = evaluate_model(trained.model, synth_single, synth_single / "annotations.json", method="cam")
    loc, base = report["localization"], report["centre_baseline"]
    assert report["split"] == "val" and report["localization_samples"] == report["images"]
    for k in ("MaxBoxAccV2", "IoU30", "IoU50", "IoU70", "MaxBoxAcc", "GT-known Loc", "Top-1 Loc", "PxAP"):
        assert 0 <= loc[k] <= 100, k
    assert loc["MaxBoxAccV2"] == pytest.approx((loc["IoU30"] + loc["IoU50"] + loc["IoU70"]) / 3)
    assert "PxAP" in base and base["IoU30"] >= base["IoU70"]
    res = localize_images(trained.model, synth_single / "images", tmp_path / "loc", threshold=0.3)
    assert len(res["images"]) == 48 and (tmp_path / "loc" / "index.html").is_file()
    assert len(list((tmp_path / "loc" / "overlays").glob("*.png"))) == 48
    first = res["images"][0]
    mask_file = tmp_path / "loc" / next(iter(first["masks"].values()))
    from PIL import Image
    assert Image.open(mask_file).size == (first["width"], first["height"])
    doc = json.loads((tmp_path / "loc" / "detections.json").read_text())
    assert all(len(a["bbox"]) == 4 and 0 <= a["score"] <= 1 for a in doc["annotations"])


def test_localize_skips_unreadable_images(trained, synth_single, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match="could not be read"):
        res = localize_images(trained.model, [synth_single / "images" / "000000.jpg", bad], None)
    assert len(res["images"]) == 1 and res["skipped"][0]["file"].endswith("broken.jpg")


def test_resume_continues_from_last_checkpoint(synth_single, tmp_path):
    first = fine_tune(synth_single, tmp_path, epochs=1, **TINY)
    assert len(first.history) == 1
    again = fine_tune(synth_single, tmp_path, epochs=2, resume=True, **TINY)
    assert [h["epoch"] for h in again.history] == [0, 1] and again.history[0] == first.history[0]  # the history survives the resume


def test_cli_synth_train_localize_evaluate(tmp_path, monkeypatch):
    from weakloc import cli

    monkeypatch.setattr(cli.console, "width", 200)  # tables stay on one line
    run = CliRunner()
    data = tmp_path / "data"
    r = run.invoke(app, ["synth", str(data), "--n", "24", "--size", "64", "--mode", "binary", "--max-instances", "2"])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["train", str(data), "-o", str(tmp_path / "run"), "--backbone", "test_resnet", "--pretrained", "none",
                         "--input-size", "64", "--output-stride", "8", "--epochs", "1", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    model = tmp_path / "run" / "model"
    r = run.invoke(app, ["calibrate", str(model), str(data), "-a", str(data / "annotations.json"), "--split", "all", "--per-class", "3"])
    assert r.exit_code == 0, r.output
    assert "threshold" in r.output and json.loads((model / "config.json").read_text())["maps"]["sources"]["threshold"]["by"] == "calibrate"
    r = run.invoke(app, ["evaluate", str(model), str(data), "-a", str(data / "annotations.json"), "--split", "all",
                         "-o", str(tmp_path / "report.json")])
    assert r.exit_code == 0, r.output
    assert "centre baseline" in r.output
    saved = json.loads((tmp_path / "report.json").read_text())
    assert 0 <= saved["localization"]["MaxBoxAccV2"] <= 100 and "MaxBoxAccV2" in saved["centre_baseline"]
    r = run.invoke(app, ["localize", str(model), str(data / "images"), "-o", str(tmp_path / "loc")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "loc" / "index.html").is_file()
    r = run.invoke(app, ["explain", str(model), str(data / "images"), "-o", str(tmp_path / "exp"), "--method", "layercam",
                         "--target", "all", "--layer", "backbone.layer3"])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file
    maps = load_file(str(tmp_path / "exp" / "maps.safetensors"))
    first = sorted(k for k in maps if k.endswith(".normalized"))[0]
    # maps come at the default test-time size: twice the 64-px training size, stored in the model
    assert json.loads((model / "config.json").read_text())["maps"]["test_size"] == 128
    assert maps[first].shape == (2, 128, 128) and 0 <= maps[first].min() and maps[first].max() <= 1
    assert len(list((tmp_path / "exp" / "overlays").glob("*.png"))) == 2 * 24
    few = [str(p) for p in sorted((data / "images").iterdir())[:2]]
    r = run.invoke(app, ["localize", str(model), *few, "-o", str(tmp_path / "loc2"), "--method", "scorecam",
                         "--option", "chunk=32", "--tta", "--eigen-smooth", "--threshold", "otsu"])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["explain", str(model), few[0], "-o", str(tmp_path / "exp2"), "--method",
                         "gradcam", "--layer", "backbone.layer2,backbone.layer3", "--fusion", "product", "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["explain-eval", str(model), str(data), "--split", "all", "--limit", "6", "--steps", "8",
                         "--methods", "cam,gradcam,random", "-o", str(tmp_path / "faith.json")])
    assert r.exit_code == 0, r.output
    assert "deletion AUC" in r.output and "random" in r.output
    rows = json.loads((tmp_path / "faith.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["cam", "gradcam", "random"] and all(0 <= row["insertion_auc"] <= 1 for row in rows)
    r = run.invoke(app, ["methods"])
    for name in ("gradcam", "eigencam", "scorecam", "sscam", "iscam", "ablationcam", "smooth-gradcam++", "finercam"):
        assert name in r.output


@pytest.mark.parametrize("args, message", [
    (["train", "/no/such/place"], "no such file or directory"),
    (["localize", "/no/such/model", "x.jpg"], "no config.json"),
    (["explain", "/no/such/model", "x.jpg", "--option", "chunk"], "expected KEY=VALUE"),
])
def test_cli_errors_are_one_line_not_tracebacks(args, message, capsys, monkeypatch):
    import sys

    from weakloc.cli import main

    monkeypatch.setattr(sys, "argv", ["weakloc", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    out = capsys.readouterr().out
    assert message in out and "Traceback" not in out


def test_demo_small(tmp_path):
    """The demo's whole path (offline lite0 weights) on a handful of images."""
    from weakloc.demo import run_demo

    metrics = run_demo(tmp_path / "demo", n_images=30, epochs=1, methods=("cam",))
    assert (tmp_path / "demo" / "report.html").is_file() and (tmp_path / "demo" / "metrics.json").is_file()
    ev = metrics["evaluation"]["cam"]
    assert ev["split"] == "val" and 0 <= ev["localization"]["MaxBoxAccV2"] <= 100
    assert "MaxBoxAccV2" in ev["centre_baseline"]
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "centre baseline" in html and "<img" in html


def test_calibrate_from_a_few_boxes(trained, synth_single, tmp_path):
    from weakloc.evaluate.calibrate import calibrate, few_box_subset
    from weakloc.data.annotations import read_annotations
    from weakloc.data.labels import load_labels
    from weakloc.models import load_model

    labels = load_labels(synth_single)
    gt = read_annotations(synth_single / "annotations.json")
    idx = few_box_subset(labels, gt, trained.model.config.classes, per_class=2, seed=0)
    assert 3 <= len(idx) <= 6 and idx == few_box_subset(labels, gt, trained.model.config.classes, per_class=2, seed=0)
    model = load_model(trained.model_dir)
    res = calibrate(model, synth_single, gt, per_class=2, methods=("cam", "gradcam++"))
    assert res["method"] in ("cam", "gradcam++") and 0 <= res["threshold"] <= 1
    assert model.config.maps.method == res["method"] and model.config.maps.sources["threshold"]["per_class"] == 2
    r = CliRunner().invoke(app, ["calibrate", str(trained.model_dir), str(synth_single), "-a", str(synth_single / "annotations.json"),
                                 "--per-class", "2", "--methods", "cam,layercam"])
    assert r.exit_code == 0, r.output
    assert "threshold" in r.output and load_model(trained.model_dir).config.maps.sources["method"]["per_class"] == 2


def test_test_time_input_size_is_calibrated_and_used(trained, synth_single, tmp_path):
    import shutil

    from weakloc.explain.pipeline import map_settings
    from weakloc.models import load_model

    model_dir = shutil.copytree(trained.model_dir, tmp_path / "model")
    train_size = load_model(model_dir).config.input_size
    r = CliRunner().invoke(app, ["calibrate", str(model_dir), str(synth_single), "-a", str(synth_single / "annotations.json"),
                                 "--per-class", "2", "--test-sizes", str(train_size + 32)])
    assert r.exit_code == 0, r.output
    stored = load_model(model_dir).config
    assert stored.input_size == train_size and stored.maps.test_size == train_size + 32
    assert stored.maps.sources["test_size"]["by"] == "calibrate"
    assert map_settings(load_model(model_dir)).test_size == train_size + 32
    from weakloc.evaluate.calibrate import calibrate

    net = load_model(model_dir)
    res = calibrate(net, synth_single, synth_single / "annotations.json", per_class=2, test_sizes=(train_size, train_size + 32))
    assert res.test_size in (train_size, train_size + 32) and res["input_size"] == res.test_size and net.config.input_size == train_size
    assert net.config.inference_size() == res.test_size
    assert set(res["per_method"]) == {f"cam@{train_size}", f"cam@{train_size + 32}"}
    assert (net.config.maps.test_size or train_size) == res.test_size
    assert map_settings(load_model(model_dir), test_size=train_size + 64).test_size == train_size + 64
    r = CliRunner().invoke(app, ["localize", str(model_dir), str(synth_single / "images"), "-o", str(tmp_path / "loc")])
    assert r.exit_code == 0, r.output


def test_stored_map_options_are_the_default_path(trained, synth_single, tmp_path):
    import shutil

    import torch

    from weakloc.evaluate.calibrate import calibrate
    from weakloc.explain import explain
    from weakloc.explain.pipeline import map_settings
    from weakloc.models import load_model

    net = load_model(trained.model_dir)
    assert net.config.maps.options == {"cam": {"positive_weights": True}}  # fine_tune's default
    assert map_settings(net, method="cam").method_options() == {"positive_weights": True}
    assert map_settings(net, {"positive_weights": False}, method="cam").method_options() == {"positive_weights": False}  # the caller wins
    assert map_settings(net, method="gradcam").method_options() == {}
    # evaluate's CAM is the clamped-weights CAM unless told otherwise
    kw = dict(method="cam", split="val")
    stored = evaluate_model(net, synth_single, synth_single / "annotations.json", **kw)["localization"]["MaxBoxAccV2"]
    clamped = evaluate_model(net, synth_single, synth_single / "annotations.json", maps={"positive_weights": True},
                             **kw)["localization"]["MaxBoxAccV2"]
    assert stored == clamped
    x = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(explain(net, x, "cam", positive_weights=True).raw, explain(net, x, "cam").raw)
    # calibrate picks a normalisation from the K boxes and stores it beside the stored options
    res = calibrate(net, synth_single, synth_single / "annotations.json", per_class=2, normalizations=("minmax", "pas"))
    assert res["normalization"] in ("minmax", "pas") and set(res["per_method"]) == {"cam/minmax", "cam/pas"}
    assert net.config.maps.options["cam"] == {"positive_weights": True, "normalization": res["normalization"]}
    model_dir = shutil.copytree(trained.model_dir, tmp_path / "model")
    r = CliRunner().invoke(app, ["calibrate", str(model_dir), str(synth_single), "-a", str(synth_single / "annotations.json"),
                                 "--per-class", "2", "--normalizations", "minmax,ivr"])
    assert r.exit_code == 0, r.output
    assert load_model(model_dir).config.maps.options["cam"]["normalization"] in ("minmax", "ivr")
