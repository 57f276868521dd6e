"""`make eval` and `make variants` on bad data: one line on stderr that says what is wrong and which layout was
expected, exit status 2, no server started, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from kit import archive, run_make


def _coco_missing_images(root: Path) -> Path:
    (root / "images").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "0.jpg")
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in range(3)]
    document = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "circle"}]}
    (root / "annotations.json").write_text(json.dumps(document))
    return root


def _masks_all_wrong(root: Path) -> Path:
    for folder in ("images", "masks"):
        (root / folder).mkdir()
    Image.new("RGB", (32, 32)).save(root / "images" / "a.jpg")
    Image.new("L", (10, 10)).save(root / "masks" / "a.png")
    return root


def _unknown_labels(root: Path) -> Path:
    for name in ("zebra", "okapi"):
        (root / name).mkdir()
        Image.new("RGB", (8, 8)).save(root / name / "x.png")
    return root


CASES = [
    ("digits", lambda root: root / "nowhere", "does not exist; expected an ImageFolder tree"),
    ("digits", lambda root: root, "holds no class folder with images"),
    ("digits", _unknown_labels, "the 2 class folders of"),
    ("shapes", _coco_missing_images, "2 of its 3 images are not in"),
    ("shapes_seg", _masks_all_wrong, "every mask is unusable, e.g."),
]


@pytest.mark.parametrize(("model", "make", "expected"), CASES, ids=["missing", "empty", "labels", "coco", "masks"])
def test_bad_data_is_one_line(tmp_path: Path, model: str, make, expected: str) -> None:
    archive(model)
    done = run_make("eval", MODEL=model, DATA=make(tmp_path))
    assert done.returncode == 2
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith(("make: ***", "WARNING - "))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "torchserve started" not in done.stderr


def test_variants_of_a_folder_that_is_not_one(tmp_path: Path) -> None:
    done = run_make("variants", MODEL="nothing", DATA=tmp_path, MODELS=tmp_path)
    assert done.returncode == 2
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("make: ***")]
    assert lines == [
        f"error: {tmp_path}/nothing is not a model folder (no model-config.yaml); `make scaffold` makes one"
    ]
