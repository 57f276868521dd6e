"""Reference outputs computed without the kit: torchvision presets and the raw .pt, to compare against."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
import yaml
from torchvision.transforms import v2

REPO = Path(__file__).resolve().parents[2]


# The detector's ONNX graph (legacy exporter) follows eager torch closely on some photos (astronaut,
# colorwheel: top-10 boxes within 0.03 px, scores within ~3e-4) and drifts on others (coffee,
# hubble_deep_field), where the seeded detector's near-tied proposals come out in another order.
ORT_DETECTOR_SCORE_TOL = 5e-4
ORT_DETECTOR_PHOTOS = ("astronaut", "colorwheel")


def handler_section(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "models" / name / "model-config.yaml").read_text())["handler"]


@functools.cache
def raw_model(name: str) -> torch.nn.Module:
    """The model of ``models/<name>`` loaded directly with torch/torchvision."""
    folder = REPO / "models" / name
    source = handler_section(name)["model"]
    if source.get("format") == "torchscript":
        return torch.jit.load(str(folder / source["file"])).eval()
    if "architecture" in source:
        model = torchvision.models.get_model(
            source["architecture"],
            weights=None,
            **({"weights_backbone": None} if "rcnn" in source["architecture"] else {}),
            **source.get("kwargs", {}),
        )
    else:
        spec = importlib.util.spec_from_file_location("ref_model", folder / source["model_file"])
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        model = getattr(module, source["model_class"])(**source.get("kwargs", {}))
    model.load_state_dict(torch.load(folder / source["file"], weights_only=True))
    return model.eval()


def decoded_jpeg(data: bytes, name: str) -> np.ndarray:
    """A JPEG as the kit decodes it for classifier ``name``: at reduced DCT scale (Pillow's draft, never
    under twice the model's ``resize``) when it is at least twice that on both sides, as the README says."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data))
    resize = 2 * handler_section(name).get("resize", 256)  # the kit keeps twice the recipe's resize
    if min(image.size) >= 2 * resize:
        image.draft("RGB", (resize, resize))
    return np.asarray(image.convert("RGB"))


def class_probabilities(name: str, image: np.ndarray) -> torch.Tensor:
    """Softmax probabilities of a classifier on an HxWx3 uint8 image, via torchvision's v2 preset."""
    return probabilities(raw_model(name), handler_section(name), image)


def probabilities(model: Any, section: dict[str, Any], image: np.ndarray) -> torch.Tensor:
    """Softmax probabilities of ``model`` on one image, preprocessed by torchvision's v2 preset."""
    preset = v2.Compose(
        [
            v2.Resize(section.get("resize", 256), interpolation=_interpolation(section), antialias=True),
            v2.CenterCrop(section.get("crop", 224)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(section.get("mean", [0.485, 0.456, 0.406]), section.get("std", [0.229, 0.224, 0.225])),
        ]
    )
    x = preset(torch.from_numpy(np.array(image)).permute(2, 0, 1))[None]
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1)[0]


def _interpolation(section: dict[str, Any]) -> v2.InterpolationMode:
    name = section.get("interpolation", "bilinear")
    return v2.InterpolationMode.NEAREST_EXACT if name == "nearest" else v2.InterpolationMode(name)


def detections(name: str, image: np.ndarray) -> list[dict[str, Any]]:
    """Detections above the configured threshold, best first, on one image alone."""
    return model_detections(raw_model(name), handler_section(name), image)


def model_detections(model: Any, section: dict[str, Any], image: np.ndarray) -> list[dict[str, Any]]:
    """Detections of ``model`` above the section's threshold, best first, on one image alone."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    with torch.inference_mode():
        out = model([x])[0]
    keep = out["scores"] >= section.get("score_threshold", 0.5)
    order = torch.argsort(out["scores"][keep], descending=True, stable=True)[: section.get("max_detections", 100)]
    return [
        {"index": int(c), "score": float(s), "box": b.tolist()}
        for c, s, b in zip(out["labels"][keep][order], out["scores"][keep][order], out["boxes"][keep][order])
    ]


def assert_classification_matches(answer: list[dict[str, Any]], probs: torch.Tensor, atol: float = 1e-4) -> None:
    """Every served {index, score} equals the reference probability of that index, ranked alike."""
    assert answer, "empty classification"
    for item in answer:
        assert abs(item["score"] - float(probs[item["index"]])) <= atol, item
    top = torch.topk(probs, len(answer)).values
    assert [round(i["score"], 4) for i in answer] == [round(float(v), 4) for v in top]


def assert_detections_match(
    answer: list[dict[str, Any]], expected: list[dict[str, Any]], box_tol: float = 0.5, score_tol: float = 1e-4
) -> None:
    """Same detections in the same order: labels equal, scores within ``score_tol``, boxes within ``box_tol`` px."""
    assert len(answer) == len(expected)
    for got, want in zip(answer, expected):
        assert got["index"] == want["index"]
        assert abs(got["score"] - want["score"]) <= score_tol
        assert max(abs(a - b) for a, b in zip(got["box"], want["box"])) <= box_tol


def assert_detections_close(
    answer: list[dict[str, Any]],
    expected: list[dict[str, Any]],
    top: int = 10,
    score_tol: float = ORT_DETECTOR_SCORE_TOL,
) -> None:
    """Each of the ``top`` expected detections has a served one of its label, score and box (0.5 px)."""
    assert len(answer) >= min(top, len(expected))
    for want in expected[:top]:
        same = [d for d in answer if d["index"] == want["index"] and abs(d["score"] - want["score"]) <= score_tol]
        assert same, want
        assert min(max(abs(a - b) for a, b in zip(d["box"], want["box"])) for d in same) <= 0.5, want


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, float(x2 - x1)) * max(0.0, float(y2 - y1))
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, threshold: float) -> list[int]:
    """NMS from its definition: per class, keep the best box, drop those overlapping it by more than the threshold."""
    kept: list[int] = []
    for cls in classes.unique().tolist():
        order = [int(i) for i in torch.argsort(scores, descending=True, stable=True) if classes[i] == cls]
        while order:
            best = order.pop(0)
            kept.append(best)
            order = [i for i in order if iou(boxes[best], boxes[i]) <= threshold]
    return sorted(kept, key=lambda i: (-float(scores[i]), i))


def yolo_detections(model: Any, section: dict[str, Any], image: np.ndarray) -> list[dict[str, Any]]:
    """A raw-output detector's answer computed here: the layouts decoded and NMS done from their definitions."""
    from servekit.yolo import letterbox

    size = section.get("input_size", 640)
    boxed, geometry = letterbox(torch.from_numpy(np.array(image)).permute(2, 0, 1), size)
    with torch.inference_mode():
        raw = model(boxed[None].float() / 255)[0].float()
    layout = section["layout"]
    if layout == "end2end":
        boxes, scores, classes = raw[:, :4], raw[:, 4], raw[:, 5].round().long()
    else:
        rows = raw.T if layout == "yolov8" else raw
        cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        class_scores = rows[:, 4:] if layout == "yolov8" else rows[:, 5:] * rows[:, 4:5]
        scores, classes = class_scores.max(1)
    keep = torch.nonzero(scores >= section.get("score_threshold", 0.25)).flatten()
    order = list(range(len(keep)))
    if layout != "end2end":
        order = greedy_nms(boxes[keep], scores[keep], classes[keep], section.get("iou_threshold", 0.45))
    order = sorted(order, key=lambda i: (-float(scores[keep][i]), i))[: section.get("max_detections", 300)]
    result = []
    for i in order:
        x1, y1, x2, y2 = boxes[keep][i].tolist()
        mapped = [(x1 - geometry.left) / geometry.scale_x, (y1 - geometry.top) / geometry.scale_y,
                  (x2 - geometry.left) / geometry.scale_x, (y2 - geometry.top) / geometry.scale_y]  # fmt: skip
        limits = [geometry.width, geometry.height] * 2
        box = [min(max(v, 0.0), limit) for v, limit in zip(mapped, limits)]
        result.append({"index": int(classes[keep][i]), "score": float(scores[keep][i]), "box": box})
    return result
