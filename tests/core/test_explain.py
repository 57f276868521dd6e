"""Explanations in process: a target per request, bad requests failing alone, bounded answers, and maps that
point where the evidence is (the trained shapes segmenter on held-out scenes: hit rate and a deletion check)."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
import torch

import demo_models
import shapes
from kit import REPO
from servekit.config import SegmenterConfig, read_model_config
from servekit.errors import BadInput
from servekit.explain import explain_batch, grid_shape, occlusion_cells, resolve_target, to_grid
from servekit.segmentation import segmentation_logits
from servekit.service import VisionService, build_service
from servekit.transforms import classifier_batch, segmenter_input

MODELS = REPO / "models"
CPU = torch.device("cpu")
SCENES = 24  # held-out shapes scenes the maps are checked on
ANSWER_BOUND = 20 * 1024  # bytes of one explanation, PNG heatmap included (TorchServe's stock: about 3.4 MB)


def service(name: str) -> VisionService[Any]:
    return build_service(read_model_config(MODELS / name), MODELS / name, CPU, 8, name)


@pytest.fixture(scope="module")
def digits() -> VisionService[Any]:
    return service("digits")


@pytest.fixture(scope="module")
def segmenter() -> VisionService[Any]:
    return service("shapes_seg")


@pytest.fixture(scope="module")
def scenes() -> list[shapes.Scene]:
    return shapes.held_out(SCENES)


def test_a_mixed_batch_answers_each_row_as_it_asked(digits: VisionService[Any]) -> None:
    images, _ = demo_models.digit_images("test")
    png = demo_models.encode(images[0], "PNG")
    rows = [
        {"body": png},  # a prediction
        {"body": png},  # its explanation (the endpoint marks it): the top-1
        {"body": png, "target": b"7"},  # a form field / gRPC input naming the class by index
        {"data": {"data": base64.b64encode(png).decode(), "target": "3", "png": True}},  # JSON body
        {"body": png, "target": b"42"},  # out of range
        {"body": png, "target": b"seven"},  # not a label
        {"body": png[:40]},  # a corrupt image in the explanation batch
        {"body": png, "explain": b"true", "target": b"1"},  # a gRPC-style row asking itself
    ]
    out = digits.handle(rows, [False, True, True, True, True, True, True]).answers
    prediction = out[0]
    assert (
        isinstance(prediction, list) and prediction[0]["index"] == digits.handle([{"body": png}]).answers[0][0]["index"]
    )
    top1 = out[1]["explanation"]
    assert top1["target"]["index"] == prediction[0]["index"]
    assert abs(top1["target"]["score"] - prediction[0]["score"]) < 1e-3
    assert out[2]["explanation"]["target"]["index"] == 7
    assert out[3]["explanation"]["target"]["index"] == 3 and "png" in out[3]["explanation"]
    assert out[7]["explanation"]["target"]["index"] == 1
    for bad, text in ((out[4], "out of range"), (out[5], "not a label"), (out[6], "")):
        assert isinstance(bad, BadInput) and text in bad.message, bad
    for answer in (out[1], out[2], out[3], out[7]):
        body = answer["explanation"]
        assert body["method"] == "gradcam" and body["box"] == [0, 0, 32, 32]
        grid = np.array(body["grid"])
        assert grid.shape == (14, 14) and grid.min() >= 0 and grid.max() == 1.0
        assert np.allclose(grid, np.round(grid, 2))
        assert len(json.dumps(answer)) < ANSWER_BOUND


def test_a_detector_refuses_explanations_per_request(jpegs: dict[str, bytes]) -> None:
    detector = service("shapes")
    out = detector.handle([{"body": jpegs["chelsea"]}, {"body": jpegs["chelsea"]}], [True, False]).answers
    assert isinstance(out[0], BadInput) and "classifiers and segmenters" in out[0].message
    assert isinstance(out[1], list)


def test_targets_resolve_by_index_or_label() -> None:
    labels = ["cat", "dog", "7"]
    assert resolve_target(None, labels, 3) is None
    assert (
        resolve_target(b"1", labels, 3) == 1
        and resolve_target("dog", labels, 3) == 1
        and resolve_target(2, labels, 3) == 2
    )
    for bad in (3, -1, "bird", 1.5, True):
        with pytest.raises(BadInput):
            resolve_target(bad, labels, 3)


def test_grids_follow_the_input_and_stay_normalized() -> None:
    assert grid_shape(224, 224, 14) == (14, 14) and grid_shape(300, 450, 14) == (9, 14)
    assert (
        occlusion_cells(224, 224, 64) == (8, 8)
        and occlusion_cells(320, 480, 64)[0] * occlusion_cells(320, 480, 64)[1] <= 64
    )
    cells = to_grid(torch.rand(7, 7), (14, 14))
    assert cells.shape == (14, 14) and float(cells.max()) == 1.0
    assert float(to_grid(torch.zeros(20, 20), (14, 14)).max()) == 0.0


def eager_segmenter() -> torch.nn.Module:
    """The trained shapes segmenter as an eager module (its state_dict in model.py's class), for Grad-CAM."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("shapes_seg_model", MODELS / "shapes_seg" / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    network = module.ShapesSegNet()
    network.load_state_dict(torch.load(MODELS / "shapes_seg" / "model.pt", weights_only=True))
    return network.eval()


def peak_in_a_box(grid: list[list[float]], box: list[int], targets: np.ndarray) -> bool:
    """Whether the centre of the grid's hottest cell, in the pixels of the image as sent, is inside a target box."""
    cells = np.array(grid)
    row, col = np.unravel_index(int(cells.argmax()), cells.shape)
    x0, y0, x1, y1 = box
    x = x0 + (col + 0.5) * (x1 - x0) / cells.shape[1]
    y = y0 + (row + 0.5) * (y1 - y0) / cells.shape[0]
    return any(bx0 <= x <= bx1 and by0 <= y <= by1 for bx0, by0, bx1, by1 in targets)


def test_maps_point_at_the_shapes_on_held_out_scenes(segmenter: VisionService[Any], scenes: list[shapes.Scene]) -> None:
    """Occlusion (the served segmenter, as its folder says) and Grad-CAM (its eager twin): for the class of the first
    shape of each scene, the hottest cell lies inside a box of that class; deleting the hottest cells lowers
    the class's score more than deleting as many random cells."""
    config = segmenter.config
    assert isinstance(config, SegmenterConfig)
    network = eager_segmenter()
    rng = np.random.default_rng(0)
    hits = {"occlusion": 0, "gradcam": 0}
    deletion: list[tuple[float, float]] = []
    for scene in scenes:
        wanted = int(scene.classes[0])
        label = shapes.CLASSES[wanted]
        targets = scene.boxes[scene.classes == wanted]
        row = {"body": shapes.encode_jpeg(scene.image), "target": label.encode()}
        occluded = segmenter.handle([row], [True]).answers[0]["explanation"]
        assert occluded["method"] == "occlusion" and occluded["target"]["label"] == label
        hits["occlusion"] += peak_in_a_box(occluded["grid"], occluded["box"], targets)

        pixels = torch.from_numpy(scene.image).permute(2, 0, 1)
        batch = classifier_batch([segmenter_input(pixels, config)], config)
        index = wanted + 1  # labels: background first

        def scores(x: torch.Tensor) -> torch.Tensor:
            return segmentation_logits(network(x)).mean(dim=(2, 3))

        grid = grid_shape(int(batch.shape[2]), int(batch.shape[3]), 14)
        (found,) = explain_batch(network, scores, batch, [index], method="gradcam", grid=grid)
        height, width = scene.image.shape[:2]
        hits["gradcam"] += peak_in_a_box(found.grid.tolist(), [0, 0, width, height], targets)

        # deletion: fill the hottest tenth of the cells with the image's mean colour, or as many random ones
        cells = found.grid.flatten()
        count = max(1, cells.numel() // 10)
        hottest = cells.argsort(descending=True)[:count].tolist()
        random = rng.choice(cells.numel(), count, replace=False).tolist()
        with torch.no_grad():
            base = float(scores(batch)[0, index])
        drops = []
        for chosen in (hottest, random):
            masked = batch.clone()
            fill = batch[0].mean(dim=(1, 2), keepdim=True)
            for cell in chosen:
                r, c = divmod(cell, grid[1])
                h0, h1 = r * batch.shape[2] // grid[0], (r + 1) * batch.shape[2] // grid[0]
                w0, w1 = c * batch.shape[3] // grid[1], (c + 1) * batch.shape[3] // grid[1]
                masked[0, :, h0:h1, w0:w1] = fill
            with torch.no_grad():
                drops.append(base - float(scores(masked)[0, index]))
        deletion.append((drops[0], drops[1]))
    rates = {method: count / len(scenes) for method, count in hits.items()}
    wins = sum(top > rand for top, rand in deletion) / len(deletion)
    mean_top, mean_random = (float(np.mean(v)) for v in zip(*deletion))
    print(
        f"hit rate on {len(scenes)} held-out scenes: {rates}; deletion: hottest 10 % of cells drop the score by "
        f"{mean_top:.2f} on average, random cells by {mean_random:.2f}; hottest worse in {wins:.0%} of scenes"
    )
    assert rates["occlusion"] >= 0.7 and rates["gradcam"] >= 0.85, rates
    assert mean_top - mean_random > 0.1 and wins >= 0.75, deletion
