"""Transforms, postprocess and the batch runner: pure functions, checked against torchvision itself."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models import detection
from torchvision.transforms import v2

from servekit.config import parse_handler_config
from servekit.errors import BadInput, error_body
from servekit.postprocess import detections_to_json, label_of, topk_to_json
from servekit.service import run_batch
from servekit.transforms import (
    classifier_batch,
    classifier_crop,
    detector_padded_shape,
    group_by_key,
)

CONFIG = parse_handler_config({"task": "classification", "model": {"architecture": "resnet18"}})


def test_classifier_batch_matches_torchvision_preset() -> None:
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((300, 451), (512, 512), (240, 320))]
    preset = v2.Compose(
        [
            v2.Resize(256, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CONFIG.mean, CONFIG.std),
        ]
    )
    ours = classifier_batch([classifier_crop(img, CONFIG) for img in images], CONFIG)
    theirs = torch.stack([preset(img) for img in images])
    assert ours.shape == (3, 3, 224, 224)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_topk_is_ordered_softmax_with_labels() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    answer = topk_to_json(logits, ["a", "b", "c"], k=5)
    assert [item["label"] for item in answer[0]] == ["b", "c", "a"]
    assert math.isclose(sum(item["score"] for item in answer[0]), 1.0, rel_tol=1e-6)
    assert answer[1][0] == {"label": "a", "index": 0, "score": pytest.approx(torch.softmax(logits[1], 0)[0].item())}
    assert label_of(["a"], 7) == "7"


def test_detections_threshold_order_limit_and_clip() -> None:
    output = {
        "boxes": torch.tensor([[-5.0, 2.0, 50.0, 60.0], [1.0, 1.0, 9.0, 9.0], [0.0, 0.0, 99.0, 99.0]]),
        "scores": torch.tensor([0.6, 0.2, 0.9]),
        "labels": torch.tensor([1, 2, 3]),
    }
    answer = detections_to_json(output, ["bg", "cat", "dog", "car"], (40, 80), score_threshold=0.5, max_detections=5)
    assert [d["label"] for d in answer] == ["car", "cat"]
    assert answer[0]["box"] == [0.0, 0.0, 40.0, 80.0] and answer[1]["box"] == [0.0, 2.0, 40.0, 60.0]
    assert len(detections_to_json(output, [], (40, 80), 0.0, 1)) == 1


@pytest.mark.parametrize("size", [(512, 512), (300, 451), (480, 640), (240, 320), (1000, 30), (17, 900)])
def test_padded_shape_matches_torchvision_transform(size: tuple[int, int]) -> None:
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3)
    transform = model.eval().transform
    images = transform([torch.rand(3, *size)])[0]
    expected = tuple(images.tensors.shape[-2:])
    assert (
        detector_padded_shape(*size, transform.min_size[-1], transform.max_size, transform.size_divisible) == expected
    )


def test_group_by_key_keeps_first_appearance_order() -> None:
    assert group_by_key(["a", "b", "a", "c", "b"]) == [[0, 2], [1, 4], [3]]


def test_run_batch_fails_only_the_bad_rows() -> None:
    def prepare(row: int) -> int:
        if row < 0:
            raise BadInput(f"negative: {row}")
        return row

    seen: list[list[int]] = []

    def infer(items: list[int]) -> list[int]:
        seen.append(items)
        return [i * 10 for i in items]

    outcome = run_batch([1, -1, 2, -2], prepare, infer, lambda raw, items: raw)
    assert seen == [[1, 2]]
    assert outcome.answers[0] == 10 and outcome.answers[2] == 20
    assert error_body(outcome.answers[1]) == {"error": "negative: -1", "code": 400}
    assert outcome.good == 2


def test_run_batch_prepares_in_parallel_and_keeps_each_rows_error() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    names: set[str] = set()
    barrier = threading.Barrier(2, timeout=10)  # two rows prepared at once, or this times out

    def prepare(row: int) -> int:
        names.add(threading.current_thread().name)
        if row in (1, 2):
            barrier.wait()
        if row < 0:
            raise BadInput(f"negative: {row}")
        if row == 99:
            raise ZeroDivisionError("unexpected")
        return row

    with ThreadPoolExecutor(2, thread_name_prefix="decode") as pool:
        outcome = run_batch([1, 2, -3, 99, 4], prepare, lambda items: items, lambda raw, items: raw, pool)
    assert outcome.answers[:2] == [1, 2] and outcome.answers[4] == 4
    assert error_body(outcome.answers[2]) == {"error": "negative: -3", "code": 400}
    assert error_body(outcome.answers[3])["code"] == 500
    assert all(name.startswith("decode") for name in names)


def test_run_batch_model_failure_is_a_500_without_internals() -> None:
    def infer(items: list[int]) -> list[int]:
        raise RuntimeError("CUDA kernel exploded at 0xdeadbeef")

    outcome = run_batch([1, 2], lambda r: r, infer, lambda raw, items: raw)
    bodies = [error_body(a) for a in outcome.answers]
    assert all(b["code"] == 500 and "0xdeadbeef" not in b["error"] for b in bodies)


def test_run_batch_all_bad_never_calls_the_model() -> None:
    def prepare(row: int) -> int:
        raise BadInput("bad")

    outcome = run_batch([1, 2], prepare, lambda items: pytest.fail("model called"), lambda raw, items: raw)
    assert outcome.good == 0


def test_masks_become_coco_rle_and_keypoints_triples() -> None:
    import numpy as np
    from pycocotools import mask as coco_mask

    masks = torch.zeros(2, 1, 6, 8)
    masks[0, 0, 1:4, 2:5] = 0.9
    masks[1, 0, 0, 0] = 0.4  # below the 0.5 mask threshold: an empty mask
    output = {
        "boxes": torch.tensor([[2.0, 1.0, 5.0, 4.0], [0.0, 0.0, 1.0, 1.0]]),
        "labels": torch.tensor([1, 1]),
        "scores": torch.tensor([0.9, 0.8]),
        "masks": masks,
        "keypoints": torch.tensor([[[2.5, 1.5, 1.0]], [[0.2, 0.3, 1.0]]]),
        "keypoints_scores": torch.tensor([[3.25], [0.5]]),
    }
    items = detections_to_json(output, ["bg", "thing"], (8, 6), 0.5, 10)
    assert [i["label"] for i in items] == ["thing", "thing"]
    first = items[0]["mask"]
    assert first["size"] == [6, 8] and isinstance(first["counts"], str)
    decoded = coco_mask.decode({"size": first["size"], "counts": first["counts"].encode("ascii")})
    assert np.array_equal(decoded.astype(bool), (masks[0, 0] >= 0.5).numpy())
    assert coco_mask.decode({"size": [6, 8], "counts": items[1]["mask"]["counts"].encode()}).sum() == 0
    assert items[0]["keypoints"] == [[2.5, 1.5, 3.25]]
