"""Raw-output (YOLO-style) detectors: letterbox in, class-aware NMS out, boxes back in the image's pixels.

Three output layouts are read (ultralytics' published layouts, read as a contract; no code of theirs):

- ``yolov5``: ``[N, A, 5+C]``: cx, cy, w, h, objectness, C class scores (score = objectness x class);
- ``yolov8``: ``[N, 4+C, A]``: cx, cy, w, h, C class scores;
- ``end2end``: ``[N, K, 6]``: x1, y1, x2, y2, score, class, already suppressed.

Every image is letterboxed to the same square, so a batch of mixed sizes is one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms, box_convert, nms
from torchvision.transforms.v2 import functional as F

from servekit.errors import ConfigError, require

LAYOUTS = ("yolov5", "yolov8", "end2end")
PAD_VALUE = 114
END2END_MAX_ROWS = 1000


@dataclass(frozen=True)
class Letterbox:
    """How one image was fitted into the square: its size, the scale on each axis and the padding."""

    width: int
    height: int
    scale_x: float
    scale_y: float
    left: int
    top: int

    def values(self) -> list[float]:
        """The geometry as six numbers (width, height, scale_x, scale_y, left, top), e.g. for a Triton tensor."""
        return [self.width, self.height, self.scale_x, self.scale_y, self.left, self.top]

    @classmethod
    def from_values(cls, values: Sequence[float]) -> Letterbox:
        """The geometry that :meth:`values` wrote."""
        width, height, scale_x, scale_y, left, top = (float(v) for v in values)
        return cls(round(width), round(height), scale_x, scale_y, round(left), round(top))


def letterbox_geometry(width: int, height: int, size: int) -> tuple[int, int, Letterbox]:
    """The resized width and height of an image fitted into ``size`` x ``size``, and its geometry."""
    scale = min(size / width, size / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    return new_w, new_h, Letterbox(width, height, new_w / width, new_h / height, left, top)


def letterbox(
    pixels: torch.Tensor, size: int, original: tuple[int, int] | None = None
) -> tuple[torch.Tensor, Letterbox]:
    """Fit a uint8 3 x H x W image into ``size`` x ``size`` keeping its aspect, centred on 114 gray.

    ``original`` (width, height) is the size the image was sent at, when ``pixels`` is a reduced-scale
    decode of it: the geometry, and so the boxes, stay in the pixels as sent.
    """
    width, height = original or (int(pixels.shape[2]), int(pixels.shape[1]))
    new_w, new_h, geometry = letterbox_geometry(width, height, size)
    resized = F.resize(pixels, [new_h, new_w], antialias=True)
    return _on_canvas(resized, size, geometry.left, geometry.top), geometry


def ultralytics_letterbox(pixels: torch.Tensor, size: int) -> tuple[torch.Tensor, Letterbox]:
    """Fit a fully decoded uint8 3 x H x W image into ``size`` x ``size`` as ultralytics' predictor does, so
    boxes equal ``yolo predict``'s: OpenCV ``INTER_LINEAR`` on uint8 (no antialias) to ``round(side * r)``,
    placed as :func:`letterbox_geometry` places it (their ``round(d - 0.1)`` padding is that floor), and
    boxes mapped back with one gain and the pad of their ``scale_boxes`` (``round((size - side * r) / 2 -
    0.1)``, from the unrounded side). Their published behaviour, reproduced.
    """
    cv2 = require("cv2", "handler.letterbox ultralytics (OpenCV's resize, package opencv-python-headless)")
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    new_w, new_h, placed = letterbox_geometry(width, height, size)
    image = pixels.permute(1, 2, 0).contiguous().numpy()
    if (new_w, new_h) != (width, height):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = _on_canvas(torch.from_numpy(image).permute(2, 0, 1), size, placed.left, placed.top)
    gain = min(size / height, size / width)
    pad_x, pad_y = round((size - width * gain) / 2 - 0.1), round((size - height * gain) / 2 - 0.1)
    return canvas, Letterbox(width, height, gain, gain, pad_x, pad_y)


def _on_canvas(resized: torch.Tensor, size: int, left: int, top: int) -> torch.Tensor:
    """A ``size`` x ``size`` canvas of 114 gray with ``resized`` pasted at (left, top)."""
    canvas = torch.full((3, size, size), PAD_VALUE, dtype=torch.uint8)
    canvas[:, top : top + resized.shape[1], left : left + resized.shape[2]] = resized
    return canvas


def unletterbox(boxes: torch.Tensor, geometry: Letterbox) -> torch.Tensor:
    """Boxes (x1, y1, x2, y2) in the letterboxed square back to the pixels of the image as sent, clipped."""
    out = boxes.to(torch.float32).clone()
    out[:, 0::2] = ((out[:, 0::2] - geometry.left) / geometry.scale_x).clamp(0, geometry.width)
    out[:, 1::2] = ((out[:, 1::2] - geometry.top) / geometry.scale_y).clamp(0, geometry.height)
    return out


def infer_layout(shape: Sequence[int], classes: int | None = None) -> str:
    """The layout a raw output of this shape is in (``classes`` disambiguates, e.g. 1-class yolov5).

    Raises:
        ConfigError: the shape fits none, or more than one, of the layouts.
    """
    if len(shape) != 3:
        raise ConfigError(f"a YOLO-style output is N x rows x columns; the model returned shape {list(shape)}")
    _, rows, cols = (int(d) for d in shape)
    fits = []
    if rows < cols and rows > 4 and (classes is None or rows == 4 + classes):
        fits.append("yolov8")
    if rows > cols and cols > 5 and (classes is None or cols == 5 + classes):
        fits.append("yolov5")
    if cols == 6:
        fits.append("end2end")
    if fits == ["yolov5", "end2end"]:  # 1 class or unknown: anchors run to thousands, a suppressed head to hundreds
        fits = ["end2end"] if rows <= END2END_MAX_ROWS else ["yolov5"]
    if len(fits) != 1:
        what = "none" if not fits else " and ".join(fits)
        raise ConfigError(
            f"output shape {list(shape)} fits {what} of the layouts [N, A, 5+C] (yolov5), [N, 4+C, A] (yolov8), "
            "[N, K, 6] (end2end): set handler.layout"
        )
    return fits[0]


def resolve_layout(configured: str, shape: Sequence[int], classes: int | None = None) -> str:
    """The configured layout, or for ``auto`` the one an output of this shape is in."""
    return configured if configured != "auto" else infer_layout(shape, classes)


def layout_classes(shape: Sequence[int], layout: str) -> int | None:
    """The class count a raw output carries (None for end2end, whose classes are indices)."""
    if layout == "yolov8":
        return int(shape[1]) - 4
    if layout == "yolov5":
        return int(shape[2]) - 5
    return None


@dataclass(frozen=True)
class YoloSettings:
    """Postprocessing of a raw output."""

    layout: str
    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 300
    agnostic_nms: bool = False


def candidates(raw: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's raw output as (boxes x1y1x2y2, scores, classes), before thresholds and NMS."""
    raw = raw.to(torch.float32)
    if layout == "end2end":
        return raw[:, :4], raw[:, 4], raw[:, 5].round().long()
    rows = raw.T if layout == "yolov8" else raw
    boxes = box_convert(rows[:, :4], "cxcywh", "xyxy")
    if layout == "yolov8":
        scores, classes = rows[:, 4:].max(dim=1)
    else:
        scores, classes = (rows[:, 5:] * rows[:, 4:5]).max(dim=1)
    return boxes, scores, classes


def suppress(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, settings: YoloSettings) -> torch.Tensor:
    """Indices kept: score threshold, class-aware (or agnostic) NMS, best first, at most max_detections."""
    keep = torch.nonzero(scores >= settings.score_threshold).flatten()
    if settings.layout != "end2end" and len(keep):
        if settings.agnostic_nms:
            kept = nms(boxes[keep], scores[keep], settings.iou_threshold)
        else:
            kept = batched_nms(boxes[keep], scores[keep], classes[keep], settings.iou_threshold)
        keep = keep[kept]
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    return keep[: settings.max_detections]


def detect(raw: torch.Tensor, geometry: Letterbox, settings: YoloSettings) -> dict[str, torch.Tensor]:
    """One image's detections as torchvision's ``{boxes, labels, scores}``, boxes in the image's pixels."""
    boxes, scores, classes = candidates(raw, settings.layout)
    keep = suppress(boxes, scores, classes, settings)
    return {"boxes": unletterbox(boxes[keep], geometry), "labels": classes[keep], "scores": scores[keep]}
