"""Thresholds and regions."""

import pytest
import torch

from weakloc.errors import WeaklocError
from weakloc.localize import binarize, otsu_threshold, parse_threshold, percentile_threshold, region_boxes, thresholds_for


def test_otsu_splits_bimodal_maps():
    m = torch.zeros(2, 10, 10)
    m[0, :, 5:] = 0.8
    m[0, :, :5] = 0.1
    m[1] = torch.linspace(0, 1, 100).reshape(10, 10) ** 8
    t = otsu_threshold(m)
    assert 0.1 <= t[0] < 0.8
    assert t.shape == (2,)


def test_percentile_and_fixed():
    m = torch.linspace(0, 1, 100).reshape(1, 10, 10)
    assert percentile_threshold(m, 0.9).item() == pytest.approx(0.9, abs=0.01)
    assert parse_threshold("p90") == ("percentile", 0.9)
    assert parse_threshold("0.25") == ("fixed", 0.25)
    assert thresholds_for(m, "0.25").tolist() == [0.25]
    with pytest.raises(WeaklocError, match="no calibrated threshold"):
        thresholds_for(m, "calibrated")
    with pytest.raises(WeaklocError, match="threshold must be"):
        parse_threshold("high")


def test_region_boxes_largest_and_all():
    m = torch.zeros(1, 20, 20)
    m[0, 2:5, 3:9] = 1.0  # 18 px
    m[0, 10:18, 10:14] = 0.6  # 32 px
    dets = region_boxes(binarize(m, torch.tensor([0.5])), m, keep="all")
    assert dets[0].boxes.tolist() == [[10, 10, 13, 17], [3, 2, 8, 4]]
    assert dets[0].scores.tolist() == pytest.approx([0.6, 1.0])
    big = region_boxes(binarize(m, torch.tensor([0.5])), m, keep="largest")
    assert big[0].boxes.tolist() == [[10, 10, 13, 17]]
    none = region_boxes(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4))
    assert none[0].boxes.shape == (0, 4)


def test_min_area_zero_keeps_every_region_and_detections_hold_boxes_and_scores():
    m = torch.zeros(1, 8, 8)
    m[0, 0, 0] = 1.0  # a one-pixel region
    m[0, 4:7, 4:7] = 0.8
    masks = binarize(m, torch.tensor([0.5]))
    zero, one = region_boxes(masks, m, keep="all", min_area=0), region_boxes(masks, m, keep="all", min_area=1)
    assert zero[0].boxes.tolist() == one[0].boxes.tolist() == [[4, 4, 6, 6], [0, 0, 0, 0]]
    assert region_boxes(masks, m, keep="all", min_area=2)[0].boxes.tolist() == [[4, 4, 6, 6]]
    assert set(vars(zero[0])) == {"boxes", "scores"}


def test_check_threshold_names_the_option():
    from weakloc.errors import OptionError
    from weakloc.localize.threshold import check_threshold

    assert check_threshold("p90") == "p90" and check_threshold(0.4) == 0.4 and check_threshold("calibrated", 0.2) == "calibrated"
    with pytest.raises(OptionError, match="threshold: this model has no calibrated threshold; run `weakloc calibrate`"):
        check_threshold("calibrated")
    with pytest.raises(OptionError, match="threshold"):
        check_threshold(1.5)
