"""Raw-output (YOLO-style) detectors: letterbox geometry, layouts, NMS against a reference from its definition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import greedy_nms
from servekit.errors import ConfigError
from servekit.yolo import (
    YoloSettings,
    infer_layout,
    letterbox,
    letterbox_geometry,
    suppress,
    unletterbox,
)


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(1, 4000),
    height=st.integers(1, 4000),
    size=st.sampled_from([320, 640]),
    corners=st.tuples(*[st.floats(0, 1)] * 4),
)
def test_boxes_map_back_through_the_letterbox(
    width: int, height: int, size: int, corners: tuple[float, float, float, float]
) -> None:
    """A box in the image, mapped into the letterbox as the model sees it, comes back within 1 px."""
    x1, x2 = sorted((corners[0] * width, corners[2] * width))
    y1, y2 = sorted((corners[1] * height, corners[3] * height))
    _, _, geometry = letterbox_geometry(width, height, size)
    seen = torch.tensor([[x1 * geometry.scale_x + geometry.left, y1 * geometry.scale_y + geometry.top,
                          x2 * geometry.scale_x + geometry.left, y2 * geometry.scale_y + geometry.top]])  # fmt: skip
    back = unletterbox(seen, geometry)[0]
    assert max(abs(float(a) - b) for a, b in zip(back, (x1, y1, x2, y2))) <= 1.0


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(80, 1600),
    height=st.integers(80, 1600),
    box=st.tuples(*[st.floats(0.05, 0.45)] * 2, *[st.floats(0.55, 0.95)] * 2),
)
def test_a_drawn_box_comes_back_through_letterbox_and_an_identity_model(
    width: int, height: int, box: tuple[float, float, float, float]
) -> None:
    """Draw a white box, letterbox the image, find the box in the model's input, map it back."""
    x1, y1 = round(box[0] * width), round(box[1] * height)
    x2, y2 = round(box[2] * width), round(box[3] * height)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[:, y1:y2, x1:x2] = 255
    boxed, geometry = letterbox(image, 320)
    assert boxed.shape == (3, 320, 320)
    assert int(boxed[0, 0, 0]) == 114 or (geometry.left == 0 and geometry.top == 0)
    ys, xs = torch.nonzero(boxed[0] > 127 + 57, as_tuple=True)  # the identity "model": the bright pixels' extent
    found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    back = unletterbox(found, geometry)[0]
    tolerance = 1.0 + 1.0 / min(geometry.scale_x, geometry.scale_y)  # one input pixel, in the image's pixels
    assert max(abs(float(a) - b) for a, b in zip(back, (x1, y1, x2, y2))) <= tolerance


@pytest.mark.parametrize("seed", range(20))
def test_class_aware_nms_equals_the_greedy_reference(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(60, 2, generator=generator) * 200
    wh = torch.rand(60, 2, generator=generator) * 60 + 5
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(60, generator=generator)
    classes = torch.randint(0, 3, (60,), generator=generator)
    kept = suppress(boxes, scores, classes, YoloSettings("yolov8", 0.2, 0.45, 1000))
    candidates = torch.nonzero(scores >= 0.2).flatten()
    expected = greedy_nms(boxes[candidates], scores[candidates], classes[candidates], 0.45)
    assert kept.tolist() == [int(candidates[i]) for i in expected]
    agnostic = suppress(boxes, scores, classes, YoloSettings("yolov8", 0.2, 0.45, 1000, agnostic_nms=True))
    same = greedy_nms(boxes[candidates], scores[candidates], torch.zeros_like(classes[candidates]), 0.45)
    assert agnostic.tolist() == [int(candidates[i]) for i in same]
    assert len(suppress(boxes, scores, classes, YoloSettings("yolov8", 0.2, 0.45, 5))) == min(5, len(kept))


@pytest.mark.parametrize(
    ("shape", "classes", "layout"),
    [
        ((1, 84, 8400), None, "yolov8"),
        ((1, 25200, 85), None, "yolov5"),
        ((1, 300, 6), None, "end2end"),
        ((1, 300, 6), 3, "end2end"),
        ((1, 8400, 6), 1, "yolov5"),
        ((4, 7, 100), 3, "yolov8"),
    ],
)
def test_layout_from_the_output_shape(shape: tuple[int, ...], classes: int | None, layout: str) -> None:
    assert infer_layout(shape, classes) == layout


@pytest.mark.parametrize(("shape", "classes"), [((1, 10), None), ((1, 84, 8400), 3), ((2, 4, 4), None)])
def test_outputs_that_fit_no_layout_say_so(shape: tuple[int, ...], classes: int | None) -> None:
    with pytest.raises(ConfigError, match="set handler.layout|N x rows x columns"):
        infer_layout(shape, classes)
