"""The WSOL metrics against the reference vectors of wsol-protocol.md and hand-checked cases."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weakloc.evaluate.boxes import box_iou_inclusive, boxes_at_thresholds, contour_boxes
from weakloc.evaluate.wsol import (
    BoxSweep, PxAPAccumulator, box_accuracy_curves, box_sweep, gt_known_loc, pxap, threshold_list, wsol_box_metrics,
)
from weakloc.explain.maps import centre_gaussian, normalize_minmax

TAUS = [0, 0.2, 0.4, 0.6, 0.8]
UNIMODAL = [[0, 0, 0, 0, 0], [0, .4, .4, .4, .6], [0, .4, 1, .8, .6], [0, .4, .4, .4, .6]]
MULTIMODAL = [[.4, 0, .2, .2, .2], [.4, .4, 0, .4, 0], [0, 0, 0, .4, 0], [1, .6, .8, .2, .2]]


def test_iou_reference_vector():
    iou = box_iou_inclusive(torch.tensor([[1, 2, 5, 6]]), torch.tensor([[3, 1, 4, 5]]))
    assert iou.item() == pytest.approx(8 / 27)


def test_iou_disjoint_identical_and_degenerate():
    a = torch.tensor([[0, 0, 3, 3], [10, 10, 12, 12], [5, 5, 5, 5]])
    b = torch.tensor([[0, 0, 3, 3], [5, 5, 5, 5]])
    iou = box_iou_inclusive(a, b)
    assert iou[0, 0] == 1 and iou[1, 0] == 0 and iou[2, 1] == 1  # a one-pixel box has area 1
    assert iou[0, 1] == 0


@pytest.mark.parametrize("score_map, expected", [
    (UNIMODAL, [[1, 1, 4, 3], [1, 1, 4, 3], [2, 1, 4, 3], [2, 2, 4, 3], [2, 2, 3, 3]]),
    (MULTIMODAL, [[0, 0, 4, 3], [0, 0, 2, 2], [0, 3, 3, 3], [2, 3, 3, 3], [0, 3, 1, 3]]),
])
def test_largest_contour_box_reference_vectors(score_map, expected):
    boxes = boxes_at_thresholds(torch.tensor(score_map, dtype=torch.float32), TAUS)
    assert [b[0].tolist() for b in boxes] == expected


@pytest.mark.parametrize("score_map, expected", [
    (UNIMODAL, [[1, 1, 4, 3], [1, 1, 4, 3], [2, 1, 4, 3], [2, 2, 4, 3], [2, 2, 3, 3]]),
    (MULTIMODAL, [[0, 0, 4, 3], [0, 0, 2, 2], [0, 3, 3, 3], [2, 3, 3, 3], [0, 3, 1, 3]]),
])
def test_vectorised_sweep_matches_reference_boxes(score_map, expected):
    """The batched sweep's V1 IoU equals the IoU of the reference's box at every threshold."""
    m = torch.tensor(score_map, dtype=torch.float32)
    gt = torch.tensor([[1, 0, 3, 2]])
    sweep = box_sweep(m[None], [gt], torch.tensor(TAUS, dtype=torch.float64))
    want = box_iou_inclusive(torch.tensor(expected), gt)[:, 0]
    assert torch.allclose(sweep.best_iou_largest[0], want)


def test_all_zero_map_gives_zero_box_and_nan_is_error():
    boxes = boxes_at_thresholds(torch.zeros(3, 3), TAUS)
    assert all(b.tolist() == [[0, 0, 0, 0]] for b in boxes)
    with pytest.raises(ValueError):
        boxes_at_thresholds(torch.full((3, 3), float("nan")), TAUS)
    with pytest.raises(ValueError):
        box_sweep(torch.full((1, 3, 3), float("nan")), [torch.tensor([[0, 0, 1, 1]])], torch.tensor([0.5]))


def test_contour_areas_equal_opencv():
    import cv2
    rng = np.random.default_rng(0)
    binary = (rng.random((40, 50)) > 0.6).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    boxes, areas = contour_boxes(binary)
    assert np.allclose(areas, [cv2.contourArea(c) for c in contours])
    rects = np.array([cv2.boundingRect(c) for c in contours])
    assert np.array_equal(boxes[:, 0], rects[:, 0])
    assert np.array_equal(boxes[:, 2], np.minimum(rects[:, 0] + rects[:, 2], 49))


def test_sweep_matches_plain_loop_on_random_maps():
    """The vectorised sweep (V1 and V2) equals a per-threshold loop over OpenCV boxes."""
    g = torch.Generator().manual_seed(0)
    maps = normalize_minmax(torch.nn.functional.interpolate(torch.rand(6, 1, 6, 6, generator=g), size=(32, 32), mode="bicubic")[:, 0])
    gts = [torch.tensor([[2, 3, 20, 25], [15, 10, 30, 30]]), torch.tensor([[0, 0, 31, 31]]), torch.tensor([[5, 5, 9, 9]])] * 2
    taus = threshold_list(0.05)
    sweep = box_sweep(maps, gts, taus)
    for i in range(6):
        for multi, table in ((False, sweep.best_iou_largest), (True, sweep.best_iou_all)):
            per_tau = boxes_at_thresholds(maps[i], taus.tolist(), multi_contour=multi)
            want = torch.stack([box_iou_inclusive(torch.from_numpy(b), gts[i]).max() for b in per_tau])
            assert torch.allclose(table[i], want), (i, multi)


def test_maxboxaccv2_takes_best_tau_per_delta_and_not_any_tau():
    """Two images whose good thresholds differ: counting 'any tau' would give 100, the protocol 50."""
    best_iou = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64)
    from weakloc.evaluate.wsol import BoxSweep
    sweep = BoxSweep(torch.tensor([0.1, 0.5], dtype=torch.float64), best_iou, best_iou)
    m = wsol_box_metrics(sweep)
    assert m["MaxBoxAccV2"] == pytest.approx(50.0)
    assert m["IoU30"] == m["IoU50"] == m["IoU70"] == pytest.approx(50.0)
    assert m["MaxBoxAcc"] == pytest.approx(50.0)


def test_maxboxaccv2_hand_example():
    # IoU per image at the two thresholds; deltas 30/50/70
    best = torch.tensor([[0.35, 0.60], [0.55, 0.75], [0.20, 0.72]], dtype=torch.float64)
    curves = box_accuracy_curves(best)
    assert torch.allclose(curves, torch.tensor([[200 / 3, 100.0], [100 / 3, 100.0], [0.0, 200 / 3]], dtype=torch.float64))
    from weakloc.evaluate.wsol import BoxSweep
    m = wsol_box_metrics(BoxSweep(torch.tensor([0.2, 0.4], dtype=torch.float64), best, best))
    assert m["MaxBoxAccV2"] == pytest.approx((100 + 100 + 200 / 3) / 3)
    assert m["IoU70_tau"] == pytest.approx(0.4)


def test_perfect_box_map_scores_100_and_centre_baseline_fails_off_centre():
    maps = torch.zeros(2, 64, 64)
    maps[0, 10:20, 5:30] = 1.0
    maps[1, 40:60, 40:60] = 1.0
    gts = [torch.tensor([[5, 10, 29, 19]]), torch.tensor([[40, 40, 59, 59]])]
    m = wsol_box_metrics(box_sweep(maps, gts, threshold_list(0.01)))
    assert m["MaxBoxAccV2"] == pytest.approx(100.0)
    centre = centre_gaussian((64, 64)).expand(2, 64, 64)
    mc = wsol_box_metrics(box_sweep(centre, gts, threshold_list(0.01)))
    assert mc["IoU70"] == 0.0


def test_typed_box_metrics_keep_the_protocols_names():
    best = torch.tensor([[0.35, 0.60], [0.55, 0.75], [0.20, 0.72]], dtype=torch.float64)
    m = wsol_box_metrics(BoxSweep(torch.tensor([0.2, 0.4], dtype=torch.float64), best, best), pxap=12.5)
    assert list(m.to_dict()) == ["MaxBoxAcc", "MaxBoxAcc_tau", "MaxBoxAccV2", "IoU30", "IoU30_tau", "IoU50", "IoU50_tau",
                                 "IoU70", "IoU70_tau", "PxAP"]
    assert (m.iou30, m.iou50, m.iou70) == pytest.approx((100.0, 100.0, 200 / 3))
    assert (m.iou30_tau, m.iou50_tau, m.iou70_tau) == pytest.approx((0.4, 0.4, 0.4))
    assert m["MaxBoxAccV2"] == m.max_box_acc_v2 and m["PxAP"] == m.pxap == 12.5
    assert "PxAP" not in wsol_box_metrics(BoxSweep(torch.tensor([0.2, 0.4], dtype=torch.float64), best, best))
    top1 = gt_known_loc(torch.ones(1, 8, 8), [torch.tensor([[0, 0, 7, 7]])], 0.5)
    assert top1.to_dict() == {"GT-known Loc": 100.0, "GT-known_tau": 0.5} and top1.top1_loc is None


def test_gt_known_and_top1_loc():
    maps = torch.zeros(2, 16, 16)
    maps[:, 2:8, 2:8] = 1.0
    gts = [torch.tensor([[2, 2, 7, 7]]), torch.tensor([[10, 10, 15, 15]])]
    out = gt_known_loc(maps, gts, 0.2, correct_class=torch.tensor([False, True]))
    assert out["GT-known Loc"] == 50.0 and out["Top-1 Loc"] == 0.0


def test_pxap_perfect_random_and_hand_case():
    masks = torch.zeros(1, 10, 10, dtype=torch.uint8)
    masks[0, :5] = 1
    perfect = masks.float()
    assert pxap(perfect, masks, threshold_list(0.01)) == pytest.approx(100.0)
    # 2 fg pixels with scores .9 and .3; 2 bg pixels with .6 and .1; one ignored pixel
    maps = torch.tensor([[[0.9, 0.3, 0.6, 0.1, 0.95]]])
    m = torch.tensor([[[1, 1, 0, 0, 255]]], dtype=torch.uint8)
    # PR points by descending score: (.9: P1 R.5) (.6: P.5 R.5) (.3: P2/3 R1) (.1: P.5 R1) -> AP = .5*1 + .5*2/3
    assert pxap(maps, m, threshold_list(0.01)) == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))
    acc = PxAPAccumulator(threshold_list(0.01))
    acc.update(maps[:, :, :2], m[:, :, :2])
    acc.update(maps[:, :, 2:], m[:, :, 2:])
    assert acc.compute() == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_running_counts_equal_the_metrics_of_all_sweeps_at_once(sizes, seed):
    """evaluate scores a test set batch by batch in constant memory (issue 22): the counts over the
    batches give exactly what the concatenated per-map sweep gives."""
    from weakloc.evaluate.wsol import BoxAccuracyCounts, BoxSweep, box_accuracy_curves, threshold_list

    g = torch.Generator().manual_seed(seed)
    taus = threshold_list(0.05)
    parts = []
    for n in sizes:
        best_all = torch.rand(n, len(taus), generator=g, dtype=torch.float64)
        best_all[torch.rand(n, len(taus), generator=g) < 0.2] = 0.5  # exactly on a delta
        parts.append(BoxSweep(taus.double(), best_all * torch.rand(n, len(taus), generator=g, dtype=torch.float64), best_all))
    counts = BoxAccuracyCounts(taus)
    for p in parts:
        counts.update(p)
    whole = BoxSweep(taus.double(), torch.cat([p.best_iou_largest for p in parts]), torch.cat([p.best_iou_all for p in parts]))
    assert counts.n == sum(sizes)
    got = counts.metrics(0.25)
    curves = box_accuracy_curves(whole.best_iou_all)  # the per-map definition, over every map at once
    best, arg = curves.max(1)
    assert got.max_box_acc_v2 == float(best.mean()) and [got.iou30, got.iou50, got.iou70] == best.tolist()
    assert [got.iou30_tau, got.iou50_tau, got.iou70_tau] == [float(taus[a]) for a in arg.tolist()]
    v1 = box_accuracy_curves(whole.best_iou_largest, (50,))[0]
    assert got.max_box_acc == float(v1.max()) and got.max_box_acc_tau == float(taus[int(v1.argmax())]) and got.pxap == 0.25
