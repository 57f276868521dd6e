"""A model's own preprocessing recipe, read from the tool that trained it, as ``handler:`` keys.

torchvision keeps it in the weight enum (``weights.transforms()``), timm in the data config it resolves
from ``pretrained_cfg`` (``resolve_data_config``), Hugging Face in the image processor. Each function
here turns one of those into a :class:`Recipe` (resize, crop, interpolation, mean, std) that says where
it came from; scaffold writes it into ``model-config.yaml`` once, so every backend serves the model as
its owner evaluated it. Pure: the zoo objects are read by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from servekit.errors import ConfigError

Size = int | tuple[int, int]
# PIL's resampling codes, which Hugging Face image processors store as ``resample``
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
NEVER_NORMALIZE = {"MobileViT"}  # processors that keep an image_mean and image_std but never apply them
NO_ANTIALIAS = {"RfDetr"}  # processors that rescale, then resize floats with antialias off
HF_LARGE_EDGE = 384  # ConvNeXt's processor warps (no crop) at or above this shortest edge


@dataclass(frozen=True)
class Recipe:
    """Preprocessing as the kit's keys: resize (short side or [h, w]), crop (0: none), interpolation, mean, std."""

    resize: Size
    crop: Size
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    notes: tuple[str, ...] = ()
    crop_rounding: str = "round"
    max_size: int = 0  # a processor's longest_edge: the long side's cap when the short side is resized
    size_divisor: int = 0  # a Mask2Former processor's: each resized side rounded up to a multiple of it
    channel_order: str = "rgb"  # bgr: a processor's do_flip_channel_order (MobileViT)
    keep_aspect_ratio: bool = False  # DPT's: [h, w] scaled by one factor, then sides rounded to a multiple
    ensure_multiple_of: int = 0
    antialias: bool = True  # False: resampled as floats without antialiasing (RF-DETR's processor)

    def section(self, task: str = "classification") -> dict[str, Any]:
        """The ``handler:`` keys this recipe sets (a segmenter's or a detector's has no crop)."""
        crop = {
            "crop": _yaml_size(self.crop),
            **({"crop_rounding": self.crop_rounding} if self.crop_rounding != "round" else {}),
        }
        cap = {"max_size": self.max_size} if task != "classification" and isinstance(self.resize, int) else {}
        if task == "segmentation" and self.size_divisor:
            cap["size_divisor"] = self.size_divisor
        if task == "segmentation" and self.crop:
            cap["crop"] = _yaml_size(self.crop)
        if task == "segmentation" and self.keep_aspect_ratio:
            cap["keep_aspect_ratio"] = True
        if task == "segmentation" and self.ensure_multiple_of > 1:
            cap["ensure_multiple_of"] = self.ensure_multiple_of
        if task == "detection" and not self.antialias:
            cap["antialias"] = False
        return {
            "resize": _yaml_size(self.resize),
            **(crop if task == "classification" else cap),
            "interpolation": self.interpolation,
            "mean": [round(v, 6) for v in self.mean],
            "std": [round(v, 6) for v in self.std],
            **({"channel_order": self.channel_order} if self.channel_order != "rgb" else {}),
        }

    def describe(self) -> str:
        """One line: the recipe and where it came from."""
        resize = (
            f"short side {self.resize}" if isinstance(self.resize, int) else f"to {self.resize[0]}x{self.resize[1]}"
        )
        crop = "no crop" if not self.crop else f"crop {_text(self.crop)}"
        if self.max_size and isinstance(self.resize, int):
            resize += f" (long side at most {self.max_size})"
        if self.size_divisor:
            resize += f" (sides rounded up to a multiple of {self.size_divisor})"
        if self.keep_aspect_ratio:
            resize += " keeping the aspect ratio"
        if self.ensure_multiple_of > 1:
            resize += f" (sides rounded to a multiple of {self.ensure_multiple_of})"
        if not self.antialias:
            resize += " (not antialiased)"
        if self.channel_order != "rgb":
            resize = f"{resize}, channels flipped to {self.channel_order.upper()}"
        mean = ", ".join(f"{v:.3g}" for v in self.mean)
        std = ", ".join(f"{v:.3g}" for v in self.std)
        return f"recipe from {self.source}: resize {resize} {self.interpolation}, {crop}, mean [{mean}] std [{std}]"


def torchvision_recipe(preset: Any, source: str) -> Recipe:
    """The recipe of a torchvision weights entry's ``transforms()`` (``ImageClassification``, or
    ``SemanticSegmentation``: the short side resized, no crop)."""
    resize = [int(v) for v in preset.resize_size]
    crop = [int(v) for v in getattr(preset, "crop_size", None) or []]
    interpolation = getattr(preset.interpolation, "value", str(preset.interpolation))
    return Recipe(
        _size(resize),
        _size(crop) if crop else 0,
        _interpolation(interpolation, source),
        tuple(float(v) for v in preset.mean),
        tuple(float(v) for v in preset.std),
        source,
    )


def timm_recipe(data_config: Mapping[str, Any], source: str) -> Recipe:
    """The recipe of timm's eval transform for a resolved data config (``transforms_imagenet_eval``).

    The short side goes to ``floor(size / crop_pct)`` and the center ``size`` is cut (crop_mode center),
    or both sides are squashed to that and cut (crop_mode squash).
    """
    _, height, width = (int(v) for v in data_config["input_size"])
    crop_pct = float(data_config.get("crop_pct") or 0.875)
    mode = data_config.get("crop_mode") or "center"
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    notes: list[str] = []
    if mode == "squash":
        resize: Size = scaled
    else:
        if mode != "center" or scaled[0] != scaled[1]:
            notes.append(f"timm crop_mode {mode} at {height}x{width} served as a center crop of the short side")
        resize = min(scaled)
    interpolation = str(data_config.get("interpolation") or "bilinear")
    if interpolation == "random":  # a training-time choice; timm evaluates random as bilinear
        interpolation = "bilinear"
    return Recipe(
        resize,
        _size([height, width]),
        _interpolation(interpolation, source),
        tuple(float(v) for v in data_config["mean"]),
        tuple(float(v) for v in data_config["std"]),
        source,
        tuple(notes),
    )


def hf_recipe(processor: Mapping[str, Any], source: str, task: str = "classification") -> Recipe:
    """The recipe of a Hugging Face image processor's settings (``processor.to_dict()``), read as its class
    reads them (``image_processor_type``).

    Its center crop puts an odd margin's extra pixel at the bottom/right (``crop_rounding: floor``).
    ``size`` as ``shortest_edge``: the short side to it, except where the class rescales it first (ConvNeXt's
    ``crop_pct``: to ``edge / crop_pct``, then the center ``edge``, warped at 384 and above; PoolFormer's
    ``crop_pct``: to ``int(edge / crop_pct)``; LeViT: to ``int(256 / 224 * edge)``); any other class's
    ``crop_pct`` is a field it never reads (MobileNetV2's). A DETR processor's ``longest_edge`` becomes
    ``max_size``. ``size`` as ``height``/``width``: an exact resize (DPT's ``keep_aspect_ratio`` and
    ``ensure_multiple_of`` kept). A center crop when ``do_center_crop``; ``rescale_factor``, EfficientNet's
    ``rescale_offset`` and ``include_top``, and ``do_normalize`` folded into mean and std;
    ``do_flip_channel_order`` as ``channel_order: bgr``; RF-DETR's float resize without antialiasing as
    ``antialias: false``.

    Raises:
        ConfigError: a classifier's processor whose output size varies with the image (short side, no crop;
            a segmenter may take that, its images of one shape running together).
    """
    kind = _processor_kind(processor)
    size = dict(processor.get("size") or {})
    if not processor.get("do_resize", True):
        raise ConfigError(f"{source}: do_resize is false, so images would reach the model at any size")
    resize, crop, max_size = _hf_sizes(processor, kind, size, source)
    if processor.get("do_center_crop") and processor.get("crop_size"):
        box = processor["crop_size"]
        crop = _size([int(box["height"]), int(box["width"])]) if isinstance(box, Mapping) else int(box)
    keep_aspect = bool(processor.get("keep_aspect_ratio")) and kind == "DPT"
    multiple = int(processor.get("ensure_multiple_of") or 0) if kind == "DPT" else 0
    if task == "classification" and (keep_aspect or multiple > 1):
        raise ConfigError(f"{source}: keep_aspect_ratio/ensure_multiple_of vary the input size of a classifier")
    if isinstance(resize, int) and not crop and task == "classification":
        raise ConfigError(f"{source}: resizes the short side to {resize} without a crop, so the input size varies")
    resample = processor.get("resample", 2)
    interpolation = PIL_RESAMPLE.get(int(resample), "") if isinstance(resample, int) else str(resample).lower()
    mean, std = _folded(processor, kind)
    flip = bool(processor.get("do_flip_channel_order"))
    if flip:  # the processor normalizes, then flips: the kit's mean and std are in the model's (BGR) order
        mean, std = mean[::-1], std[::-1]
    interpolation = _interpolation(interpolation, source)
    divisor = int(processor.get("size_divisor") or 0) if task == "segmentation" and kind != "DPT" else 0
    return Recipe(
        resize, crop, interpolation, mean, std, source, crop_rounding="floor", max_size=max_size, size_divisor=divisor,
        channel_order="bgr" if flip else "rgb", keep_aspect_ratio=keep_aspect, ensure_multiple_of=multiple,
        antialias=kind not in NO_ANTIALIAS,
    )  # fmt: skip


def _processor_kind(processor: Mapping[str, Any]) -> str:
    """The processor's family from its class name: ``ConvNextImageProcessorFast`` -> ``ConvNext``."""
    name = str(processor.get("image_processor_type") or "")
    for suffix in ("Fast", "Pil"):
        name = name.removesuffix(suffix)
    return name.removesuffix("ImageProcessor")


def _hf_sizes(processor: Mapping[str, Any], kind: str, size: Mapping[str, Any], source: str) -> tuple[Size, Size, int]:
    """(resize, crop, max_size) of a processor's ``size`` as its class reads it (before ``do_center_crop``)."""
    crop_pct = processor.get("crop_pct")
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if kind == "ConvNext" and crop_pct:
            return (int(edge / float(crop_pct)), edge, 0) if edge < HF_LARGE_EDGE else ((edge, edge), 0, 0)
        if kind == "PoolFormer" and crop_pct:
            return int(edge / float(crop_pct)), 0, 0
        if kind == "Levit":
            return int(256 / 224 * edge), 0, 0
        return edge, 0, int(size.get("longest_edge") or 0)
    if "height" in size and "width" in size:
        height, width = int(size["height"]), int(size["width"])
        if kind == "PoolFormer" and crop_pct:
            scaled = (int(height / float(crop_pct)), int(width / float(crop_pct)))
            return (scaled[0] if height == width else scaled), 0, 0
        return (height, width), 0, 0
    raise ConfigError(f"{source}: size {dict(size)} is neither a shortest edge nor a height and width")


def _folded(processor: Mapping[str, Any], kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std for pixels in [0, 1] equal to the processor's rescale and normalize: the processor computes
    ``(pixel * factor - offset - mean) / std``, then EfficientNet's ``include_top`` divides by ``std`` again;
    the kit computes ``(pixel / 255 - mean') / std'``."""
    rescaled = processor.get("do_rescale", True)
    normalized = processor.get("do_normalize", True) and kind not in NEVER_NORMALIZE
    factor = float(processor.get("rescale_factor", 1 / 255)) if rescaled else 1.0
    offset = 1.0 if rescaled and processor.get("rescale_offset") else 0.0  # EfficientNet: pixel * factor - 1
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    if normalized:
        mean = _three(processor.get("image_mean", (0.5, 0.5, 0.5)))
        std = _three(processor.get("image_std", (0.5, 0.5, 0.5)))
    if processor.get("include_top") and processor.get("image_std") is not None:  # EfficientNet: x / std again
        std = tuple(s * t for s, t in zip(std, _three(processor["image_std"])))
    scale = 255.0 * factor
    return tuple((m + offset) / scale for m in mean), tuple(s / scale for s in std)


def _three(values: Any) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    return tuple(float(v) for v in values)


def _interpolation(name: str, source: str) -> str:
    if name not in INTERPOLATIONS:
        raise ConfigError(f"{source}: interpolation {name!r} is not one the kit reproduces ({list(INTERPOLATIONS)})")
    return name


def _size(values: Sequence[int]) -> Size:
    """[s] or [s, s] as s; [h, w] as (h, w)."""
    if len(values) == 1 or values[0] == values[1]:
        return int(values[0])
    return int(values[0]), int(values[1])


def _yaml_size(size: Size) -> Any:
    return size if isinstance(size, int) else list(size)


def _text(size: Size) -> str:
    return str(size) if isinstance(size, int) else f"{size[0]}x{size[1]}"
