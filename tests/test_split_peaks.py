"""``keep="peaks"``: regions split at the map's peaks (touching objects), in localize and evaluate."""

import numpy as np
import pytest
import torch

from weakloc.evaluate.matching import region_instances
from weakloc.localize.regions import binarize, region_boxes, split_at_peaks


def _bumps(centres, size=(24, 40), sigma=3.0):
    """Sum of Gaussian bumps ``(H, W)``, peak 1 each."""
    y, x = torch.meshgrid(torch.arange(size[0], dtype=torch.float32), torch.arange(size[1], dtype=torch.float32), indexing="ij")
    return sum(torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2)) for cx, cy in centres)


def test_two_touching_bumps_are_one_region_but_two_peaks():
    heat = _bumps([(12, 12), (24, 12)], sigma=4.0)
    heat = heat / heat.max()
    mask = binarize(heat[None], torch.tensor([0.3]))
    whole = region_boxes(mask, heat[None], keep="all")[0]
    assert len(whole.boxes) == 1  # the two objects touch above the threshold
    split = region_boxes(mask, heat[None], keep="peaks")[0]
    assert len(split.boxes) == 2
    left, right = sorted(split.boxes.tolist())
    # the watershed line falls at the saddle between the bumps (x = 18)
    assert left[2] <= 18 <= right[0] + 1 and left[0] == whole.boxes[0, 0] and right[2] == whole.boxes[0, 2]
    assert left[1] == right[1] == whole.boxes[0, 1].item()


def test_a_shallow_dip_does_not_split():
    heat = _bumps([(16, 12), (22, 12)], sigma=4.0)  # the dip between them is far below the prominence
    heat = heat / heat.max()
    labels = split_at_peaks(binarize(heat[None], torch.tensor([0.3]))[0].numpy().astype(np.uint8), heat.numpy(), 0.1)
    assert labels.max() == 1
    assert len(split_at_peaks(np.zeros((5, 5), np.uint8), np.zeros((5, 5), np.float32))) == 5  # no foreground: all zero labels


def test_every_foreground_pixel_keeps_a_label_and_separate_regions_stay_separate():
    heat = _bumps([(8, 8), (30, 16)], sigma=2.0)
    heat[0, 0] = 0.5  # a plateau pixel region with no peak of that dynamic: kept whole
    heat = heat / heat.max()
    mask = (heat > 0.3).numpy().astype(np.uint8)
    labels = split_at_peaks(mask, heat.numpy(), 0.1)
    assert ((labels > 0) == (mask > 0)).all()
    assert len(np.unique(labels[labels > 0])) == 3


def test_peaks_finds_both_objects_where_a_region_scores_one_miss():
    heat = _bumps([(12, 12), (24, 12)], sigma=4.0)
    heat = (heat / heat.max())[None]
    gt = [torch.tensor([[7, 7, 17, 17], [19, 7, 29, 17]])]
    assert region_instances(heat, gt, 0.3, keep="all") == [(0, 1, 2)]
    assert region_instances(heat, gt, 0.3, keep="peaks") == [(2, 0, 0)]


@pytest.mark.parametrize("keep", ["peaks", "largest", "all"])
def test_keep_choices_on_an_empty_map(keep):
    dets = region_boxes(torch.zeros(2, 6, 6, dtype=torch.bool), torch.zeros(2, 6, 6), keep=keep)
    assert [d.boxes.shape for d in dets] == [(0, 4), (0, 4)]


def test_unknown_keep_names_the_choices():
    from weakloc.errors import OptionError

    with pytest.raises(OptionError, match="keep.*peaks"):
        region_boxes(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4), keep="split")
