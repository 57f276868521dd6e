"""Triton python-backend glue for one step of a servekit ensemble (copied as ``<model>/1/model.py``).

The step comes from the model config's ``servekit_step`` parameter: ``preprocess`` (image bytes to the
model's input), ``model`` (ONNX Runtime on the CPU, for servers without the onnxruntime backend) or
``postprocess`` (model outputs to the JSON answer). The work itself is in ``servekit.triton_steps``,
shared with the TorchServe handlers; this file only moves tensors in and out of Triton requests.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the staged servekit package sits beside this file

from servekit.quality import HISTOGRAM, ClassSlots, ImageStats, quality_metrics  # noqa: E402
from servekit.triton_steps import error_message, image_bytes, load_steps  # noqa: E402


def _input(request: Any, name: str) -> np.ndarray:
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy()


def _fail(exc: BaseException) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(error_message(exc)))


class StepMetrics:
    """The kit's model-quality samples as the python backend's custom metrics, labelled with the ensemble's
    name: counters, and a histogram as its ``_sum`` and ``_count`` counters, so the PrometheusRule's means
    (deploy/monitoring) read the same series from Triton's metrics port as from TorchServe's."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.families: dict[str, Any] = {}
        self.metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self.slots = ClassSlots()

    def emit(self, answers: list[Any], images: list[ImageStats | None]) -> None:
        for sample in quality_metrics(answers, images, self.slots):
            if sample.kind == HISTOGRAM:
                self._add(f"{sample.name}_sum", sample.value, sample.labels)
                self._add(f"{sample.name}_count", 1, sample.labels)
            else:
                self._add(sample.name, sample.value, sample.labels)

    def _add(self, name: str, value: float, labels: tuple[tuple[str, str], ...]) -> None:
        key = (name, labels)
        if key not in self.metrics:
            if name not in self.families:
                self.families[name] = pb_utils.MetricFamily(
                    name=name, description=f"servekit model quality: {name}", kind=pb_utils.MetricFamily.COUNTER
                )
            self.metrics[key] = self.families[name].Metric(labels={"ModelName": self.model_name, **dict(labels)})
        self.metrics[key].increment(value)


class TritonPythonModel:
    """One servekit step; ``execute`` answers every request of a batch, failing only the bad ones."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.step = parameters["servekit_step"]
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        self.steps = load_steps(HERE, parameters.get("image_name", "images"), parameters.get("raw_name", "output0"))
        ensemble = args["model_name"].removesuffix(f"_{self.step}")
        self.metrics = StepMetrics(ensemble) if self.step in ("preprocess", "postprocess") else None
        if self.step == "model":
            import torch

            from servekit.onnx_backend import load_onnx

            threads = int(parameters.get("threads", "0")) or (os.cpu_count() or 1)
            self.model = load_onnx(HERE / "model.onnx", torch.device("cpu"), threads)

    def execute(self, requests: list[Any]) -> list[Any]:
        run = {"preprocess": self._preprocess, "model": self._model, "postprocess": self._postprocess}[self.step]
        return run(requests)

    def _preprocess(self, requests: list[Any]) -> list[Any]:
        """Every image of every request prepared alone; a request with a bad image fails alone."""
        images = [[image_bytes(v) for v in _input(r, "IMAGE").reshape(-1)] for r in requests]
        batch = self.steps.preprocess([item for request in images for item in request])
        outcomes = batch.answers
        if self.metrics is not None:  # what was sent, and the bad inputs by error class
            self.metrics.emit([o for o in outcomes if isinstance(o, BaseException)], batch.images)
        responses, start = [], 0
        for request in images:
            mine, start = outcomes[start : start + len(request)], start + len(request)
            failed = next((o for o in mine if isinstance(o, BaseException)), None)
            if failed is not None:
                responses.append(_fail(failed))
                continue
            join = np.stack if self.steps.batched else (lambda arrays: arrays[0])
            tensors = [pb_utils.Tensor(name, join([o[name] for o in mine])) for name in self.outputs]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses

    def _model(self, requests: list[Any]) -> list[Any]:
        """ONNX Runtime on the CPU: the requests of a batched model run as one batch."""
        import torch

        if not self.steps.batched:
            responses = []
            for request in requests:
                (out,) = self.model([torch.from_numpy(_input(request, self.inputs[0]))])
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, out[n].numpy()) for n in self.outputs]))
            return responses
        inputs = [_input(r, self.inputs[0]) for r in requests]
        raw = self.model(torch.from_numpy(np.concatenate(inputs)))
        arrays = [t.numpy() for t in (raw if isinstance(raw, tuple) else (raw,))]  # a DETR graph: logits, boxes
        bounds = np.cumsum([0] + [len(x) for x in inputs])
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(n, out[a:b]) for n, out in zip(self.outputs, arrays)])
            for a, b in itertools.pairwise(bounds)
        ]

    def _postprocess(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                answers = self.steps.postprocess({name: _input(request, name) for name in self.inputs})
            except Exception as exc:
                responses.append(_fail(exc))
                continue
            if self.metrics is not None:  # what the model answered
                self.metrics.emit([json.loads(a) for a in answers], [])
            shape = (-1, 1) if self.steps.batched else (-1,)
            out = np.array(answers, dtype=np.object_).reshape(shape)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("ANSWER", out)]))
        return responses
