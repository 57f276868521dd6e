"""The shapes detector's scenes and its evaluation (the served mAP is in test_e2e and test_triton)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shapes
import shapes_eval
from kit import REPO


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_a_scene_keeps_the_rules(seed: int) -> None:
    scene = shapes.make_scene(seed)
    height, width, channels = scene.image.shape
    assert channels == 3 and scene.image.dtype == np.uint8
    assert shapes.SIDE_RANGE[0] <= min(width, height) and max(width, height) <= shapes.SIDE_RANGE[1]
    assert 1 <= len(scene.boxes) <= shapes.MAX_OBJECTS and len(scene.boxes) == len(scene.classes)
    sides = scene.boxes[:, 2:] - scene.boxes[:, :2]
    assert (sides >= shapes.OBJECT_RANGE[0]).all() and (sides <= shapes.OBJECT_RANGE[1]).all()
    assert (
        (scene.boxes[:, :2] >= 0).all() and (scene.boxes[:, 2] <= width).all() and (scene.boxes[:, 3] <= height).all()
    )
    for a, b in itertools.combinations(scene.boxes.tolist(), 2):
        assert shapes.overlap(a, b) <= shapes.MAX_OVERLAP


def test_the_same_seed_gives_the_same_scene_and_held_out_seeds_are_apart() -> None:
    a, b = shapes.make_scene(7), shapes.make_scene(7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert shapes.HELD_OUT_SEED > 10 * 3000  # far beyond any training pool


def test_a_shape_is_drawn_inside_its_box_in_a_colour_that_stands_out() -> None:
    scene = shapes.make_scene(3)
    for (x1, y1, x2, y2), kind in zip(scene.boxes.astype(int).tolist(), scene.classes.tolist()):
        centre = scene.image[(y1 + y2) // 2 + (y2 - y1) // 4, (x1 + x2) // 2].astype(float)
        corner = scene.image[y1 + 1, x1 + 1].astype(float)
        if shapes.CLASSES[kind] == "square":
            assert np.linalg.norm(centre - corner) < 1.0  # both inside the filled square
        else:  # a circle's or a triangle's top-left corner is background
            assert np.linalg.norm(centre - corner) > 40


def _perfect(scenes: list[shapes.Scene]) -> list[list[dict]]:
    return [
        [{"label": shapes.CLASSES[k], "score": 1.0, "box": b} for b, k in zip(s.boxes.tolist(), s.classes.tolist())]
        for s in scenes
    ]


def test_map50_of_the_truth_is_one_and_of_nothing_is_zero() -> None:
    scenes = shapes.held_out(5)
    assert shapes_eval.map50(scenes, _perfect(scenes)) == pytest.approx(1.0)
    assert shapes_eval.map50(scenes, [[] for _ in scenes]) <= 0.0


def test_map50_counts_a_wrong_class_or_a_far_box_as_a_miss() -> None:
    scenes = shapes.held_out(5)
    answers = _perfect(scenes)
    wrong = [[{**d, "label": shapes.CLASSES[(shapes.CLASSES.index(d["label"]) + 1) % 3]} for d in a] for a in answers]
    assert shapes_eval.map50(scenes, wrong) < 0.05
    # shifted by 60 % of its side: IoU 0.25, under 0.5
    far = [
        [
            {
                **d,
                "box": [
                    d["box"][0] + 0.6 * (d["box"][2] - d["box"][0]),
                    *d["box"][1:2],
                    d["box"][2] + 0.6 * (d["box"][2] - d["box"][0]),
                    d["box"][3],
                ],
            }
            for d in a
        ]
        for a in answers
    ]
    assert shapes_eval.map50(scenes, far) < 0.05


def test_the_mosaic_holds_every_drawn_scene() -> None:
    scenes = shapes.held_out(3)
    drawn = [shapes_eval.draw_answer(s.image, a) for s, a in zip(scenes, _perfect(scenes))]
    canvas = shapes_eval.mosaic(drawn)
    assert canvas.shape[2] == 3 and canvas.shape[1] >= drawn[0].shape[2] + drawn[1].shape[2]
    assert not np.array_equal(drawn[0].permute(1, 2, 0).numpy(), scenes[0].image)  # boxes were drawn


def test_committed_weights_are_kept_only_while_their_sources_and_files_match(tmp_path: Path) -> None:
    """make models keeps a trained demo's committed weights (trained.json): not once a file or a source changes."""
    import make_models

    folder = tmp_path / "shapes"
    shutil.copytree(REPO / "models" / "shapes", folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert make_models.kept("shapes", folder), "models/shapes/trained.json does not match its sources"
    (folder / "model.py").write_text((folder / "model.py").read_text() + "\n# edited\n")
    assert make_models.kept("shapes", folder) is None  # a changed source trains anew
    shutil.copy(REPO / "models" / "shapes" / "model.py", folder / "model.py")
    (folder / "labels.json").write_text('["circle"]\n')
    assert make_models.kept("shapes", folder) is None  # so does an altered file
