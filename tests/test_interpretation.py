"""Where it looked when it was wrong (issue 20, piece 4): the confusion matrix, the top losses with the
heatmaps of their predicted and true classes, the most / least confident correct cases per class,
interpretation.html, and the `weakloc report` / `weakloc train` paths."""

import csv
import html
import math
import re
from urllib.parse import unquote

import pytest
import torch
import torch.nn.functional as F

from weakloc.config import MapConfig
from weakloc.data.dataset import eval_transform
from weakloc.data.images import read_image
from weakloc.data.labels import load_labels, resolve_split
from weakloc.data.synthetic import SyntheticConfig, write_synthetic
from weakloc.evaluate.interpretation import interpret
from weakloc.explain import pipeline
from weakloc.models import ModelConfig, WeaklocNet


def _model(classes, task="single", test_size=None, seed=0, **extra):
    """A tiny random model whose classifier is scaled up, so its predictions spread over the classes."""
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="test_resnet", classes=list(classes), task=task, input_size=32, output_stride=8, drop_rate=0.0,
                      maps=MapConfig(test_size=test_size), **extra)
    net = WeaklocNet(cfg, pretrained="none").eval()
    with torch.no_grad():
        net.classifier.weight.mul_(40.0)
    return net


def _hand_logits(net, labeled, size):
    """Logits of every image of ``labeled`` at ``size``, read here (what the first pass must match)."""
    tf = eval_transform(size, net.config.mean, net.config.std)
    with torch.no_grad():
        return net(torch.stack([tf(read_image(p)) for p in labeled.paths]))


@pytest.fixture(scope="module")
def single_data(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("interp_single"), SyntheticConfig(n_images=30, size=40, val_fraction=0.5, seed=3))


def _recording(monkeypatch):
    calls = []
    original = pipeline.make_maps

    def recorder(model, images, settings, target="predicted", **extra):
        heat = original(model, images, settings, target, **extra)
        calls.append({"size": settings.test_size, "shape": tuple(images.shape), "targets": heat.targets.cpu(), "maps": heat.normalized.cpu()})
        return heat

    monkeypatch.setattr(pipeline, "make_maps", recorder)
    return calls


def test_single_label_confusion_matrix_top_losses_and_maps(single_data, monkeypatch):
    net = _model(["square", "star", "triangle"], test_size=48)
    calls = _recording(monkeypatch)
    res = interpret(net, single_data, k=5, per_class=2, split="val", batch_size=4)
    labeled, _ = resolve_split(load_labels(single_data, classes=net.config.classes), "val")
    logits = _hand_logits(net, labeled, 48)
    y = labeled.targets
    pred = logits.argmax(-1)
    hand = [[0] * 3 for _ in range(3)]
    for t, p in zip(y.tolist(), pred.tolist()):
        hand[t][p] += 1
    assert res.task == "single" and res.split == "val" and res.images == len(labeled) and res.test_size == 48
    assert res.confusion.tolist() == hand
    assert len(set(pred.tolist())) > 1, "the test model should predict more than one class"
    assert res.accuracy == pytest.approx(100 * sum(hand[k][k] for k in range(3)) / len(y))
    # the top losses: the 5 highest cross-entropies, highest first, each the loss of its own image
    losses = F.cross_entropy(logits, y, reduction="none")
    assert [c.loss for c in res.top_losses] == pytest.approx(sorted(losses.tolist(), reverse=True)[:5], abs=1e-4)
    assert all(a.loss >= b.loss for a, b in zip(res.top_losses, res.top_losses[1:]))
    for case in res.top_losses:
        assert case.loss == pytest.approx(float(losses[case.image]), abs=1e-4)
        assert case.probability_true == pytest.approx(math.exp(-case.loss), abs=1e-4)
        t, p = labeled.classes[int(y[case.image])], labeled.classes[int(pred[case.image])]
        assert case.true == [t] and case.predicted == [p] and case.correct == (t == p)
        roles = {panel.role: panel.class_name for panel in case.panels}
        assert roles == ({"predicted and true": t} if t == p else {"predicted": p, "true": t})
        for panel in case.panels:  # a heatmap of the predicted and of the true class for every loss case
            m = res.maps[(case.image, panel.class_index)]
            assert m.shape == (48, 48) and 0 <= float(m.min()) and float(m.max()) <= 1
    assert any(not c.correct for c in res.top_losses)
    # every map came from the one pipeline, on images at the stored test size
    assert calls and all(c["size"] == 48 and c["shape"][-2:] == (48, 48) for c in calls)
    # per class: correct images only, most confident first, the least confident ones the lowest of the rest
    conf = logits.softmax(-1).max(-1).values
    for k, name in enumerate(labeled.classes):
        right = [n for n in range(len(y)) if int(y[n]) == k and int(pred[n]) == k]
        most = [c.image for c in res.most_confident[name]]
        least = [c.image for c in res.least_confident[name]]
        assert most == sorted(right, key=lambda n: -float(conf[n]))[:2]
        rest = [n for n in right if n not in most]
        assert least == sorted(rest, key=lambda n: float(conf[n]))[:2]
        assert all(c.correct and c.true == [name] for c in res.most_confident[name] + res.least_confident[name])


def test_multi_label_cases_are_pairs_with_binary_losses(tmp_path):
    data = write_synthetic(tmp_path / "multi", SyntheticConfig(n_images=16, size=40, mode="multi", max_instances=2, val_fraction=0.0, seed=2))
    net = _model(["triangle", "square", "star"], task="multi", seed=1)
    res = interpret(net, data, k=6, per_class=1, split="all", batch_size=8)
    labeled = load_labels(data, classes=net.config.classes)
    logits = _hand_logits(net, labeled, 32)
    y = labeled.targets.bool()
    present = logits.sigmoid() >= 0.5
    hand = torch.zeros(3, 2, 2, dtype=torch.long)
    for n in range(len(y)):
        for k in range(3):
            hand[k, int(y[n, k]), int(present[n, k])] += 1
    assert res.task == "multi" and res.confusion.tolist() == hand.tolist()
    bce = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none")
    shown = sorted((float(bce[n, k]) for n in range(len(y)) for k in range(3) if y[n, k] or present[n, k]), reverse=True)
    assert [c.loss for c in res.top_losses] == pytest.approx(shown[:6], abs=1e-4)
    for case in res.top_losses:
        k = net.config.classes.index(case.label)
        truly, called = bool(y[case.image, k]), bool(present[case.image, k])
        assert truly or called, "a true negative is no case"
        assert case.correct == (truly == called)
        roles = [p.role for p in case.panels]
        if called and not truly:  # false positive: the class it wrongly saw
            assert case.panels[0].role == "predicted" and case.panels[0].class_name == case.label
            assert all(p.class_name in case.true for p in case.panels[1:])
        elif truly and not called:  # a miss: the class it missed, beside what it found most likely instead
            assert roles[-1] == "true" and case.panels[-1].class_name == case.label and len(roles) == 2
        for p in case.panels:
            assert (case.image, p.class_index) in res.maps


def test_yes_no_model_uses_its_cut_and_the_positive_class_map(tmp_path):
    data = write_synthetic(tmp_path / "bin", SyntheticConfig(n_images=16, size=40, mode="binary", val_fraction=0.0, seed=4))
    labeled = load_labels(data)
    assert labeled.positive_index is not None
    pos = labeled.positive_index
    net = _model(labeled.classes, positive_class=pos, seed=2)
    p_pos = _hand_logits(net, labeled, 32).softmax(-1)[:, pos]
    cut = round(float(p_pos.median()), 3)  # a cut that is not the arg-max's 0.5 for some image
    net.config.decision_threshold = cut
    res = interpret(net, data, k=4, per_class=1, batch_size=8)
    pred = torch.where(p_pos >= cut, pos, 1 - pos)
    assert (pred != torch.where(p_pos >= 0.5, pos, 1 - pos)).any()
    hand = [[0, 0], [0, 0]]
    for t, p in zip(labeled.targets.tolist(), pred.tolist()):
        hand[t][p] += 1
    assert res.task == "yes/no" and res.confusion.tolist() == hand and f"{cut:.3f}" in res.decision
    for case in res.cases():
        assert [(p.role, p.class_index) for p in case.panels] == [("positive", pos)]
        assert case.predicted == [labeled.classes[int(pred[case.image])]]


def test_page_escapes_class_and_file_names_and_stays_in_its_folder(tmp_path):
    from weakloc.report import top_losses

    src = write_synthetic(tmp_path / "s", SyntheticConfig(n_images=8, size=40, seed=5))
    rows = list(csv.DictReader((src / "labels.csv").read_text().splitlines()))
    odd = tmp_path / "odd"
    odd.mkdir()
    names = {"triangle": "<script>", "square": "a&b\"q", "star": "star"}
    with open(odd / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i, r in enumerate(rows):
            target = odd / f"<img src=x onerror=alert({i})>.jpg"
            target.write_bytes((src / r["path"]).read_bytes())
            w.writerow([target.name, names[r["label"]]])
    classes = sorted({names[r["label"]] for r in rows})
    net = _model(classes)
    out = tmp_path / "out"
    res = top_losses(net, odd, out, k=4, per_class=1)
    page = (out / "interpretation.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "<img src=x" not in page  # no tag from a name
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=alert(" in page
    pngs = list((out / "interpretation").glob("*.png"))
    assert pngs and all(p.resolve().parent == (out / "interpretation").resolve() for p in pngs)
    for src_attr in re.findall(r'src="([^"]+)"', page):  # every picture the page shows exists
        assert (out / unquote(html.unescape(src_attr))).is_file(), src_attr
    shown = sum(1 + len(c.panels) for c in res.top_losses)
    assert page.count("<div class=\"panel\">") >= shown


def test_bad_arguments_are_refused_before_reading(single_data, tmp_path):
    from weakloc.errors import OptionError
    from weakloc.report import top_losses

    net = _model(["square", "star", "triangle"])
    for kwargs, name in (({"k": 0}, "k"), ({"per_class": -1}, "per_class"), ({"split": "nope"}, "split"),
                         ({"maps": {"method": "nope"}}, "method"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(OptionError, match=name):
            top_losses(net, tmp_path / "missing", tmp_path / "o", **kwargs)


def test_cli_report_and_train_write_the_page(single_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from weakloc import cli
    from weakloc.cli import app
    from weakloc.models import save_model

    monkeypatch.setattr(cli.console, "width", 200)
    run = CliRunner()
    model = save_model(_model(["square", "star", "triangle"]), tmp_path / "model")
    r = run.invoke(app, ["report", str(model), str(single_data), "-o", str(tmp_path / "rep"), "--k", "3", "--per-class", "1",
                         "--method", "gradcam", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "interpretation.html").is_file() and "of the top 3 losses wrong" in r.output
    assert "gradcam" in (tmp_path / "rep" / "interpretation.html").read_text(encoding="utf-8")
    r = run.invoke(app, ["report", str(model), str(single_data), "-o", str(tmp_path / "rep2"), "--k", "0"])
    assert r.exit_code != 0 and not (tmp_path / "rep2").exists()

    train = ["train", str(single_data), "--backbone", "test_resnet", "--pretrained", "none", "--input-size", "32",
             "--output-stride", "8", "--epochs", "1", "--freeze-epochs", "0", "--batch-size", "8", "--test-scale", "1"]
    import weakloc.train

    trained = []
    real_fine_tune = weakloc.train.fine_tune

    def recording(*args, **kwargs):
        trained.append(real_fine_tune(*args, **kwargs))
        return trained[-1]

    monkeypatch.setattr(weakloc.train, "fine_tune", recording)
    r = run.invoke(app, [*train, "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "run" / "interpretation.html").read_text(encoding="utf-8")
    val = sum(1 for row in csv.DictReader((single_data / "labels.csv").read_text().splitlines()) if row["split"] == "val")
    assert f"{val} validation image(s)" in page and "where it looked when it was wrong" in r.output
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"model", "checkpoints", "metrics.json", "interpretation.html", "interpretation"}

    # the same training again (not rerun: its result is reused) without the page, and with a page that fails
    monkeypatch.setattr(weakloc.train, "fine_tune", lambda *args, **kwargs: trained[0])
    r = run.invoke(app, [*train, "-o", str(tmp_path / "quiet"), "--no-interpretation"])
    assert r.exit_code == 0, r.output
    assert "model saved to" in r.output and not (tmp_path / "quiet" / "interpretation.html").exists()

    import weakloc.report.interpretation as writer

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(writer, "after_training", broken)
    r = run.invoke(app, [*train, "-o", str(tmp_path / "warned")])
    assert r.exit_code == 0, r.output  # training succeeded; the page's problem is one warning line
    assert "model saved to" in r.output
    assert "interpretation.html not written: disk on fire" in r.output and "second line" not in r.output
