"""Generate Triton model repositories from ``models/<name>/`` and the ONNX exports (``make triton-repo``).

Two repositories with the same ensembles, so clients send what TorchServe clients send (the encoded
image, ``IMAGE``, ``TYPE_STRING``) and get the same JSON (``ANSWER``):

- ``model_repository/gpu``: ``<name>_model`` is an ``onnxruntime_onnx`` model on ``KIND_GPU`` with dynamic
  batching; classifiers add the TensorRT accelerator in FP16 with an engine cache and a warm-up. For
  NVIDIA's Triton container (``docker run --gpus=all ...``).
- ``model_repository/cpu``: ``<name>_model`` is a python-backend model running ONNX Runtime on
  ``KIND_CPU``, for servers without the onnxruntime backend (the ``tritonserver`` that ``nvidia-pytriton``
  bundles, used by the tests here).

Each ensemble is ``<name>_preprocess`` -> ``<name>_model`` -> ``<name>_postprocess``; the two python
steps run the kit's own decode, transforms and answers (``servekit.triton_steps``). Classifiers batch
(``max_batch_size`` 16); the detector takes images of any size one request at a time
(``max_batch_size: 0``, dynamic height and width, variable-length outputs). A segmenter batches at its recipe's
[h, w] and passes each image's size (``TYPE_INT32``, 2 values) to the postprocess. A raw-output (``output: yolo``)
detector batches like a classifier: the preprocess letterboxes every image to one square and passes its
geometry (``TYPE_FP64``, 6 values) around the model to the postprocess, which runs the kit's NMS; the
model's tensors keep the ONNX graph's own names (``images``/``output0`` for ultralytics' exports). A
DETR-family (``output: detr``) detector batches at its recipe's [h, w] (RT-DETR's 640 x 640): ``pixel_values``
in, ``logits`` and ``pred_boxes`` out, each image's size around the model to the postprocess.
Every ``config.pbtxt`` is parsed with tritonclient's ``ModelConfig`` protobuf before it is written.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from archive_args import stage_servekit
from servekit.config import ClassifierConfig, DetectorConfig, HandlerConfig, SegmenterConfig, read_model_config
from servekit.loading import load_labels
from servekit.onnx_backend import DETECTOR_IO
from servekit.triton_steps import DETR_IMAGE

logger = logging.getLogger("triton_repo")
MAX_BATCH = 16
PYTHON_STEPS = ("preprocess", "postprocess")
STEP_FILE = Path(__file__).resolve().parents[2] / "triton" / "servekit_step.py"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    dims: tuple[int, ...]

    def pbtxt(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        return f'{{ name: "{self.name}" data_type: {self.dtype} dims: [ {dims} ] }}'


def _io(kind: str, tensors: list[Tensor]) -> str:
    return f"{kind} [\n  " + ",\n  ".join(t.pbtxt() for t in tensors) + "\n]\n"


@dataclass(frozen=True)
class RawGraph:
    """A raw-output detector's ONNX graph: its input and output names, and one image's output dims."""

    image_name: str
    raw_name: str
    raw_dims: tuple[int, ...]

    @classmethod
    def probe(cls, onnx_file: Path, input_size: int) -> RawGraph:
        """Names from the graph, dims from one forward pass on a gray image."""
        import torch

        from servekit.onnx_backend import load_onnx
        from servekit.service import raw_output_shape

        model = load_onnx(onnx_file, torch.device("cpu"), 1)
        shape = raw_output_shape(model, input_size, torch.device("cpu"))
        return cls(model.input_name, model.output_name, tuple(shape[1:]))


@dataclass(frozen=True)
class Signature:
    """The tensors between the steps of one model's ensemble."""

    batch: int  # max_batch_size: 0 means no batching dimension
    model_in: list[Tensor]
    model_out: list[Tensor]
    extra: list[Tensor]  # preprocess outputs that skip the model and go to postprocess

    @classmethod
    def of(cls, config: HandlerConfig, classes: int, raw: RawGraph | None = None) -> Signature:
        if raw is not None:  # a raw-output detector: letterboxed images batch like a classifier's crops
            size = config.input_size if isinstance(config, DetectorConfig) else 0
            return cls(
                MAX_BATCH,
                [Tensor(raw.image_name, "TYPE_FP32", (3, size, size))],
                [Tensor(raw.raw_name, "TYPE_FP32", raw.raw_dims)],
                [Tensor("geometry", "TYPE_FP64", (6,))],
            )
        if isinstance(config, ClassifierConfig):
            return cls(
                MAX_BATCH,
                [Tensor("input", "TYPE_FP32", (3, *config.input_size))],
                [Tensor("logits", "TYPE_FP32", (classes,))],
                [],
            )
        if isinstance(config, DetectorConfig) and config.output == "detr":
            if not isinstance(config.resize, tuple):
                raise SystemExit(
                    "a DETR-family detector's Triton ensemble needs resize as [height, width] (RT-DETR's 640 x 640); "
                    "a short-side recipe (DETR's 800) is served by TorchServe only"
                )
            return cls(
                MAX_BATCH,
                [Tensor(DETR_IMAGE, "TYPE_FP32", (3, *config.resize))],
                [Tensor("logits", "TYPE_FP32", (-1, -1)), Tensor("pred_boxes", "TYPE_FP32", (-1, 4))],
                [Tensor("size", "TYPE_INT32", (2,))],
            )
        if isinstance(config, SegmenterConfig):  # one [h, w] for every image (the ONNX export needs it too)
            if not isinstance(config.resize, tuple):
                raise SystemExit("a segmenter's Triton ensemble needs resize as [height, width]")
            return cls(
                MAX_BATCH,
                [Tensor("input", "TYPE_FP32", (3, *config.resize))],
                [Tensor("logits", "TYPE_FP32", (classes, -1, -1))],
                [Tensor("size", "TYPE_INT32", (2,))],
            )
        return cls(
            0,
            [Tensor("image", "TYPE_FP32", (3, -1, -1))],
            [
                Tensor("boxes", "TYPE_FP32", (-1, 4)),
                Tensor("labels", "TYPE_INT64", (-1,)),
                Tensor("scores", "TYPE_FP32", (-1,)),
            ],
            [Tensor("size", "TYPE_INT32", (2,))],
        )


IMAGE = Tensor("IMAGE", "TYPE_STRING", (1,))
ANSWER = Tensor("ANSWER", "TYPE_STRING", (1,))


def _batching(sig: Signature, delay_us: int) -> str:
    if not sig.batch:
        return ""
    return f"dynamic_batching {{ preferred_batch_size: [ 8, 16 ] max_queue_delay_microseconds: {delay_us} }}\n"


def _python(name: str, step: str, sig: Signature, *, inputs: list[Tensor], outputs: list[Tensor], delay_us: int) -> str:
    parameters = {"servekit_step": step, "image_name": sig.model_in[0].name, "raw_name": sig.model_out[0].name}
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {sig.batch}\n'
        + _io("input", inputs)
        + _io("output", outputs)
        + _batching(sig, delay_us)
        + "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        + "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in parameters.items())
    )


def _gpu_model(name: str, sig: Signature, delay_us: int) -> str:
    text = (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {sig.batch}\n'
        + _io("input", sig.model_in)
        + _io("output", sig.model_out)
        + _batching(sig, delay_us)
        + "instance_group [ { kind: KIND_GPU count: 1 } ]\n"
    )
    if not sig.batch:  # the torchvision detector: CUDA provider; TensorRT engines for every image size would not pay
        return text
    first = sig.model_in[0]
    dims = ", ".join(str(d) for d in first.dims)
    return text + (
        "optimization { execution_accelerators { gpu_execution_accelerator: [ {\n"
        '  name: "tensorrt"\n'
        '  parameters { key: "precision_mode" value: "FP16" }\n'
        '  parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
        '  parameters { key: "trt_engine_cache_enable" value: "1" }\n'
        '  parameters { key: "trt_engine_cache_path" value: "/tmp/triton_trt_cache" }\n'
        "} ] } }\n"
        "model_warmup [ {\n"
        f'  name: "warmup_batch_8" batch_size: 8\n'
        f'  inputs {{ key: "{first.name}" value: {{ data_type: {first.dtype} dims: [ {dims} ] random_data: true }} }}\n'
        "} ]\n"
    )


def _ensemble(name: str, sig: Signature) -> str:
    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
        maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
        return f'    {{ model_name: "{model}" model_version: -1{maps} }}'

    pre_out = {t.name: t.name for t in sig.model_in + sig.extra}
    model_io = {t.name: t.name for t in sig.model_in}
    post_in = {t.name: t.name for t in sig.model_out + sig.extra}
    steps = [
        step(f"{name}_preprocess", {"IMAGE": "IMAGE"}, pre_out),
        step(f"{name}_model", model_io, {t.name: t.name for t in sig.model_out}),
        step(f"{name}_postprocess", post_in, {"ANSWER": "ANSWER"}),
    ]
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {sig.batch}\n'
        + _io("input", [IMAGE])
        + _io("output", [ANSWER])
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n"
    )


def model_configs(
    name: str, config: HandlerConfig, classes: int, kind: str, *, delay_us: int = 2000, raw: RawGraph | None = None
) -> dict[str, str]:
    """Every ``config.pbtxt`` of one model's ensemble, by Triton model name."""
    sig = Signature.of(config, classes, raw)
    configs = {
        name: _ensemble(name, sig),
        f"{name}_preprocess": _python(
            f"{name}_preprocess", "preprocess", sig, inputs=[IMAGE], outputs=sig.model_in + sig.extra, delay_us=delay_us
        ),
        f"{name}_postprocess": _python(
            f"{name}_postprocess",
            "postprocess",
            sig,
            inputs=sig.model_out + sig.extra,
            outputs=[ANSWER],
            delay_us=delay_us,
        ),
    }
    if kind == "gpu":
        configs[f"{name}_model"] = _gpu_model(f"{name}_model", sig, delay_us)
    else:
        configs[f"{name}_model"] = _python(
            f"{name}_model", "model", sig, inputs=sig.model_in, outputs=sig.model_out, delay_us=delay_us
        )
    return configs


def parse_config(text: str) -> object:
    """Parse a ``config.pbtxt`` with tritonclient's ``ModelConfig`` message (errors give line and column)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _stage_python(folder: Path, model_dir: Path, config: HandlerConfig, handlers: Path) -> None:
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy(STEP_FILE, version / "model.py")
    stage_servekit(handlers, version)
    shutil.copy(model_dir / "model-config.yaml", version / "model-config.yaml")
    shutil.copy(model_dir / config.labels, version / config.labels)
    if (model_dir / "config.json").is_file():  # a Hugging Face folder's: what `scoring: auto` reads
        shutil.copy(model_dir / "config.json", version / "config.json")


def graph_outputs(onnx_file: Path) -> list[str]:
    """The output names of an ONNX graph."""
    import onnx

    return [output.name for output in onnx.load(str(onnx_file), load_external_data=False).graph.output]


def write_model(name: str, models: Path, onnx_dir: Path, out: Path, *, kind: str, handlers: Path) -> list[str]:
    """Write one model's ensemble and steps under ``out``; return the Triton model names."""
    model_dir = models / name
    config = read_model_config(model_dir)
    onnx_file = onnx_dir / name / "model.onnx"
    if not onnx_file.is_file():
        raise SystemExit(f"{onnx_file} is missing: run `make onnx` first")
    classes = len(load_labels(model_dir / config.labels))
    if isinstance(config, DetectorConfig) and config.output == "torchvision":
        extra = [output for output in graph_outputs(onnx_file) if output not in DETECTOR_IO[1]]
        if extra:  # the ensemble would drop them silently where TorchServe answers them
            raise SystemExit(
                f"{name}: a torchvision detector's Triton ensemble answers boxes, labels and scores; this graph also "
                f"gives {', '.join(extra)} (masks or keypoints), which only TorchServe answers: serve it there"
            )
    raw = None
    if isinstance(config, DetectorConfig) and config.output == "yolo":
        raw = RawGraph.probe(onnx_file, config.input_size)
    configs = model_configs(name, config, classes, kind, raw=raw)
    for model_name, text in configs.items():
        parse_config(text)
        folder = out / model_name
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(text, encoding="utf-8")
        python = model_name != name and (model_name != f"{name}_model" or kind == "cpu")
        if python:
            _stage_python(folder, model_dir, config, handlers)
        if model_name == f"{name}_model":
            shutil.copy(onnx_file, folder / "1" / "model.onnx")
    return list(configs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--onnx-dir", type=Path, default=Path("build/onnx"))
    parser.add_argument("--handlers", type=Path, default=Path("handlers"))
    parser.add_argument("--out", type=Path, default=Path("model_repository"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for kind in ("cpu", "gpu"):
        written = []
        for name in args.names:
            written += write_model(name, args.models, args.onnx_dir, args.out / kind, kind=kind, handlers=args.handlers)
        logger.info("%s/%s: %s", args.out, kind, ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
