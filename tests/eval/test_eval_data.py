"""Labeled data as users lay it out (scripts/eval/eval_data.py): each layout read, each bad one a single line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval_data import DataError, label_index, load_dataset, split

LABELS = ("cat", "dog", "golden retriever")


def _png(path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGB", value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def test_image_folder_matches_labels_by_name_case_and_separators(tmp_path: Path) -> None:
    for folder in ("cat", "Dog", "golden_retriever"):
        _png(tmp_path / folder / "a.png")
        _png(tmp_path / folder / "nested" / "b.jpg")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = load_dataset(tmp_path, "classification", LABELS)
    assert data.layout == "ImageFolder"
    classes = sorted((s.path.relative_to(tmp_path).parts[0], s.truth) for s in data.samples)
    assert classes == [("Dog", 1)] * 2 + [("cat", 0)] * 2 + [("golden_retriever", 2)] * 2
    assert data.digest() == load_dataset(tmp_path, "classification", LABELS).digest()


def test_unknown_class_folders_are_named_and_left_out(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "zebra" / "z.png")
    data = load_dataset(tmp_path, "classification", LABELS)
    assert [s.truth for s in data.samples] == [0]
    assert data.unmatched == ("zebra",)
    assert data.excluded == ((str(tmp_path / "zebra" / "z.png"), "class folder 'zebra' is none of the model's labels"),)


def test_label_map_and_csv(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "1.png")
    _png(tmp_path / "imgs" / "2.png")
    (tmp_path / "map.json").write_text(json.dumps({"kitty": "cat"}))
    (tmp_path / "list.csv").write_text("path,label\nimgs/1.png,kitty\nimgs/2.png,dog\nimgs/3.png,dog\n")
    data = load_dataset(tmp_path / "list.csv", "classification", LABELS, label_map=tmp_path / "map.json")
    assert data.layout == "CSV"
    assert [s.truth for s in data.samples] == [0, 1]
    assert data.excluded == ((str(tmp_path / "imgs" / "3.png"), "the CSV names it but there is no such file"),)
    assert label_index("2", ["a", "b", "c"], {}) == 2  # an index where the labels are names
    assert label_index("2", ["0", "1", "2"], {}) == 2


@pytest.mark.parametrize(
    ("make", "task", "expected"),
    [
        (lambda root: root / "missing", "classification", "does not exist; expected an ImageFolder tree"),
        (lambda root: root, "classification", "holds no class folder with images"),
        (lambda root: _png(root / "loose.png").parent, "classification", "1 images lie directly in it"),
        (
            lambda root: _png(root / "zebra" / "a.png").parents[1],
            "classification",
            "match none of the model's 3 labels",
        ),
        (lambda root: root, "detection", "holds no COCO JSON files"),
        (lambda root: root, "segmentation", "has no image and mask folders"),
    ],
)
def test_bad_layouts_are_one_line(tmp_path: Path, make, task: str, expected: str) -> None:
    with pytest.raises(DataError) as caught:
        load_dataset(make(tmp_path), task, LABELS)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def _coco(root: Path, files: list[str], categories: list[str]) -> Path:
    images = [{"id": i + 1, "file_name": f, "width": 8, "height": 6} for i, f in enumerate(files)]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 2], "area": 6, "iscrowd": 0}]
    cats = [{"id": 10 + i, "name": n} for i, n in enumerate(categories)]
    annotations[0]["category_id"] = 10
    path = root / "annotations" / "instances_val.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


def test_coco_images_found_beside_the_release_and_categories_renumbered(tmp_path: Path) -> None:
    _png(tmp_path / "val" / "a.jpg")
    annotation = _coco(tmp_path, ["a.jpg"], ["dog", "zebra"])
    data = load_dataset(tmp_path, "detection", LABELS)
    assert data.root == tmp_path / "val"
    assert data.coco is not None and data.coco["annotations"][0]["category_id"] == 2  # dog is label 1 -> id 2
    assert data.unmatched == ("zebra",) and data.category_names == {2: "dog"}
    assert load_dataset(annotation, "detection", LABELS).digest() == data.digest()


def test_coco_with_images_missing_is_one_line(tmp_path: Path) -> None:
    _png(tmp_path / "val" / "a.jpg")
    _coco(tmp_path, ["a.jpg", "b.jpg", "c.jpg"], ["dog"])
    with pytest.raises(DataError, match=r"2 of its 3 images are not in .*val \(b.jpg, c.jpg\); COCO AP needs every"):
        load_dataset(tmp_path, "detection", LABELS)


def test_segmentation_masks_of_another_size_or_rgb_are_named_and_left_out(tmp_path: Path) -> None:
    for stem in ("a", "b", "c", "d"):
        _png(tmp_path / "images" / f"{stem}.jpg", (8, 6))
    palette = Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint8).repeat(3, 0).repeat(4, 1), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9] * 759)
    (tmp_path / "masks").mkdir()
    palette.save(tmp_path / "masks" / "a.png")
    _png(tmp_path / "masks" / "b.png", (4, 4), "L")
    _png(tmp_path / "masks" / "c.png", (8, 6), "RGB")
    data = load_dataset(tmp_path, "segmentation", LABELS)
    assert [s.path.stem for s in data.samples] == ["a"]
    why = dict(data.excluded)
    assert why[str(tmp_path / "masks" / "b.png")] == "mask is 4x4, its image 8x6"
    assert "not an index PNG" in why[str(tmp_path / "masks" / "c.png")]
    assert why[str(tmp_path / "images" / "d.jpg")] == "no mask of the same stem"


def test_segmentation_masks_with_classes_the_model_lacks_is_one_line(tmp_path: Path) -> None:
    _png(tmp_path / "JPEGImages" / "a.jpg", (4, 4))
    _png(tmp_path / "SegmentationClass" / "a.png", (4, 4), "L", 7)
    with pytest.raises(DataError, match=r"masks hold class indices \[7\] but the model has 3 classes"):
        load_dataset(tmp_path, "segmentation", LABELS)


def test_calibration_and_scored_splits_are_disjoint_and_stable(tmp_path: Path) -> None:
    for i in range(50):
        _png(tmp_path / ("cat" if i % 2 else "dog") / f"{i}.png")
    data = load_dataset(tmp_path, "classification", LABELS)
    calibration, scored = split(data, 0.2)
    names = {s.path for s in calibration.samples}
    assert names.isdisjoint({s.path for s in scored.samples})
    assert len(names) + len(scored.samples) == 50 and 3 <= len(names) <= 20
    assert [s.path for s in split(data, 0.2)[0].samples] == [s.path for s in calibration.samples]
