"""Model outputs to the JSON answers clients see (the schemas are in docs/calling.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def topk_to_json(logits: torch.Tensor, labels: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Softmax each row of ``logits`` and return its top ``k`` as ``{label, index, score}``, best first."""
    probs = torch.softmax(logits.to(torch.float32), dim=1)
    k = min(k, probs.shape[1])
    scores, indices = torch.topk(probs, k, dim=1)
    return [
        [
            {"label": label_of(labels, int(i)), "index": int(i), "score": float(s)}
            for s, i in zip(row_scores.tolist(), row_indices.tolist())
        ]
        for row_scores, row_indices in zip(scores, indices)
    ]


def detections_to_json(
    output: Mapping[str, torch.Tensor],
    labels: Sequence[str],
    size: tuple[int, int],
    score_threshold: float,
    max_detections: int,
    *,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One detector output to ``{label, index, score, box}`` items, best first.

    ``box`` is ``[x1, y1, x2, y2]`` in the pixels of the image as sent (``size`` is its width and
    height), clipped to it. A Mask R-CNN output adds ``mask``: COCO RLE (``{"size": [h, w], "counts"}``)
    of the mask at ``mask_threshold``; a Keypoint R-CNN output adds ``keypoints``: ``[[x, y, score], ...]``.
    """
    width, height = size
    scores = output["scores"].detach().to("cpu", torch.float32)
    keep = torch.nonzero(scores >= score_threshold).flatten()
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)][:max_detections]
    boxes = output["boxes"].detach().to("cpu", torch.float32)[keep]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    classes = output["labels"].detach().to("cpu")[keep]
    items = [
        {
            "label": label_of(labels, int(c)),
            "index": int(c),
            "score": float(s),
            "box": [round(float(v), 2) for v in box],
        }
        for c, s, box in zip(classes.tolist(), scores[keep].tolist(), boxes)
    ]
    if "masks" in output:
        for item, mask in zip(items, output["masks"].detach().to("cpu")[keep]):
            item["mask"] = mask_to_rle(mask[0] >= mask_threshold)
    if "keypoints" in output:
        points = output["keypoints"].detach().to("cpu", torch.float32)[keep]
        point_scores = output.get("keypoints_scores", points[..., 2]).detach().to("cpu", torch.float32)[keep]
        for item, xy, kp_scores in zip(items, points, point_scores):
            item["keypoints"] = [
                [round(float(p[0]), 2), round(float(p[1]), 2), round(float(sc), 4)] for p, sc in zip(xy, kp_scores)
            ]
    return items


def mask_to_rle(mask: torch.Tensor) -> dict[str, Any]:
    """A binary H x W mask as COCO run-length encoding (pycocotools), JSON-ready."""
    import numpy as np
    from pycocotools import mask as coco_mask

    encoded = coco_mask.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def label_of(labels: Sequence[str], index: int) -> str:
    """Return the name of class ``index``, or its number when the label list has none."""
    return labels[index] if 0 <= index < len(labels) else str(index)
