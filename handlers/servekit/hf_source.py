"""Hugging Face transformers image classifiers: a ``save_pretrained`` folder, loaded offline.

The class comes from the folder's ``config.json`` through ``AutoModelForImageClassification``, with
``local_files_only=True`` and no remote code: a folder whose config names code of its own (``auto_map``)
is refused. The module returned takes a normalized batch and returns its logits, as every other
classifier the kit serves. transformers is imported only when such a model loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from servekit.errors import ConfigError, plain_line, require

CONFIG_FILE = "config.json"


class ImageClassifierLogits(torch.nn.Module):
    """A transformers image classifier as ``pixel_values -> logits``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


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


def classifier_class(config: dict[str, Any]) -> str:
    """The ``...ForImageClassification`` class a transformers config names.

    Raises:
        ConfigError: remote code (``auto_map``), or a model that is not an image classifier.
    """
    architectures = [str(a) for a in config.get("architectures") or []]
    model_type = config.get("model_type", "?")
    if config.get("auto_map"):
        raise ConfigError(
            "the Hugging Face folder's config.json names code of its own (auto_map); the kit never runs code from "
            "a model folder: export the model to ONNX or TorchScript and scaffold that"
        )
    transformers = require("transformers", "a Hugging Face model folder")
    known = set(transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values())
    named = next((a for a in architectures if a in known), None)
    if named is None:
        what = ", ".join(architectures) or f"model_type {model_type}"
        raise ConfigError(
            f"the Hugging Face folder holds {what}, not an image classifier (an AutoModelForImageClassification "
            f"class such as ViTForImageClassification); only image classifiers are served from transformers"
        )
    return named


def load_transformers(folder: Path) -> ImageClassifierLogits:
    """The folder's image classifier, weights loaded from its own files only, in eval mode, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    classifier_class(read_config(folder))
    transformers = require("transformers", "a Hugging Face model folder")
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"cannot load the Hugging Face folder: {plain_line(str(exc))[:300]}") from None
    return ImageClassifierLogits(model).eval()


def id2label(config: dict[str, Any]) -> list[str]:
    """Class names in index order from ``id2label`` (empty when the config has none)."""
    mapping = config.get("id2label") or {}
    try:
        indexed = {int(k): str(v) for k, v in mapping.items()}
    except (AttributeError, ValueError):
        return []
    return [indexed.get(i, f"LABEL_{i}") for i in range(max(indexed, default=-1) + 1)]
