"""Image tensors to model inputs: work on uint8 until the batch is built, then normalize once."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from servekit.config import ClassifierConfig, DetectorConfig, SegmenterConfig, Size

# nearest-exact picks the pixels PIL's NEAREST picks (torch's plain "nearest" is off by half a pixel)
INTERPOLATION_MODES = {
    "nearest": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}


def classifier_crop(pixels: torch.Tensor, config: ClassifierConfig) -> torch.Tensor:
    """The model's recipe on one uint8 image: resize (the short side to an int, or to exactly [h, w]) with
    the config's interpolation, antialiased, then center-crop (none when ``crop`` is 0); still uint8."""
    resized = resize_image(pixels, config.resize, config.interpolation)
    if not config.crop:
        return resized
    height, width = config.input_size
    if config.crop_rounding == "floor" and resized.shape[1] >= height and resized.shape[2] >= width:
        return floor_center_crop(resized, height, width)
    return F.center_crop(resized, [height, width])


def floor_center_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The center ``height`` x ``width`` of an image, an odd margin's extra pixel at the bottom/right (Hugging
    Face processors' center crop; torchvision rounds it the other way)."""
    top, left = max(int(pixels.shape[1]) - height, 0) // 2, max(int(pixels.shape[2]) - width, 0) // 2
    return pixels[:, top : top + height, left : left + width]


def resize_image(pixels: torch.Tensor, resize: Size, interpolation: str, *, antialias: bool = True) -> torch.Tensor:
    """One uint8 image resized, antialiased: the short side to an int, or to exactly [height, width]. Without
    ``antialias``, resampled as floats (still 0-255) with antialiasing off: an image processor that rescales
    before it resizes (RF-DETR's) computes that."""
    size = [resize] if isinstance(resize, int) else list(resize)
    mode = INTERPOLATION_MODES[interpolation]
    if not antialias:
        return F.resize(pixels.to(torch.float32), size, interpolation=mode, antialias=False)
    return F.resize(pixels, size, interpolation=mode, antialias=True)


def aspect_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """The resized (height, width) of a Hugging Face processor's ``shortest_edge`` / ``longest_edge`` resize:
    the short side to ``short`` unless the long side would pass ``max_size`` (0: no cap). The rounding is
    Hugging Face's (``image_transforms.get_size_with_aspect_ratio``), so the model sees the same shape."""
    raw: float | None = None
    if max_size:
        low, high = float(min(height, width)), float(max(height, width))
        if high / low * short > max_size:
            raw = max_size * low / high
            short = round(raw)
    if (height <= width and height == short) or (width <= height and width == short):
        return height, width
    scale = raw if raw is not None else short
    if width < height:
        return int(scale * height / width), short
    return short, int(scale * width / height)


def resized_shape(
    height: int,
    width: int,
    resize: Size,
    max_size: int = 0,
    divisor: int = 0,
    *,
    keep_aspect: bool = False,
    multiple: int = 0,
) -> tuple[int, int]:
    """The (height, width) a recipe resizes an image of this size to: exactly ``resize`` when it is a pair
    (or, with ``keep_aspect`` or ``multiple``, as DPT's processor does: :func:`fitted_shape`); else the short
    side to ``resize`` (the long side capped at ``max_size``, 0: no cap; torchvision's and Hugging Face's
    rounding), then each side rounded up to a multiple of ``divisor`` (Mask2Former's ``size_divisor``; 0: none)."""
    if not isinstance(resize, int):
        if keep_aspect or multiple:
            return fitted_shape(height, width, (int(resize[0]), int(resize[1])), keep_aspect, multiple)
        return resize
    out_h, out_w = aspect_size(height, width, resize, max_size)
    if divisor > 0:
        out_h, out_w = math.ceil(out_h / divisor) * divisor, math.ceil(out_w / divisor) * divisor
    return out_h, out_w


def fitted_shape(height: int, width: int, target: tuple[int, int], keep_aspect: bool, multiple: int) -> tuple[int, int]:
    """DPT's resize (``get_resize_output_image_size``): with ``keep_aspect``, both sides scaled by the one of
    the two factors nearer to 1; each side then rounded to the nearest multiple of ``multiple`` (Python's
    ``round``, as Hugging Face's ``constrain_to_multiple_of`` with no bounds)."""
    scale_h, scale_w = target[0] / height, target[1] / width
    if keep_aspect:
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h
    step = max(multiple, 1)
    return round(scale_h * height / step) * step, round(scale_w * width / step) * step


def segmenter_input(pixels: torch.Tensor, config: SegmenterConfig, sent: tuple[int, int] | None = None) -> torch.Tensor:
    """The segmenter's recipe on one uint8 image: resized as the model was trained, then center-cropped when
    the recipe has a crop (a processor's ``do_center_crop``); still uint8.
    The shape comes from the (height, width) as sent, so a reduced-scale JPEG decode gives the same one."""
    height, width = sent or (int(pixels.shape[-2]), int(pixels.shape[-1]))
    shape = resized_shape(
        height, width, config.resize, config.max_size, config.size_divisor,
        keep_aspect=config.keep_aspect_ratio, multiple=config.ensure_multiple_of,
    )  # fmt: skip
    resized = resize_image(pixels, shape, config.interpolation)
    if not config.crop:
        return resized
    height, width = (config.crop, config.crop) if isinstance(config.crop, int) else config.crop
    return floor_center_crop(resized, height, width)


def classifier_batch(
    crops: Sequence[torch.Tensor], config: ClassifierConfig | SegmenterConfig | DetectorConfig
) -> torch.Tensor:
    """Stack uint8 images of one shape into one float batch in the model's channel order, normalized by the
    config's mean and std."""
    batch = torch.stack(list(crops)).to(torch.float32).div_(255.0)
    if config.channel_order == "bgr":
        batch = batch.flip(1)
    mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std)


def detector_inputs(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Turn uint8 images of any sizes into the float [0, 1] list torchvision detectors take."""
    return [image.to(torch.float32).div_(255.0) for image in images]


def detector_padded_shape(height: int, width: int, min_size: int, max_size: int, divisible: int) -> tuple[int, int]:
    """The padded input shape a torchvision R-CNN transform gives an image of this size.

    It resizes so the short side is ``min_size`` (the long side at most ``max_size``), floors, then
    pads up to a multiple of ``divisible``. Images with the same padded shape are padded identically
    alone or together, so running them as one batch cannot change any image's answer.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    resized = (math.floor(height * scale), math.floor(width * scale))
    return tuple(int(math.ceil(side / divisible) * divisible) for side in resized)  # type: ignore[return-value]


def group_by_key(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices grouped by equal key, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())
