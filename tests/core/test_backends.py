"""The faster backends: ONNX exports, int8, their archives, their fidelity, and `make bench-quick`."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import demo_models
import fidelity
import reference
import shapes
from corpus import CORRUPT
from kit import MODELS, ONNX_DIR, REPO, SOURCE_PATH, archive, onnx_file

CLASSIFIERS = ["digits", "resnet18", "mobilenet_v3_small"]


@pytest.mark.parametrize("name", MODELS)
def test_export_matches_torch(name: str) -> None:
    onnx_file(name)
    check = json.loads((ONNX_DIR / name / "export.json").read_text())
    assert check["max_abs_probability"] <= 1e-4, check
    assert check["max_abs_box"] <= 0.5, check
    assert check["same_top1"], check


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_onnx_runtime_follows_eager_on_the_image_set(name: str) -> None:
    report = fidelity.compare_backends(name, REPO / "models", {"onnx": onnx_file(name)})
    assert report["onnx"]["max_abs_probability"] <= 1e-4, report
    assert report["onnx"]["top1_agreement"] == 1.0, report


def test_int8_digits_keeps_its_accuracy() -> None:
    report = fidelity.compare_backends("digits", REPO / "models", {"int8": onnx_file("digits", "model.int8.onnx")})
    sys.stderr.write(f"\n[int8 digits] {report}\n")
    assert report["int8"]["top1_agreement"] >= 0.99, report
    assert report["torch"]["accuracy"] - report["int8"]["accuracy"] <= 0.01, report


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_int8_stays_close_in_probability(name: str) -> None:
    # Seeded-weight ImageNet nets give near-uniform probabilities (top-1 ~0.004, margins ~4e-4), so
    # their top-1 agreement says little; the bench reports it, this checks that int8 stays close.
    report = fidelity.compare_backends(name, REPO / "models", {"int8": onnx_file(name, "model.int8.onnx")})
    assert report["int8"]["max_abs_probability"] <= 0.05, report


@pytest.mark.parametrize("variant", ["resnet18_onnx", "resnet18_int8", "fasterrcnn_onnx"])
def test_variant_archive_carries_the_graph(variant: str) -> None:
    with zipfile.ZipFile(archive(variant)) as mar:
        files = set(mar.namelist())
        config = yaml.safe_load(mar.read("model-config.yaml"))
    expected = "model.int8.onnx" if variant.endswith("int8") else "model.onnx"
    assert config["handler"]["model"] == {"file": expected, "format": "onnx"}
    assert {expected, "labels.json", "servekit/onnx_backend.py"} <= files
    assert "model.pt" not in files


@pytest.mark.parametrize("name", ["resnet18", "shapes"])
def test_openvino_archive_carries_the_onnx_graph(name: str) -> None:
    with zipfile.ZipFile(archive(f"{name}_openvino")) as mar:
        files = set(mar.namelist())
        config = yaml.safe_load(mar.read("model-config.yaml"))
    assert config["handler"]["model"] == {"file": "model.onnx", "format": "openvino"}
    assert {"model.onnx", "servekit/openvino_backend.py"} <= files and "model.pt" not in files


@pytest.mark.parametrize("name", ["resnet18", "shapes"])
def test_openvino_archive_answers_like_onnx_runtime(
    name: str, load_handler: Any, photos: dict[str, np.ndarray]
) -> None:
    # The same graph on two runtimes: a corrupt image fails alone, every other answer agrees.
    images = [photos[n] for n in ("chelsea", "astronaut", "coffee")]
    if name == "shapes":
        images = [s.image for s in shapes.held_out(3)]
    rows: list[dict[str, Any]] = [{"body": demo_models.encode(image, "PNG")} for image in images]
    rows.insert(1, {"body": CORRUPT})
    ours, theirs = load_handler(f"{name}_openvino").handle(rows), load_handler(f"{name}_onnx").handle(rows)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == [200, 400, 200, 200]
    for (_, a), (_, b) in zip([ours[0], *ours[2:]], [theirs[0], *theirs[2:]]):
        assert [d["label"] for d in a] == [d["label"] for d in b]
        assert all(abs(x["score"] - y["score"]) <= 1e-4 for x, y in zip(a, b))
        assert all(max(abs(u - v) for u, v in zip(x["box"], y["box"])) <= 0.5 for x, y in zip(a, b) if "box" in x)


def test_bf16_is_refused_on_a_cpu_without_it_and_for_onnx() -> None:
    from servekit.config import ModelSource
    from servekit.errors import ConfigError
    from servekit.loading import check_bf16

    check_bf16({"avx512f", "avx512_bf16"})
    check_bf16({"amx_bf16", "amx_tile"})
    with pytest.raises(ConfigError, match="AVX512-BF16 or AMX; this one has avx2: use fp32"):
        check_bf16({"avx2", "fma"})
    with pytest.raises(ConfigError, match="bf16 applies to the torch formats and openvino"):
        ModelSource(file="model.onnx", format="onnx", precision="bf16")


def test_bf16_autocast_stays_close_to_fp32(photos: dict[str, np.ndarray]) -> None:
    from servekit.config import read_model_config
    from servekit.loading import Autocast, load_model

    folder = REPO / "models" / "resnet18"
    config = read_model_config(folder)
    model = load_model(folder, config.model, torch.device("cpu"))
    batch = demo_models.classifier_inputs([photos["chelsea"], photos["coffee"]], config)
    with torch.inference_mode():
        fp32 = model(batch).softmax(-1)
        bf16 = Autocast(model, torch.device("cpu"))(batch)
    assert bf16.dtype == torch.float32
    assert (bf16.softmax(-1) - fp32).abs().max() < 1e-3


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_onnx_archive_answers_like_eager(name: str, load_handler: Any, photos: dict[str, np.ndarray]) -> None:
    images = [photos[n] for n in ("chelsea", "astronaut", "coffee")]
    rows: list[dict[str, Any]] = [{"body": demo_models.encode(image, "PNG")} for image in images]
    rows.insert(1, {"body": CORRUPT})
    results = load_handler(f"{name}_onnx").handle(rows)
    assert [s for s, _ in results] == [200, 400, 200, 200]
    for (_, answer), image in zip([results[0], *results[2:]], images):
        reference.assert_classification_matches(answer, reference.class_probabilities(name, image))


def test_onnx_detector_archive_answers_like_eager(load_handler: Any, photos: dict[str, np.ndarray]) -> None:
    names = reference.ORT_DETECTOR_PHOTOS
    rows = [{"body": demo_models.encode(photos[n], "PNG")} for n in names]
    results = load_handler("fasterrcnn_onnx").handle([*rows, {"body": CORRUPT}])
    assert [s for s, _ in results] == [200] * len(names) + [400]
    for name, (_, answer) in zip(names, results):
        reference.assert_detections_close(answer, reference.detections("fasterrcnn", photos[name]))


@pytest.mark.e2e
def test_bench_quick_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    subprocess.run(
        [sys.executable, "scripts/bench/bench.py", "--mode", "quick", "--out", str(out), "--seconds", "3"],
        cwd=REPO,
        check=True,
        timeout=900,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHONPATH": SOURCE_PATH},
    )
    table = (out / "results.md").read_text()
    sys.stderr.write("\n" + table)
    assert "## Targets" in table and "kit fastest vs stock, resnet18" in table
    rows = json.loads((out / "results.json").read_text())["rows"]
    served = [r for r in rows if r["where"] != "in-process"]
    assert {r["where"] for r in served} == {"stock", "kit", "triton"}
    assert all(r["errors"] == 0 and r["rate"] > 0 for r in served), served
    assert (out / "throughput.png").stat().st_size > 0 and (out / "latency.png").stat().st_size > 0


def test_reduced_decode_keeps_accuracy_on_4k_upscales() -> None:
    # The bar: no drop beyond 1 point in the digits' top-1 or the shapes' mAP@0.5.
    report = fidelity.reduced_decode_fidelity(REPO / "models", digits=150, scenes=60)
    sys.stderr.write(f"\n[reduced decode, 4K upscales] {report}\n")
    digits, found = report["digits"], report["shapes"]
    assert digits["top1_agreement"] >= 0.99 and digits["full_accuracy"] - digits["reduced_accuracy"] <= 0.01
    assert found["full_map50"] - found["reduced_map50"] <= 0.01
    assert digits["mean_abs_input_diff"] < 2.0 and found["mean_abs_input_diff"] < 2.0
