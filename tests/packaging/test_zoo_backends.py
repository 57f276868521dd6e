"""The timm and Hugging Face demo folders on every backend the other classifiers get: their ONNX exports
(checked against torch), ONNX Runtime, OpenVINO, AOTInductor and int8 archives built by `make test`,
loaded in-process by TorchServe's own model loader, answering as the eager archive (a corrupt image fails
alone). Their Triton ensembles are compared with TorchServe in tests/deploy/test_triton.py."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import demo_models
import fidelity
from corpus import CORRUPT
from kit import REPO, ZOO_DEMOS, onnx_file

VARIANT_TOLERANCE = {"onnx": 1e-4, "openvino": 1e-4, "aoti": 1e-4}


@pytest.mark.parametrize("name", ZOO_DEMOS)
def test_zoo_export_matches_torch(name: str) -> None:
    onnx_file(name)
    check = json.loads((REPO / "build" / "onnx" / name / "export.json").read_text())
    assert check["max_abs_probability"] <= 1e-4 and check["same_top1"], check


@pytest.mark.parametrize("variant", sorted(VARIANT_TOLERANCE))
@pytest.mark.parametrize("name", ZOO_DEMOS)
def test_zoo_variant_answers_like_eager(
    name: str, variant: str, load_handler: Any, photos: dict[str, np.ndarray]
) -> None:
    rows: list[dict[str, Any]] = [{"body": demo_models.encode(photos[n], "JPEG")} for n in ("chelsea", "coffee")]
    rows.insert(1, {"body": CORRUPT})
    eager, ours = load_handler(name).handle(rows), load_handler(f"{name}_{variant}").handle(rows)
    assert [s for s, _ in ours] == [s for s, _ in eager] == [200, 400, 200]
    for (_, a), (_, b) in zip([ours[0], ours[2]], [eager[0], eager[2]]):
        # rank by rank (seeded nets have near-equal probabilities, so indices may swap within the tolerance)
        assert len(a) == len(b)
        assert all(abs(x["score"] - y["score"]) <= VARIANT_TOLERANCE[variant] for x, y in zip(a, b)), (a, b)


@pytest.mark.parametrize("name", ZOO_DEMOS)
def test_zoo_int8_stays_close_in_probability(name: str) -> None:
    report = fidelity.compare_backends(name, REPO / "models", {"int8": onnx_file(name, "model.int8.onnx")})
    assert report["int8"]["max_abs_probability"] <= 0.05, report
