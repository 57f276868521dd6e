"""The shapes detector's evaluation and pictures: COCO mAP@0.5 of the kit's answers, boxes drawn.

Apart from ``shapes.py`` (scenes and training) so that changing how the model is measured never retrains it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shapes import CLASSES, HELD_OUT_COUNT, Scene, encode_jpeg, held_out


def coco_ground_truth(scenes: Sequence[Scene], scales: Sequence[float] | None = None) -> dict[str, Any]:
    """The scenes' shapes as a COCO ground-truth document (category ids 1..C); ``scales`` maps each
    scene to the size it was sent at (an upscaled copy), 1 by default."""
    images, annotations = [], []
    for i, scene in enumerate(scenes):
        scale = scales[i] if scales else 1.0
        height, width = scene.image.shape[:2]
        images.append({"id": i, "width": round(width * scale), "height": round(height * scale)})
        for box, kind in zip((scene.boxes * scale).tolist(), scene.classes.tolist()):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": kind + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_detections(answers: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The kit's JSON answers (one list of ``{label, score, box}`` per scene) as COCO results."""
    index = {name: i + 1 for i, name in enumerate(CLASSES)}
    results = []
    for image_id, answer in enumerate(answers):
        for item in answer:
            x1, y1, x2, y2 = item["box"]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": index[item["label"]],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": item["score"],
                }
            )
    return results


def map50(
    scenes: Sequence[Scene], answers: Sequence[Sequence[dict[str, Any]]], scales: Sequence[float] | None = None
) -> float:
    """mAP at IoU 0.5 (COCO's AP50, all areas, 100 detections) of the answers for these scenes
    (sent at ``scales`` times their size, 1 by default)."""
    import contextlib

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = coco_ground_truth(scenes, scales)
        truth.createIndex()
        found = coco_detections(answers)
        predicted = truth.loadRes(found) if found else COCO()
        evaluator = COCOeval(truth, predicted, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])


def answers_in_process(model_dir: Path, images: Sequence[bytes]) -> list[Any]:
    """The kit's answers for encoded images, through the same service the handler runs."""
    from servekit.config import read_model_config
    from servekit.service import build_service

    service = build_service(read_model_config(model_dir), model_dir, torch.device("cpu"), max_batch=8)
    answers: list[Any] = []
    for start in range(0, len(images), 8):
        outcome = service.handle([{"body": data} for data in images[start : start + 8]])
        answers += outcome.answers
    return answers


def evaluate(
    model_dir: Path, count: int = HELD_OUT_COUNT, run: Callable[[Path, Sequence[bytes]], list[Any]] = answers_in_process
) -> float:
    """mAP@0.5 of the model folder's detector on ``count`` held-out scenes sent as JPEG."""
    scenes = held_out(count)
    return map50(scenes, run(model_dir, [encode_jpeg(s.image) for s in scenes]))


# ---------------------------------------------------------------------------------------------- drawing


def draw_answer(image: np.ndarray, answer: Sequence[dict[str, Any]]) -> torch.Tensor:
    """The image (3 x H x W uint8) with the answer's boxes, labels and scores drawn on it."""
    from torchvision.utils import draw_bounding_boxes

    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)
    if not answer:
        return pixels
    boxes = torch.tensor([item["box"] for item in answer], dtype=torch.float32)
    labels = [f"{item['label']} {item['score']:.2f}" for item in answer]
    colours = [("red", "blue", "green")[CLASSES.index(item["label"])] for item in answer]
    return draw_bounding_boxes(pixels, boxes, labels, colors=colours, width=3)


def mosaic(images: Sequence[torch.Tensor], columns: int = 2, gap: int = 8) -> np.ndarray:
    """Images of any sizes on one white canvas, ``columns`` to a row (H x W x 3 uint8)."""
    rows = [list(images[i : i + columns]) for i in range(0, len(images), columns)]
    heights = [max(int(im.shape[1]) for im in row) for row in rows]
    width = max(sum(int(im.shape[2]) for im in row) + gap * (len(row) - 1) for row in rows)
    canvas = torch.full((3, sum(heights) + gap * (len(rows) - 1), width), 255, dtype=torch.uint8)
    top = 0
    for row, height in zip(rows, heights):
        left = 0
        for im in row:
            canvas[:, top : top + im.shape[1], left : left + im.shape[2]] = im
            left += int(im.shape[2]) + gap
        top += height + gap
    return canvas.permute(1, 2, 0).numpy()
