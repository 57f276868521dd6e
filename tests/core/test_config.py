"""Config parsing: typed, validated once, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from servekit.config import ClassifierConfig, DetectorConfig, ImageLimits, parse_handler_config
from servekit.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_every_shipped_model_config_parses() -> None:
    for path in sorted((REPO / "models").glob("*/model-config.yaml")):
        document = yaml.safe_load(path.read_text())
        config = parse_handler_config(document["handler"])
        assert config.task in ("classification", "detection", "segmentation"), path
        assert document["batchSize"] >= 1 and document["maxBatchDelay"] >= 0


def test_classifier_defaults_and_types() -> None:
    config = parse_handler_config({"task": "classification", "model": {"architecture": "resnet18"}, "mean": [0, 0, 0]})
    assert isinstance(config, ClassifierConfig)
    assert config.mean == (0.0, 0.0, 0.0) and all(isinstance(v, float) for v in config.mean)
    assert config.crop == 224 and config.topk == 5
    assert config.limits == ImageLimits()


def test_detector_config() -> None:
    config = parse_handler_config(
        {
            "task": "detection",
            "model": {"architecture": "fasterrcnn_resnet50_fpn", "kwargs": {"num_classes": 3}},
            "score_threshold": 0.25,
            "limits": {"max_pixels": 1000, "formats": ["PNG"]},
        }
    )
    assert isinstance(config, DetectorConfig)
    assert config.score_threshold == 0.25 and config.limits.formats == ("PNG",)
    assert config.model.kwargs == {"num_classes": 3}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (None, "'handler' must be a mapping"),
        ({"task": "keypoints"}, "handler.task must be one of"),
        ({"task": "classification", "model": {"architecture": "resnet18"}, "topK": 3}, "unknown key 'handler.topK'"),
        (
            {"task": "classification", "model": {"architecture": "resnet18", "wieghts": 1}},
            "unknown key 'handler.model.wieghts'",
        ),
        (
            {"task": "classification", "model": {"architecture": "resnet18"}, "crop": "224"},
            "'handler.crop' must be int",
        ),
        ({"task": "classification", "model": {"architecture": "resnet18"}, "topk": True}, "'handler.topk' must be int"),
        (
            {"task": "classification", "model": {"architecture": "resnet18"}, "crop": 300},
            "handler.crop must be > 0 and <= resize",
        ),
        (
            {"task": "classification", "model": {"architecture": "resnet18"}, "std": [1, 0, 1]},
            "handler.std needs 3 values > 0",
        ),
        (
            {"task": "classification", "model": {"architecture": "resnet18"}, "mean": [0.5]},
            "handler.mean needs 3 values",
        ),
        ({"task": "classification", "model": {}}, "exactly one of 'architecture'"),
        (
            {"task": "classification", "model": {"architecture": "a", "model_file": "m.py", "model_class": "M"}},
            "exactly one of",
        ),
        ({"task": "classification", "model": {"model_file": "m.py"}}, "handler.model.model_class is required"),
        ({"task": "classification", "model": {"format": "onnxx"}}, "'handler.model.format' must be one of"),
        (
            {"task": "classification", "model": {"format": "torchscript", "architecture": "resnet18"}},
            "apply to state_dict/safetensors",
        ),
        (
            {"task": "detection", "model": {"architecture": "x"}, "score_threshold": 1.5},
            "handler.score_threshold must be within",
        ),
        (
            {"task": "detection", "model": {"architecture": "x"}, "limits": {"formats": ["TIFF"]}},
            "handler.limits.formats unknown",
        ),
        (
            {"task": "detection", "model": {"architecture": "x"}, "limits": {"max_bytes": 0}},
            "handler.limits.max_bytes must be > 0",
        ),
        ({"task": "detection", "model": {"architecture": "x"}, "limits": 5}, "'handler.limits' must be a mapping"),
    ],
)
def test_bad_configs_name_the_key(section: object, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_handler_config(section)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert str(info.value).startswith("model-config.yaml:")
