"""The Triton ensemble's steps, as pure functions over numpy: the same decode, transforms and answers as
the TorchServe handlers (this module imports neither Triton nor TorchServe).

Every step class answers per image: ``preprocess`` gives, for each encoded image, its tensors by name
(or the exception that image ended in) with the stats of the images it decoded (a ``BatchOutcome``), and
``postprocess`` gives one JSON document per image of a request. ``batched`` says whether the ensemble has
a batch dimension (classifiers, segmenters and DETR-family detectors resized to one [h, w], and raw-output
detectors, letterboxed to one square) or takes one image per request (torchvision detectors).

An ensemble takes the encoded image bytes (``IMAGE``, ``TYPE_STRING``) and answers the JSON bytes
(``ANSWER``) that TorchServe would send. A request that fails gets, as its Triton error message, the
same JSON body ``{"error": ..., "code": ...}`` that TorchServe sends.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from servekit.config import ClassifierConfig, DetectorConfig, HandlerConfig, SegmenterConfig, read_model_config
from servekit.decode import decode_request
from servekit.errors import error_body
from servekit.loading import load_labels
from servekit.onnx_backend import DETR_IO, RAW_IO
from servekit.postprocess import detections_to_json, topk_to_json
from servekit.service import (
    BatchOutcome,
    DetrItem,
    SegmenterItem,
    classifier_item,
    detr_answers,
    detr_item,
    detr_scoring,
    letterboxed_item,
    run_batch,
    segmenter_answers,
    segmenter_item,
    yolo_answers,
    yolo_settings,
)
from servekit.transforms import classifier_batch, detector_inputs
from servekit.yolo import Letterbox, resolve_layout


def error_message(exc: BaseException) -> str:
    """The Triton error message of a failed request: TorchServe's JSON error body."""
    return json.dumps(error_body(exc))


def answer_bytes(answer: Any) -> bytes:
    """An answer serialized exactly as the TorchServe handlers serialize it."""
    return json.dumps(answer).encode("utf-8")


def image_bytes(value: Any) -> bytes:
    """One element of a ``TYPE_STRING`` tensor (numpy gives ``bytes`` or ``np.object_``)."""
    return bytes(value) if not isinstance(value, str) else value.encode("utf-8")


Tensors = dict[str, np.ndarray]  # one image's tensors by Triton name
DETR_IMAGE = "pixel_values"  # a DETR-family graph's input, as `make onnx` and Hugging Face's exports name it


SizedItem = SegmenterItem | DetrItem  # the resized image first, the size it was sent at second


def resized_batch(
    images: Sequence[bytes], prepare: Callable[[bytes], SizedItem], config: HandlerConfig, image_name: str
) -> BatchOutcome:
    """Each image decoded and resized alone by ``prepare`` (to one [h, w] recipe), the good ones normalized as
    one batch; each image's row goes out as ``image_name`` with its size as sent (``size``, int32) beside it,
    for the postprocess to answer in that image's pixels (segmenters and DETR-family detectors)."""

    def normalize(items: list[SizedItem]) -> torch.Tensor:
        return classifier_batch([item[0] for item in items], config)

    def split(batch: torch.Tensor, items: list[SizedItem]) -> list[Tensors]:
        sizes = [np.array(item[1], dtype=np.int32) for item in items]
        return [{image_name: row, "size": size} for row, size in zip(batch.numpy(), sizes)]

    return run_batch(images, prepare, normalize, split)


@dataclass(frozen=True)
class ClassifierSteps:
    """Preprocess (bytes -> normalized crop) and postprocess (logits -> top-k JSON) of a classifier."""

    config: ClassifierConfig
    labels: list[str]
    batched = True

    def preprocess(self, images: Sequence[bytes]) -> BatchOutcome:
        """Decode and crop each image alone; normalize the good ones as one batch."""

        def prepare(data: bytes) -> torch.Tensor:
            return classifier_item({"body": data}, self.config)

        def normalize(crops: list[torch.Tensor]) -> torch.Tensor:
            return classifier_batch(crops, self.config)

        def split(batch: torch.Tensor, _crops: list[torch.Tensor]) -> list[Tensors]:
            return [{"input": row} for row in batch.numpy()]

        return run_batch(images, prepare, normalize, split)

    def postprocess(self, tensors: Tensors) -> list[bytes]:
        """Top-k answers of a batch of logits, one JSON document each."""
        logits = torch.from_numpy(tensors["logits"])
        return [answer_bytes(a) for a in topk_to_json(logits, self.labels, self.config.topk)]


@dataclass(frozen=True)
class YoloSteps:
    """Preprocess (bytes -> letterboxed image and its geometry) and postprocess (raw output -> NMS -> JSON).

    ``image_name`` and ``raw_name`` are the ONNX graph's input and output names.
    """

    config: DetectorConfig
    labels: list[str]
    image_name: str = RAW_IO[0]
    raw_name: str = RAW_IO[1]
    batched = True

    def preprocess(self, images: Sequence[bytes]) -> BatchOutcome:
        """Each image letterboxed alone (float32 in [0, 1]), with its geometry (float64, 6 values)."""

        def prepare(data: bytes) -> Tensors:
            pixels, geometry = letterboxed_item({"body": data}, self.config)
            return {
                self.image_name: pixels.to(torch.float32).div_(255.0).numpy(),
                "geometry": np.array(geometry.values(), dtype=np.float64),
            }

        return run_batch(images, prepare, list, lambda tensors, _: tensors)

    def postprocess(self, tensors: Tensors) -> list[bytes]:
        """One JSON answer per image of a batch of raw outputs, as the TorchServe handler answers."""
        raw = torch.from_numpy(tensors[self.raw_name])
        layout = resolve_layout(self.config.layout, raw.shape, len(self.labels) or None)
        geometries = [Letterbox.from_values(row) for row in tensors["geometry"]]
        answers = yolo_answers(
            raw, geometries, yolo_settings(self.config, layout), self.labels, self.config.max_detections
        )
        return [answer_bytes(a) for a in answers]


@dataclass(frozen=True)
class DetectorSteps:
    """Preprocess (bytes -> float image and its size) and postprocess (raw detections -> JSON), one image
    per request: a torchvision detector takes images of any size."""

    config: DetectorConfig
    labels: list[str]
    batched = False

    def preprocess(self, images: Sequence[bytes]) -> BatchOutcome:
        """Each image as float32 3 x H x W in [0, 1], and its (width, height)."""

        def prepare(data: bytes) -> Tensors:
            decoded = decode_request({"body": data}, self.config.limits)
            pixels = detector_inputs([decoded.pixels])[0].contiguous().numpy()
            return {"image": pixels, "size": np.array([decoded.width, decoded.height], dtype=np.int32)}

        return run_batch(images, prepare, list, lambda tensors, _: tensors)

    def postprocess(self, tensors: Tensors) -> list[bytes]:
        output = {name: torch.from_numpy(tensors[name]) for name in ("boxes", "labels", "scores")}
        width, height = (int(v) for v in np.asarray(tensors["size"]).reshape(-1)[:2])
        answer = detections_to_json(
            output, self.labels, (width, height), self.config.score_threshold, self.config.max_detections
        )
        return [answer_bytes(answer)]


@dataclass(frozen=True)
class SegmenterSteps:
    """Preprocess (bytes -> normalized image at the recipe's [h, w], and the size as sent) and postprocess
    (logits -> label map at that size -> JSON). A fixed [h, w] recipe lets images of any sizes batch."""

    config: SegmenterConfig
    labels: list[str]
    batched = True

    def preprocess(self, images: Sequence[bytes]) -> BatchOutcome:
        """Decode and resize each image alone; normalize the good ones as one batch."""
        return resized_batch(images, lambda data: segmenter_item({"body": data}, self.config), self.config, "input")

    def postprocess(self, tensors: Tensors) -> list[bytes]:
        """One JSON answer per image of a batch of logits, in the pixels of the image as sent."""
        logits = torch.from_numpy(tensors["logits"])
        sizes = np.asarray(tensors["size"]).reshape(-1, 2)
        items = [(torch.empty(0), (int(h), int(w)), self.config.format) for h, w in sizes]
        return [answer_bytes(a) for a in segmenter_answers(logits, items, self.config, self.labels)]


@dataclass(frozen=True)
class DetrSteps:
    """Preprocess (bytes -> ``pixel_values`` at the recipe's [h, w], and the size as sent) and postprocess
    (the queries' ``logits`` and ``pred_boxes`` -> JSON): the TorchServe handler's functions, so both servers
    score, scale and threshold alike. A fixed [h, w] recipe (RT-DETR's 640 x 640) lets images of any sizes
    batch."""

    config: DetectorConfig
    labels: list[str]
    scoring: str
    batched = True

    def preprocess(self, images: Sequence[bytes]) -> BatchOutcome:
        """Decode and resize each image alone; normalize the good ones as one batch."""
        return resized_batch(images, lambda data: detr_item({"body": data}, self.config), self.config, DETR_IMAGE)

    def postprocess(self, tensors: Tensors) -> list[bytes]:
        """One JSON answer per image of a batch of queries, in the pixels of the image as sent."""
        logits, boxes = (torch.from_numpy(tensors[name]) for name in DETR_IO)
        sizes = np.asarray(tensors["size"]).reshape(-1, 2)
        items = [(torch.empty(0), (int(width), int(height))) for width, height in sizes]
        answers = detr_answers(list(zip(logits, boxes)), items, self.config, self.scoring, self.labels)
        return [answer_bytes(a) for a in answers]


Steps = ClassifierSteps | YoloSteps | DetectorSteps | SegmenterSteps | DetrSteps


def load_steps(folder: Path, image_name: str = RAW_IO[0], raw_name: str = RAW_IO[1]) -> Steps:
    """The steps of the model whose ``model-config.yaml`` and labels were copied into ``folder``."""
    config: HandlerConfig = read_model_config(folder)
    labels = load_labels(folder / config.labels)
    if isinstance(config, ClassifierConfig):
        return ClassifierSteps(config, labels)
    if isinstance(config, SegmenterConfig):
        return SegmenterSteps(config, labels)
    if config.output == "yolo":
        return YoloSteps(config, labels, image_name, raw_name)
    if config.output == "detr":  # scoring: auto reads the Hugging Face config.json staged beside it
        return DetrSteps(config, labels, detr_scoring(config, folder))
    return DetectorSteps(config, labels)
