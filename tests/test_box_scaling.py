"""Box scaling between map and image sizes, in every direction: never inverted, never outside the
image, always covering the region it came from (property tests over random boxes and sizes)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.utils import draw_bounding_boxes

from weakloc.localize.regions import scale_boxes
from weakloc.report.overlay import draw_detections

sizes = st.integers(1, 64)
image_sides = st.one_of(st.integers(1, 64), st.integers(65, 20000))


@st.composite
def boxes_in_map(draw):
    h, w = draw(sizes), draw(sizes)
    n = draw(st.integers(0, 6))
    rows = []
    for _ in range(n):
        x0 = draw(st.integers(0, w - 1))
        y0 = draw(st.integers(0, h - 1))
        rows.append([x0, y0, draw(st.integers(x0, w - 1)), draw(st.integers(y0, h - 1))])
    return (h, w), torch.tensor(rows, dtype=torch.float32).view(-1, 4)


@settings(max_examples=400, deadline=None)
@given(boxes_in_map(), image_sides, image_sides)
def test_scaled_boxes_are_ordered_inside_and_cover_the_region(case, th, tw):
    (h, w), boxes = case
    out = scale_boxes(boxes, (h, w), (th, tw))
    assert out.shape == boxes.shape and out.dtype == torch.float32
    x0, y0, x1, y1 = out.unbind(1)
    assert (x0 <= x1).all() and (y0 <= y1).all()
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= tw - 1).all() and (y1 <= th - 1).all()
    assert torch.equal(out, out.round())  # whole pixels
    # the scaled box covers the continuous span of the source box ...
    sx, sy = tw / w, th / h
    assert (x0 <= boxes[:, 0] * sx + 1e-3).all() and (x1 + 1 >= (boxes[:, 2] + 1) * sx - 1e-3).all()
    assert (y0 <= boxes[:, 1] * sy + 1e-3).all() and (y1 + 1 >= (boxes[:, 3] + 1) * sy - 1e-3).all()
    # ... and by less than one target pixel on each side
    assert (x0 > boxes[:, 0] * sx - 1).all() and (x1 < (boxes[:, 2] + 1) * sx).all()
    assert (y0 > boxes[:, 1] * sy - 1).all() and (y1 < (boxes[:, 3] + 1) * sy).all()


@settings(max_examples=100, deadline=None)
@given(boxes_in_map(), st.integers(1, 300), st.integers(1, 300))
def test_every_scaled_box_can_be_drawn(case, th, tw):
    (h, w), boxes = case
    out = scale_boxes(boxes, (h, w), (th, tw))
    picture = draw_bounding_boxes(torch.zeros(3, th, tw, dtype=torch.uint8), out, width=1)  # raises on inverted boxes
    assert picture.shape == (3, th, tw)


@given(boxes_in_map())
def test_same_size_is_the_identity(case):
    (h, w), boxes = case
    assert torch.equal(scale_boxes(boxes, (h, w), (h, w)), boxes)


def test_the_reported_one_pixel_region_halved_is_not_inverted():
    assert scale_boxes(torch.tensor([[10.0, 10, 10, 10]]), (320, 320), (160, 160)).tolist() == [[5.0, 5.0, 5.0, 5.0]]


def test_a_very_wide_image_keeps_its_boxes_inside():
    out = scale_boxes(torch.tensor([[0.0, 0, 9, 9], [3, 4, 3, 4]]), (10, 10), (1, 512))
    assert out[:, 1].eq(0).all() and out[:, 3].eq(0).all() and (out[:, 2] <= 511).all()


def test_draw_detections_orders_and_clips_what_it_is_given():
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    drawn = draw_detections(image, torch.tensor([[5.0, 5, 4.5, 4.5], [-3, -3, 100, 100], [float("nan"), 0, 3, 3]]), ["a", "b", "c"])
    assert drawn.shape == image.shape and drawn.sum() > 0
