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

from servekit.triton_steps import ClassifierSteps, error_message, image_bytes, load_steps  # noqa: E402

CLASSIFIER_OUTPUTS = ("logits",)
DETECTOR_OUTPUTS = ("boxes", "labels", "scores")


def _input(request: Any, name: str) -> np.ndarray:
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy()


def _fail(exc: BaseException) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(error_message(exc)))


class TritonPythonModel:
    """One servekit step; ``execute`` answers every request of a batch, failing only the bad ones."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.step = config["parameters"]["servekit_step"]["string_value"]
        self.steps = load_steps(HERE)
        self.classifier = isinstance(self.steps, ClassifierSteps)
        if self.step == "model":
            import torch

            from servekit.onnx_backend import load_onnx

            threads = int(config["parameters"].get("threads", {}).get("string_value", "0")) or (os.cpu_count() or 1)
            self.model = load_onnx(HERE / "model.onnx", torch.device("cpu"), threads)

    def execute(self, requests: list[Any]) -> list[Any]:
        run = {"preprocess": self._preprocess, "model": self._model, "postprocess": self._postprocess}[self.step]
        return run(requests)

    # ------------------------------------------------------------------ preprocess

    def _preprocess(self, requests: list[Any]) -> list[Any]:
        if not self.classifier:
            return [self._preprocess_detector(request) for request in requests]
        images = [[image_bytes(v) for v in _input(r, "IMAGE").reshape(-1)] for r in requests]
        outcomes = self.steps.preprocess([item for request in images for item in request])
        responses, start = [], 0
        for request in images:
            mine, start = outcomes[start : start + len(request)], start + len(request)
            failed = next((o for o in mine if isinstance(o, BaseException)), None)
            if failed is not None:
                responses.append(_fail(failed))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("input", np.stack(mine))]))
        return responses

    def _preprocess_detector(self, request: Any) -> Any:
        try:
            pixels, size = self.steps.preprocess(image_bytes(_input(request, "IMAGE").reshape(-1)[0]))
        except Exception as exc:
            return _fail(exc)
        return pb_utils.InferenceResponse([pb_utils.Tensor("image", pixels), pb_utils.Tensor("size", size)])

    # ------------------------------------------------------------------ model

    def _model(self, requests: list[Any]) -> list[Any]:
        import torch

        if not self.classifier:
            responses = []
            for request in requests:
                (out,) = self.model([torch.from_numpy(_input(request, "image"))])
                tensors = [pb_utils.Tensor(name, out[name].numpy()) for name in DETECTOR_OUTPUTS]
                responses.append(pb_utils.InferenceResponse(tensors))
            return responses
        inputs = [_input(r, "input") for r in requests]
        logits = self.model(torch.from_numpy(np.concatenate(inputs))).numpy()
        bounds = np.cumsum([0] + [len(x) for x in inputs])
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits[a:b])]) for a, b in itertools.pairwise(bounds)
        ]

    # ------------------------------------------------------------------ postprocess

    def _postprocess(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                if self.classifier:
                    answers = self.steps.postprocess(_input(request, "logits"))
                    out = np.array(answers, dtype=np.object_).reshape(-1, 1)
                else:
                    boxes, labels, scores, size = (_input(request, n) for n in (*DETECTOR_OUTPUTS, "size"))
                    out = np.array([self.steps.postprocess(boxes, labels, scores, size)], dtype=np.object_)
            except Exception as exc:
                responses.append(_fail(exc))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("ANSWER", out)]))
        return responses
