"""Export a model folder's ``.pt`` to ONNX and check the export against torch (``make onnx``).

Classifiers: input ``input`` (N x 3 x crop x crop, dynamic N), output ``logits``, exported with the
dynamo exporter (``onnxscript``); TorchScript files go through the legacy exporter, which is the only
one that takes them. Detectors (torchvision R-CNN): input ``image`` (3 x H x W, dynamic H and W, values
in [0, 1]), outputs ``boxes``, ``labels``, ``scores``, legacy exporter at opset 17 (the dynamo exporter
fails on torchvision's detection code). Raw-output (``output: yolo``) detectors: input ``images``
(N x 3 x S x S, dynamic N), output ``output0`` (the raw prediction), as ultralytics names them.
DETR-family (``output: detr``) detectors: input ``pixel_values`` (N x 3 x H x W at the recipe's resize,
dynamic N; dynamic H and W when the recipe resizes by the short side), outputs ``logits`` and
``pred_boxes``, as Hugging Face and optimum name them; legacy exporter at opset 17.
Writes ``build/onnx/<name>/model.onnx`` and a JSON report with the largest difference from torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from servekit.config import ClassifierConfig, DetectorConfig, SegmenterConfig, read_model_config
from servekit.detr import detr_outputs
from servekit.errors import ConfigError, plain_line
from servekit.loading import load_model
from servekit.onnx_backend import CLASSIFIER_IO, DETECTOR_IO, DETR_IO, RAW_IO, load_onnx
from servekit.segmentation import segmentation_logits
from servekit.service import detr_scoring, raw_tensor
from servekit.yolo import candidates, resolve_layout

logger = logging.getLogger("export_onnx")
OPSET = 17
PROBABILITY_TOLERANCE = 1e-4
BOX_TOLERANCE = 0.5


@dataclass(frozen=True)
class ExportCheck:
    """How closely the ONNX graph follows the torch model on the same inputs."""

    name: str
    exporter: str
    max_abs_logit: float = 0.0
    max_abs_probability: float = 0.0
    max_abs_box: float = 0.0
    same_top1: bool = True

    def ok(self) -> bool:
        return self.max_abs_probability <= PROBABILITY_TOLERANCE and self.max_abs_box <= BOX_TOLERANCE


def export_classifier(
    model: Any, size: tuple[int, int], path: Path, scripted: bool, io: tuple[str, str] = CLASSIFIER_IO
) -> str:
    """Export a batch of height x width images with a dynamic batch axis; returns the exporter used.

    torch.export (dynamo) first; a network it cannot trace (some timm and Hugging Face models) falls
    back to the TorchScript-based exporter, and one that neither exports fails with both reasons.
    """
    example = torch.rand(2, 3, *size)
    names = {"input_names": [io[0]], "output_names": [io[1]]}
    axes = {io[0]: {0: "batch"}, io[1]: {0: "batch"}}
    if scripted:  # the TorchScript exporter's warnings about a ScriptModule's signature say nothing to a user
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=OPSET, dynamic_axes=axes, **names
            )
        return "legacy"
    batch = torch.export.Dim("batch", min=1, max=1024)
    # an ExportedProgram (format exported) already says which batch sizes it takes
    shapes = None if isinstance(model, torch.export.ExportedProgram) else ({0: batch},)
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes, verbose=False, **names)
        program.save(str(path))
        return "dynamo"
    except Exception as dynamo_error:
        why = f"{type(dynamo_error).__name__}: {plain_line(str(dynamo_error))[:200]}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=OPSET, dynamic_axes=axes, **names
            )
    except Exception as legacy_error:
        raise ConfigError(
            f"the network does not export to ONNX: torch.export said {why}; the TorchScript exporter said "
            f"{type(legacy_error).__name__}: {plain_line(str(legacy_error))[:200]}"
        ) from None
    return "legacy"


class SegmenterLogits(torch.nn.Module):
    """A segmenter as ``input -> logits [N, C, h, w]`` (torchvision's ``{"out", "aux"}`` dict unwrapped)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return segmentation_logits(self.model(x))


def segmenter_graph(model: Any, scripted: bool, size: tuple[int, int]) -> Any:
    """What to export for a segmenter: a TorchScript one as it is (a scripted module cannot be traced inside
    a Python wrapper), when it already returns the logits tensor; any other wrapped by ``SegmenterLogits``.

    Raises:
        ConfigError: a TorchScript segmenter returning something else than one tensor.
    """
    if not scripted:
        return SegmenterLogits(model).eval()  # a new module starts in training mode: the exporter warns
    with torch.inference_mode():
        found = model(torch.rand(1, 3, *size))
    if not isinstance(found, torch.Tensor):
        raise ConfigError(
            f"the TorchScript segmenter returns {type(found).__name__}, not a logits tensor: export it to ONNX from "
            "its Python class, or script a module returning the logits alone"
        )
    return model


def export_detector(model: Any, path: Path) -> str:
    """Export one image in, boxes/labels/scores out, height and width dynamic."""
    example = [torch.rand(3, 320, 480)]
    outputs = list(DETECTOR_IO[1])
    axes = {DETECTOR_IO[0]: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in outputs}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[DETECTOR_IO[0]],
            output_names=outputs,
            dynamic_axes=axes,
        )
    return "legacy"


class DetrGraph(torch.nn.Module):
    """A DETR-family network as a graph of one input and two outputs: ``(logits, pred_boxes)``."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return detr_outputs(self.model(pixel_values))


def detr_example_shape(config: DetectorConfig) -> tuple[int, int]:
    """The (height, width) the export traces: the recipe's fixed size, else a 4:3 image at its short side."""
    if isinstance(config.resize, tuple):
        return config.resize
    return config.resize, min(config.max_size or config.resize * 4 // 3, config.resize * 4 // 3)


def export_detr(model: Any, config: DetectorConfig, path: Path) -> str:
    """Export a batch at the recipe's size; a short-side recipe keeps height and width dynamic too."""
    name = "pixel_values"
    dynamic = {0: "batch"} if isinstance(config.resize, tuple) else {0: "batch", 2: "height", 3: "width"}
    axes = {name: dynamic, **{output: {0: "batch"} for output in DETR_IO}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            DetrGraph(model).eval(),
            (torch.rand(1, 3, *detr_example_shape(config)),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[name],
            output_names=list(DETR_IO),
            dynamic_axes=axes,
        )
    return "legacy"


def check_detr(name: str, model: Any, onnx_model: Any, config: DetectorConfig, scoring: str) -> ExportCheck:
    """Compare the queries' scores (as the model's scoring reads them) and boxes (pixels of the resized
    input) on a seeded batch of 2 images."""
    height, width = detr_example_shape(config)
    inputs = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits, boxes = detr_outputs(model(inputs))
    got_logits, got_boxes = onnx_model(inputs)

    def scores(values: torch.Tensor) -> torch.Tensor:
        return values.float().softmax(-1) if scoring == "softmax" else values.float().sigmoid()

    pixels = torch.tensor([width, height, width, height], dtype=torch.float32)
    return ExportCheck(
        name,
        "legacy",
        max_abs_logit=float((logits.float() - got_logits).abs().max()),
        max_abs_probability=float((scores(logits) - scores(got_logits)).abs().max()),
        max_abs_box=float(((boxes.float() - got_boxes) * pixels).abs().max()),
        same_top1=bool((scores(logits).argmax(-1) == scores(got_logits).argmax(-1)).all()),
    )


def check_classifier(
    name: str, exporter: str, model: Any, onnx_model: Any, size: tuple[int, int], *, segmenter: bool = False
) -> ExportCheck:
    """Compare logits and probabilities (per pixel for a segmenter) on a seeded batch of 4 images."""
    inputs = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = segmentation_logits(model(inputs)) if segmenter else model(inputs)
    expected, got = expected.float(), onnx_model(inputs)
    return ExportCheck(
        name,
        exporter,
        max_abs_logit=float((expected - got).abs().max()),
        max_abs_probability=float((expected.softmax(1) - got.softmax(1)).abs().max()),
        same_top1=bool((expected.argmax(1) == got.argmax(1)).float().mean() >= (0.999 if segmenter else 1.0)),
    )


def check_raw(name: str, exporter: str, model: Any, onnx_model: Any, config: DetectorConfig) -> ExportCheck:
    """Compare a raw-output detector's candidate boxes (pixels) and scores on a seeded batch of 2 images."""
    size = config.input_size
    inputs = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = raw_tensor(model(inputs)).float()
    got = onnx_model(inputs)
    layout = resolve_layout(config.layout, expected.shape)
    box_diff = score_diff = 0.0
    for mine, theirs in zip(expected, got):
        (boxes, scores, _), (got_boxes, got_scores, _) = candidates(mine, layout), candidates(theirs, layout)
        box_diff = max(box_diff, float((boxes - got_boxes).abs().max()))
        score_diff = max(score_diff, float((scores - got_scores).abs().max()))
    return ExportCheck(name, exporter, max_abs_probability=score_diff, max_abs_box=box_diff)


def check_detector(name: str, exporter: str, model: Any, onnx_model: Any) -> ExportCheck:
    """Compare boxes and scores of the confident detections on two image sizes."""
    generator = torch.Generator().manual_seed(0)
    box_diff = score_diff = 0.0
    same = True
    for shape in ((3, 320, 480), (3, 400, 300)):
        image = torch.rand(*shape, generator=generator)
        with torch.inference_mode():
            (expected,) = model([image])
        (got,) = onnx_model([image])
        n = min(len(expected["scores"]), len(got["scores"]), 10)
        same = same and len(expected["scores"]) == len(got["scores"])
        if n:
            box_diff = max(box_diff, float((expected["boxes"][:n] - got["boxes"][:n]).abs().max()))
            score_diff = max(score_diff, float((expected["scores"][:n] - got["scores"][:n]).abs().max()))
    return ExportCheck(name, exporter, max_abs_probability=score_diff, max_abs_box=box_diff, same_top1=same)


def export(name: str, models: Path, out: Path) -> ExportCheck:
    """Export ``models/<name>`` to ``out/<name>/model.onnx`` and check it."""
    model_dir = models / name
    config = read_model_config(model_dir)
    model = load_model(model_dir, config.model, torch.device("cpu"))
    target = out / name / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    scripted = config.model.format == "torchscript"
    if isinstance(config, ClassifierConfig):
        graph = getattr(model, "program", None) or model  # an exported folder: its program, not the chunking wrapper
        exporter = export_classifier(graph, config.input_size, target, scripted)
        check = check_classifier(name, exporter, model, load_onnx(target, torch.device("cpu"), 2), config.input_size)
    elif isinstance(config, SegmenterConfig):
        if not isinstance(config.resize, tuple):
            raise ConfigError(f"{name}: ONNX export of a segmenter needs resize as [height, width] (one input shape)")
        exporter = export_classifier(segmenter_graph(model, scripted, config.resize), config.resize, target, scripted)
        onnx_model = load_onnx(target, torch.device("cpu"), 2)
        check = check_classifier(name, exporter, model, onnx_model, config.resize, segmenter=True)
    elif isinstance(config, DetectorConfig) and config.output == "detr":
        exporter = export_detr(model, config, target)
        onnx_model = load_onnx(target, torch.device("cpu"), 2)
        check = check_detr(name, model, onnx_model, config, detr_scoring(config, model_dir))
    elif isinstance(config, DetectorConfig) and config.output == "yolo":
        size = (config.input_size, config.input_size)
        exporter = export_classifier(model, size, target, scripted, RAW_IO)
        check = check_raw(name, exporter, model, load_onnx(target, torch.device("cpu"), 2), config)
    else:
        exporter = export_detector(model, target)
        check = check_detector(name, exporter, model, load_onnx(target, torch.device("cpu"), 2))
    (out / name / "export.json").write_text(json.dumps(asdict(check), indent=2) + "\n", encoding="utf-8")
    return check


def parse_model_args(description: str | None, argv: list[str] | None) -> argparse.Namespace:
    """The command line of the ONNX scripts: model names, the models folder, the ONNX output folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("build/onnx"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_model_args(__doc__, argv)
    logging.getLogger("torch").setLevel(logging.ERROR)
    failed = 0
    for name in args.names:
        check = export(name, args.models, args.out)
        logger.info(
            "%s: %s exporter, max |logit diff| %.2e, max |probability/score diff| %.2e, max |box diff| %.3f px, "
            "same top-1/count: %s -> %s",
            name,
            check.exporter,
            check.max_abs_logit,
            check.max_abs_probability,
            check.max_abs_box,
            check.same_top1,
            "ok" if check.ok() else "OUT OF TOLERANCE",
        )
        failed += not check.ok()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
