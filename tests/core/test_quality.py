"""Model-quality samples in process: what each answer and image adds, with bounded label sets."""

from __future__ import annotations

import numpy as np
import torch

import demo_models
from servekit.config import ImageLimits
from servekit.decode import decode_image
from servekit.errors import BadInput, PayloadTooLarge
from servekit.quality import (
    CLASS_SLOTS,
    COUNTER,
    HISTOGRAM,
    ClassSlots,
    aspect_bin,
    image_stats,
    observing,
    quality_metrics,
)


def test_class_labels_stay_bounded() -> None:
    slots = ClassSlots()
    named = [slots.label(f"class {i}") for i in range(CLASS_SLOTS + 30)]
    assert len(set(named)) == CLASS_SLOTS + 1 and named[-1] == "other"
    assert slots.label("class 3") == "class 3"  # a class named once keeps its name


def test_images_are_observed_only_while_observing() -> None:
    photo = demo_models.encode(np.full((600, 800, 3), 255, np.uint8), "JPEG", quality=95)
    decode_image(photo, ImageLimits())  # nothing collects outside a block
    with observing() as seen:
        decode_image(photo, ImageLimits(), min_side=200)
    assert len(seen) == 1
    stats = seen[0]
    assert stats.pixels == 480_000 and abs(stats.aspect - 4 / 3) < 1e-9 and stats.brightness > 0.99
    assert stats.scale == 2  # 1/2 keeps both sides >= min_side (300 >= 200); 1/4 would not
    assert image_stats(torch.zeros(3, 10, 40, dtype=torch.uint8), 40, 10).brightness == 0.0
    assert [aspect_bin(a) for a in (0.3, 0.75, 1.0, 1.5, 3.0)] == ["tall", "portrait", "square", "landscape", "wide"]


def test_one_batch_of_every_answer_kind() -> None:
    top_k = [{"label": "tabby", "index": 281, "score": 0.75}, {"label": "tiger cat", "index": 282, "score": 0.2}]
    detections = [{"label": "dog", "index": 18, "score": 0.9, "box": [0, 0, 1, 1]}] * 3
    segmentation = {"size": [2, 2], "classes": [{"label": "background", "area": 0.7}, {"label": "cat", "area": 0.3}]}
    answers = [top_k, top_k, detections, [], segmentation, BadInput("x"), PayloadTooLarge("y"), RuntimeError("z")]
    stats = image_stats(torch.full((3, 30, 40), 128, dtype=torch.uint8), 40, 30)
    samples = quality_metrics(answers, [stats, None], ClassSlots(), seconds=0.25)
    counters = {(s.name, s.labels): s.value for s in samples if s.kind == COUNTER}
    histograms: dict[str, list[float]] = {}
    for s in samples:
        if s.kind == HISTOGRAM:
            histograms.setdefault(s.name, []).append(s.value)
    assert counters[("ServekitAnswers", (("Class", "tabby"),))] == 2
    assert counters[("ServekitAnswers", (("Class", "dog"),))] == 3
    assert counters[("ServekitBadInputs", (("ErrorClass", "BadInput"),))] == 1
    assert counters[("ServekitBadInputs", (("ErrorClass", "PayloadTooLarge"),))] == 1
    assert counters[("ServekitBadInputs", (("ErrorClass", "InternalError"),))] == 1
    assert counters[("ServekitImageAspect", (("Aspect", "landscape"),))] == 1
    assert counters[("ServekitDecodeScale", (("Scale", "1"),))] == 1
    assert histograms["ServekitTop1Confidence"] == [0.75, 0.75, 0.9]
    assert histograms["ServekitDetectionsPerImage"] == [3, 0]
    assert histograms["ServekitSegmentedArea"] == [0.3]  # background is not segmented area
    assert histograms["ServekitRequestSeconds"] == [0.25] * len(answers)
    assert abs(histograms["ServekitImageBrightness"][0] - 128 / 255) < 1e-3
    assert not any(s.name == "ServekitRequestSeconds" for s in quality_metrics([top_k], [], ClassSlots()))
