"""The task metrics of served answers: pure functions from the kit's JSON answers and the truth.

- classification: top-1, top-k (k up to the answers' length, 5 at most), per-class recall, the confusion
  matrix (rows the truth, columns the top-1 answer);
- detection: COCO AP, AP50, AP75, AP small/medium/large and AR@100 from pycocotools' ``COCOeval`` (boxes, and
  masks where the answers carry them), with each category's AP;
- segmentation: the pixel confusion matrix over the images (``ignore_index`` never counted, a pixel no class
  claims counted as missed), then mIoU, pixel accuracy and each class's IoU.

Each returns a :class:`Scores`: the headline metric (the one ``make variants`` keeps within a budget), the
others beside it, and the per-class figures for the report.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADLINE = {"classification": "top1", "detection": "AP", "segmentation": "mIoU"}
COCO_STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")


@dataclass(frozen=True)
class Scores:
    """One evaluation's figures: ``headline`` names the metric a budget applies to."""

    headline: str
    metrics: dict[str, float]
    per_class: dict[str, float] = field(default_factory=dict)  # recall, AP or IoU of each class
    per_class_name: str = ""
    confusion: list[list[int]] = field(default_factory=list)
    confusion_labels: list[str] = field(default_factory=list)

    @property
    def value(self) -> float:
        return self.metrics[self.headline]


# ------------------------------------------------------------------------------------------ classification


def top_indices(answer: Sequence[Mapping[str, Any]]) -> list[int]:
    """The class indices of a top-k answer, best first."""
    return [int(item["index"]) for item in answer]


def classification_scores(
    truth: Sequence[int], answers: Sequence[Sequence[Mapping[str, Any]]], labels: Sequence[str]
) -> Scores:
    """Top-1, top-k, per-class recall and the confusion matrix over the classes the data holds (a top-1
    outside them lands in the column ``other``)."""
    if not truth:
        raise ValueError("no answered images to score")
    ranked = [top_indices(a) for a in answers]
    k = min(5, *(len(r) for r in ranked))
    hits1 = [bool(r) and r[0] == t for r, t in zip(ranked, truth)]
    hitsk = [t in r[:k] for r, t in zip(ranked, truth)]
    present = sorted(set(truth))
    column = {c: i for i, c in enumerate(present)}
    other = any(r[0] not in column for r in ranked if r)
    matrix = np.zeros((len(present), len(present) + int(other)), dtype=np.int64)
    for r, t in zip(ranked, truth):
        matrix[column[t], column.get(r[0], len(present)) if r else len(present)] += 1
    recall = {labels[c]: float(matrix[i, i] / matrix[i].sum()) for i, c in enumerate(present)}
    metrics = {"top1": float(np.mean(hits1)), f"top{k}": float(np.mean(hitsk)), "images": float(len(truth))}
    metrics["mean_class_recall"] = float(np.mean(list(recall.values())))
    names = [labels[c] for c in present] + (["other"] if other else [])
    return Scores("top1", metrics, recall, "recall", matrix.tolist(), names)


# ------------------------------------------------------------------------------------------ detection


def coco_results(
    image_ids: Sequence[int],
    answers: Sequence[Sequence[Mapping[str, Any]]],
    labels: Sequence[str],
    categories: Mapping[int, str],
) -> list[dict[str, Any]]:
    """The kit's detection answers (``{label, score, box[, mask]}`` in the image's pixels) as COCO results;
    labels that are no category of the truth are left out (they cannot be scored)."""
    index = {name: cid for cid, name in categories.items()}
    results = []
    for image_id, answer in zip(image_ids, answers):
        for item in answer:
            cid = index.get(item["label"])
            if cid is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in item["box"])
            found = {"image_id": int(image_id), "category_id": cid, "bbox": [x1, y1, x2 - x1, y2 - y1]}
            found["score"] = float(item["score"])
            if isinstance(item.get("mask"), Mapping) and "counts" in item["mask"]:
                found["segmentation"] = {"size": list(item["mask"]["size"]), "counts": item["mask"]["counts"]}
            results.append(found)
    return results


def detection_scores(
    truth: Mapping[str, Any], results: Sequence[Mapping[str, Any]], image_ids: Sequence[int]
) -> Scores:
    """COCO evaluation (pycocotools) of ``results`` on the images ``image_ids`` of ``truth``: bbox, and segm
    when the results carry masks and the truth polygons or RLE."""
    box = _coco_eval(truth, results, image_ids, "bbox")
    metrics = {name: float(v) for name, v in zip(COCO_STATS, box.stats)}
    metrics["images"] = float(len(image_ids))
    with_masks = results and all("segmentation" in r for r in results)
    if with_masks and any("segmentation" in a for a in truth["annotations"]):
        segm = _coco_eval(truth, results, image_ids, "segm")
        metrics.update({f"mask_{name}": float(v) for name, v in zip(COCO_STATS[:3], segm.stats)})
    per_class = {}
    precision = box.eval["precision"]  # [iou, recall, category, area, max_dets]
    for k, cid in enumerate(box.params.catIds):
        values = precision[:, :, k, 0, -1]
        valid = values[values > -1]
        name = next(c["name"] for c in truth["categories"] if c["id"] == cid)
        per_class[name] = float(valid.mean()) if valid.size else float("nan")
    return Scores("AP", metrics, per_class, "AP")


def _coco_eval(
    truth: Mapping[str, Any], results: Sequence[Mapping[str, Any]], image_ids: Sequence[int], kind: str
) -> Any:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {k: truth[k] for k in ("images", "annotations", "categories")}
        gt.createIndex()
        found = [dict(r) for r in results]
        if kind == "segm":
            for r in found:
                r["segmentation"] = {**r["segmentation"], "counts": str(r["segmentation"]["counts"]).encode("ascii")}
        dt = gt.loadRes(found) if found else COCO()
        if not found:
            dt.dataset = {"images": gt.dataset["images"], "annotations": [], "categories": gt.dataset["categories"]}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType=kind)
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


# ------------------------------------------------------------------------------------------ segmentation


def answer_label_map(answer: Mapping[str, Any]) -> np.ndarray:
    """A segmentation answer back to its label map (H x W int64): the ``png`` label map where it is sent,
    else the classes' RLE masks; pixels no class claims are -1."""
    from PIL import Image

    if "png" in answer:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"]))), dtype=np.int64)
    from pycocotools import mask as coco_mask

    height, width = answer["size"]
    out = np.full((height, width), -1, np.int64)
    for item in answer["classes"]:
        rle = {"size": item["mask"]["size"], "counts": item["mask"]["counts"].encode("ascii")}
        out[coco_mask.decode(rle).astype(bool)] = item["index"]
    return out


def pixel_confusion(truth: np.ndarray, found: np.ndarray, classes: int, ignore_index: int) -> np.ndarray:
    """The ``classes`` x (``classes`` + 1) pixel counts of (truth, answer); the last column counts pixels no
    class claimed; ``ignore_index`` pixels of the truth are left out."""
    if truth.shape != found.shape:
        raise ValueError(f"answer is {found.shape[1]}x{found.shape[0]}, its mask {truth.shape[1]}x{truth.shape[0]}")
    keep = truth != ignore_index
    t, f = truth[keep], found[keep]
    f = np.where((f >= 0) & (f < classes), f, classes)
    return np.bincount(t * (classes + 1) + f, minlength=classes * (classes + 1)).reshape(classes, classes + 1)


def segmentation_scores(confusion: np.ndarray, labels: Sequence[str]) -> Scores:
    """mIoU (over the classes present in the truth or the answers), pixel accuracy and each class's IoU."""
    classes = len(labels)
    inter = np.diag(confusion[:, :classes]).astype(np.float64)
    truth_px = confusion.sum(1).astype(np.float64)
    found_px = confusion[:, :classes].sum(0).astype(np.float64)
    union = truth_px + found_px - inter
    present = union > 0
    ious = {labels[i]: float(inter[i] / union[i]) for i in range(classes) if present[i]}
    metrics = {
        "mIoU": float(np.mean(list(ious.values()))) if ious else 0.0,
        "pixel_accuracy": float(inter.sum() / max(truth_px.sum(), 1)),
        "unclaimed_pixels": float(confusion[:, classes].sum() / max(truth_px.sum(), 1)),
    }
    names = [*labels, "none"]
    return Scores("mIoU", metrics, ious, "IoU", confusion.tolist(), names)
