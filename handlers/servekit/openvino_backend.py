"""OpenVINO behind the same call the services make on a torch module (``format: openvino``).

It reads the exported ONNX graph (``make onnx``) or an OpenVINO IR (``.xml`` beside its ``.bin``) and
compiles it for the CPU with the worker's threads and the precision asked for (``fp32``, or ``bf16``
on CPUs with AVX512-BF16 or AMX). It serves graphs that take one image batch and give one tensor:
classifiers (``logits``) and raw-output detectors (``output0``). ``openvino`` is imported only when
such a model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from servekit.errors import ConfigError, plain_line

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


def compile_options(threads: int, precision: str) -> dict[str, str]:
    """The CPU plugin's properties: a latency hint (one batch at a time per worker), threads, precision."""
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": str(max(1, threads)),
        "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
    }


class OpenVinoModel:
    """The part of ``torch.nn.Module`` the services use (``eval``, ``__call__``), over a compiled model."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        outputs = [o.get_any_name() for o in compiled.outputs]
        self.output = compiled.outputs[outputs.index("logits")] if "logits" in outputs else compiled.outputs[0]

    def eval(self) -> OpenVinoModel:
        return self

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor):
            raise ConfigError("format openvino serves classifiers and raw-output (yolo) detectors")
        result = self.request.infer({0: batch.detach().cpu().numpy()}, share_inputs=True)
        return torch.from_numpy(result[self.output].copy())


def load_openvino(path: Path, device: torch.device, threads: int, precision: str = "fp32") -> OpenVinoModel:
    """Read and compile an ONNX graph or OpenVINO IR for the CPU.

    Raises:
        ConfigError: not on a CPU, a graph OpenVINO cannot read, or one with more than one input.
    """
    import openvino as ov

    if device.type != "cpu":
        raise ConfigError("format openvino runs on the CPU here; use onnx (CUDA provider) on a GPU")
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as exc:
        raise ConfigError(f"OpenVINO cannot read {path.name}: {plain_line(str(exc))}") from None
    if len(model.inputs) != 1:
        names = [i.get_any_name() for i in model.inputs]
        raise ConfigError(f"format openvino serves graphs with one image input; {path.name} has {names}")
    return OpenVinoModel(core.compile_model(model, "CPU", compile_options(threads, precision)))
