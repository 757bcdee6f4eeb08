"""Whole-object levers: alignment and consistency losses, the PSOL-style localizer stage, and the
YOLO annotation reader the Aquarium benchmark uses."""

import pytest
import torch
import torch.nn.functional as F

from weakloc.errors import AnnotationError, WeaklocError
from weakloc.explain import explain
from weakloc.train import fine_tune
from weakloc.train.alignment import alignment_loss, dropout_consistency_loss, present_classes
from weakloc.train.pseudo import box_loss, localizer_loss, pseudo_boxes, pseudo_masks, teacher_maps


def _peaked(h=6, w=6):
    """A (1, 1, h, w) map: 1 on the 2x2 top-left block, 0.6 on the next ring, 0 elsewhere."""
    m = torch.zeros(1, 1, h, w)
    m[..., :3, :3] = 0.6
    m[..., :2, :2] = 1.0
    return m


def test_present_classes_from_indices_multi_hot_and_soft_targets():
    assert present_classes(torch.tensor([2, 0]), 3).tolist() == [[False, False, True], [True, False, False]]
    assert present_classes(torch.tensor([[1.0, 0.0, 1.0]]), 3).tolist() == [[True, False, True]]
    assert present_classes(torch.tensor([[0.3, 0.7, 0.0]]), 3).tolist() == [[True, True, False]]


def test_alignment_loss_is_zero_for_aligned_object_and_orthogonal_background():
    w = torch.tensor([[1.0, 0.0]])  # one class, weight along channel 0
    cam = _peaked()
    feats = torch.zeros(1, 2, 6, 6)
    obj = cam[0, 0] >= 0.5
    feats[0, 0][obj] = 2.0  # object features along w, equal norms
    feats[0, 1][~obj] = 1.0  # background orthogonal to w
    present = torch.tensor([[True]])
    assert alignment_loss(feats, cam, w, present).item() == pytest.approx(0.0, abs=1e-6)
    # turn half the object away from w: direction term 0.5 * (1 - cos 90deg) = 0.5 over the object
    tilted = feats.clone()
    tilted[0, 0, :3, 2], tilted[0, 1, :3, 2] = 0.0, 2.0
    loss = alignment_loss(tilted, cam, w, present, norm_weight=0.0)
    assert loss.item() == pytest.approx(3 / 9, abs=1e-5)  # 3 of the 9 object positions are orthogonal
    feats.requires_grad_(True)
    alignment_loss(feats * torch.linspace(0.5, 1.5, 36).view(1, 1, 6, 6), cam, w, present).backward()
    assert feats.grad.abs().sum() > 0  # the uneven norms are penalised
    assert alignment_loss(feats, cam, w, torch.tensor([[False]])).item() == 0.0


def test_dropout_consistency_zero_when_evidence_is_even_and_positive_when_peaked():
    present = torch.tensor([[True]])
    flat = torch.ones(1, 1, 6, 6)
    assert dropout_consistency_loss(flat, present).item() == pytest.approx(0.0)
    peaked = _peaked().requires_grad_(True)
    loss = dropout_consistency_loss(peaked, present)
    # full mean = (4 * 1 + 5 * 0.6) / 36; kept mean over the 32 positions below 0.8 = 3 / 32
    assert loss.item() == pytest.approx(abs(3 / 32 - 7 / 36), abs=1e-6)
    loss.backward()
    assert peaked.grad[0, 0, 2, 2] < 0  # gradient descent raises the kept object positions


def test_pseudo_masks_and_localizer_loss(tiny_model):
    x = torch.randn(2, 3, 64, 64)
    maps = teacher_maps(tiny_model, x, "cam")
    assert torch.equal(maps, explain(tiny_model, x, "cam", target="all").normalized)
    masks = pseudo_masks(maps, (8, 8), threshold=0.5)
    assert masks.shape == (2, 3, 8, 8) and set(masks.unique().tolist()) <= {0.0, 1.0}
    expected = (F.avg_pool2d(maps, 8) >= 0.5).float()  # each 8x8 block's mean
    assert torch.equal(masks, expected)
    present = torch.tensor([[True, False, False], [False, True, True]])
    perfect = (masks * 2 - 1) * 30
    assert localizer_loss(perfect, masks, present).item() < 1e-6
    zero = torch.zeros_like(masks)
    assert localizer_loss(zero, masks, present).item() == pytest.approx(F.binary_cross_entropy_with_logits(zero, masks).item(), rel=1e-6)
    with pytest.raises(WeaklocError, match="differ in shape"):
        localizer_loss(zero[:, :, :4], masks, present)


def test_pseudo_boxes_are_the_extent_of_the_present_classes_foreground():
    maps = torch.zeros(3, 2, 10, 20)
    maps[0, 0, 2:5, 4:9] = 1.0  # class 0: rows 2-4, columns 4-8
    maps[0, 1, 7:9, 15:17] = 1.0  # class 1, absent from image 0: ignored
    maps[1, 0, 1:3, 0:2] = 0.9
    maps[1, 1, 6:10, 10:20] = 0.6  # both present in image 1: their union's extent
    present = torch.tensor([[True, False], [True, True], [True, True]])
    boxes, valid = pseudo_boxes(maps, present, threshold=0.5)
    assert valid.tolist() == [True, True, False]  # image 2 has no foreground
    assert boxes[0].tolist() == pytest.approx([4 / 20, 2 / 10, 9 / 20, 5 / 10])
    assert boxes[1].tolist() == pytest.approx([0.0, 0.1, 1.0, 1.0])
    assert boxes[2].tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(WeaklocError, match="pseudo_boxes"):
        pseudo_boxes(maps, present[:, :1])


def test_box_loss_is_zero_on_the_target_and_ignores_invalid_images():
    t = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]])
    valid = torch.tensor([True, False])
    assert box_loss(t.clone(), t, valid).item() == pytest.approx(0.0, abs=1e-6)
    off = torch.tensor([[0.5, 0.6, 0.9, 0.9], [0.3, 0.3, 0.4, 0.4]], requires_grad=True)
    loss = box_loss(off, t, valid)
    assert loss.item() > 1.0  # disjoint boxes: GIoU loss above 1, plus the L1
    loss.backward()
    assert off.grad[1].abs().sum() == 0  # the invalid image's box gets no gradient
    none = box_loss(off, t, torch.tensor([False, False]))
    assert none.item() == 0.0
    none.backward()  # a batch without a present class still backpropagates (a separate box network's only loss)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    empty = localizer_loss(logits, torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()
    assert logits.grad.abs().sum() == 0


def test_box_head_regresses_a_box_at_any_input_size():
    from weakloc.models.heads import BoxHead

    head = BoxHead(4)
    untrained = head(torch.randn(2, 4, 6, 6))
    assert untrained.shape == (2, 4)
    assert untrained[0].tolist() == pytest.approx([0.25, 0.25, 0.75, 0.75], abs=1e-5)  # uniform weights, 0.25 each way
    # objectness from channel 0 of the features: all weight on one position puts the box around it
    with torch.no_grad():
        head.conv.weight[0, 0] = 50.0
    f = torch.zeros(1, 4, 10, 10)
    f[0, 0, 1, 8] = 1.0
    box = head(f)[0]
    # not clamped to the image: a side past the border still gets a gradient back
    assert box.tolist() == pytest.approx([0.85 - 0.25, 0.15 - 0.25, 0.85 + 0.25, 0.15 + 0.25], abs=1e-4)
    # the same box from a finer grid of the same picture (a larger input)
    f2 = torch.zeros(1, 4, 20, 20)
    f2[0, 0, 2:4, 16:18] = 1.0
    with torch.no_grad():
        head.conv.weight[0, 0] = 500.0
    assert head(f2)[0].tolist() == pytest.approx(box.tolist(), abs=1e-3)


def test_box_method_draws_the_box():
    from weakloc.explain.methods import box_map

    m = box_map(torch.tensor([[0.25, -0.2, 0.75, 0.5]]), (4, 8))
    assert m[0].tolist() == [[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0], [0] * 8, [0] * 8]


def test_second_stage_trains_a_localizer_from_a_teacher(synth_single, tmp_path):
    kw = dict(backbone="test_resnet", pretrained="none", input_size=64, output_stride=8, epochs=1, freeze_epochs=0,
              batch_size=8, progress=False, workers=0, limit_batches=2)
    first = fine_tune(synth_single, tmp_path / "first", align_weight=1.0, consistency_weight=1.0, **kw)
    with pytest.raises(WeaklocError, match="no localizer head"):
        explain(first.model, torch.randn(1, 3, 64, 64), "localizer")
    with pytest.raises(WeaklocError, match="no box head"):
        explain(first.model, torch.randn(1, 3, 64, 64), "box")
    second = fine_tune(synth_single, tmp_path / "second", teacher=first.model_dir, **kw)
    assert second.model.config.localizer and second.model.config.box_head
    h = explain(second.model, torch.randn(2, 3, 64, 64), "localizer", target="all")
    assert h.raw.shape == (2, 3, 64, 64) and 0 <= h.raw.min() and h.raw.max() <= 1
    boxes = explain(second.model, torch.randn(2, 3, 64, 64), "box", target="all")
    assert boxes.raw.shape == (2, 3, 64, 64) and set(boxes.raw.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(boxes.raw[:, 0], boxes.raw[:, 2])  # class-agnostic: one box for every class
    from weakloc.models import load_model

    reloaded = load_model(second.model_dir)  # the box head's weights travel with the model folder
    assert reloaded.config.box_head and torch.equal(reloaded.box_head.conv.weight, second.model.box_head.conv.weight)
    from dataclasses import replace

    from weakloc.data.labels import load_labels

    renamed = replace(load_labels(synth_single), classes=["x", "y", "z"])
    with pytest.raises(WeaklocError, match="teacher's classes"):
        fine_tune(renamed, tmp_path / "bad", teacher=first.model_dir, **kw)


def test_density_head_on_an_earlier_stage():
    from weakloc.models import ModelConfig, WeaklocNet

    cfg = ModelConfig(backbone="test_resnet", classes=["a", "b"], task="multi", input_size=64, counting="density", density_stage=-2,
                      density_hidden=8)
    model = WeaklocNet(cfg, pretrained="none").eval()
    out = model.forward_maps(torch.randn(2, 3, 64, 64))
    reduction = model.backbone.feature_info[-2]["reduction"]
    assert out.density.shape == (2, 2, 64 // reduction, 64 // reduction)
    assert torch.allclose(out.counts, out.density.sum((2, 3)))
    positions = (64 // reduction) ** 2  # the density's bias starts each map at one object in all
    assert torch.allclose(F.softplus(model.counting_head.density[-1].bias) * positions, torch.ones(2))
    with pytest.raises(WeaklocError, match="density stage 9"):
        WeaklocNet(ModelConfig(backbone="test_resnet", classes=["a"], task="multi", counting="density", density_stage=9))


def test_density_head_reads_the_last_map_as_context():
    from weakloc.models import ModelConfig, WeaklocNet

    cfg = ModelConfig(backbone="test_resnet", classes=["a", "b"], task="multi", input_size=64, counting="density", density_stage=-2,
                      density_hidden=8, density_context=True)
    model = WeaklocNet(cfg, pretrained="none").eval()
    x = torch.randn(2, 3, 64, 64)
    out = model.forward_maps(x)
    assert torch.allclose(out.counts, out.density.sum((2, 3)))
    # the context path is live: the last map changes the density, and gradients reach its 1x1 conv
    with torch.no_grad():
        model.counting_head.context.weight.zero_()
    flat = model.forward_maps(x).density
    assert not torch.allclose(flat, out.density)
    model.train()
    model.forward_maps(x).counts.sum().backward()
    assert model.counting_head.context.weight.grad.abs().sum() > 0
    with pytest.raises(WeaklocError, match="hidden width"):
        WeaklocNet(ModelConfig(backbone="test_resnet", classes=["a"], task="multi", counting="density", density_stage=-2,
                               density_hidden=0, density_context=True), pretrained="none")


def _yolo(tmp_path, lines: dict[str, str]):
    from PIL import Image

    (tmp_path / "data.yaml").write_text("nc: 2\nnames: ['fish', 'shark']\n")
    for split, text in lines.items():
        (tmp_path / split / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / split / "labels").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (200, 100)).save(tmp_path / split / "images" / f"{split}_a.jpg")
        (tmp_path / split / "labels" / f"{split}_a.txt").write_text(text)
    return tmp_path


def test_yolo_reader_scales_boxes_and_accepts_empty_files(tmp_path):
    from weakloc.data.annotations import read_annotations

    gt = read_annotations(_yolo(tmp_path, {"train": "0 0.5 0.5 0.2 0.4\n1 0.25 0.25 0.1 0.1\n", "valid": ""}))
    assert gt.classes == ["fish", "shark"]
    a = gt.find("train/images/train_a.jpg")
    assert (a.width, a.height) == (200, 100) and a.labels == ["fish", "shark"]
    assert torch.allclose(a.boxes, torch.tensor([[80.0, 30.0, 120.0, 70.0], [40.0, 20.0, 60.0, 30.0]]))
    assert len(gt.find("valid_a.jpg").boxes) == 0


@pytest.mark.parametrize("line, message", [("0 0.5 0.5 0.2\n", "expected 'class cx cy w h'"), ("7 0.5 0.5 0.2 0.2\n", "class in 0..1"),
                                           ("a b c d e\n", "expected 'class cx cy w h'")])
def test_yolo_reader_names_the_bad_line(tmp_path, line, message):
    from weakloc.data.annotations import read_yolo

    with pytest.raises(AnnotationError, match=rf"train_a.txt:2: .*{message}"):
        read_yolo(_yolo(tmp_path, {"train": "0 0.5 0.5 0.2 0.2\n" + line}))


def test_separate_box_network_learns_beside_a_frozen_teacher(synth_single, tmp_path):
    from weakloc.models import load_model

    kw = dict(pretrained="none", epochs=2, freeze_epochs=1, batch_size=8, progress=False, workers=0, limit_batches=2)
    first = fine_tune(synth_single, tmp_path / "first", backbone="test_resnet", input_size=64, output_stride=8, **kw)
    from weakloc.models.checkpoint import save_model

    first.model.config.maps.threshold = 0.37  # as `weakloc calibrate` would store it
    calibrated = save_model(first.model, tmp_path / "first-calibrated")
    # the classifier's own settings come from the teacher, whatever the call says
    second = fine_tune(synth_single, tmp_path / "second", teacher=calibrated, box_backbone="test_resnet", backbone="resnet18",
                       input_size=96, **kw)
    net, teacher = second.model, first.model
    assert net.config.maps.threshold == 0.37  # and so do its calibrated map settings
    assert net.config.box_backbone == "test_resnet" and net.config.backbone == "test_resnet" and net.config.input_size == 64
    trained, frozen = dict(net.state_dict()), dict(teacher.state_dict())
    for key, value in frozen.items():  # weights and BatchNorm statistics: the teacher's, untouched by training
        assert torch.equal(trained[key], value), key
    from weakloc.models import WeaklocNet

    start = WeaklocNet(net.config)  # an untrained box network: training moved the box network's weights
    assert not torch.equal(start.box_head.conv.weight, net.box_head.conv.weight)
    # validation scores the frozen classifier, the same every epoch, so the first epoch stays "best";
    # the model kept is the last one, whose box backbone trained after the frozen first epoch
    first_epoch = torch.load(tmp_path / "second" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert first_epoch["epoch"] == 0 and second.metrics["best_epoch"] == 1
    key = next(k for k in first_epoch["state_dict"] if k.startswith("model.box_backbone.") and k.endswith("weight"))
    assert not torch.equal(first_epoch["state_dict"][key], net.state_dict()[key[len("model."):]])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), teacher(x))  # the classifier answers as the teacher does
        box = net.forward_maps(x, with_box=True).box
    assert box.shape == (2, 4)
    reloaded = load_model(second.model_dir)
    assert reloaded.config.box_backbone == "test_resnet"
    with torch.no_grad():
        assert torch.allclose(reloaded.forward_maps(x, with_box=True).box, box)
    maps = explain(reloaded, x, "box", target="all")
    assert maps.raw.shape == (2, 3, 64, 64)
    # a self-training round: the student's own boxes teach the next box network, started from its weights
    third = fine_tune(synth_single, tmp_path / "third", teacher=second.model_dir, teacher_method="box", box_backbone="test_resnet",
                      **kw)
    assert third.model.config.train.teacher_method == "box"
    with torch.no_grad():
        assert torch.allclose(third.model(x), teacher(x))
    # another box network than the teacher's starts afresh (its weights would not fit)
    fourth = fine_tune(synth_single, tmp_path / "fourth", teacher=third.model_dir, box_backbone="test_nfnet", **kw)
    assert fourth.model.config.box_backbone == "test_nfnet"
    with torch.no_grad():
        assert fourth.model.forward_maps(x).box is None  # the box network runs only when asked
        assert fourth.model.forward_maps(x, with_box=True).box.shape == (2, 4)


def test_resuming_with_another_teacher_of_the_same_architecture_is_refused(synth_single, tmp_path):
    from weakloc.errors import CheckpointError

    kw = dict(backbone="test_resnet", pretrained="none", input_size=64, freeze_epochs=0, batch_size=8, progress=False, workers=0,
              limit_batches=1)
    first = fine_tune(synth_single, tmp_path / "first", epochs=1, **kw)
    other = fine_tune(synth_single, tmp_path / "other", epochs=1, seed=1, **kw)
    fine_tune(synth_single, tmp_path / "second", teacher=first.model_dir, epochs=1, **kw)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*last\.ckpt: it was trained from another teacher"):
        fine_tune(synth_single, tmp_path / "second", teacher=other.model_dir, epochs=2, resume=True, **kw)
    resumed = fine_tune(synth_single, tmp_path / "second", teacher=first.model_dir, epochs=2, resume=True, **kw)
    assert [h["epoch"] for h in resumed.history] == [0, 1]


def test_separate_box_network_needs_a_teacher(synth_single, tmp_path):
    from weakloc.errors import OptionError

    with pytest.raises(OptionError, match="box.backbone.*--teacher, teacher="):
        fine_tune(synth_single, tmp_path / "x", box_backbone="test_resnet", pretrained="none", epochs=1, progress=False)
    from weakloc.models import ModelConfig, WeaklocNet

    first = fine_tune(synth_single, tmp_path / "first", backbone="test_resnet", pretrained="none", input_size=64, epochs=1,
                      freeze_epochs=0, batch_size=8, progress=False, workers=0, limit_batches=1)
    from dataclasses import replace

    from weakloc.data.labels import load_labels

    multi = replace(load_labels(synth_single), task="multi")
    with pytest.raises(WeaklocError, match="teacher's task 'single' differs from the data's 'multi'"):
        fine_tune(multi, tmp_path / "x2", teacher=first.model_dir, box_backbone="test_resnet", pretrained="none", epochs=1,
                  progress=False)
    with pytest.raises(WeaklocError, match="needs box_head"):
        WeaklocNet(ModelConfig(backbone="test_resnet", classes=["a", "b"], box_backbone="test_resnet"))


def test_box_maps_run_at_the_training_size_unrefined_unless_asked():
    """The box regressor learnt its sides at the training size: a stored 2x test size (the classifier's
    maps') would feed it an upsampled-then-downsampled, blurred image, and the stored guided filter
    would blur its 0/1 rectangle -- for its own maps and for the next round's targets alike."""
    from types import SimpleNamespace

    from weakloc.config import MapConfig, ModelConfig, resolve_maps
    from weakloc.train.pseudo import teacher_size_and_refine

    cfg = ModelConfig(backbone="test_resnet", classes=["a", "b"], input_size=64, box_head=True,
                      maps=MapConfig(method="cam", test_size=128, refine="guided"))
    cam, box = resolve_maps(cfg), resolve_maps(cfg, method="box")
    assert (cam.test_size, cam.refine) == (128, "guided") and (box.test_size, box.refine) == (64, "none")
    asked = resolve_maps(cfg, method="box", test_size=96, refine="guided:0.05")
    assert (asked.test_size, asked.refine) == (96, "guided:0.05")  # what the caller asks for wins
    assert cfg.inference_size() == 128 and cfg.inference_size("box") == 64
    teacher = SimpleNamespace(config=cfg)
    assert teacher_size_and_refine(teacher, "box") == (64, "none")
    assert teacher_size_and_refine(teacher, "cam") == (128, "guided")
