"""Faithfulness metrics: deletion/insertion curves and AUCs against hand computations and a loop
reference; Average Drop / Increase in Confidence on exact cases; the method comparison."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from weakloc.errors import WeaklocError
from weakloc.evaluate.faithfulness import (
    average_drop_increase,
    baseline_images,
    compare_methods,
    deletion_insertion,
    explanation_quality,
    gaussian_blur,
    pixel_ranks,
    step_counts,
    trapezoid_auc,
)


class Toy(nn.Module):
    """A "model" with WeaklocNet's interface: ``model(x)`` -> logits, ``probabilities``, ``config``."""

    def __init__(self, fn, task="single", classes=("a", "b"), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)):
        super().__init__()
        self.fn = fn
        self.config = SimpleNamespace(task=task, classes=list(classes), mean=tuple(mean), std=tuple(std))
        self.scale = nn.Parameter(torch.ones(()))  # so the model has a device

    def forward(self, x):
        return self.fn(x) * self.scale

    def probabilities(self, logits):
        return logits.softmax(-1) if self.config.task == "single" else logits.sigmoid()


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def auc(ys: list[float]) -> float:
    return (sum(ys) - (ys[0] + ys[-1]) / 2) / (len(ys) - 1)


def pixel_sum_model():
    """One sigmoid class whose logit is the sum over pixels of the channel mean."""
    return Toy(lambda x: x.mean(1).flatten(1).sum(1, keepdim=True), task="multi", classes=["a"])


def test_exact_curves_on_a_2x2_image():
    model = pixel_sum_model()
    img = torch.tensor([4.0, 3, 2, 1]).view(1, 1, 2, 2).expand(1, 3, 2, 2).contiguous()
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.5]],     # order p1, p2, p3 (tie kept in raster order), p0
                         [[0.9, 0.1], [0.2, 0.3]]])[None]  # order p0, p3, p2, p1
    r = deletion_insertion(model, img, maps, torch.tensor([[0, 0]]), steps=4, baseline="zero", return_curves=True)
    want_del = [[10, 7, 5, 4, 0], [10, 6, 5, 3, 0]]
    want_ins = [[0, 3, 5, 6, 10], [0, 4, 5, 7, 10]]
    for t in range(2):
        d = [sig(v) for v in want_del[t]]
        i = [sig(v) for v in want_ins[t]]
        assert r.deletion_curve[0, t].tolist() == pytest.approx(d, abs=1e-6)
        assert r.insertion_curve[0, t].tolist() == pytest.approx(i, abs=1e-6)
        assert r.deletion[0, t].item() == pytest.approx(auc(d), abs=1e-6)
        assert r.insertion[0, t].item() == pytest.approx(auc(i), abs=1e-6)
    # steps that do not divide the pixels: n_k = floor(k * 4 / 3) = 0, 1, 2, 4
    r3 = deletion_insertion(model, img, maps[:, :1], torch.tensor([0]), steps=3, baseline="zero", return_curves=True)
    assert r3.deletion_curve[0, 0].tolist() == pytest.approx([sig(v) for v in [10, 7, 5, 0]], abs=1e-6)
    assert r3.insertion_curve[0, 0].tolist() == pytest.approx([sig(v) for v in [0, 3, 5, 10]], abs=1e-6)


def test_step_scheme_ranks_and_auc():
    assert step_counts(4, 4).tolist() == [0, 1, 2, 3, 4]
    assert step_counts(4, 3).tolist() == [0, 1, 2, 4]
    assert step_counts(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    m = torch.tensor([[0.5, 0.9], [0.5, float("nan")]])[None, None]
    assert pixel_ranks(m).tolist() == [[[1, 0, 2, 3]]]  # ties in raster order, NaN last
    assert trapezoid_auc(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(0.25)
    assert trapezoid_auc(torch.tensor([0.3, 0.3])).item() == pytest.approx(0.3)


def region_model():
    """Two softmax classes; logit 0 = 4 x the mean of the top-left 8x8 region, logit 1 = 0."""
    def fn(x):
        z = 4 * x[:, :, :8, :8].mean((1, 2, 3))
        return torch.stack([z, torch.zeros_like(z)], 1)
    return Toy(fn)


def test_region_first_map_deletes_faster_and_inserts_faster():
    model = region_model()
    img = torch.zeros(1, 3, 32, 32)
    img[:, :, :8, :8] = 2.0
    good = torch.zeros(32, 32)
    good[:8, :8] = 1
    maps = torch.stack([good, 1 - good])[None]  # (1, 2, 32, 32): region first, region last
    tg = torch.zeros(1, 2, dtype=torch.long)
    # 64 region pixels of 1024, 16 steps of 64 pixels: exact curves with the zero baseline
    r = deletion_insertion(model, img, maps, tg, steps=16, baseline="zero", return_curves=True)
    hi = sig(8)
    assert r.deletion_curve[0, 0].tolist() == pytest.approx([hi] + [0.5] * 16, abs=1e-6)
    assert r.deletion_curve[0, 1].tolist() == pytest.approx([hi] * 16 + [0.5], abs=1e-6)
    assert r.insertion_curve[0, 0].tolist() == pytest.approx([0.5] + [hi] * 16, abs=1e-6)
    assert r.insertion_curve[0, 1].tolist() == pytest.approx([0.5] * 16 + [hi], abs=1e-6)
    for baseline in ("zero", "blur", "mean", "black", ("zero", "blur")):
        r = deletion_insertion(model, img, maps, tg, steps=16, baseline=baseline)
        assert r.deletion[0, 0] < r.deletion[0, 1], baseline
        assert r.insertion[0, 0] > r.insertion[0, 1], baseline


def reference(model, img, m, target, steps, base_del, base_ins):
    """Deletion/insertion curves with Python loops: one image, one map."""
    h, w = img.shape[-2:]
    n = h * w
    vals = m.flatten().tolist()
    order = sorted(range(n), key=lambda p: -vals[p])  # Python's sort is stable
    curves = ([], [])
    for k in range(steps + 1):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[: k * n // steps]] = True
        mask = mask.view(1, h, w)
        for c, x in zip(curves, (torch.where(mask, base_del, img), torch.where(mask, img, base_ins))):
            c.append(model.probabilities(model(x[None]))[0, target].item())
    return curves


def test_matches_loop_reference_and_chunking():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = Toy(net, classes=["a", "b", "c"])
    imgs = torch.randn(3, 3, 5, 4)
    maps = torch.rand(3, 2, 5, 4).round(decimals=1)  # many ties
    tg = torch.randint(0, 3, (3, 2))
    with torch.no_grad():
        for baseline in ("zero", "mean"):
            out = deletion_insertion(model, imgs, maps, tg, steps=7, baseline=baseline, chunk=5, return_curves=True)
            for b in range(3):
                base = baseline_images(imgs[b:b + 1], baseline)[0]
                for t in range(2):
                    d, i = reference(model, imgs[b], maps[b, t], tg[b, t], 7, base, base)
                    assert out.deletion_curve[b, t].tolist() == pytest.approx(d, abs=1e-5)
                    assert out.insertion_curve[b, t].tolist() == pytest.approx(i, abs=1e-5)
            for chunk in (1, 1000) if baseline == "zero" else ():
                other = deletion_insertion(model, imgs, maps, tg, steps=7, baseline=baseline, chunk=chunk, return_curves=True)
                assert torch.allclose(other.deletion_curve, out.deletion_curve, atol=1e-6)
                assert torch.allclose(other.insertion, out.insertion, atol=1e-6)


def test_blur_baseline():
    x = torch.full((2, 3, 9, 7), 0.7)
    assert torch.allclose(gaussian_blur(x), x, atol=1e-6)  # a constant image stays constant
    img = torch.randn(1, 3, 12, 10)
    g1 = torch.exp(-(torch.arange(11.0) - 5) ** 2 / 50)
    k2 = torch.outer(g1, g1) / g1.sum() ** 2
    padded = nn.functional.pad(img, (5, 5, 5, 5), mode="replicate")
    want = nn.functional.conv2d(padded, k2.expand(3, 1, 11, 11), groups=3)
    assert torch.allclose(gaussian_blur(img), want, atol=1e-5)
    # constant image, any map: every perturbed input is the image, so both curves are flat
    model = pixel_sum_model()
    r = deletion_insertion(model, x[:1], torch.rand(1, 1, 9, 7), torch.tensor([[0]]), steps=5, return_curves=True)
    s = torch.sigmoid(torch.tensor(0.7 * 63))
    assert torch.allclose(r.deletion_curve, s.expand(1, 1, 6)) and torch.allclose(r.insertion, s.expand(1, 1))


def test_other_baselines():
    model = pixel_sum_model()
    img = torch.randn(2, 3, 4, 4)
    assert torch.equal(baseline_images(img, "zero"), torch.zeros_like(img))
    assert torch.allclose(baseline_images(img, "mean")[:, :, 3, 2], img.mean((2, 3)))
    black = baseline_images(img, "black", model)
    assert torch.allclose(black[0, :, 0, 0], -torch.tensor([0.5, 0.4, 0.3]) / torch.tensor([0.2, 0.25, 0.3]))
    r = deletion_insertion(model, img, torch.rand(2, 1, 4, 4), torch.zeros(2, 1, dtype=torch.long), steps=2,
                           baseline="mean", return_curves=True)
    want = torch.sigmoid(img.mean((1, 2, 3)) * 16)  # every pixel at its channel mean
    assert torch.allclose(r.insertion_curve[:, 0, 0], want, atol=1e-5)
    assert torch.allclose(r.deletion_curve[:, 0, -1], want, atol=1e-5)


def test_shapes_device_and_defaults(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    maps = torch.rand(2, 3, 32, 32)
    tg = torch.tensor([[0, 1, 2], [2, 1, 0]])
    r = deletion_insertion(tiny_model, x, maps, tg, steps=3, chunk=7)
    assert r.deletion.shape == r.insertion.shape == (2, 3)
    assert r.deletion_curve is None and r.insertion_curve is None
    assert r.deletion.device == x.device and r.deletion.dtype == torch.float32
    assert ((r.deletion >= 0) & (r.deletion <= 1)).all() and torch.isfinite(r.insertion).all()
    r = deletion_insertion(tiny_model, x, maps, tg, steps=3, return_curves=True)
    assert r.deletion_curve.shape == r.insertion_curve.shape == (2, 3, 4)
    # the ends of the curves: the image itself (deletion k=0, insertion k=steps)
    with torch.no_grad():
        p = tiny_model.probabilities(tiny_model(x)).gather(1, tg)
    assert torch.allclose(r.deletion_curve[..., 0], p, atol=1e-5)
    assert torch.allclose(r.insertion_curve[..., -1], p, atol=1e-5)
    a = average_drop_increase(tiny_model, x, maps, tg, chunk=4)
    assert a.drop.shape == a.increase.shape == a.score.shape == (2, 3)
    assert a.increase.dtype == torch.bool and ((a.drop >= 0) & (a.drop <= 1)).all()
    assert torch.allclose(a.score, p, atol=1e-5)


def test_errors(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    tg = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(WeaklocError, match="do not match images"):
        deletion_insertion(tiny_model, x, torch.rand(2, 1, 16, 16), tg)
    with pytest.raises(WeaklocError, match="do not match images"):
        average_drop_increase(tiny_model, x, torch.rand(3, 1, 32, 32), tg)
    with pytest.raises(WeaklocError, match="targets"):
        deletion_insertion(tiny_model, x, torch.rand(2, 2, 32, 32), tg)
    with pytest.raises(WeaklocError, match="targets"):
        average_drop_increase(tiny_model, x, torch.rand(2, 1, 32, 32), torch.zeros(3, dtype=torch.long))
    with pytest.raises(WeaklocError, match="baseline"):
        deletion_insertion(tiny_model, x, torch.rand(2, 1, 32, 32), tg, baseline="noise")
    with pytest.raises(WeaklocError, match="steps"):
        deletion_insertion(tiny_model, x, torch.rand(2, 1, 32, 32), tg, steps=0)
    with pytest.raises(WeaklocError, match="0..2"):
        deletion_insertion(tiny_model, x, torch.rand(2, 1, 32, 32), tg + 3)


def brightness_model(a: float, b: float, cols: slice = slice(None)):
    """One sigmoid class: logit = a * mean pixel value (un-normalised) over ``cols`` + b."""
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    return Toy(lambda x: (a * (x * std + mean)[..., cols].mean((1, 2, 3)) + b)[:, None], task="multi", classes=["a"]), mean, std


def test_average_drop_and_increase_exact():
    model, mean, std = brightness_model(5.0, -2.0)
    x = ((torch.full((1, 3, 6, 6), 0.8) - mean) / std)
    maps = torch.stack([torch.full((6, 6), 0.5), torch.ones(6, 6), torch.zeros(6, 6)])[None]
    tg = torch.zeros(1, 3, dtype=torch.long)
    r = average_drop_increase(model, x, maps, tg)
    # Y = sig(5 * 0.8 - 2); half the pixel values: O = sig(0); all ones: O = Y; all zeros (black): O = sig(-2)
    y = sig(2)
    assert r.score[0].tolist() == pytest.approx([y] * 3, abs=1e-6)
    assert r.explanation_score[0].tolist() == pytest.approx([0.5, y, sig(-2)], abs=1e-6)
    assert r.drop[0].tolist() == pytest.approx([(y - 0.5) / y, 0, (y - sig(-2)) / y], abs=1e-6)
    assert r.increase[0].tolist() == [False, False, False]
    # darker is more confident: O > Y, no drop
    model, _, _ = brightness_model(-5.0, 2.0)
    r = average_drop_increase(model, x, maps[:, :1], tg[:, :1])
    assert r.score.item() == pytest.approx(sig(-2), abs=1e-6) and r.explanation_score.item() == pytest.approx(0.5, abs=1e-6)
    assert r.drop.item() == 0 and r.increase.item()


def test_average_drop_map_covering_the_evidence():
    # the model looks at the left half only; a map of ones there changes nothing it sees
    model, mean, std = brightness_model(3.0, -1.0, slice(0, 4))
    torch.manual_seed(1)
    x = (torch.rand(3, 3, 5, 8) - mean) / std
    maps = torch.rand(3, 1, 5, 8)
    maps[..., :4] = 1
    r = average_drop_increase(model, x, maps, torch.zeros(3, 1, dtype=torch.long))
    assert torch.equal(r.drop, torch.zeros(3, 1)) and not r.increase.any()
    assert torch.allclose(r.explanation_score, r.score)


def test_average_drop_all_ones_on_real_model(tiny_model):
    x = torch.randn(3, 3, 32, 32)
    r = average_drop_increase(tiny_model, x, torch.ones(3, 1, 32, 32), torch.tensor([0, 1, 2]))
    assert torch.equal(r.drop, torch.zeros(3, 1)) and not r.increase.any()
    assert torch.equal(r.explanation_score, r.score)


def test_explanation_quality(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    q = explanation_quality(tiny_model, x, "cam", target="top2", steps=4, chunk=16)
    for k in ("deletion", "insertion", "drop", "increase", "score", "targets"):
        assert q[k].shape == (2, 2) and q[k].device == x.device, k
    assert isinstance(q["seconds"], float) and q["seconds"] > 0
    with torch.no_grad():
        assert torch.equal(q["targets"], tiny_model(x).topk(2, -1).indices)


def test_compare_methods_on_a_loader(tiny_model, synth_single):
    from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform
    from weakloc.data.labels import load_labels

    cfg = tiny_model.config
    ds = ImageDataset.from_labels(load_labels(synth_single), eval_transform(32, cfg.mean, cfg.std))
    loader = DataLoader(Subset(ds, range(5)), batch_size=2, shuffle=False, collate_fn=collate_skip_bad)
    methods = ["cam", "gradcam", "random"]
    rows = compare_methods(tiny_model, loader, methods, steps=3, chunk=16)
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert r["maps"] == r["images"] == 5
        for k in ("deletion_auc", "insertion_auc", "average_drop_pct", "increase_in_confidence_pct", "ms_per_image"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["method"], k)
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1
        assert 0 <= r["average_drop_pct"] <= 100 and 0 <= r["increase_in_confidence_pct"] <= 100
        assert r["ms_per_image"] > 0
    # CAM and last-layer Grad-CAM give the same normalised maps when neither clamps: same metrics
    same = compare_methods(tiny_model, loader, ["cam", "gradcam"], steps=3, relu=False, warmup=False)
    assert same[0]["deletion_auc"] == pytest.approx(same[1]["deletion_auc"], abs=1e-4)
    assert same[0]["insertion_auc"] == pytest.approx(same[1]["insertion_auc"], abs=1e-4)


def test_compare_methods_batches_and_errors(tiny_model):
    batches = [torch.randn(2, 3, 32, 32), (torch.randn(1, 3, 32, 32), torch.tensor([0])), {"image": None}]
    rows = compare_methods(tiny_model, batches, ["sobel"], target="all", steps=2)
    assert len(rows) == 1 and rows[0]["images"] == 3 and rows[0]["maps"] == 9
    with pytest.raises(WeaklocError, match="unknown explanation method"):
        compare_methods(tiny_model, batches, ["nope"])
    with pytest.raises(WeaklocError, match="no images"):
        compare_methods(tiny_model, [{"image": None}], ["cam"])
