"""Typed, validated per-model settings, parsed once from ``model-config.yaml``'s ``handler:`` section.

TorchServe's frontend keys (``batchSize``, ``maxBatchDelay``, ...) sit at the top of the file; the
kit's own keys sit under ``handler:``. :func:`parse_handler_config` turns that section into a frozen
dataclass, rejecting unknown keys and bad values with a message that names the key. It runs when an
archive is built (``scripts/packaging/archive_args.py``) and when a worker loads the model, never per request.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from servekit.errors import ConfigError

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FORMATS = ("state_dict", "safetensors")  # formats that need a network definition
Size = int | tuple[int, ...]  # a short side (int), or [height, width]


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what a request may carry, checked before a full decode."""

    # encoded image bytes a request may carry
    max_bytes: int = 20 * 1024 * 1024
    # width x height, read from the header before decoding
    max_pixels: int = 40_000_000
    # longer side / shorter side
    max_aspect_ratio: float = 50.0
    # image formats accepted (sniffed from the bytes, not the content type)
    formats: tuple[str, ...] = IMAGE_FORMATS
    # A JPEG far larger than the model's input is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    # (never below what the model needs), then resized: less time and memory, pixels a little different.
    reduced_jpeg: bool = True

    def __post_init__(self) -> None:
        _require(self.max_bytes > 0, "limits.max_bytes", "must be > 0")
        _require(self.max_pixels > 0, "limits.max_pixels", "must be > 0")
        _require(self.max_aspect_ratio >= 1, "limits.max_aspect_ratio", "must be >= 1")
        unknown = sorted(set(self.formats) - set(IMAGE_FORMATS))
        _require(not unknown, "limits.formats", f"unknown formats {unknown}; known: {list(IMAGE_FORMATS)}")


@dataclass(frozen=True)
class ModelSource:
    """Where the network comes from: weights plus a network definition, or a self-contained graph.

    ``state_dict`` and ``safetensors`` need an ``architecture`` (a torchvision name, or ``timm:<name>``
    for a timm model) or a ``model_file`` with ``model_class``; ``transformers`` is a Hugging Face
    ``save_pretrained`` folder (``config.json`` beside ``file``); ``torchscript``, ``exported``,
    ``aoti`` and ``onnx`` carry their graph.
    ``max_batch`` bounds the batch a traced graph takes (0: any); larger batches run in chunks.
    ``openvino`` reads an ONNX graph (or an OpenVINO IR) and compiles it with OpenVINO for the CPU;
    ``executorch`` is an ExecuTorch program (``.pte``, ``make pte``) run by the ExecuTorch runtime on the CPU.
    """

    # the weights or graph, relative to the model folder
    file: str = "model.pt"
    # how ``file`` is stored (scaffold reads it from the bytes)
    format: Literal[
        "state_dict", "safetensors", "transformers", "torchscript", "exported", "aoti", "onnx", "openvino", "executorch"
    ] = "state_dict"
    # state_dict/safetensors: a torchvision name, or timm:<name>
    architecture: str | None = None
    # state_dict/safetensors: a Python file defining the network (runs only with a trust flag at scaffold)
    model_file: str | None = None
    # the class in ``model_file``
    model_class: str | None = None
    # passed to the network's constructor (num_classes, ...)
    kwargs: dict[str, Any] = field(default_factory=dict)
    # exported/aoti/onnx/executorch: the largest batch the graph takes (0: any); larger run in chunks
    max_batch: int = 0
    # bf16: torch autocast (torch formats) or OpenVINO's bf16 hint, on CPUs with AVX512-BF16 or AMX
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        _require(self.max_batch >= 0, "model.max_batch", "must be >= 0 (0: any batch size)")
        _require(
            self.precision == "fp32" or self.format not in ("onnx", "aoti", "executorch"),
            "model.precision",
            f"bf16 applies to the torch formats and openvino, not to format '{self.format}'",
        )
        if self.format in WEIGHT_FORMATS:
            has_arch = self.architecture is not None
            has_file = self.model_file is not None
            _require(
                has_arch != has_file,
                "model",
                "a state_dict needs exactly one of 'architecture' (a torchvision name or timm:<name>) "
                "or 'model_file' (a Python file) with 'model_class'",
            )
            _require(
                not has_file or self.model_class is not None,
                "model.model_class",
                "is required with 'model_file'",
            )
        else:
            _require(
                self.architecture is None and self.model_file is None,
                "model",
                f"'architecture' and 'model_file' apply to state_dict/safetensors, not to format '{self.format}'",
            )


@dataclass(frozen=True)
class CompileSettings:
    """``handler.compile``: torch.compile the module at load, warmed up at every batch size it will see."""

    # torch.compile's mode
    mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    # compile for dynamic shapes (batch sizes) rather than one graph per batch size
    dynamic: bool = False
    # inductor freezing: weights folded in as constants (an int8 program's weights packed for oneDNN)
    freezing: bool = False


@dataclass(frozen=True)
class ExplainSettings:
    """``handler.explain``: how ``/explanations`` (and KServe's ``:explain``) answer (servekit/explain.py).

    ``auto`` is Grad-CAM on an eager network with convolutions and occlusion otherwise; ``grid`` cells
    along the longer side of the model's input; ``budget`` forward passes per image for occlusion;
    ``steps`` for Integrated Gradients; ``layer`` the module Grad-CAM reads ('' : the last convolution);
    ``png`` adds a small heatmap PNG to every explanation.
    """

    # auto: Grad-CAM on eager CNNs, occlusion otherwise
    method: Literal["auto", "gradcam", "occlusion", "integrated_gradients"] = "auto"
    # cells on the longer side of the model's input
    grid: int = 14
    # occlusion: forward passes (cells) per image
    budget: int = 64
    # integrated_gradients: steps from the mean image
    steps: int = 16
    # Grad-CAM's module name ('': the last convolution)
    layer: str = ""
    # add a small base64 heatmap PNG to every explanation
    png: bool = False

    def __post_init__(self) -> None:
        _require(2 <= self.grid <= 64, "explain.grid", "must be within [2, 64] (cells on the longer side)")
        _require(1 <= self.budget <= 1024, "explain.budget", "must be within [1, 1024] forward passes")
        _require(1 <= self.steps <= 256, "explain.steps", "must be within [1, 256]")


@dataclass(frozen=True)
class ClassifierConfig:
    """Settings of an image classifier."""

    # the task this section configures
    task: Literal["classification"]
    # where the network comes from
    model: ModelSource = field(default_factory=ModelSource)
    # class names: a JSON list, or TorchServe's {"0": "name"} mapping
    labels: str = "labels.json"
    # The model's own recipe (scaffold reads it from torchvision, timm or Hugging Face): resize the short
    # side to ``resize`` (or to exactly [height, width]), center-crop ``crop`` (int or [h, w]; 0: none),
    # resampling with ``interpolation`` (antialiased), then normalize with ``mean`` and ``std``.
    resize: Size = 256
    # center crop, int or [h, w]; 0: none (needs resize as [h, w])
    crop: Size = 224
    # resampling filter of the resize (antialiased)
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    # where an odd margin's extra pixel goes: round (torchvision, timm) or floor (Hugging Face processors)
    crop_rounding: Literal["round", "floor"] = "round"
    # per-channel mean subtracted after scaling to [0, 1]
    mean: tuple[float, ...] = IMAGENET_MEAN
    # per-channel std divided by
    std: tuple[float, ...] = IMAGENET_STD
    # the order of the model's input channels: rgb, or bgr (an image processor's do_flip_channel_order, as
    # MobileViT's); mean and std are given in that order
    channel_order: Literal["rgb", "bgr"] = "rgb"
    # classes in each answer, best first
    topk: int = 5
    # intra-op threads per worker; 0: cores / maxWorkers
    threads: int = 0
    # torch.compile the network at load, warmed up at every batch size
    compile: CompileSettings | None = None
    # how /explanations answers
    explain: ExplainSettings = field(default_factory=ExplainSettings)
    # bounds on what a request may carry
    limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        resized = _pair(self.resize, "resize")
        _require(min(resized) > 0, "resize", "must be > 0")
        if self.crop == 0:
            _require(isinstance(self.resize, tuple), "crop", "0 (no crop) needs resize as [height, width]")
        else:
            crop = _pair(self.crop, "crop")
            bound = resized if isinstance(self.resize, tuple) else (self.resize, self.resize)
            _require(0 < crop[0] <= bound[0] and 0 < crop[1] <= bound[1], "crop", "must be > 0 and <= resize")
        _require(len(self.mean) == 3, "mean", "needs 3 values (R, G, B)")
        _require(len(self.std) == 3 and min(self.std) > 0, "std", "needs 3 values > 0")
        _require(self.topk >= 1, "topk", "must be >= 1")
        _require(self.threads >= 0, "threads", "must be >= 0 (0: cores / workers)")

    @property
    def input_size(self) -> tuple[int, int]:
        """The (height, width) of the batch the model sees."""
        if self.crop:
            return _pair(self.crop, "crop")
        return _pair(self.resize, "resize")

    @property
    def decode_side(self) -> int:
        return decode_side(self.resize)


def decode_side(resize: Size) -> int:
    """The smallest side a reduced-scale JPEG decode may go down to: twice what ``resize`` needs, so the
    recipe's own antialiased filter still does the last reduction of at least 2x (at 1x, the DCT-domain
    scaling alone moved a sensitive model's probabilities by up to 0.11; at 2x by up to 0.022)."""
    return 2 * max(_pair(resize, "resize"))


def _pair(size: Size, key: str) -> tuple[int, int]:
    """An int or [h, w] size as (height, width)."""
    if isinstance(size, int):
        return size, size
    _require(len(size) == 2, key, "must be an int or [height, width]")
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class DetectorConfig:
    """Settings of an object detector."""

    # the task this section configures
    task: Literal["detection"]
    # where the network comes from
    model: ModelSource = field(default_factory=ModelSource)
    # class names (index 0 is background for torchvision detectors)
    labels: str = "labels.json"
    # detections under this score are left out
    score_threshold: float = 0.5
    # at most this many detections per image, best first
    max_detections: int = 100
    mask_threshold: float = 0.5  # Mask R-CNN: a mask pixel is in at this probability
    # output: torchvision (a list of images in, {boxes, labels, scores} out), yolo (a letterboxed
    # batch in, a raw [N, A, 5+C] / [N, 4+C, A] / [N, K, 6] tensor out; see servekit/yolo.py) or detr
    # (a resized batch in, class logits [N, Q, C] and normalized cx, cy, w, h boxes [N, Q, 4] out)
    output: Literal["torchvision", "yolo", "detr"] = "torchvision"
    # detr: softmax over classes with a trailing no-object class (DETR, YOLOS), or sigmoid per class and
    # the top max_detections over queries x classes (Deformable/Conditional DETR, RT-DETR, D-FINE, RF-DETR);
    # auto reads it from a Hugging Face folder's model type
    scoring: Literal["auto", "softmax", "sigmoid"] = "auto"
    # detr: the recipe (the image processor's): the short side to resize, the long side at most max_size
    # (0: no cap), or exactly [h, w] (RT-DETR: 640 x 640); normalized with mean and std
    resize: Size = 800
    # detr: the long side's cap with a short-side resize (0: none)
    max_size: int = 1333
    # detr: resampling filter of the resize (antialiased)
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    # detr: false resamples the image as floats without antialiasing, as RF-DETR's processor does (rescale,
    # then resize with antialias off); the JPEG is then decoded whole, never at reduced scale
    antialias: bool = True
    # detr: per-channel mean
    mean: tuple[float, ...] = IMAGENET_MEAN
    # detr: per-channel std
    std: tuple[float, ...] = IMAGENET_STD
    # detr: the order of the model's input channels: rgb, or bgr (an image processor's do_flip_channel_order, as
    # MobileViT's); mean and std are given in that order
    channel_order: Literal["rgb", "bgr"] = "rgb"
    # yolo: the raw output's layout (auto: probed with one forward pass)
    layout: Literal["auto", "yolov5", "yolov8", "end2end"] = "auto"
    # yolo: the letterbox square
    input_size: int = 640
    # yolo output: "kit" fits the image antialiased; "ultralytics" as their predictor does (OpenCV
    # INTER_LINEAR on uint8, their pad rounding and box scaling), so boxes equal `yolo predict`
    letterbox: Literal["kit", "ultralytics"] = "kit"
    # yolo: NMS IoU threshold
    iou_threshold: float = 0.45
    # yolo: NMS across classes
    agnostic_nms: bool = False
    # intra-op threads per worker; 0: cores / maxWorkers
    threads: int = 0
    # not for detectors (must stay unset)
    compile: CompileSettings | None = None
    # bounds on what a request may carry
    limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        _require(0.0 <= self.score_threshold <= 1.0, "score_threshold", "must be within [0, 1]")
        _require(self.max_detections >= 1, "max_detections", "must be >= 1")
        _require(self.input_size >= 32, "input_size", "must be >= 32")
        _require(0.0 < self.iou_threshold <= 1.0, "iou_threshold", "must be within (0, 1]")
        _require(self.threads >= 0, "threads", "must be >= 0 (0: cores / workers)")
        _require(self.compile is None, "compile", "applies to classifiers (torchvision detectors do not compile whole)")
        _require(min(_pair(self.resize, "resize")) > 0 and self.max_size >= 0, "resize", "must be > 0")
        _require(len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0, "mean", "and std need 3 values")

    @property
    def decode_side(self) -> int:
        return decode_side(self.resize) if self.antialias else 0


@dataclass(frozen=True)
class SegmenterConfig:
    """Settings of a semantic segmenter: a class for every pixel of the image as sent."""

    # the task this section configures
    task: Literal["segmentation"]
    # where the network comes from
    model: ModelSource = field(default_factory=ModelSource)
    # class names, one per output channel
    labels: str = "labels.json"
    # The model's recipe: resize the short side to ``resize`` (torchvision's segmentation weights: 520), or
    # to exactly [height, width] (Hugging Face processors: SegFormer 512 x 512), antialiased, no crop; then
    # normalize. Images of one resized shape run as one forward pass.
    resize: Size = 520
    max_size: int = 0  # with a short-side resize: the long side's cap (Hugging Face's longest_edge; 0: none)
    size_divisor: int = 0  # then each side rounded up to a multiple of it (Mask2Former's size_divisor; 0: none)
    # with resize as [h, w]: scale both sides by the one factor (of h / height and w / width) nearer to 1
    # (DPT's keep_aspect_ratio), then round each side to a multiple of ensure_multiple_of (0: exactly [h, w])
    keep_aspect_ratio: bool = False
    # with resize as [h, w]: each side rounded to the nearest multiple of it (DPT's ensure_multiple_of; 0: none)
    ensure_multiple_of: int = 0
    # then the center crop, int or [h, w] (a processor's do_center_crop: MobileViT's, MobileNetV2's; 0: none);
    # the logits of the crop are still stretched over the whole image, as post_process_semantic_segmentation does
    crop: Size = 0
    # resampling filter of the resize (antialiased)
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    # per-channel mean
    mean: tuple[float, ...] = IMAGENET_MEAN
    # per-channel std
    std: tuple[float, ...] = IMAGENET_STD
    # the order of the model's input channels: rgb, or bgr (an image processor's do_flip_channel_order, as
    # MobileViT's); mean and std are given in that order
    channel_order: Literal["rgb", "bgr"] = "rgb"
    # The answer: "rle", each class present with its area and a COCO RLE mask; "png", the same classes
    # without masks and the label map (a class index per pixel) as one base64 PNG.
    format: Literal["rle", "png"] = "rle"
    min_area: float = 0.0  # classes covering less than this share of the image are left out
    ignore: tuple[str, ...] = ()  # labels never reported (e.g. [background])
    # intra-op threads per worker; 0: cores / maxWorkers
    threads: int = 0
    # how /explanations answers (a class's mean logit)
    explain: ExplainSettings = field(default_factory=ExplainSettings)
    # bounds on what a request may carry
    limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        _require(min(_pair(self.resize, "resize")) > 0, "resize", "must be > 0")
        _require(self.max_size >= 0 and self.size_divisor >= 0, "max_size", "and size_divisor must be >= 0")
        _require(self.ensure_multiple_of >= 0, "ensure_multiple_of", "must be >= 0 (0: none)")
        _require(
            isinstance(self.resize, tuple) or not (self.keep_aspect_ratio or self.ensure_multiple_of),
            "keep_aspect_ratio",
            "and ensure_multiple_of need resize as [height, width]",
        )
        _require(len(self.mean) == 3, "mean", "needs 3 values (R, G, B)")
        _require(len(self.std) == 3 and min(self.std) > 0, "std", "needs 3 values > 0")
        _require(0.0 <= self.min_area < 1.0, "min_area", "must be within [0, 1) (a share of the image)")
        _require(self.threads >= 0, "threads", "must be >= 0 (0: cores / workers)")

    @property
    def decode_side(self) -> int:
        return decode_side(self.resize)


HandlerConfig = ClassifierConfig | DetectorConfig | SegmenterConfig
_TASKS: dict[str, type[ClassifierConfig] | type[DetectorConfig] | type[SegmenterConfig]] = {
    "classification": ClassifierConfig,
    "detection": DetectorConfig,
    "segmentation": SegmenterConfig,
}


def parse_handler_config(section: Mapping[str, Any] | None) -> HandlerConfig:
    """Build the typed config of one model from its ``handler:`` mapping.

    Raises:
        ConfigError: naming the first unknown, missing or invalid key.
    """
    if not isinstance(section, Mapping):
        raise ConfigError("model-config.yaml: 'handler' must be a mapping with at least 'task'")
    task = section.get("task")
    if task not in _TASKS:
        raise ConfigError(f"model-config.yaml: handler.task must be one of {sorted(_TASKS)}, got {task!r}")
    try:
        return _build(_TASKS[task], section, "handler")
    except ConfigError as exc:
        raise ConfigError(f"model-config.yaml: {exc}") from None


def read_model_document(model_dir: Path) -> dict[str, Any]:
    """The parsed ``model-config.yaml`` of a model folder (frontend keys and ``handler:``)."""
    import yaml

    path = model_dir / "model-config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} is missing (scaffold one with `make scaffold`)")
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a mapping")
    return document


def read_model_config(model_dir: Path) -> HandlerConfig:
    """The typed handler config of a model folder."""
    return parse_handler_config(read_model_document(model_dir).get("handler"))


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"handler.{key} {why}")


def _build(cls: type, mapping: Mapping[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise ConfigError(f"unknown key '{path}.{unknown[0]}' (known: {sorted(names)})")
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}") for name, value in mapping.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{path}: {exc}") from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, _mapping(value, path), path)
    if origin in (Union, types.UnionType):
        return _coerce_union(args, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{path}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        return dict(_mapping(value, path))
    return _scalar(hint, value, path)


def _coerce_union(args: tuple[Any, ...], value: Any, path: str) -> Any:
    """The value as the first member type that takes it (``int | tuple[int, ...]``: 224 or [224, 224])."""
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    first: ConfigError | None = None
    for member in members:
        try:
            return _coerce(member, value, path)
        except ConfigError as exc:
            first = first or exc
    if len(members) > 1:
        names = " or ".join(
            "a list" if typing.get_origin(m) is tuple else getattr(m, "__name__", str(m)) for m in members
        )
        raise ConfigError(f"'{path}' must be {names}, got {value!r}")
    assert first is not None
    raise first


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"'{path}' must be a mapping, got {type(value).__name__}")
    return value


def _scalar(hint: type, value: Any, path: str) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"'{path}' must be {hint.__name__}, got {value!r}")
