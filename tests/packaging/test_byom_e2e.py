"""Bring your own model, end to end: files saved as users save them -> `make scaffold` -> `make archive`
(`make -j4`, private archiver TMPDIRs) and `make aoti` -> a real TorchServe -> answers equal the in-process model's.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

import demo_models
import reference
from client import KeyRing, RestClient
from kit import Server, run_make, serving
from user_models import FORMS, MASK_FORMS, YOLO_FORMS, Form, apply_edits

pytestmark = pytest.mark.e2e
PHOTOS = ("chelsea", "astronaut")


@dataclass
class Deployment:
    forms: dict[str, Form]
    found: dict[str, str]
    models: Path
    server: Server
    rest: RestClient
    aoti_line: str

    def form(self, name: str) -> Form:
        """The form an archive serves (``<name>_aoti`` is built by `make aoti` from ``<name>``)."""
        return self.forms[name] if name in self.forms else self.forms[name.removesuffix("_aoti")]

    def section(self, name: str) -> dict[str, Any]:
        folder = self.models / self.form(name).name
        return yaml.safe_load((folder / "model-config.yaml").read_text())["handler"]


@pytest.fixture(scope="module")
def byom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("byom")
    files, models, store = root / "files", root / "models", root / "store"
    files.mkdir()
    forms = {form.name: form for form in (make(files) for make in [*FORMS, *YOLO_FORMS, *MASK_FORMS])}
    found = {}
    for form in forms.values():
        result = run_make("scaffold", MODELS=models, NAME=form.name, TASK=form.task, **form.make_vars)
        assert result.returncode == 0, f"{form.name}: {result.stderr}"
        found[form.name] = " | ".join(x for x in result.stdout.splitlines() if x.startswith(("found ", "note: ")))
        apply_edits(models / form.name, form)
    # An unrelated /tmp/<model name> must survive the archiver (it stages in a private TMPDIR).
    bystander = Path("/tmp") / "byom_ckpt"
    bystander.mkdir(exist_ok=True)
    (bystander / "notes.txt").write_text("mine")
    result = run_make("-j4", "archive", MODELS=models, STORE=store)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (bystander / "notes.txt").read_text() == "mine"
    aoti = run_make("aoti", MODEL="byom_compiled", MODELS=models, STORE=store)
    assert aoti.returncode == 0, aoti.stderr[-2000:]
    served = sorted(p.stem for p in store.glob("*.mar"))
    assert served == sorted([*forms, "byom_compiled_aoti"])
    with serving(root / "torchserve", store, served, timeout=600) as server:
        rest = RestClient(server.endpoints, KeyRing(server.key_file))
        line = next(x for x in aoti.stdout.splitlines() if x.startswith("wrote"))
        yield Deployment(forms, found, models, server, rest, line)


EXPECTED_FINDINGS = {
    "byom_ckpt": ["format state_dict", "weights under 'model'", "prefix 'module.' stripped", "7 classes"],
    "byom_effnet": ["format state_dict", "efficientnet_b0, 5 classes", "labels from flowers.txt"],
    "byom_safetensors": ["format safetensors", "prefix '_orig_mod.' stripped", "10 classes"],
    "byom_torchscript": ["format torchscript", "4 classes", "| note: TorchScript is deprecated upstream"],
    "byom_exported": ["format exported", "static batch 1", "7 classes"],
    "byom_aoti": ["format aoti", "native code", "3 classes"],
    "byom_onnx": ["format onnx", "input 224x224", "7 classes"],
    "byom_detector": ["format state_dict", "4 classes", "__background__"],
    "byom_compiled": ["format state_dict", "TinyNet, 3 classes"],
    "byom_maskrcnn": ["format state_dict", "maskrcnn_resnet50_fpn, 2 classes", "__background__"],
    "byom_keypointrcnn": ["format state_dict", "keypointrcnn_resnet50_fpn, 2 classes", "__background__"],
    "yolo_v8": ["format torchscript", "raw output [1, 7, 100]: layout yolov8, letterbox 320", "3 classes"],
    "yolo_v5": ["format onnx", "raw output [1, 100, 8]: layout yolov5, letterbox 320", "3 classes"],
    "yolo_e2e": ["format exported", "raw output [1, 20, 6]: layout end2end, letterbox 320", "3 classes"],
}
YOLO = ["yolo_v8", "yolo_v5", "yolo_e2e"]
MASKED = ["byom_maskrcnn", "byom_keypointrcnn"]


@pytest.mark.parametrize("name", sorted(EXPECTED_FINDINGS))
def test_scaffold_says_in_one_line_what_it_found(byom: Deployment, name: str) -> None:
    line = byom.found[name]
    assert line.startswith(f"found {Path(byom.forms[name].make_vars['PT']).name}: ")
    for words in EXPECTED_FINDINGS[name]:
        assert words in line, line
    assert ("deprecated upstream" in line) == ("format torchscript" in line), line


def png_and_pixels(image: np.ndarray) -> tuple[bytes, np.ndarray]:
    data = demo_models.encode(image, "PNG")
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


DETECTORS = ["byom_detector", *YOLO, *MASKED]
CLASSIFIERS = [*sorted(n for n in EXPECTED_FINDINGS if n not in DETECTORS), "byom_compiled_aoti"]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_served_classifier_equals_the_in_process_model(
    byom: Deployment, name: str, photos: dict[str, np.ndarray]
) -> None:
    model = byom.form(name).reference
    for photo in PHOTOS:
        data, pixels = png_and_pixels(photos[photo])
        reply = byom.rest.predict(name, data)
        assert reply.status == 200, reply.body
        reference.assert_classification_matches(reply.body, reference.probabilities(model, byom.section(name), pixels))


@pytest.mark.parametrize("name", ["byom_exported", "byom_aoti", "byom_onnx", "byom_compiled", "byom_compiled_aoti"])
def test_concurrent_batches_of_a_traced_graph_answer_each_image(
    byom: Deployment, name: str, photos: dict[str, np.ndarray]
) -> None:
    """16 concurrent requests form batches the graph's own batch bounds do not allow; each is right."""
    model = byom.form(name).reference
    images = [png_and_pixels(np.roll(photos[PHOTOS[i % 2]], 37 * i, axis=1)) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda item: byom.rest.predict(name, item[0]), images))
    for reply, (_, pixels) in zip(replies, images):
        assert reply.status == 200, reply.body
        reference.assert_classification_matches(reply.body, reference.probabilities(model, byom.section(name), pixels))


def test_served_detector_with_its_own_class_count(byom: Deployment, photos: dict[str, np.ndarray]) -> None:
    form = byom.forms["byom_detector"]
    for photo in PHOTOS:
        data, pixels = png_and_pixels(photos[photo])
        reply = byom.rest.predict(form.name, data)
        assert reply.status == 200, reply.body
        expected = reference.model_detections(form.reference, byom.section(form.name), pixels)
        assert expected, "the seeded detector should find something above 0.05"
        reference.assert_detections_match(reply.body, expected)
        assert {d["label"] for d in reply.body} <= {"circle", "square", "triangle"}


def test_labels_come_from_the_users_file(byom: Deployment, photos: dict[str, np.ndarray]) -> None:
    reply = byom.rest.predict("byom_effnet", png_and_pixels(photos["chelsea"])[0])
    assert {item["label"] for item in reply.body} == {"daisy", "dandelion", "roses", "sunflowers", "tulips"}


def test_make_aoti_reports_its_check_against_eager(byom: Deployment) -> None:
    line = byom.aoti_line
    assert "max abs difference from eager" in line, line
    assert float(line.rsplit(" ", 1)[1]) < 1e-3


def test_archives_are_self_contained(byom: Deployment) -> None:
    """The archives built with -j4 each hold their own model (no staging area shared between builds)."""
    import zipfile

    store = byom.server.process.model_store
    for name in byom.forms:
        with zipfile.ZipFile(store / f"{name}.mar") as mar:
            config = yaml.safe_load(mar.read("model-config.yaml"))
            assert config["handler"]["model"]["file"] in mar.namelist()
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            assert manifest["model"]["modelName"] == name


def scene(width: int, height: int, colour: int) -> tuple[bytes, np.ndarray]:
    """A gray image with one square of pure red, green or blue (the grid detector's classes)."""
    image = np.full((height, width, 3), 90, np.uint8)
    side = min(width, height) // 2
    top, left = (height - side) // 3, (width - side) // 2
    image[top : top + side, left : left + side] = 0
    image[top : top + side, left : left + side, colour] = 255
    return png_and_pixels(image)


@pytest.mark.parametrize("name", YOLO)
def test_yolo_batch_of_three_sizes_is_one_forward_pass(byom: Deployment, name: str) -> None:
    """Three images of three sizes in one batch (letterboxed alike): each answer is its own image's."""
    from loadgen import servekit_counters

    form = byom.form(name)
    metrics = f"{byom.server.endpoints.url('metrics')}/metrics"

    def counters() -> dict[str, float]:
        return servekit_counters(requests.get(metrics, timeout=10).text, name)

    scenes = [scene(640, 480, 0), scene(300, 500, 1), scene(1000, 400, 2)]
    before = counters()
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda item: byom.rest.predict(name, item[0]), scenes))
    after = counters()
    assert after["Requests"] - before.get("Requests", 0.0) == 3
    assert after["Batches"] - before.get("Batches", 0.0) == 1, "the three images were not one batch"
    for reply, (_, pixels), colour in zip(replies, scenes, ("red", "green", "blue")):
        assert reply.status == 200, reply.body
        expected = reference.yolo_detections(form.reference, byom.section(name), pixels)
        assert expected and reply.body[0]["label"] == colour
        reference.assert_detections_match(reply.body, expected, box_tol=0.5, score_tol=1e-4)


def test_a_corrupt_image_fails_alone_on_the_yolo_path(byom: Deployment) -> None:
    good = scene(500, 300, 0)[0]
    payloads = [good, good[:200], good]
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda data: byom.rest.predict("yolo_v8", data), payloads))
    assert [r.status for r in replies] == [200, 400, 200]
    assert "corrupt or truncated" in replies[1].body["error"]


@pytest.mark.parametrize("name", MASKED)
def test_masks_as_rle_and_keypoints_equal_the_in_process_model(
    byom: Deployment, name: str, photos: dict[str, np.ndarray]
) -> None:
    """Mask R-CNN's masks come back as COCO RLE (IoU >= 0.99 with the model's), keypoints within 0.5 px."""
    import torch
    from pycocotools import mask as coco_mask

    form = byom.form(name)
    section = byom.section(name)
    data, pixels = png_and_pixels(photos["chelsea"])
    reply = byom.rest.predict(name, data)
    assert reply.status == 200, reply.body
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255
    with torch.inference_mode():
        out = form.reference([x])[0]
    order = torch.argsort(out["scores"], descending=True, stable=True)
    order = order[out["scores"][order] >= section["score_threshold"]][: section["max_detections"]]
    assert len(reply.body) == len(order) > 0
    for item, index in zip(reply.body, order.tolist()):
        assert abs(item["score"] - float(out["scores"][index])) <= 1e-4
        if "masks" in out:
            rle = {"size": item["mask"]["size"], "counts": item["mask"]["counts"].encode("ascii")}
            served = coco_mask.decode(rle).astype(bool)
            assert served.shape == pixels.shape[:2]
            wanted = (out["masks"][index, 0] >= 0.5).numpy()
            union = np.logical_or(served, wanted).sum()
            assert union == 0 or np.logical_and(served, wanted).sum() / union >= 0.99
        else:
            expected = out["keypoints"][index]
            assert len(item["keypoints"]) == 17
            for (px, py, score), (ex, ey, _), es in zip(
                item["keypoints"], expected.tolist(), out["keypoints_scores"][index].tolist()
            ):
                assert abs(px - ex) <= 0.5 and abs(py - ey) <= 0.5 and abs(score - es) <= 1e-3
