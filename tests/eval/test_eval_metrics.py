"""Task metrics of served answers (scripts/eval/eval_metrics.py) against references written apart from the kit:
scikit-learn for classification, pycocotools driven here for detection, the IoU's definition for segmentation."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from eval_metrics import (
    answer_label_map,
    classification_scores,
    coco_results,
    detection_scores,
    pixel_confusion,
    segmentation_scores,
)

LABELS = [f"c{i}" for i in range(7)]


def _topk(scores: np.ndarray, k: int) -> list[list[dict]]:
    order = np.argsort(-scores, axis=1)[:, :k]
    return [
        [{"label": LABELS[j], "index": int(j), "score": float(row[j])} for j in idx] for row, idx in zip(scores, order)
    ]


def test_classification_against_scikit_learn() -> None:
    from sklearn.metrics import confusion_matrix, recall_score, top_k_accuracy_score

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, 300)  # class 6 never in the data: answered, it lands in "other"
    scores = rng.random((300, 7)) + np.eye(7)[truth] * rng.random((300, 1)) * 1.2
    got = classification_scores(truth.tolist(), _topk(scores, 5), LABELS)
    assert got.metrics["top1"] == pytest.approx(top_k_accuracy_score(truth, scores, k=1, labels=range(7)))
    assert got.metrics["top5"] == pytest.approx(top_k_accuracy_score(truth, scores, k=5, labels=range(7)))
    recalls = recall_score(truth, scores.argmax(1), labels=range(6), average=None)
    assert list(got.per_class.values()) == pytest.approx(list(recalls))
    full = confusion_matrix(truth, scores.argmax(1), labels=range(7))
    expected = np.concatenate([full[:6, :6], full[:6, 6:].sum(1, keepdims=True)], axis=1)
    assert got.confusion == expected.tolist() and got.confusion_labels == [*LABELS[:6], "other"]


def test_topk_follows_what_the_archive_answers() -> None:
    got = classification_scores([0, 1], _topk(np.eye(7)[[0, 2]], 3), LABELS)
    assert set(got.metrics) == {"top1", "top3", "images", "mean_class_recall"}
    assert got.metrics["top1"] == 0.5


def _truth() -> dict:
    images = [{"id": i, "width": 100, "height": 80, "file_name": f"{i}.jpg"} for i in (3, 5, 9)]
    boxes = [(3, 1, [10, 10, 30, 20]), (3, 2, [50, 40, 20, 30]), (5, 1, [0, 0, 50, 50]), (9, 2, [60, 10, 30, 30])]
    annotations = [
        {"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for n, (i, c, b) in enumerate(boxes)
    ]
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def _reference_stats(truth: dict, results: list[dict], kind: str = "bbox") -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType=kind)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_detection_answers_scored_as_pycocotools_scores_them() -> None:
    truth = _truth()
    answers = [
        [{"label": "a", "score": 0.9, "box": [11, 10, 41, 31]}, {"label": "b", "score": 0.6, "box": [50, 42, 70, 70]},
         {"label": "zebra", "score": 0.99, "box": [0, 0, 5, 5]}],
        [{"label": "a", "score": 0.8, "box": [2, 0, 50, 52]}, {"label": "b", "score": 0.3, "box": [0, 0, 50, 50]}],
        [],
    ]  # fmt: skip
    results = coco_results([3, 5, 9], answers, ["a", "b", "zebra"], {1: "a", 2: "b"})
    assert len(results) == 4  # zebra is no category of the truth
    reference = [
        {"image_id": r["image_id"], "category_id": r["category_id"], "bbox": r["bbox"], "score": r["score"]}
        for r in results
    ]
    got = detection_scores(truth, results, [3, 5, 9])
    assert [got.metrics[k] for k in ("AP", "AP50", "AP75")] == pytest.approx(_reference_stats(truth, reference)[:3])
    assert results[0]["bbox"] == [11.0, 10.0, 30.0, 21.0]
    assert set(got.per_class) == {"a", "b"}


def test_mask_answers_give_mask_ap() -> None:
    truth = _truth()
    square = np.zeros((80, 100), np.uint8, order="F")
    square[10:30, 10:40] = 1
    rle = coco_mask.encode(square)
    truth["annotations"] = [
        {**truth["annotations"][0], "segmentation": {"size": [80, 100], "counts": rle["counts"].decode()}}
    ]
    truth["images"] = truth["images"][:1]
    answer = [
        {
            "label": "a",
            "score": 0.9,
            "box": [10, 10, 40, 30],
            "mask": {"size": [80, 100], "counts": rle["counts"].decode()},
        }
    ]
    got = detection_scores(truth, coco_results([3], [answer], ["a", "b"], {1: "a", 2: "b"}), [3])
    assert got.metrics["mask_AP"] == pytest.approx(1.0) and got.metrics["AP"] == pytest.approx(1.0)


def test_segmentation_iou_from_its_definition() -> None:
    rng = np.random.default_rng(1)
    truths = [rng.integers(0, 4, (20, 30)) for _ in range(3)]
    truths[0][:2] = 255  # ignored
    founds = [np.where(rng.random(t.shape) < 0.8, t, rng.integers(0, 4, t.shape)) for t in truths]
    founds[1][0, :5] = -1  # claimed by no class
    confusion = sum(pixel_confusion(t, f, 4, 255) for t, f in zip(truths, founds))
    got = segmentation_scores(confusion, ["bg", "x", "y", "z"])
    keep = [t != 255 for t in truths]
    ious = []
    for c in range(4):
        inter = sum(((t == c) & (f == c) & k).sum() for t, f, k in zip(truths, founds, keep))
        union = sum((((t == c) | (f == c)) & k).sum() for t, f, k in zip(truths, founds, keep))
        ious.append(inter / union)
    assert list(got.per_class.values()) == pytest.approx(ious)
    assert got.metrics["mIoU"] == pytest.approx(np.mean(ious))
    correct = sum(((t == f) & k).sum() for t, f, k in zip(truths, founds, keep))
    assert got.metrics["pixel_accuracy"] == pytest.approx(correct / sum(k.sum() for k in keep))


def test_answer_label_maps_from_rle_and_png() -> None:
    import base64

    from PIL import Image

    labels = np.array([[0, 0, 1], [2, 1, 1]], dtype=np.uint8)
    classes = []
    for index in (1, 2):
        rle = coco_mask.encode(np.asfortranarray((labels == index).astype(np.uint8)))
        classes.append(
            {"label": str(index), "index": index, "mask": {"size": [2, 3], "counts": rle["counts"].decode()}}
        )
    expected = np.where(labels == 0, -1, labels)  # background left out of the answer: claimed by no class
    assert (answer_label_map({"size": [2, 3], "classes": classes}) == expected).all()
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG")
    png = {"size": [2, 3], "classes": [], "png": base64.b64encode(buffer.getvalue()).decode()}
    assert (answer_label_map(png) == labels).all()
