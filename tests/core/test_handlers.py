"""Each built .mar, loaded in-process by TorchServe's own model loader and driven like its worker."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import demo_models
import reference
from corpus import CORRUPT
from kit import MODELS, REPO, SOURCE_PATH, archive


@pytest.mark.parametrize("name", MODELS)
def test_archive_is_self_contained(name: str) -> None:
    with zipfile.ZipFile(archive(name)) as mar:
        files = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    handler = manifest["model"]["handler"]
    assert handler in ("servekit_classifier.py", "servekit_detector.py", "servekit_segmenter.py")
    shipped = {f"servekit/{p.name}" for p in (REPO / "handlers" / "servekit").glob("*.py")}
    assert shipped <= files
    assert {handler, "model.pt", "labels.json", "model-config.yaml"} <= files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


@pytest.mark.parametrize("name", ["digits", "resnet18", "mobilenet_v3_small"])
def test_classifier_batch_with_a_corrupt_image(name: str, load_handler: Any, photos: dict[str, np.ndarray]) -> None:
    images = [photos["chelsea"], photos["astronaut"], photos["coffee"]]
    rows = [
        {"body": bytearray(demo_models.encode(images[0]))},
        {"body": CORRUPT},
        {"data": demo_models.encode(images[1], "PNG")},
        {"body": b"not an image"},
        {"body": {"data": base64.b64encode(demo_models.encode(images[2], "WEBP", lossless=True)).decode()}},
    ]
    results = load_handler(name).handle(rows)
    assert [status for status, _ in results] == [200, 400, 200, 400, 200]
    assert "corrupt or truncated" in results[1][1]["error"] and results[1][1]["code"] == 400
    assert "not an image" in results[3][1]["error"]
    decoded = [reference.decoded_jpeg(demo_models.encode(images[0]), name), images[1], images[2]]
    for (_status, answer), image in zip([results[0], results[2], results[4]], decoded):
        reference.assert_classification_matches(answer, reference.class_probabilities(name, image))


def test_digits_accuracy_in_process(load_handler: Any, digits_test: tuple[list[bytes], list[int]]) -> None:
    images, labels = digits_test
    handler = load_handler("digits")
    predicted = []
    for start in range(0, len(images), 8):
        predicted += [
            answer[0]["index"] for _, answer in handler.handle([{"body": b} for b in images[start : start + 8]])
        ]
    accuracy = np.mean(np.array(predicted) == np.array(labels))
    assert accuracy >= 0.95, accuracy


def test_detector_mixed_sizes_match_each_image_alone(load_handler: Any, photos: dict[str, np.ndarray]) -> None:
    names = ["astronaut", "rocket", "coffee", "chelsea"]
    rows = [{"body": demo_models.encode(photos[n], "PNG")} for n in names]
    rows.insert(2, {"body": CORRUPT})
    results = load_handler("fasterrcnn").handle(rows)
    assert [s for s, _ in results] == [200, 200, 400, 200, 200]
    answers = [a for s, a in results if s == 200]
    assert any(answers), "the demo detector should find something in these photos"
    for name, answer in zip(names, answers):
        reference.assert_detections_match(answer, reference.detections("fasterrcnn", photos[name]))
        height, width = photos[name].shape[:2]
        for item in answer:
            x1, y1, x2, y2 = item["box"]
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
            assert item["label"] not in ("", None)


def test_archive_builder_rejects_bad_folders(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "broken"
    folder.mkdir(parents=True)
    shutil.copy(REPO / "models" / "resnet18" / "model-config.yaml", folder)
    text = (folder / "model-config.yaml").read_text().replace("topk: 5", "top_k: 5")
    (folder / "model-config.yaml").write_text(text)
    command = [
        sys.executable,
        str(REPO / "scripts/packaging/archive_args.py"),
        "broken",
        "--models",
        str(tmp_path / "models"),
        "--handlers",
        str(REPO / "handlers"),
        "--stage",
        str(tmp_path / "stage"),
        "--export",
        str(tmp_path),
    ]
    env = {"PYTHONPATH": SOURCE_PATH}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "unknown key 'handler.top_k'" in result.stderr
    (folder / "model-config.yaml").write_text(text.replace("top_k: 5", "topk: 5"))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "missing model.pt, labels.json" in result.stderr
