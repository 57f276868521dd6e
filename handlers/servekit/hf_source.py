"""Hugging Face transformers vision models: a ``save_pretrained`` folder, loaded offline.

The class comes from the folder's ``config.json`` through the Auto class of its task
(``AutoModelForImageClassification``, ``AutoModelForSemanticSegmentation``, ``AutoModelForObjectDetection``
for the DETR family), with
``local_files_only=True`` and no remote code: a folder whose config names code of its own (``auto_map``)
is refused. The module returned takes a normalized batch and returns its logits (``[N, C]`` for a
classifier, ``[N, C, h, w]`` for a segmenter; a detector's ``logits`` and ``pred_boxes``), as every other
model of its task the kit serves.
transformers is imported only when such a model loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from servekit.errors import ConfigError, plain_line, require

CONFIG_FILE = "config.json"


class Logits(torch.nn.Module):
    """A transformers vision model as ``pixel_values -> logits`` (a detector: ``-> (logits, pred_boxes)``)."""

    def __init__(self, model: torch.nn.Module, outputs: tuple[str, ...] = ("logits",)) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        found = self.model(pixel_values=pixel_values)
        if len(self.outputs) == 1:
            return getattr(found, self.outputs[0])
        return tuple(getattr(found, name) for name in self.outputs)


class QuerySemantics(torch.nn.Module):
    """A mask-classification model (MaskFormer, Mask2Former) as ``pixel_values -> [N, C, h, w]`` class scores,
    as their processors' ``post_process_semantic_segmentation`` computes them: each query's class softmax
    (no-object dropped) times its mask's sigmoid, summed over queries; Mask2Former's masks first upsampled
    to 384 x 384 as that processor does. The kit then resizes the scores to the image and takes each
    pixel's best class, as for any segmenter."""

    def __init__(self, model: torch.nn.Module, mask_size: tuple[int, int] | None) -> None:
        super().__init__()
        self.model = model
        self.mask_size = mask_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        found = self.model(pixel_values=pixel_values)
        masks = found.masks_queries_logits
        if self.mask_size is not None:
            masks = torch.nn.functional.interpolate(masks, size=self.mask_size, mode="bilinear", align_corners=False)
        classes = found.class_queries_logits.softmax(dim=-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", classes, masks.sigmoid())


# mask-classification models served as semantic segmenters -> the mask size their post-processing upsamples to
QUERY_SEGMENTERS: dict[str, tuple[int, int] | None] = {
    "Mask2FormerForUniversalSegmentation": (384, 384),
    "MaskFormerForInstanceSegmentation": None,
}


# the kit's task -> the Auto class that loads it, the transformers mapping of its model classes, an example
HF_TASKS = {
    "classification": (
        "AutoModelForImageClassification",
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "an image classifier (such as ViTForImageClassification)",
    ),
    "segmentation": (
        "AutoModelForSemanticSegmentation",
        "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
        "a semantic segmenter (such as SegformerForSemanticSegmentation)",
    ),
    "detection": (
        "AutoModelForObjectDetection",
        "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES",
        "a DETR-family detector (such as RTDetrForObjectDetection)",
    ),
}
OUTPUTS = {"detection": ("logits", "pred_boxes")}  # what each task's wrapper returns, when not the logits alone


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json``, parsed.

    Raises:
        ConfigError: missing or not a JSON object.
    """
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {plain_line(str(exc))}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data


def model_task(config: dict[str, Any]) -> tuple[str, str]:
    """The kit's task and the transformers class a config names: ``("segmentation", "Segformer...")``.

    Raises:
        ConfigError: remote code (``auto_map``), or a model of no task the kit serves from transformers.
    """
    architectures = [str(a) for a in config.get("architectures") or []]
    model_type = config.get("model_type", "?")
    if config.get("auto_map"):
        raise ConfigError(
            "the Hugging Face folder's config.json names code of its own (auto_map); the kit never runs code from "
            "a model folder: export the model to ONNX or TorchScript and scaffold that"
        )
    transformers = require("transformers", "a Hugging Face model folder")
    mappings = transformers.models.auto.modeling_auto
    for task, (_, mapping, _) in HF_TASKS.items():
        named = next((a for a in architectures if a in mapped_classes(getattr(mappings, mapping))), None)
        if named is not None:
            return task, named
    named = next((a for a in architectures if a in QUERY_SEGMENTERS), None)
    if named is not None:
        return "segmentation", named
    what = ", ".join(architectures) or f"model_type {model_type}"
    if model_type == "oneformer":
        raise ConfigError(
            "the Hugging Face folder holds a OneFormer, whose forward pass takes a tokenized task prompt beside the "
            "image: the kit serves MaskFormer and Mask2Former in semantic mode, not OneFormer"
        )
    served = "; ".join(example for _, _, example in HF_TASKS.values())
    raise ConfigError(f"the Hugging Face folder holds {what}, which the kit does not serve: it serves {served}")


def mapped_classes(mapping: dict[str, Any]) -> set[str]:
    """The class names of a transformers Auto mapping, whose values are a name or a tuple of names (DeiT's and
    LeViT's ``...WithTeacher`` classes, the distilled checkpoints' own, sit in such tuples)."""
    return {name for value in mapping.values() for name in (value if isinstance(value, (tuple, list)) else (value,))}


def check_task(folder: Path, task: str) -> str:
    """The transformers class of the folder, when it is a model of ``task``.

    Raises:
        ConfigError: one line naming what the folder holds and the task it would be served as.
    """
    found, named = model_task(read_config(folder))
    if found != task:
        raise ConfigError(f"the Hugging Face folder holds {named}, a model for {found}, not {task}: use task {found}")
    return named


def load_transformers(folder: Path) -> Logits | QuerySemantics:
    """The folder's model, weights loaded from its own files only, in eval mode, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task, named = model_task(read_config(folder))
    transformers = require("transformers", "a Hugging Face model folder")
    transformers.utils.logging.disable_progress_bar()
    auto_class = "AutoModelForUniversalSegmentation" if named in QUERY_SEGMENTERS else HF_TASKS[task][0]
    auto = getattr(transformers, auto_class)
    try:
        model = auto.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"cannot load the Hugging Face folder: {plain_line(str(exc))[:300]}") from None
    if named in QUERY_SEGMENTERS:
        return QuerySemantics(model, QUERY_SEGMENTERS[named]).eval()
    return Logits(model, OUTPUTS.get(task, ("logits",))).eval()


def id2label(config: dict[str, Any]) -> list[str]:
    """Class names in index order from ``id2label`` (empty when the config has none)."""
    mapping = config.get("id2label") or {}
    try:
        indexed = {int(k): str(v) for k, v in mapping.items()}
    except (AttributeError, ValueError):
        return []
    return [indexed.get(i, f"LABEL_{i}") for i in range(max(indexed, default=-1) + 1)]
