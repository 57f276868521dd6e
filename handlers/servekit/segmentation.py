"""Semantic segmentation outputs to answers sized by what they say, not by pixels.

A segmenter returns class logits ``[N, C, h, w]`` at its input's resolution (or a fraction of it). The
answer is for the image as sent: the logits are upsampled bilinearly to its size (as torch's
``interpolate`` and Hugging Face's ``post_process_semantic_segmentation`` do), each pixel takes its best
class, and each class present is answered once, largest first, with its share of the image and a COCO
RLE mask; or, with ``format: png``, the label map as one PNG. Only pixels near class boundaries are
blended (see :func:`label_map`), so a 12 MP photo never holds C x 12 M floats.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from servekit.errors import BadInput, ConfigError
from servekit.postprocess import label_of, mask_to_rle
from servekit.protocols import field_text, request_field

CHUNK_ELEMENTS = 1 << 24  # floats blended at a time (64 MB)


def segmentation_logits(output: Any) -> torch.Tensor:
    """The ``[N, C, h, w]`` logits of what a segmenter returned: torchvision's ``{"out", "aux"}`` dict, a
    Hugging Face output's ``logits``, the first element of a tuple or list, or the tensor itself.

    Raises:
        ConfigError: the model returned something else, or a tensor that is not 4-D.
    """
    if isinstance(output, dict):
        output = output.get("out", output.get("logits", next(iter(output.values()), None)))
    elif hasattr(output, "logits"):
        output = output.logits
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(f"a segmenter must return class logits [N, C, h, w]; this model returned {shape}")
    return output


def label_map(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The class of each pixel of a ``height`` x ``width`` image from one image's ``[C, h, w]`` logits:
    the argmax of their bilinear upsampling (``align_corners=False``, torch's ``interpolate``).

    Exact without upsampling C planes: a pixel interpolates the four logit vectors around it, and where
    those four share their best class the blend has it too (a convex combination keeps every
    ``logit_k >= logit_j``), so only pixels between corners that disagree (near class boundaries) are
    blended, a bounded number at a time. Returns uint8 (int16 past 256 classes), ``height`` x ``width``.
    """
    classes, rows, cols = logits.shape
    dtype = torch.uint8 if classes <= 256 else torch.int16
    logits = logits.to(torch.float32)
    coarse = logits.argmax(0)
    if (rows, cols) == (height, width):
        return coarse.to(dtype)
    top, bottom, wy = _source_index(rows, height)
    left, right, wx = _source_index(cols, width)
    below = torch.arange(rows).add_(1).clamp_(max=rows - 1)
    beside = torch.arange(cols).add_(1).clamp_(max=cols - 1)
    agree = (coarse == coarse[below]) & (coarse == coarse[:, beside]) & (coarse == coarse[below][:, beside])
    out = coarse.to(dtype)[top][:, left]
    ys, xs = torch.nonzero(~agree[top][:, left], as_tuple=True)
    vectors = logits.permute(1, 2, 0).contiguous()  # h x w x C: one pixel's logits are contiguous
    step = max(1, CHUNK_ELEMENTS // max(1, 4 * classes))
    for start in range(0, len(ys), step):
        y, x = ys[start : start + step], xs[start : start + step]
        t, b, x0, x1 = top[y], bottom[y], left[x], right[x]
        fy, fx = wy[y, None], wx[x, None]
        upper = vectors[t, x0] * (1 - fx) + vectors[t, x1] * fx
        lower = vectors[b, x0] * (1 - fx) + vectors[b, x1] * fx
        out[y, x] = (upper * (1 - fy) + lower * fy).argmax(1).to(dtype)
    return out


def _source_index(size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index along one axis: the two source indices it blends and the second's weight."""
    source = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * (size / out_size) - 0.5).clamp_(min=0)
    first = source.floor().long().clamp_(max=size - 1)
    return first, (first + 1).clamp_(max=size - 1), source - first


ANSWER_FORMATS = ("rle", "png")
BACKGROUND_LABELS = frozenset(("background", "__background__", "__bg__", "bg"))


def is_background(label: str) -> bool:
    """Whether a class name means "nothing" (VOC's and torchvision's ``__background__``, the kit's shapes):
    left out of the segmented area and of an explanation's default target."""
    return label.strip().lower() in BACKGROUND_LABELS


def requested_format(row: Any, default: str) -> str:
    """The answer format a request asks for: a ``format`` form field (``-F format=png``) or a ``format`` key
    beside the base64 image of a JSON body (``{"data": "<base64>", "format": "png"}``); else ``default``.

    Raises:
        BadInput: a format other than rle or png.
    """
    value = request_field(row, "format")
    if value is None:
        return default
    text = field_text(value)
    found = text.strip().lower()
    if found not in ANSWER_FORMATS:
        raise BadInput(f"format must be one of {', '.join(ANSWER_FORMATS)}; got {text.strip()[:20]!r}")
    return found


def segmentation_answer(
    labels_map: torch.Tensor,
    labels: Sequence[str],
    *,
    answer_format: str = "rle",
    min_area: float = 0.0,
    ignore: Sequence[str] = (),
) -> dict[str, Any]:
    """One image's answer: ``{"size": [h, w], "classes": [{label, index, area, mask}]}``, largest first.

    ``area`` is the class's share of the image (4 decimals); ``mask`` is COCO RLE. Classes under
    ``min_area`` or named in ``ignore`` are left out. ``answer_format`` "png" drops the masks and adds
    ``png``: the label map (a class index per pixel) as a base64 grayscale PNG (16-bit past 256 classes).
    """
    height, width = (int(v) for v in labels_map.shape)
    counts = np.bincount(labels_map.numpy().ravel().astype(np.intp, copy=False))
    total = float(height * width)
    order = sorted((int(i) for i in np.flatnonzero(counts)), key=lambda i: (-int(counts[i]), i))
    classes = []
    for index in order:
        label = label_of(labels, index)
        area = counts[index] / total
        if label in ignore or area < min_area:
            continue
        item: dict[str, Any] = {"label": label, "index": index, "area": round(area, 4)}
        if answer_format == "rle":
            item["mask"] = mask_to_rle(labels_map == index)
        classes.append(item)
    answer: dict[str, Any] = {"size": [height, width], "classes": classes}
    if answer_format == "png":
        answer["png"] = label_map_png(labels_map)
    return answer


def label_map_png(labels_map: torch.Tensor) -> str:
    """A label map as a base64 PNG: 8-bit grayscale (the class index is the gray value), or 16-bit."""
    from PIL import Image

    pixels = labels_map.numpy()
    image = Image.fromarray(pixels, "L") if pixels.dtype == np.uint8 else Image.fromarray(pixels.astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
