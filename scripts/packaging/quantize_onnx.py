"""Static int8 quantization of an exported classifier with ONNX Runtime (``make int8``).

Calibrates on images the kit makes itself, run through the kit's own preprocessing: the digits model on
its training split, ImageNet classifiers on crops and flips of scikit-image's photos. QDQ format,
per-channel int8 weights, uint8 activations with ``reduce_range`` (7-bit weights, which this CPU, with
AVX-512 but no VNNI, needs to avoid saturation). Writes ``build/onnx/<name>/model.int8.onnx`` and prints
the fidelity against the fp32 graph on images the calibration never saw.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

import demo_models
import fidelity
from export_onnx import parse_model_args
from servekit.config import ClassifierConfig, read_model_config

logger = logging.getLogger("quantize_onnx")


def calibration_images(name: str, count: int = 96) -> list[np.ndarray]:
    """RGB uint8 images to calibrate ``name`` on (disjoint from :func:`fidelity.evaluation_images`)."""
    if name == "digits":
        images, _ = demo_models.digit_images("train")
        return images[:count]
    return fidelity.photo_crops(demo_models.sample_photos(), count, seed=1)


class Batches:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over preprocessed batches of 8."""

    def __init__(self, inputs: torch.Tensor, input_name: str = "input") -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {input_name: chunk.numpy()} for chunk in torch.split(inputs, 8)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - only used by some calibration methods
        raise NotImplementedError


def named(path: Path) -> Path:
    """Name every unnamed node of the graph at ``path`` (``<op>_<index>``), in place: ``nodes_to_exclude`` and
    the report of the nodes kept in float need one name per node (the dynamo exporter leaves some empty)."""
    import onnx

    model = onnx.load(str(path))
    taken = {node.name for node in model.graph.node}
    changed = False
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type.lower()}_{index}"
            while name in taken:
                name += "_"
            node.name, changed = name, True
            taken.add(name)
    if changed:
        onnx.save(model, str(path))
    return path


def quantize_graph(
    source: Path,
    target: Path,
    inputs: Sequence[torch.Tensor],
    *,
    nodes_to_exclude: Sequence[str] = (),
    nodes_to_quantize: Sequence[str] = (),
) -> Path:
    """Static int8 QDQ quantization of the graph ``source`` into ``target``, calibrated on ``inputs`` (the
    network's own float input batches); ``nodes_to_exclude`` stay float, ``nodes_to_quantize`` (if given)
    are the only ones quantized. Per-channel int8 weights, uint8 activations with ``reduce_range``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    CalibrationDataReader.register(Batches)
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        named(prepared)
        quantize_static(
            str(prepared),
            str(target),
            Batches(torch.cat([t.contiguous() for t in inputs]), input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude) or None,
            nodes_to_quantize=list(nodes_to_quantize) or None,
        )
    return target


def quantize(name: str, models: Path, out: Path) -> dict[str, float]:
    """Write ``out/<name>/model.int8.onnx`` from ``out/<name>/model.onnx``; return its fidelity."""
    config = read_model_config(models / name)
    if not isinstance(config, ClassifierConfig):
        raise SystemExit(f"{name}: int8 quantization is offered for classifiers only")
    source = out / name / "model.onnx"
    target = out / name / "model.int8.onnx"
    quantize_graph(source, target, [demo_models.classifier_inputs(calibration_images(name), config)])
    report = fidelity.compare_onnx(name, models, source, target)
    (out / name / "int8.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_model_args(__doc__, argv)
    for name in args.names:
        report = quantize(name, args.models, args.out)
        logger.info("%s int8: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
