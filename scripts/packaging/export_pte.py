"""ExecuTorch program of a model folder, for phones and as a CPU backend (``make pte MODEL=<name> [INT8=1]``).

Writes ``build/pte/<name>/model.pte`` (``model.int8.pte`` with ``INT8=1``) and, beside it, ``preprocess.json``:
the recipe an app must apply before ``forward`` (resize, crop, interpolation, scaling, mean, std, channel order,
the labels and what the output is), written from the folder's parsed config, the one the server applies. An app
that preprocesses otherwise answers differently from the server, silently: read the recipe, never restate it.

The folder's network is loaded as a worker loads it (``servekit.config``, ``servekit.loading``), exported with
``torch.export`` (batch 1 to the folder's ``batchSize``, at most 15; height and width the recipe's), lowered to XNNPACK
(``to_edge_transform_and_lower`` with ``XnnpackPartitioner``) and serialized. With ``INT8=1`` it is quantized
first: pt2e static int8 with ExecuTorch's XNNPACK quantizer (symmetric per-channel int8 weights, int8
activations), calibrated on 64 images through the folder's own recipe: ``DATA=<images>`` when given, else the
digits' training split for ``digits`` and crops of scikit-image's photos for any other model.

The report (one line, and ``report.json`` / ``report.int8.json`` beside the program): the largest difference
from eager fp32 on preprocessed images the calibration never saw, top-1 agreement (a segmenter's: per pixel),
the file size, what XNNPACK took, and the latency at batch 1 on one thread through ExecuTorch's Python runtime
(the kit's ``format: executorch`` backend) next to eager torch on one thread, with the CPU it ran on.

Exported: classifiers, segmenters whose input size is fixed (``resize: [h, w]``), raw-output (``yolo``)
detectors (decode and NMS stay the app's, or the kit's when served). Refused in one line: torchvision detectors
and DETR-family ones, segmenters whose input follows the image's size, folders whose network is not a torch
module (TorchScript, ONNX, OpenVINO, AOTInductor, ExecuTorch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from servekit.config import (
    ClassifierConfig,
    DetectorConfig,
    HandlerConfig,
    SegmenterConfig,
    read_model_config,
    read_model_document,
)
from servekit.errors import ConfigError
from servekit.loading import load_labels, load_model
from servekit.program_backend import torch_module
from servekit.segmentation import segmentation_logits

logger = logging.getLogger("export_pte")
CHECK_IMAGES = 32  # preprocessed images the program is compared with eager on (never calibrated on)
LABELED_CHECK_IMAGES = 500  # with labels (the digits' split, DATA as class folders): the metric's images
CALIBRATION_IMAGES = 64
TIMED_CALLS = 30
TOLERANCE = 1e-3  # fp32: the largest difference allowed, relative to the largest eager output (at least 1)
RECIPE_VERSION = 1
# ExecuTorch 1.5.1 plans a dynamic batch for at most 15 (torch 2.14.1's export says 16 or 32, the program's
# memory plan 15; measured): a larger batchSize runs in chunks of 15, as the program's own metadata says.
PTE_MAX_BATCH = 15


# ------------------------------------------------------------------------------------- what is exported


def refusal(name: str, config: HandlerConfig) -> str:
    """Why folder ``name`` is not exported to ExecuTorch here (one line), or empty."""
    if isinstance(config, DetectorConfig) and config.output == "torchvision":
        return (
            f"{name} is a torchvision detector: torch.export cannot trace its NMS (data-dependent shapes) and the "
            "kit serves it whole; export its backbone and head yourself, or serve it with format state_dict"
        )
    if isinstance(config, DetectorConfig) and config.output == "detr":
        return f"{name} is a DETR-family detector; make pte exports classifiers, fixed-size segmenters, yolo detectors"
    if isinstance(config, SegmenterConfig) and not fixed_segmenter(config):
        return (
            f"{name}'s recipe resizes to a size that follows the image (resize {config.resize}); a .pte has one input "
            "size: set handler.resize to [height, width] (and no keep_aspect_ratio / ensure_multiple_of)"
        )
    return ""


def fixed_segmenter(config: SegmenterConfig) -> bool:
    """Whether every image reaches the segmenter at one size."""
    return isinstance(config.resize, tuple) and not config.keep_aspect_ratio and not config.ensure_multiple_of


def input_size(config: HandlerConfig) -> tuple[int, int]:
    """The (height, width) of the batch the network receives from the kit's recipe."""
    if isinstance(config, ClassifierConfig):
        return config.input_size
    if isinstance(config, SegmenterConfig):
        crop = config.crop
        if crop:
            return (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
        assert isinstance(config.resize, tuple)
        return int(config.resize[0]), int(config.resize[1])
    return config.input_size, config.input_size


class Outputs(torch.nn.Module):
    """The network with the one tensor its output family reads: a classifier's logits, a segmenter's
    ``[N, C, h, w]`` logits (torchvision's ``{"out"}`` dict unwrapped), a yolo detector's raw rows."""

    def __init__(self, network: torch.nn.Module, task: str) -> None:
        super().__init__()
        self.network = network
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if self.task == "segmentation":
            return segmentation_logits(out)
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out


# ------------------------------------------------------------------------------------- the app's recipe


def preprocess_recipe(
    name: str, config: HandlerConfig, labels: Sequence[str], batch: tuple[int, int]
) -> dict[str, Any]:
    """What an app applies to an RGB image before ``forward``, and what the output is: from the parsed config
    (one recipe for the fp32 and the int8 program)."""
    height, width = input_size(config)
    recipe: dict[str, Any] = {
        "version": RECIPE_VERSION,
        "model": name,
        "task": config.task,
        "input": {"shape": ["N", 3, height, width], "batch": list(batch), "dtype": "float32", "layout": "NCHW"},
    }
    if isinstance(config, DetectorConfig):
        recipe.update(yolo_recipe(config))
    else:
        recipe.update(resize_recipe(config))
        recipe.update(
            scale=1 / 255,
            mean=list(config.mean),
            std=list(config.std),
            channel_order=config.channel_order,
        )
    recipe["output"] = output_recipe(config, len(labels))
    recipe["labels"] = list(labels)
    return recipe


def recipe_text(recipe: dict[str, Any]) -> str:
    """The recipe as JSON with one key a line (each value on its line, compact), for people and apps alike."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in recipe.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def resize_recipe(config: ClassifierConfig | SegmenterConfig) -> dict[str, Any]:
    """A classifier's or segmenter's resize and crop, as the kit's transforms do them."""
    resize = config.resize
    steps: dict[str, Any] = {
        "resize": resize if isinstance(resize, int) else list(resize),
        "resize_mode": "short_side" if isinstance(resize, int) else "exact",
        "interpolation": config.interpolation,
        "antialias": True,
    }
    crop = config.crop
    if crop:
        steps["crop"] = [crop, crop] if isinstance(crop, int) else list(crop)
        # where an odd margin's extra pixel goes (torchvision: the top/left margin is rounded; floor: HF)
        steps["crop_rounding"] = getattr(config, "crop_rounding", "floor")
    else:
        steps["crop"] = None
    return steps


def yolo_recipe(config: DetectorConfig) -> dict[str, Any]:
    """A raw-output detector's letterbox: the image fitted into the square, centred on gray, scaled to [0, 1]."""
    from servekit.yolo import PAD_VALUE

    return {
        "letterbox": config.input_size,
        "letterbox_style": config.letterbox,  # kit: antialiased bilinear; ultralytics: OpenCV INTER_LINEAR
        "pad_value": PAD_VALUE,
        "interpolation": "bilinear",
        "antialias": config.letterbox == "kit",
        "scale": 1 / 255,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "channel_order": "rgb",
    }


def output_recipe(config: HandlerConfig, classes: int) -> dict[str, Any]:
    """What ``forward`` answers and what the server does with it."""
    if isinstance(config, ClassifierConfig):
        return {"kind": "logits", "shape": ["N", classes], "then": "softmax, top-k", "topk": config.topk}
    if isinstance(config, SegmenterConfig):
        return {
            "kind": "logits",
            "shape": ["N", classes, "h", "w"],
            "then": "resize the logits to the image as sent (bilinear), argmax per pixel",
        }
    return {
        "kind": "yolo raw rows",
        "layout": config.layout,
        "then": "undo the letterbox, score threshold, NMS",
        "score_threshold": config.score_threshold,
        "iou_threshold": config.iou_threshold,
        "max_detections": config.max_detections,
        "agnostic_nms": config.agnostic_nms,
    }


# ------------------------------------------------------------------------------------- images


def network_inputs(images: Sequence[bytes], config: HandlerConfig) -> torch.Tensor:
    """Encoded images as the float batch the served network receives (the service's own per-item steps)."""
    from servekit.service import classifier_item, letterboxed_item, segmenter_item
    from servekit.transforms import classifier_batch

    rows = [{"body": data} for data in images]
    if isinstance(config, ClassifierConfig):
        return classifier_batch([classifier_item(row, config) for row in rows], config)
    if isinstance(config, SegmenterConfig):
        return classifier_batch([segmenter_item(row, config)[0] for row in rows], config)
    return torch.stack([letterboxed_item(row, config)[0] for row in rows]).to(torch.float32).div_(255.0)


@dataclass(frozen=True)
class Images:
    """Encoded images to check the program on (with their labels, when known) and others to calibrate on."""

    check: list[bytes]
    truth: list[int] | None
    calibration: list[bytes]
    source: str


def data_images(data: Path, labels: Sequence[str]) -> Images:
    """DATA's images (class folders or a CSV give labels; any folder of images does): every file whose sorted
    position is a multiple of 3 checks, the others calibrate."""
    from distill import listed

    dataset, layout = listed(data, labels, None)
    samples = sorted(dataset.samples, key=lambda s: str(s.path))
    if len(samples) < 2:
        raise ConfigError(f"DATA {data} holds {len(samples)} images; make pte needs at least 2")
    labeled = all(isinstance(s.truth, int) and s.truth >= 0 for s in samples)
    checked = samples[::3][: LABELED_CHECK_IMAGES if labeled else CHECK_IMAGES]
    calibrating = [s for i, s in enumerate(samples) if i % 3][:CALIBRATION_IMAGES]
    return Images(
        [s.path.read_bytes() for s in checked],
        [int(s.truth) for s in checked] if labeled else None,  # type: ignore[arg-type]
        [s.path.read_bytes() for s in calibrating],
        f"{data}, {layout}",
    )


def demo_images(name: str) -> Images:
    """The kit's own images: the digits' held-out split (with labels) and training split, else seeded crops
    of scikit-image's photos (calibration and check crops from different seeds, as ``make int8`` takes them)."""
    import demo_models
    import fidelity

    encode = demo_models.encode
    if name == "digits":
        checked, truth = demo_models.digit_images("test")
        calibrating = demo_models.digit_images("train")[0][:CALIBRATION_IMAGES]
        count = min(len(checked), LABELED_CHECK_IMAGES)
        return Images(
            [encode(i, "PNG") for i in checked[:count]],
            list(truth[:count]),
            [encode(i, "PNG") for i in calibrating],
            "the digits' held-out split; calibration: its training split",
        )
    photos = demo_models.sample_photos()
    return Images(
        [encode(i, "PNG") for i in fidelity.photo_crops(photos, CHECK_IMAGES, seed=2)],
        None,
        [encode(i, "PNG") for i in fidelity.photo_crops(photos, CALIBRATION_IMAGES, seed=1)],
        f"seeded crops of scikit-image's {len(photos)} photos",
    )


# ------------------------------------------------------------------------------------- export and lowering


def exported(network: torch.nn.Module, size: tuple[int, int], max_batch: int) -> Any:
    """``network`` (in eval mode) as a ``torch.export`` program taking batches of 1 to ``max_batch`` (at least 2,
    at most ``PTE_MAX_BATCH``)."""
    example = torch.rand(2, 3, *size)
    batch = torch.export.Dim("batch", min=1, max=export_max(max_batch))
    with torch.no_grad():
        return torch.export.export(network, (example,), dynamic_shapes=({0: batch},))


def export_max(max_batch: int) -> int:
    """The largest batch a program is exported for: the folder's ``batchSize``, at least 2, at most 15."""
    return max(2, min(max_batch, PTE_MAX_BATCH))


def quantized(network: torch.nn.Module, size: tuple[int, int], max_batch: int, batches: Sequence[torch.Tensor]) -> Any:
    """pt2e static int8 of ``network`` with the XNNPACK quantizer, calibrated on ``batches``: a module whose
    quantize/dequantize pairs the XNNPACK partitioner lowers to int8 kernels."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported(network, size, max_batch).module(), quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    return convert_pt2e(prepared)


@dataclass(frozen=True)
class Lowered:
    """The serialized program and what XNNPACK took of it."""

    buffer: bytes
    delegated: int  # calls into the XNNPACK delegate
    outside: tuple[str, ...]  # operators left to ExecuTorch's portable kernels (shape reads not counted)

    def describe(self) -> str:
        calls = f"{self.delegated} XNNPACK call{'s' if self.delegated != 1 else ''}"
        if not self.outside:
            return f"{calls}, no op outside"
        names = sorted(set(self.outside))
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"{calls}, {len(self.outside)} op{'s' if len(self.outside) != 1 else ''} outside ({listed})"


SHAPE_OPS = ("getitem", "sym_size")


def op_name(target: Any) -> str:
    """An edge operator's short name: ``aten.view_copy.default`` -> ``view_copy``."""
    parts = str(getattr(target, "__name__", target)).split(".")
    return parts[-2] if len(parts) > 2 else parts[-1]


def lowered(program: Any) -> Lowered:
    """An exported program lowered to XNNPACK and serialized as a ``.pte``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    calls = [n for n in edge.exported_program().graph.nodes if n.op == "call_function"]
    delegated = sum("call_delegate" in str(n.target) for n in calls)
    outside = tuple(
        op_name(n.target)
        for n in calls
        if "call_delegate" not in str(n.target) and not any(op in str(n.target) for op in SHAPE_OPS)
    )
    return Lowered(edge.to_executorch().buffer, delegated, outside)


# ------------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Fidelity:
    """The program against eager fp32 on the check images."""

    max_abs: float
    largest: float  # the largest |eager output|, the scale of max_abs
    agreement: float | None  # top-1 (classifier) or per-pixel argmax (segmenter) agreement; None: a detector
    images: int
    probability: float | None = None  # a classifier's largest difference of softmax probabilities
    accuracy: tuple[float, float] | None = None  # top-1 accuracy of eager and of the program, with labels
    agreement_of: str = "top-1"  # what agrees: the top-1 class, or each pixel's class (a segmenter)

    def describe(self) -> str:
        agreed = f", of probabilities {self.probability:.2e}" if self.probability is not None else ""
        agreed += f", {self.agreement_of} agreement {self.agreement:.1%}" if self.agreement is not None else ""
        if self.accuracy is not None:
            agreed += f", top-1 accuracy {self.accuracy[1]:.1%} (eager {self.accuracy[0]:.1%})"
        return f"max abs difference {self.max_abs:.2e} (largest output {self.largest:.2f}){agreed} on {self.images}"


def fidelity_of(expected: torch.Tensor, found: torch.Tensor, task: str, truth: Sequence[int] | None = None) -> Fidelity:
    """How ``found`` (the program's outputs) follows ``expected`` (eager fp32's), and the accuracy of each
    against ``truth`` when the images have labels (a classifier's)."""
    agreement = probability = accuracy = None
    if task in ("classification", "segmentation"):
        agreement = float((expected.argmax(1) == found.argmax(1)).float().mean())
    if task == "classification":
        probability = float((expected.softmax(1) - found.softmax(1)).abs().max())
    if truth is not None and task == "classification":
        labels = torch.tensor(list(truth))
        accuracy = tuple(float((out.argmax(1) == labels).float().mean()) for out in (expected, found))
    largest, images, of = (
        float(expected.abs().max()),
        int(expected.shape[0]),
        "per-pixel" if task == "segmentation" else "top-1",
    )
    return Fidelity(float((expected - found).abs().max()), largest, agreement, images, probability, accuracy, of)


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per call at batch 1 on one thread: wall clock and this process's CPU time."""

    pte_ms: float
    pte_cpu_ms: float
    eager_ms: float
    eager_cpu_ms: float
    calls: int

    def describe(self) -> str:
        return (
            f"batch 1, 1 thread: .pte {self.pte_ms:.2f} ms (CPU {self.pte_cpu_ms:.2f}), eager {self.eager_ms:.2f} ms "
            f"(CPU {self.eager_cpu_ms:.2f}), median of {self.calls}"
        )


def median_ms(run: Callable[[], Any], calls: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``run`` after 3 warm-up calls."""
    for _ in range(3):
        run()
    wall, cpu = [], []
    for _ in range(calls):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def one_thread_latency(program: Callable[[torch.Tensor], Any], eager: torch.nn.Module, x: torch.Tensor) -> Latency:
    """Batch-1 latency of the program and of eager torch, each on one thread."""
    from servekit.executorch_backend import set_threads

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    set_threads(1)
    try:
        with torch.inference_mode():
            pte = median_ms(lambda: program(x), TIMED_CALLS)
            torch_ms = median_ms(lambda: eager(x), TIMED_CALLS)
    finally:
        torch.set_num_threads(threads)
    return Latency(pte[0], pte[1], torch_ms[0], torch_ms[1], TIMED_CALLS)


@dataclass(frozen=True)
class PteReport:
    """What ``make pte`` built and measured."""

    name: str
    program: str
    variant: str  # fp32 or int8
    size_bytes: int
    batch: tuple[int, int]
    input: tuple[int, int]
    seconds: float  # export, quantization and lowering
    lowered: str
    fidelity: Fidelity
    latency: Latency
    images: str
    machine: str

    def describe(self) -> str:
        height, width = self.input
        return (
            f"wrote {self.program} ({self.variant}, {self.size_bytes / 1e6:.2f} MB, batch {self.batch[0]}-"
            f"{self.batch[1]}, {height}x{width}, {self.lowered}) in {self.seconds:.0f} s; against eager fp32: "
            f"{self.fidelity.describe()} images ({self.images}); {self.latency.describe()}; CPU: {self.machine}"
        )


# ------------------------------------------------------------------------------------- make pte


@dataclass(frozen=True)
class Folder:
    """A model folder as a worker reads it, with the network's one output tensor."""

    name: str
    config: HandlerConfig
    network: torch.nn.Module
    labels: list[str]
    max_batch: int


def read_folder(name: str, models: Path) -> Folder:
    """Parse and load ``models/<name>`` the way a worker does; refuse what make pte does not export."""
    folder = models / name
    config = read_model_config(folder)
    why = refusal(name, config)
    if why:
        raise ConfigError(why)
    max_batch = int(read_model_document(folder).get("batchSize", 1))
    module = torch_module(load_model(folder, config.model, torch.device("cpu")))
    if module is None:
        raise ConfigError(
            f"{name} is format {config.model.format}; make pte needs the network as a torch module "
            "(a state_dict, safetensors, checkpoint, timm folder or torch.export program)"
        )
    labels = load_labels(folder / config.labels)
    network = Outputs(module, config.task).eval()
    if isinstance(config, DetectorConfig) and config.layout == "auto":  # the recipe says which layout it is
        from servekit.service import raw_output_shape
        from servekit.yolo import infer_layout

        shape = raw_output_shape(network, config.input_size, torch.device("cpu"))
        config = dataclasses.replace(config, layout=infer_layout(shape, len(labels) or None))
    return Folder(name, config, network, labels, max_batch)


def build_pte(
    name: str,
    models: Path,
    out: Path,
    *,
    int8: bool = False,
    data: Path | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
) -> tuple[PteReport, Path]:
    """``make pte``: export, (quantize,) lower, write the program and the recipe, check and time it;
    ``calibration``: the network's own input batches to calibrate int8 on (``make variants``' split)."""
    from profiles import this_machine
    from servekit.executorch_backend import load_executorch

    started = time.perf_counter()
    folder = read_folder(name, models)
    size = input_size(folder.config)
    images = data_images(data, folder.labels) if data else demo_images(name)
    check = network_inputs(images.check, folder.config)
    network = folder.network
    if int8:
        if calibration is None:
            calibration = torch.split(network_inputs(images.calibration, folder.config), export_max(folder.max_batch))
        logger.info("%s: int8 calibration on %d images", name, sum(len(b) for b in calibration))
        most = export_max(folder.max_batch)
        batches = [chunk for batch in calibration for chunk in torch.split(batch, most)]
        network = quantized(network, size, folder.max_batch, batches)
    logger.info("%s: export and XNNPACK lowering (a minute for the larger networks)", name)
    program = lowered(exported(network, size, folder.max_batch))
    target = out / name / ("model.int8.pte" if int8 else "model.pte")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(program.buffer)
    seconds = time.perf_counter() - started
    served = load_executorch(target, torch.device("cpu"), torch.get_num_threads())
    batch = (served.spec.min_batch, served.spec.max_batch or 1)  # what the program itself takes
    recipe = preprocess_recipe(name, folder.config, folder.labels, batch)
    (out / name / "preprocess.json").write_text(recipe_text(recipe), encoding="utf-8")
    with torch.inference_mode():
        expected = torch.cat([folder.network(chunk) for chunk in torch.split(check, 64)])
        found = served(check)
    fidelity = fidelity_of(expected, found, folder.config.task, images.truth)
    limit = TOLERANCE * max(1.0, fidelity.largest)
    if not int8 and fidelity.max_abs > limit:
        raise ConfigError(f"{target} differs from eager by {fidelity.max_abs:.2e} (limit {limit:.1e})")
    latency = one_thread_latency(served, folder.network, check[:1])
    report = PteReport(
        name, str(target), "int8" if int8 else "fp32", target.stat().st_size, batch, size, seconds,
        program.describe(), fidelity, latency, images.source, this_machine().describe(),
    )  # fmt: skip
    path = out / name / ("report.int8.json" if int8 else "report.json")
    path.write_text(json.dumps(asdict(report), indent=1) + "\n", encoding="utf-8")
    return report, out / name / "preprocess.json"


def main(argv: list[str] | None = None) -> int:
    from cli import report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("build/pte"))
    parser.add_argument("--int8", action="store_true", help="pt2e static int8 (XNNPACK quantizer) before lowering")
    parser.add_argument("--data", type=Path, default=None, help="images to calibrate and check on (default: the kit's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("torch").setLevel(logging.ERROR)

    def run() -> str:
        built, recipe = build_pte(args.name, args.models, args.out, int8=args.int8, data=args.data)
        return f"{built.describe()}\nthe app's preprocessing: {recipe}"

    return report(run, f"export {args.name} to ExecuTorch")


if __name__ == "__main__":
    sys.exit(main())
