"""The Triton ensemble's steps, as pure functions over numpy: the same decode, transforms and answers as
the TorchServe handlers (this module imports neither Triton nor TorchServe).

An ensemble takes the encoded image bytes (``IMAGE``, ``TYPE_STRING``) and answers the JSON bytes
(``ANSWER``) that TorchServe would send. A request that fails gets, as its Triton error message, the
same JSON body ``{"error": ..., "code": ...}`` that TorchServe sends.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from servekit.config import ClassifierConfig, DetectorConfig, HandlerConfig, read_model_config
from servekit.decode import decode_request
from servekit.errors import error_body
from servekit.loading import load_labels
from servekit.postprocess import detections_to_json, topk_to_json
from servekit.service import run_batch
from servekit.transforms import classifier_batch, classifier_crop, detector_inputs

Outcome = Any  # a step's result for one request, or the exception it failed with


def error_message(exc: BaseException) -> str:
    """The Triton error message of a failed request: TorchServe's JSON error body."""
    return json.dumps(error_body(exc))


def answer_bytes(answer: Any) -> bytes:
    """An answer serialized exactly as the TorchServe handlers serialize it."""
    return json.dumps(answer).encode("utf-8")


def image_bytes(value: Any) -> bytes:
    """One element of a ``TYPE_STRING`` tensor (numpy gives ``bytes`` or ``np.object_``)."""
    return bytes(value) if not isinstance(value, str) else value.encode("utf-8")


@dataclass(frozen=True)
class ClassifierSteps:
    """Preprocess (bytes -> normalized crop) and postprocess (logits -> top-k JSON) of a classifier."""

    config: ClassifierConfig
    labels: list[str]

    def preprocess(self, images: Sequence[bytes]) -> list[Outcome]:
        """Decode and crop each image alone; normalize the good ones as one batch."""

        def prepare(data: bytes) -> torch.Tensor:
            decoded = decode_request({"body": data}, self.config.limits)
            return classifier_crop(decoded.pixels, self.config.resize, self.config.crop)

        def normalize(crops: list[torch.Tensor]) -> torch.Tensor:
            return classifier_batch(crops, self.config)

        def split(batch: torch.Tensor, _crops: list[torch.Tensor]) -> list[np.ndarray]:
            return list(batch.numpy())

        return run_batch(images, prepare, normalize, split).answers

    def postprocess(self, logits: np.ndarray) -> list[bytes]:
        """Top-k answers of a batch of logits, one JSON document each."""
        return [answer_bytes(a) for a in topk_to_json(torch.from_numpy(logits), self.labels, self.config.topk)]


@dataclass(frozen=True)
class DetectorSteps:
    """Preprocess (bytes -> float image and its size) and postprocess (raw detections -> JSON)."""

    config: DetectorConfig
    labels: list[str]

    def preprocess(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """One image as float32 3 x H x W in [0, 1], and its (width, height)."""
        decoded = decode_request({"body": data}, self.config.limits)
        pixels = detector_inputs([decoded.pixels])[0].contiguous().numpy()
        return pixels, np.array([decoded.width, decoded.height], dtype=np.int32)

    def postprocess(self, boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray, size: np.ndarray) -> bytes:
        output = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(classes),
            "scores": torch.from_numpy(scores),
        }
        width, height = (int(v) for v in np.asarray(size).reshape(-1)[:2])
        return answer_bytes(
            detections_to_json(
                output, self.labels, (width, height), self.config.score_threshold, self.config.max_detections
            )
        )


def load_steps(folder: Path) -> ClassifierSteps | DetectorSteps:
    """The steps of the model whose ``model-config.yaml`` and labels were copied into ``folder``."""
    config: HandlerConfig = read_model_config(folder)
    labels = load_labels(folder / config.labels)
    if isinstance(config, ClassifierConfig):
        return ClassifierSteps(config, labels)
    return DetectorSteps(config, labels)
