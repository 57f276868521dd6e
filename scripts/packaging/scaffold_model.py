"""Scaffold ``models/<name>/`` from a model file or folder a user already has (``make scaffold``).

The file's format is found from its content, whatever its suffix: a state_dict or training checkpoint
(``torch.save``, timm ``train.py`` and Lightning checkpoints included), safetensors, TorchScript, a
``torch.export`` program, an AOTInductor package or ONNX; a folder is a timm hub folder or a Hugging
Face ``save_pretrained`` folder. A classifier's preprocessing is read from its own recipe (torchvision's
weight entry, timm's data config, the Hugging Face image processor) and written with where it came from;
an ultralytics export's class names and input size come from its metadata.
Weights are unwrapped from checkpoints and wrapper prefixes, the class count is read off the final
layer and checked against the labels, and the folder is then loaded and run on a generated image
exactly as a worker will, so a model that cannot serve fails here, in one line, not in TorchServe.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
import yaml
from PIL import Image

from cli import report
from servekit import hf_source, timm_source
from servekit.checkpoint import check_labels, head_key, shape_of
from servekit.config import WEIGHT_FORMATS, ModelSource, parse_handler_config
from servekit.detr import detr_outputs, scoring_of
from servekit.errors import ConfigError, plain_line, require
from servekit.loading import load_labels, load_model
from servekit.program_backend import InputSpec, exported_input_spec
from servekit.recipes import Recipe, hf_recipe, timm_recipe, torchvision_recipe
from servekit.segmentation import segmentation_logits
from servekit.service import build_service, raw_output_shape
from servekit.sniff import FILE_NAMES, WEIGHT_FILES, Sniffed, sniff_model_file
from servekit.ultralytics_source import read_export_metadata
from servekit.weights import fit_weights, read_weights
from servekit.yolo import infer_layout, layout_classes

FRONTEND_DEFAULTS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 20, "responseTimeout": 60}
CLASSIFIER_DEFAULTS = {"resize": 256, "crop": 224, "topk": 5}
DETECTOR_DEFAULTS = {"score_threshold": 0.5, "max_detections": 100}
SEGMENTER_DEFAULTS = {"resize": 520}  # torchvision's segmentation recipe, when the model says none
YOLO_DEFAULTS = {"score_threshold": 0.25, "iou_threshold": 0.45, "max_detections": 300}
DETR_DEFAULTS = {"score_threshold": 0.5, "max_detections": 100}  # post_process_object_detection's threshold
ULTRALYTICS_PREDICT = {"score_threshold": 0.25, "iou_threshold": 0.7, "max_detections": 300}  # `yolo predict`
BACKGROUND = "__background__"
TASKS = ("classification", "detection", "segmentation")


@dataclass
class Plan:
    """What the folder will hold: the handler section, the weights to write, labels, and notes."""

    section: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    state: dict[str, torch.Tensor] | None = None  # unwrapped weights to write instead of copying the file
    classes: int | None = None
    head: tuple[str, tuple[int, ...]] | None = None
    copies: dict[str, Path] = field(default_factory=dict)  # files to copy into the folder, by their name there
    labels: list[str] = field(default_factory=list)  # class names the model carries (id2label, its metadata)
    labels_from: str = ""
    network: str = ""
    recipe: Recipe | None = None
    fitted: torch.nn.Module | None = None  # the network with the file's weights (weights formats)

    def use_recipe(self, recipe: Recipe) -> None:
        """Write the model's own preprocessing into the section and say where it came from."""
        self.section.update(recipe.section(self.section["task"]))
        self.recipe = recipe
        self.notes.extend([recipe.describe(), *recipe.notes])


def check_architecture(architecture: str, task: str) -> None:
    """Fail with one line for an unknown torchvision or timm name, or one of the other task."""
    if timm_source.is_timm(architecture):
        if task != "classification":
            raise ConfigError(f"{architecture}: timm models are served as classifiers (TASK=classification)")
        timm_source.check_name(architecture.removeprefix(timm_source.PREFIX))
        return
    known = torchvision.models.list_models()
    if architecture not in known:
        close = difflib.get_close_matches(architecture, known, n=3)
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else "; `python -c 'import torchvision; print(torchvision.models.list_models())'` lists them"
        )
        raise ConfigError(f"unknown torchvision architecture {architecture!r}{hint}")
    found = architecture_task(architecture)
    if found != task:
        raise ConfigError(f"{architecture} is a {found} architecture, not {task}: use TASK={found}")


TORCHVISION_TASKS = {
    "detection": torchvision.models.detection,
    "segmentation": torchvision.models.segmentation,
    "video": torchvision.models.video,
    "optical flow": torchvision.models.optical_flow,
    "classification": torchvision.models,
}


def architecture_task(architecture: str) -> str:
    """The task of a torchvision architecture, from the module that defines it."""
    found = (t for t, m in TORCHVISION_TASKS.items() if architecture in torchvision.models.list_models(module=m))
    return next(found, "quantized or other")


def weights_plan(args: argparse.Namespace, sniffed: Sniffed) -> Plan:
    """Fit a state_dict/safetensors file to its network: unwrapped, head sized from the weights, recipe read."""
    obj = read_weights(args.pt, sniffed.format)
    notes = checkpoint_notes(obj)
    architecture = args.architecture
    if not (architecture or args.model_file):
        architecture = timm_checkpoint_model(obj)
        if architecture is None:
            raise ConfigError(
                f"{args.pt.name} holds weights only ({sniffed.description}): name the network with "
                "ARCH=<torchvision name>, ARCH=timm:<timm name> or MODEL_FILE=<file.py> CLASS=<class name>"
            )
        notes.append(f"a timm train.py checkpoint of {architecture.removeprefix(timm_source.PREFIX)}")
    model: dict[str, Any] = {"file": FILE_NAMES[sniffed.format], "format": sniffed.format}
    if architecture:
        check_architecture(architecture, args.task)
        model["architecture"] = architecture
        source_dir = Path(".")
    else:
        model.update(model_file=Path(args.model_file).name, model_class=args.model_class)
        source_dir = Path(args.model_file).parent
    if args.num_classes:
        model["kwargs"] = {"num_classes": args.num_classes}
    plan = fitted_plan(args, obj, model, source_dir, notes)
    if args.task != "detection" and not args.input_size and architecture:
        recipe = (
            timm_model_recipe(plan, obj) if timm_source.is_timm(architecture) else torchvision_arch_recipe(architecture)
        )
        if recipe is not None:
            plan.use_recipe(recipe)
    return plan


def fitted_plan(args: argparse.Namespace, obj: Any, model: dict[str, Any], source_dir: Path, notes: list[str]) -> Plan:
    """Fit the weights to the network the model section names; the plan writes them unwrapped."""
    fitted = fit_weights(obj, source_dir, ModelSource(**model))
    if fitted.num_classes is not None:
        model["kwargs"] = {**model.get("kwargs", {}), "num_classes": fitted.num_classes}
    if fitted.kwargs:
        model["kwargs"] = {**model.get("kwargs", {}), **fitted.kwargs}
    plan = Plan(task_section(args, model), [*notes, *fitted.steps], fitted.state, fitted.num_classes)
    plan.network = model.get("architecture") or model.get("model_class") or ""
    plan.fitted = fitted.model
    layer = head_key(fitted.model.state_dict(), fitted.num_classes) if fitted.num_classes else None
    if layer:
        plan.head = (layer, shape_of(fitted.state[layer]))
    return plan


def checkpoint_notes(obj: Any) -> list[str]:
    """What the saved object says it is (a Lightning checkpoint names its version)."""
    if isinstance(obj, dict) and "pytorch-lightning_version" in obj:
        return [f"a Lightning checkpoint (pytorch-lightning {obj['pytorch-lightning_version']})"]
    return []


def timm_checkpoint_model(obj: Any) -> str | None:
    """``timm:<name>`` of a timm ``train.py`` checkpoint (``args.model``, else ``arch``), when timm knows it."""
    if not isinstance(obj, dict) or "state_dict" not in obj:
        return None
    name = getattr(obj.get("args"), "model", None) or obj.get("arch")
    if not isinstance(name, str):
        return None
    try:
        timm_source.check_name(name)
    except ConfigError:
        return None
    return f"{timm_source.PREFIX}{name}"


def torchvision_arch_recipe(architecture: str) -> Recipe | None:
    """The recipe of a torchvision architecture's default weights entry (``weights.transforms()``)."""
    try:
        entry = torchvision.models.get_model_weights(architecture).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return None
    return torchvision_recipe(entry.transforms(), f"torchvision {entry}.transforms()")


def timm_model_recipe(plan: Plan, obj: Any, pretrained_cfg: dict[str, Any] | None = None) -> Recipe:
    """timm's eval recipe: ``resolve_data_config`` from the training args (train.py) or ``pretrained_cfg``."""
    import timm.data

    args = vars(obj["args"]) if isinstance(obj, dict) and hasattr(obj.get("args"), "__dict__") else {}
    model = plan.fitted
    if pretrained_cfg is not None:
        data_config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg)
        where = "timm config.json pretrained_cfg"
    else:
        data_config = timm.data.resolve_data_config(args, model=model)
        where = f"timm resolve_data_config({'train args, ' if args else ''}{plan.network} pretrained_cfg)"
    return timm_recipe(data_config, where)


def timm_folder_plan(args: argparse.Namespace, sniffed: Sniffed) -> Plan:
    """A timm hub folder (``save_for_hf``): the network from ``architecture``, recipe from ``pretrained_cfg``."""
    config = hf_source.read_config(args.pt)
    weights = next(args.pt / name for name in WEIGHT_FILES if (args.pt / name).is_file())
    fmt = "safetensors" if weights.suffix == ".safetensors" else "state_dict"
    kwargs = {**dict(config.get("model_args") or {})}
    if config.get("num_classes"):
        kwargs["num_classes"] = int(config["num_classes"])
    model: dict[str, Any] = {"file": FILE_NAMES[fmt], "format": fmt, "architecture": f"timm:{config['architecture']}"}
    check_architecture(model["architecture"], args.task)
    if kwargs:
        model["kwargs"] = kwargs
    plan = fitted_plan(args, read_weights(weights, fmt), model, Path("."), [])
    if not args.input_size:
        plan.use_recipe(timm_model_recipe(plan, None, dict(config.get("pretrained_cfg") or {})))
    names = config.get("label_names")
    if isinstance(names, (list, dict)):
        mapping = names if isinstance(names, dict) else dict(enumerate(names))
        plan.labels, plan.labels_from = hf_source.id2label({"id2label": mapping}), "config.json label_names"
    return plan


def hf_plan(args: argparse.Namespace, sniffed: Sniffed) -> Plan:
    """A Hugging Face ``save_pretrained`` classifier or segmenter: its files copied, recipe from its processor."""
    config = hf_source.read_config(args.pt)
    task, network = hf_source.model_task(config)
    if task != args.task:
        raise ConfigError(f"the Hugging Face folder holds {network}, a model for {task}: use TASK={task}")
    scoring = scoring_of(str(config.get("model_type", ""))) if task == "detection" else ""
    weights = next(name for name in WEIGHT_FILES if (args.pt / name).is_file())
    copies = {
        name: args.pt / name for name in (hf_source.CONFIG_FILE, weights, PROCESSOR_FILE) if (args.pt / name).is_file()
    }
    plan = Plan(task_section(args, {"file": weights, "format": "transformers"}), copies=copies, network=network)
    plan.labels, plan.labels_from = hf_source.id2label(config), "config.json id2label"
    plan.classes = len(plan.labels) or None
    if task == "detection":
        plan.section.update(DETR_DEFAULTS, output="detr", scoring=scoring)
        plan.notes.append(f"DETR-family outputs, {scoring} scoring ({config.get('model_type')})")
    if args.input_size:
        return plan
    if PROCESSOR_FILE in copies:
        processor = load_processor(args.pt)
        plan.use_recipe(hf_processor_recipe(args.pt, args.task, processor))
        if task != "detection":
            plan.notes.append(processor_check(processor, plan.section))
    else:
        plan.notes.append(f"no {PROCESSOR_FILE}: ImageNet's 256/224 bilinear recipe")
    return plan


PROCESSOR_FILE = "preprocessor_config.json"


def load_processor(folder: Path) -> Any:
    """The folder's image processor, loaded by transformers from its own file only."""
    transformers = require("transformers", "a Hugging Face model folder")

    return transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)


def hf_processor_recipe(folder: Path, task: str, processor: Any = None) -> Recipe:
    """The recipe of the folder's image processor (``processor``, when the caller has loaded it)."""
    processor = processor if processor is not None else load_processor(folder)
    return hf_recipe(processor.to_dict(), f"{type(processor).__name__} ({PROCESSOR_FILE})", task)


PROBE_SIZES = ((240, 320), (333, 250))  # (height, width): a landscape and a portrait image, odd margins
PROBE_LEVELS = 3.0  # the kit's input may differ from the processor's by this many quantization levels


def processor_check(processor: Any, section: dict[str, Any]) -> str:
    """Check the recipe read from a processor against the processor itself: both preprocess smooth probe
    images and the model inputs must agree in shape and within ``PROBE_LEVELS`` levels of one pixel value.

    Raises:
        ConfigError: one line naming the processor, the probe and how the kit's reading of it differs.
    """
    name = type(processor).__name__
    config = parse_handler_config(section)
    level = 1 / (255 * min(config.std))
    worst = 0.0
    for height, width in PROBE_SIZES:
        image = smooth_image(height, width)
        theirs = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"][0].float()
        mine = kit_input(torch.from_numpy(image).permute(2, 0, 1), config)
        if tuple(mine.shape) != tuple(theirs.shape):
            raise ConfigError(
                f"{name} turns a {width}x{height} image into {list(theirs.shape)}, the kit's reading of it into "
                f"{list(mine.shape)}: it would not answer as its processor; set resize and crop in model-config.yaml"
            )
        worst = max(worst, float((mine - theirs).abs().max()) / level)
    if worst > PROBE_LEVELS:
        raise ConfigError(
            f"{name}'s pixel values differ from the kit's reading of it by {worst:.1f} levels on a probe image: "
            "a processor step the kit does not reproduce; it would not answer as its processor"
        )
    return f"checked against {name} on {len(PROBE_SIZES)} probe images (within {worst:.1f} pixel levels)"


def smooth_image(height: int, width: int) -> np.ndarray:
    """A seeded image of smooth colour gradients (resize kernels agree on it up to rounding)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    planes = [np.sin(x / (17 + 9 * c) + y / (23 + 5 * c) + c) for c in range(3)]
    return ((np.stack(planes, -1) + 1) * 127.5).round().astype(np.uint8)


def kit_input(pixels: torch.Tensor, config: Any) -> torch.Tensor:
    """One image as the kit's service feeds it to the model (the classifier's crop, or the segmenter's resize)."""
    from servekit.transforms import classifier_batch, classifier_crop, segmenter_input

    resized = classifier_crop(pixels, config) if config.task == "classification" else segmenter_input(pixels, config)
    return classifier_batch([resized], config)[0]


def graph_plan(args: argparse.Namespace, sniffed: Sniffed) -> Plan:
    """A self-contained graph (TorchScript, torch.export, AOTInductor, ONNX, ExecuTorch): copied, input size read."""
    if args.architecture or args.model_file:
        raise ConfigError(f"{args.pt.name} is {sniffed.description}, which carries its network: drop ARCH/MODEL_FILE")
    spec = graph_input_spec(args.pt, sniffed.format)
    model: dict[str, Any] = {"file": FILE_NAMES[sniffed.format], "format": sniffed.format}
    max_batch = args.max_batch or (1 if sniffed.format == "aoti" and not spec.max_batch else 0)
    if max_batch:
        model["max_batch"] = max_batch
    section = task_section(args, model)
    meta = read_export_metadata(args.pt, sniffed.format) if args.task == "detection" else None
    notes = graph_task_notes(args, sniffed, spec, section, meta)
    if spec.static_batch:
        notes.append(f"static batch {spec.max_batch}: batches run in chunks of {spec.max_batch}")
    if sniffed.format == "aoti":
        notes.append("native code: serve only packages you built")
    plan = Plan(section, notes)
    if meta is not None:
        plan.labels, plan.labels_from = meta.names, "the export's metadata"
    return plan


def graph_task_notes(
    args: argparse.Namespace, sniffed: Sniffed, spec: InputSpec, section: dict[str, Any], meta: Any
) -> list[str]:
    """Set a graph's task keys in ``section`` from what it says (input size, export metadata, outputs)."""
    notes = []
    if spec.height and not args.input_size and args.task == "classification":
        section.update(crop_sizes(spec.height))
        notes.append(f"input {spec.height}x{spec.width or spec.height} read from the graph")
    elif spec.height and not args.input_size and args.task == "segmentation":
        section["resize"] = [spec.height, spec.width or spec.height]
        notes.append(f"input {spec.height}x{spec.width or spec.height} read from the graph")
    if meta is not None:
        size = args.input_size or max(meta.imgsz)
        section.update(ULTRALYTICS_PREDICT, output="yolo", input_size=size, letterbox="ultralytics")
        notes.append(meta.describe())
    elif args.task == "detection" and detr_graph(args.pt, sniffed.format):
        notes.extend(detr_graph_section(args, section, spec))
    elif args.task == "detection" and not kit_onnx_detector(args.pt, sniffed.format):
        size = args.input_size or spec.height or 640
        section.update(YOLO_DEFAULTS, output="yolo", input_size=size)
    return notes


def detr_graph(path: Path, fmt: str) -> bool:
    """An ONNX graph answering a DETR-family detector's ``logits`` and ``pred_boxes``."""
    if fmt != "onnx":
        return False
    import onnx

    from servekit.onnx_backend import DETR_IO

    outputs = {o.name for o in onnx.load_model(str(path), load_external_data=False).graph.output}
    return set(DETR_IO) <= outputs


def detr_graph_section(args: argparse.Namespace, section: dict[str, Any], spec: InputSpec, width: int = 0) -> list[str]:
    """A DETR graph's keys: the recipe from a ``preprocessor_config.json`` beside it (else its input size and
    ImageNet's mean and std), and the scoring: softmax when LABELS name one class fewer than its logits."""
    notes = []
    section.update(DETR_DEFAULTS, output="detr")
    processor = args.pt.parent / PROCESSOR_FILE
    if processor.is_file() and not args.input_size:
        recipe = hf_processor_recipe(args.pt.parent, "detection")
        section.update(recipe.section("detection"))
        notes.append(recipe.describe())
    elif spec.height or args.input_size:
        section["resize"] = [args.input_size or spec.height, args.input_size or spec.width or spec.height]
        notes.append(f"no {PROCESSOR_FILE} beside it: input {section['resize']}, ImageNet mean and std")
    if not width:  # an ONNX graph names its outputs and their shapes
        import onnx

        graph = onnx.load_model(str(args.pt), load_external_data=False).graph
        logits = next(o for o in graph.output if o.name == "logits")
        width = int(logits.type.tensor_type.shape.dim[-1].dim_value)
    labels = len(load_labels(Path(args.labels))) if args.labels else 0
    section["scoring"] = "softmax" if labels and width == labels + 1 else "sigmoid"
    why = "LABELS name one class fewer than its logits"
    if section["scoring"] == "sigmoid":
        why = "set scoring: softmax for DETR or YOLOS"
    notes.append(f"DETR-family outputs logits [N, Q, {width}] and pred_boxes: {section['scoring']} scoring ({why})")
    return notes


YOLO_ONLY_KEYS = ("output", "input_size", "iou_threshold", "layout", "letterbox", "agnostic_nms")


def answers_detr_pair(folder: Path, config: Any) -> int:
    """The logits' class width when a detector graph answers a DETR pair (logits ``[N, Q, C]``, boxes
    ``[N, Q, 4]``), else 0: one forward pass on a gray image (TorchScript and torch.export graphs do not name
    their outputs)."""
    model = load_model(folder, config.model, torch.device("cpu"))
    with torch.inference_mode():
        output = model(torch.full((1, 3, config.input_size, config.input_size), 0.5))
    try:
        logits, _ = detr_outputs(output if isinstance(output, (tuple, list)) else ())
    except ConfigError:
        return 0
    return int(logits.shape[-1])


def kit_onnx_detector(path: Path, fmt: str) -> bool:
    """An ONNX detector exported by the kit (outputs boxes, labels, scores), served like torchvision's."""
    if fmt != "onnx":
        return False
    import onnx

    outputs = {o.name for o in onnx.load_model(str(path), load_external_data=False).graph.output}
    return {"boxes", "labels", "scores"} <= outputs


def probe_yolo(folder: Path, config: Any, labels: int | None) -> tuple[str, int | None, list[int]]:
    """One forward pass on a gray letterboxed image: the output's layout, class count and shape.

    Raises:
        ConfigError: the model's output is neither a torchvision detection nor a YOLO-style raw tensor.
    """
    model = load_model(folder, config.model, torch.device("cpu"))
    try:
        shape = raw_output_shape(model, config.input_size, torch.device("cpu"))
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}; a detector's graph must return a YOLO-style tensor [N, A, 5+C], [N, 4+C, A] or [N, K, 6] "
            "(torchvision detectors: scaffold their weights with ARCH=<name>)"
        ) from None
    layout = infer_layout(shape, labels)
    return layout, layout_classes(shape, layout), shape


def graph_input_spec(path: Path, fmt: str) -> InputSpec:
    """The input shape a traced graph accepts, where the file says it."""
    if fmt == "aoti":
        from torch._inductor import aoti_load_package

        from servekit.program_backend import aoti_input_spec

        return aoti_input_spec(dict(aoti_load_package(str(path)).get_metadata()), 0)
    if fmt == "exported":
        return exported_input_spec(torch.export.load(str(path)))
    if fmt == "onnx":
        import onnx

        graph = onnx.load_model(str(path), load_external_data=False).graph
        dims = graph.input[0].type.tensor_type.shape.dim
        from servekit.onnx_backend import onnx_input_spec

        return onnx_input_spec([d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims])
    if fmt == "executorch":
        from servekit.executorch_backend import read_input_spec

        return read_input_spec(path)
    return InputSpec()


def task_section(args: argparse.Namespace, model: dict[str, Any]) -> dict[str, Any]:
    """The handler section with the task's defaults (a classifier's crop from SIZE when given)."""
    if args.task == "detection":
        return {"task": args.task, "model": model, "labels": "labels.json", **DETECTOR_DEFAULTS}
    if args.task == "segmentation":
        size = {"resize": [args.input_size, args.input_size]} if args.input_size else {}
        return {"task": args.task, "model": model, "labels": "labels.json", **SEGMENTER_DEFAULTS, **size}
    sizes = crop_sizes(args.input_size) if args.input_size else {}
    return {"task": args.task, "model": model, "labels": "labels.json", **CLASSIFIER_DEFAULTS, **sizes}


def crop_sizes(crop: int) -> dict[str, int]:
    """A classifier's crop and the short side it is cut from (ImageNet's 224/256 ratio)."""
    return {"resize": max(crop, round(crop * 256 / 224)), "crop": crop}


def output_classes(folder: Path, config: Any) -> int | None:
    """A classifier's output width, or a segmenter's logit planes, from one forward pass on a blank batch."""
    if config.task == "detection" and config.output != "detr":
        return None
    model = load_model(folder, config.model, torch.device("cpu"))
    if config.task == "detection":  # a DETR graph: its logits' width, less the no-object class of softmax scoring
        side = config.resize if isinstance(config.resize, tuple) else (config.resize, config.resize)
        with torch.inference_mode():
            logits, _ = detr_outputs(model(torch.zeros(1, 3, *side)))
        return int(logits.shape[-1]) - (1 if config.scoring == "softmax" else 0)
    if config.task == "segmentation":
        side = config.resize if isinstance(config.resize, tuple) else (config.resize, config.resize)
        with torch.inference_mode():
            return int(segmentation_logits(model(torch.zeros(1, 3, *side))).shape[1])
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, *config.input_size))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(
            f"the model returned {type(out).__name__} {getattr(out, 'shape', '')}; a classifier returns N x classes"
        )
    return int(out.shape[1])


def label_names(args: argparse.Namespace, plan: Plan, classes: int) -> tuple[list[str], str]:
    """The labels to write, checked against the class count, and a note on where they came from."""
    layer, shape = plan.head if plan.head else (None, None)
    if args.labels:
        names = load_labels(Path(args.labels))
        if args.task == "detection" and len(names) == classes - 1 and BACKGROUND not in names:
            return [BACKGROUND, *names], f"labels from {Path(args.labels).name} (with {BACKGROUND} as class 0)"
        check_labels(len(names), classes, layer, shape)
        return names, f"labels from {Path(args.labels).name}"
    if plan.labels and len(plan.labels) == classes:
        return plan.labels, f"labels from {plan.labels_from}"
    if args.architecture and not timm_source.is_timm(args.architecture):
        weights = torchvision.models.get_model_weights(args.architecture)
        categories = list(next(iter(weights)).meta.get("categories", []))
        if len(categories) == classes:
            return categories, f"{args.architecture}'s {classes} standard names as labels"
    return [f"class_{i}" for i in range(classes)], f"no LABELS given: names class_0..class_{classes - 1}"


def smoke_test(folder: Path, config: Any) -> None:
    """Serve one generated image through the kit's service, as a worker will."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buffer, "JPEG")
    service = build_service(config, folder, torch.device("cpu"), max_batch=2)
    answer = service.handle([{"body": buffer.getvalue()}] * 2).answers[0]
    if isinstance(answer, BaseException):
        raise ConfigError(f"the model failed on a test image: {type(answer).__name__}: {plain_line(str(answer))}")


def write_folder(folder: Path, args: argparse.Namespace, plan: Plan) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / plan.section["model"]["file"]
    for name, source in plan.copies.items():
        shutil.copyfile(source, folder / name)
    if not plan.copies and plan.state is not None and (plan.notes or args.pt.is_dir()):
        save_weights(plan.state, target, plan.section["model"]["format"])
    elif not plan.copies:
        shutil.copyfile(args.pt, target)
    if args.model_file:
        shutil.copyfile(args.model_file, folder / Path(args.model_file).name)


def document_text(document: dict[str, Any], recipe: Recipe | None) -> str:
    """``model-config.yaml``'s text, the recipe's keys preceded by a comment saying where they came from."""
    text = yaml.safe_dump(document, sort_keys=False)
    if recipe is None:
        return text
    comment = f"  # preprocessing: {recipe.describe()}; override any of these keys by hand\n"
    return text.replace("\n  resize:", "\n" + comment + "  resize:", 1)


def save_weights(state: dict[str, torch.Tensor], target: Path, fmt: str) -> None:
    """Write unwrapped weights: tensors only, in the format they came in."""
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(target))
    else:
        torch.save(state, target)


def scaffold(args: argparse.Namespace) -> tuple[Path, str]:
    """Write the folder, check it serves; return it and the one line that says what was found."""
    folder = args.root / args.name
    if folder.exists() and not args.force:
        raise ConfigError(f"{folder} exists (add FORCE=1 to overwrite)")
    if args.model_file and not Path(args.model_file).is_file():
        raise ConfigError(f"MODEL_FILE {args.model_file} does not exist")
    sniffed = sniff_model_file(args.pt)
    if args.torchscript and sniffed.format != "torchscript":
        raise ConfigError(f"TORCHSCRIPT=1 was given but {args.pt.name} is {sniffed.description}")
    plan = PLANNERS.get(sniffed.format, graph_plan)(args, sniffed)
    config = parse_handler_config(plan.section)
    try:
        write_folder(folder, args, plan)
        (folder / "labels.json").write_text("[]\n")
        classes = plan.classes
        width = answers_detr_pair(folder, config) if config.task == "detection" and config.output == "yolo" else 0
        if width:
            plan.section = {k: v for k, v in plan.section.items() if k not in YOLO_ONLY_KEYS}
            plan.notes.extend(detr_graph_section(args, plan.section, InputSpec(), width))
            config = parse_handler_config(plan.section)
        if config.task == "detection" and config.output == "yolo":
            given = (
                len(load_labels(Path(args.labels))) if args.labels else (args.num_classes or len(plan.labels) or None)
            )
            layout, classes, shape = probe_yolo(folder, config, given)
            plan.section["layout"] = layout
            plan.notes.append(f"raw output {shape}: layout {layout}, letterbox {config.input_size}")
            classes = classes or given
            config = parse_handler_config(plan.section)
        classes = classes or output_classes(folder, config)
        if classes is None:
            raise ConfigError("cannot tell the class count: pass NUM_CLASSES=<n>")
        names, where = label_names(args, plan, classes)
        (folder / "labels.json").write_text(json.dumps(names, indent=0) + "\n")
        document = {**FRONTEND_DEFAULTS, "handler": plan.section}
        (folder / "model-config.yaml").write_text(document_text(document, plan.recipe))
        smoke_test(folder, config)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    network = plan.network or "its graph"
    found = "; ".join([f"{sniffed.description}: format {sniffed.format}", *plan.notes])
    line = f"found {args.pt.name}: {found}; {network}, {classes} classes; {where}"
    return folder, line + (f"\n{TORCHSCRIPT_NOTE}" if sniffed.format == "torchscript" else "")


TORCHSCRIPT_NOTE = (
    "note: TorchScript is deprecated upstream since torch 2.11; this folder serves it as it is. To move, where you "
    "have the network's class: torch.export.save(torch.export.export(model.eval(), (example,)), 'model.pt2') and "
    "make scaffold PT=model.pt2, or torch.save(model.state_dict(), 'model.pt') with MODEL_FILE=<its .py>"
)


PLANNERS = {**dict.fromkeys(WEIGHT_FORMATS, weights_plan), "timm": timm_folder_plan, "transformers": hf_plan}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--task", required=True, help=" or ".join(TASKS))
    parser.add_argument(
        "--pt", type=Path, required=True, help="the model file (any suffix) or folder (timm, Hugging Face)"
    )
    parser.add_argument("--architecture", help="torchvision architecture name (or timm:<name>) of a state_dict")
    parser.add_argument("--model-file", help="Python file defining the network of a state_dict")
    parser.add_argument("--model-class", help="class name in --model-file")
    parser.add_argument("--torchscript", action="store_true", help="(no longer needed) assert the file is TorchScript")
    parser.add_argument("--num-classes", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=0, help="largest batch a traced graph takes (0: as found)")
    parser.add_argument("--input-size", type=int, default=0, help="a graph's input height/width if it does not say")
    parser.add_argument("--labels", help="JSON list, index->name JSON mapping, or text with one name a line")
    parser.add_argument("--root", type=Path, default=Path("models"))
    parser.add_argument("--force", action="store_true")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not args.name or "/" in args.name or args.name.startswith("."):
        raise ConfigError(f"NAME={args.name!r} must be a plain folder name")
    if args.task not in TASKS:
        raise ConfigError(f"TASK must be one of {', '.join(TASKS)}, got {args.task!r}")
    if not str(args.pt) or str(args.pt) == ".":
        raise ConfigError("PT=<model file> is required")
    if args.architecture and args.model_file:
        raise ConfigError("give ARCH or MODEL_FILE, not both")
    if args.model_file and not args.model_class:
        raise ConfigError("MODEL_FILE needs CLASS=<class name>")
    if args.labels and not Path(args.labels).is_file():
        raise ConfigError(f"LABELS {args.labels} does not exist")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> str:
        check_args(args)
        folder, found = scaffold(args)
        return f"{found}\nwrote {folder}; build it with: make archive MODEL={args.name}"

    return report(run, f"scaffold from {args.pt}")


if __name__ == "__main__":
    sys.exit(main())
