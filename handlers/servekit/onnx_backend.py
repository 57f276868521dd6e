"""ONNX Runtime behind the same call the services make on a torch module.

A classifier graph takes ``input`` (N x 3 x H x W float) and gives ``logits``; a detector graph takes one
``image`` (3 x H x W float in [0, 1]) and gives ``boxes``, ``labels`` and ``scores``, the names that
``scripts/packaging/export_onnx.py`` writes. The module imports ``onnxruntime`` only when an ONNX model is loaded,
so archives of torch models need nothing beyond torch and torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from servekit.errors import ConfigError
from servekit.program_backend import BoundedBatch, InputSpec

CLASSIFIER_IO = ("input", "logits")
DETECTOR_IO = ("image", ("boxes", "labels", "scores"))
DETR_IO = ("logits", "pred_boxes")  # a DETR-family graph's outputs, as Hugging Face (and optimum) name them
RAW_IO = ("images", "output0")  # a raw-output (YOLO-style) detector, named as ultralytics' exports name them


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
    """The part of ``torch.nn.Module`` the services use (``eval``, ``__call__``), over an ORT session.

    A detector graph has the outputs ``boxes``, ``labels`` and ``scores`` (``scripts/packaging/export_onnx.py``);
    any other graph takes an image batch as its first input and answers ``logits`` (or else its first
    output), plus ``pred_boxes`` for a DETR-family detector. A graph with a static batch size runs in chunks.
    """

    def __init__(self, session: Any, max_batch: int = 0) -> None:
        self.session = session
        first = session.get_inputs()[0]
        self.input_name = first.name
        outputs = [o.name for o in session.get_outputs()]
        self.is_detector = set(DETECTOR_IO[1]) <= set(outputs)
        self.output_name = CLASSIFIER_IO[1] if CLASSIFIER_IO[1] in outputs else outputs[0]
        # a DETR-family graph answers its logits and boxes together
        self.output_names = list(DETR_IO) if set(DETR_IO) <= set(outputs) else [self.output_name]
        if not self.is_detector and len(first.shape) != 4:
            raise ConfigError(f"ONNX model input {first.name!r} has shape {first.shape}; expected N x 3 x H x W")
        self.spec = onnx_input_spec(first.shape, max_batch)
        self._bounded = BoundedBatch(self._classify, self.spec, torch.device("cpu"))

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, inputs: torch.Tensor | list[torch.Tensor]) -> Any:
        if self.is_detector:
            return [self._detect(image) for image in inputs]
        assert isinstance(inputs, torch.Tensor)
        return self._bounded(inputs)

    def _classify(self, batch: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        found = self.session.run(self.output_names, {self.input_name: batch.cpu().numpy()})
        if len(found) == 1:
            return torch.from_numpy(found[0])
        return tuple(torch.from_numpy(value) for value in found)

    def _detect(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        names = list(DETECTOR_IO[1])
        outputs = self.session.run(names, {self.input_name: image.cpu().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}


def onnx_input_spec(shape: Sequence[Any], max_batch: int = 0) -> InputSpec:
    """Batch range and static height/width of an ONNX image input (a dim is an int, or a name if dynamic)."""
    dims = list(shape) + [None] * (4 - len(shape))
    static = [d if isinstance(d, int) and d > 0 else None for d in dims]
    if static[0] is not None:
        return InputSpec(static[0], static[0], static[2], static[3])
    return InputSpec(1, max_batch or None, static[2], static[3])


def load_onnx(path: Path, device: torch.device, threads: int, max_batch: int = 0) -> OnnxModel:
    """Open an exported classifier or detector graph."""
    return OnnxModel(open_session(path, device, threads), max_batch)
