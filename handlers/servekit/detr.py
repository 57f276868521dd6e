"""DETR-family detectors: a fixed set of queries, each with class logits and a normalized box; no NMS.

The model sees the image resized by its processor's recipe and answers ``logits`` ``[N, Q, C]`` and
``pred_boxes`` ``[N, Q, 4]`` (cx, cy, w, h in [0, 1] of the image). Two scoring conventions, as the
Hugging Face image processors' ``post_process_object_detection`` apply them:

- ``softmax``: a softmax over the classes, whose last is "no object"; each query's best real class
  (DETR, YOLOS, Table Transformer);
- ``sigmoid``: a sigmoid per class and the top k over queries x classes, so one query may answer two
  classes (Deformable and Conditional DETR, DAB-DETR, RT-DETR, D-FINE, RF-DETR, LW-DETR).

Boxes scale to the pixels of the image as sent; thresholds, order and clipping are the kit's
(``postprocess.detections_to_json``). Pure: tensors in, tensors out.
"""

from __future__ import annotations

from typing import Any

import torch

from servekit.errors import ConfigError

# Hugging Face model types -> how their image processor scores them
SOFTMAX_TYPES = frozenset({"detr", "yolos", "table-transformer"})
SIGMOID_TYPES = frozenset(
    {"conditional_detr", "deformable_detr", "dab-detr", "rt_detr", "rt_detr_v2", "d_fine", "deimv2", "lw_detr"}
    | {"rf_detr"}
)

DOCUMENT_PREFIX = "pp_"  # PaddleOCR's layout and text detectors in transformers' detection mapping


def scoring_of(model_type: str) -> str:
    """The scoring convention of a Hugging Face detector's ``model_type``.

    Raises:
        ConfigError: a model type the kit does not know to be DETR-like.
    """
    if model_type in SOFTMAX_TYPES:
        return "softmax"
    if model_type in SIGMOID_TYPES:
        return "sigmoid"
    if model_type.startswith(DOCUMENT_PREFIX):
        raise ConfigError(
            f"model type {model_type!r} is a PaddleOCR document-layout or text detector, whose answer (reading "
            "order, polygons, text regions) is not a list of boxes: the kit serves photo detectors, not document OCR"
        )
    known = ", ".join(sorted(SOFTMAX_TYPES | SIGMOID_TYPES))
    raise ConfigError(f"model type {model_type!r} is not a DETR-family detector the kit knows ({known}); set scoring")


def detr_outputs(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, Q, C], pred_boxes [N, Q, 4])`` from a Hugging Face output, a dict, or a pair.

    Raises:
        ConfigError: the model returned something else.
    """
    if isinstance(output, dict) or hasattr(output, "pred_boxes"):
        get = output.get if isinstance(output, dict) else lambda name: getattr(output, name, None)
        logits, boxes = get("logits"), get("pred_boxes")
    elif isinstance(output, (tuple, list)) and len(output) >= 2:
        logits, boxes = output[0], output[1]
    else:
        logits = boxes = None
    if not (isinstance(logits, torch.Tensor) and isinstance(boxes, torch.Tensor)) or boxes.shape[-1] != 4:
        what = type(output).__name__
        raise ConfigError(
            f"a DETR-family detector returns class logits [N, Q, C] and boxes [N, Q, 4]; this model returned {what}"
        )
    if logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2]:
        raise ConfigError(
            f"a DETR-family detector returns logits [N, Q, C] and boxes [N, Q, 4]; got {list(logits.shape)} "
            f"and {list(boxes.shape)}"
        )
    return logits, boxes


def detr_detections(
    logits: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], scoring: str, top_k: int
) -> dict[str, torch.Tensor]:
    """One image's queries (``[Q, C]`` logits, ``[Q, 4]`` boxes) as ``{boxes, labels, scores}`` with boxes
    ``[x1, y1, x2, y2]`` in the pixels of a ``size`` (width, height) image, at most ``top_k``, best first."""
    width, height = size
    logits, boxes = logits.to(torch.float32), boxes.to(torch.float32)
    cx, cy, w, h = boxes.unbind(-1)
    corners = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    corners = corners * torch.tensor([width, height, width, height], dtype=torch.float32)
    if scoring == "softmax":
        scores, labels = logits.softmax(-1)[:, :-1].max(-1)
        order = torch.argsort(scores, descending=True, stable=True)[:top_k]
        return {"boxes": corners[order], "labels": labels[order], "scores": scores[order]}
    flat = logits.sigmoid().flatten()
    scores, index = torch.topk(flat, min(top_k, flat.numel()))
    classes = logits.shape[-1]
    return {"boxes": corners[index // classes], "labels": index % classes, "scores": scores}
