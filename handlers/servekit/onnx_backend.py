"""ONNX Runtime behind the same call the services make on a torch module.

A classifier graph takes ``input`` (N x 3 x H x W float) and gives ``logits``; a detector graph takes one
``image`` (3 x H x W float in [0, 1]) and gives ``boxes``, ``labels`` and ``scores``, the names that
``scripts/export_onnx.py`` writes. The module imports ``onnxruntime`` only when an ONNX model is loaded,
so archives of torch models need nothing beyond torch and torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from servekit.errors import ConfigError

CLASSIFIER_IO = ("input", "logits")
DETECTOR_IO = ("image", ("boxes", "labels", "scores"))


def providers(device: torch.device, available: Sequence[str]) -> list[str]:
    """Execution providers for ``device``: CUDA first when the worker has a GPU and ORT offers it."""
    wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def open_session(path: Path, device: torch.device, threads: int) -> Any:
    """An ``InferenceSession`` on ``path`` with ``threads`` intra-op threads and full graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    chosen = [
        (p, {"device_id": device.index or 0}) if p == "CUDAExecutionProvider" else p
        for p in providers(device, ort.get_available_providers())
    ]
    return ort.InferenceSession(str(path), options, providers=chosen)


class OnnxModel:
    """The part of ``torch.nn.Module`` the services use (``eval``, ``__call__``), over an ORT session."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.is_detector = self.input_name == DETECTOR_IO[0]
        if self.input_name not in (DETECTOR_IO[0], CLASSIFIER_IO[0]):
            raise ConfigError(
                f"ONNX model input is named {self.input_name!r}; expected 'input' (classifier) or 'image' (detector)"
            )

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, inputs: torch.Tensor | list[torch.Tensor]) -> Any:
        if self.is_detector:
            return [self._detect(image) for image in inputs]
        assert isinstance(inputs, torch.Tensor)
        (logits,) = self.session.run([CLASSIFIER_IO[1]], {self.input_name: inputs.cpu().numpy()})
        return torch.from_numpy(logits)

    def _detect(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        names = list(DETECTOR_IO[1])
        outputs = self.session.run(names, {self.input_name: image.cpu().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}


def load_onnx(path: Path, device: torch.device, threads: int) -> OnnxModel:
    """Open an exported classifier or detector graph."""
    return OnnxModel(open_session(path, device, threads))
