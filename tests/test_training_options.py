"""Imbalanced yes/no data: focal loss, class-balanced sampling, PR-AUC, the decision threshold; and
training the new heads end to end."""

import pytest
import torch
import torch.nn.functional as F

from weakloc.data.labels import LabeledImages
from weakloc.errors import WeaklocError
from weakloc.explain import explain
from weakloc.train import fine_tune
from weakloc.train.fit import balanced_sampler
from weakloc.config import TrainConfig
from weakloc.train.module import choose_decision_threshold, classification_loss, classification_metrics


def test_focal_loss_reduces_to_cross_entropy_and_down_weights_easy_examples():
    logits = torch.tensor([[4.0, -4.0], [0.2, 0.1]])
    target = torch.tensor([0, 1])
    ce = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(classification_loss(logits, target, "single", TrainConfig(loss="focal", focal_gamma=0.0)), ce.mean())
    p = logits.softmax(-1)[torch.arange(2), target]
    expected = ((1 - p) ** 2 * ce).mean()
    assert torch.allclose(classification_loss(logits, target, "single", TrainConfig(loss="focal")), expected)
    multi = classification_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "multi", TrainConfig(loss="focal", focal_gamma=0.0))
    assert torch.allclose(multi, F.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]])))


def test_balanced_sampler_weights_inverse_class_frequency():
    labeled = LabeledImages(paths=[f"{i}.png" for i in range(10)], targets=torch.tensor([0] * 8 + [1] * 2), classes=["no", "yes"], task="single")
    s = balanced_sampler(labeled)
    assert torch.allclose(s.weights[:8], torch.full((8,), 1 / 8, dtype=torch.float64))
    assert torch.allclose(s.weights[8:], torch.full((2,), 1 / 2, dtype=torch.float64))
    drawn, _ = balanced_sampler(LabeledImages(labeled.paths * 50, labeled.targets.repeat(50), labeled.classes, "single")).draws()
    assert 0.4 < (drawn % 10 >= 8).float().mean() < 0.6  # positives are about half the draws


def test_balanced_sampler_draws_rare_counts_more_often():
    counts = torch.tensor([[1.0, 0.0]] * 8 + [[2.0, 0.0], [1.0, 3.0]])  # a: nine 1s and one 2; b: nine 0s and one 3
    labeled = LabeledImages(paths=[f"{i}.png" for i in range(10)], targets=(counts > 0).float(), classes=["a", "b"], task="multi",
                            counts=counts)
    w = balanced_sampler(labeled).weights
    assert torch.allclose(w[:8], torch.full((8,), 9 ** -0.5, dtype=torch.float64))  # groups of nine: 1 / 3
    assert torch.allclose(w[8], torch.tensor(1.0, dtype=torch.float64))  # the only image with two of a
    assert torch.allclose(w[9], torch.tensor(1.0, dtype=torch.float64))  # the only image with b


def test_decision_threshold_maximises_f1():
    probs = torch.tensor([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
    pos = torch.tensor([True, True, False, True, False, False])
    # cuts: top1 F1 .5, top2 .8, top3 .667, top4 .857 (tp 3, fp 1), top5 .75 -> cut between 0.4 and 0.3
    assert choose_decision_threshold(probs, pos) == pytest.approx(0.35)
    assert choose_decision_threshold(probs, torch.ones(6, dtype=torch.bool)) is None


def test_binary_metrics_include_pr_auc():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m = classification_metrics(probs, torch.tensor([0, 1, 1, 0]), "single", positive=1)
    assert set(m) == {"acc", "auroc", "prauc"} and 0 <= m["prauc"] <= 1


def test_multi_label_metrics_with_one_class_and_with_several():
    """One counted class (a multi-label model with a single label) is scored, not refused by torchmetrics."""
    probs = torch.tensor([[0.9], [0.2], [0.6], [0.3]])
    one = classification_metrics(probs, torch.tensor([[1], [0], [0], [1]]), "multi")
    assert one["acc"] == pytest.approx(0.5) and one["map"] == pytest.approx((1 + 2 / 3) / 2)  # positives ranked 1st and 3rd
    three = classification_metrics(torch.cat([probs, 1 - probs, probs], 1), torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]]), "multi")
    assert three["acc"] == pytest.approx(7 / 12)  # micro: every (image, class) pair at 0.5
    assert three["map"] == pytest.approx((5 / 6 + 1.0) / 2)  # class 2 has no positive: left out


@pytest.fixture(scope="module")
def synth_binary(tmp_path_factory):
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth_binary"), SyntheticConfig(n_images=32, size=64, mode="binary", val_fraction=0.25, seed=2))


def test_attention_head_cbam_focal_balanced_train_end_to_end(synth_binary, tmp_path):
    res = fine_tune(synth_binary, tmp_path, backbone="test_resnet", pretrained="none", input_size=64, output_stride=8, epochs=2,
                    batch_size=8, progress=False, head="attention", attention_stages=[1, 2], cbam_stages=[3], loss="focal", balanced=True)
    cfg = res.model.config
    assert cfg.head == "attention" and cfg.cbam_stages == [3] and cfg.positive_class is not None
    assert cfg.decision_threshold is None or 0 < cfg.decision_threshold < 1
    assert "val_prauc" in res.metrics or "val_auroc" not in res.metrics
    x = torch.randn(2, 3, 64, 64)
    h = explain(res.model, x, "attention")
    assert h.normalized.shape == (2, 1, 64, 64)
    with pytest.raises(WeaklocError, match="--loss: 'hinge'"):
        fine_tune(synth_binary, tmp_path / "x", backbone="test_resnet", pretrained="none", input_size=64, epochs=1, loss="hinge")


def test_tap_head_trains_from_the_cli(synth_binary, tmp_path):
    from typer.testing import CliRunner

    from weakloc.cli import app

    r = CliRunner().invoke(app, ["train", str(synth_binary), "-o", str(tmp_path / "tap"), "--backbone", "test_resnet", "--pretrained", "none",
                                 "--input-size", "64", "--output-stride", "8", "--epochs", "1", "--batch-size", "8", "--head", "tap",
                                 "--tap-threshold", "0.2", "--cbam-stages", "2", "--balanced"])
    assert r.exit_code == 0, r.output
    import json
    cfg = json.loads((tmp_path / "tap" / "model" / "config.json").read_text())
    assert cfg["head"] == "tap" and cfg["tap_threshold"] == 0.2 and cfg["cbam_stages"] == [2]


def test_hide_and_seek_hides_whole_patches():
    from weakloc.train.augment import hide_patches

    x = torch.ones(64, 3, 16, 16)
    out = hide_patches(x, grid=4, prob=0.5, generator=torch.Generator().manual_seed(0))
    patches = out[:, 0].unfold(1, 4, 4).unfold(2, 4, 4)  # (B, 4, 4, 4, 4)
    per_patch = patches.flatten(3).float()
    assert ((per_patch == 0).all(-1) | (per_patch == 1).all(-1)).all()  # each patch all hidden or all kept
    assert 0.4 < (per_patch[..., 0] == 0).float().mean() < 0.6
    assert torch.equal(hide_patches(x, prob=0.0), x)


def test_cutmix_mixes_labels_by_pasted_area():
    from weakloc.train.augment import cutmix

    torch.manual_seed(0)
    x = torch.stack([torch.full((3, 20, 20), float(i)) for i in range(4)])
    y = torch.tensor([0, 1, 2, 0])
    mixed, soft = cutmix(x, y, 3, "single", alpha=1.0)
    assert torch.allclose(soft.sum(1), torch.ones(4))
    for i in range(4):
        own = (mixed[i, 0] == i).float().mean()
        assert soft[i, y[i]] >= own - 1e-6  # the kept area's share (more when the partner has the same class)
    multi, msoft = cutmix(x, torch.eye(3)[y], 3, "multi", alpha=1.0)
    assert msoft.shape == (4, 3) and (msoft <= 1).all()


def test_fine_tune_with_hide_and_seek_and_cutmix(synth_binary, tmp_path):
    res = fine_tune(synth_binary, tmp_path, backbone="test_resnet", pretrained="none", input_size=64, output_stride=8, epochs=1,
                    batch_size=8, progress=False, hide_prob=0.5, cutmix_alpha=1.0)
    assert res.history and all(v == v for v in res.history[-1].values())  # no NaN


def test_weight_average_is_validated_and_kept(synth_binary, tmp_path):
    from weakloc.train.module import ClassifierModule

    res = fine_tune(synth_binary, tmp_path, backbone="test_resnet", pretrained="none", input_size=64, output_stride=8, epochs=2,
                    batch_size=8, progress=False, ema_decay=0.9, monitor="val_loss")
    state = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    kept = res.model.state_dict()
    averaged = {k[len("ema.module."):]: v for k, v in state.items() if k.startswith("ema.module.")}
    live = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    assert set(averaged) == set(kept) == set(live)
    w = next(k for k in kept if k.startswith("classifier") and k.endswith("weight"))  # trained from the first epoch (the backbone starts frozen)
    assert torch.equal(kept[w], averaged[w]) and not torch.equal(kept[w], live[w])  # the average, not the last step's weights
    best = min(res.history, key=lambda h: h["val_loss"])
    assert res.metrics["best_epoch"] == best["epoch"]
    with pytest.raises(WeaklocError, match="--ema-decay"):
        fine_tune(synth_binary, tmp_path / "bad", backbone="test_resnet", pretrained="none", input_size=64, epochs=1, progress=False,
                  ema_decay=1.0)
    # the average follows the trained weights: one update with decay 0 copies them
    module = ClassifierModule(res.model, TrainConfig(ema_decay=0.5))
    module.ema.decay, module.ema.use_warmup = 0.0, False
    with torch.no_grad():
        next(module.model.parameters()).add_(1.0)
    module.ema.update(module.model, step=1)
    assert torch.equal(next(module.ema.module.parameters()), next(module.model.parameters()))


def test_stochastic_weight_averaging_holds_the_lr_averages_uniformly_and_keeps_the_last_epoch(synth_binary, tmp_path):
    from weakloc.train.module import ClassifierModule, swa_start

    assert swa_start(100, 0.25) == 75 and swa_start(100, 0.0) == 100
    res = fine_tune(synth_binary, tmp_path, backbone="test_resnet", pretrained="none", input_size=64, output_stride=8, epochs=3,
                    batch_size=8, progress=False, swa=0.5, monitor="val_loss", freeze_epochs=0)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    averaged = {k[len("ema.module."):]: v for k, v in last["state_dict"].items() if k.startswith("ema.module.")}
    kept = res.model.state_dict()
    assert set(averaged) == set(kept) and all(torch.equal(kept[k], averaged[k].float()) for k in kept)  # the last epoch's average
    assert res.metrics["best_epoch"] == 2

    # the LR is held from the start of the averaged fraction, and the average is the plain mean of the steps' weights
    module = ClassifierModule(res.model, TrainConfig(swa=0.5, epochs=1, freeze_epochs=0))
    module._trainer = type("T", (), {"estimated_stepping_batches": 10})()
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = [sched.lr_lambdas[0](s) for s in range(12)]
    assert module.ema.update_after_step == 5 and lrs[5:] == [lrs[5]] * 7 and lrs[4] != lrs[5]
    p = next(module.model.parameters())
    seen = []
    for step in range(1, 10):
        with torch.no_grad():
            p.copy_(torch.full_like(p, float(step)))
        module.ema.update(module.model, step=step)
        if step > 5:
            seen.append(step)
    assert torch.allclose(next(module.ema.module.parameters()), torch.full_like(p, sum(seen) / len(seen)))
