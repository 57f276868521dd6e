"""Models as the zoo hands them over, end to end: timm, Hugging Face, Lightning, torchvision (recipes and
anchor-based detectors with their own class count) and an ultralytics-style export -> `make scaffold` ->
`make archive` -> a real TorchServe -> answers equal to the owner's own pipeline, run here.

The classifiers' reference is the zoo's preprocessing on the JPEG as Pillow decodes it (torchvision
``weights.transforms()``, timm ``create_transform(**resolve_data_config(...))``, Hugging Face
``AutoImageProcessor``); the networks are made sensitive to preprocessing first (``zoo_models.sensitize``).
Measured on this CI's photos (7 of scikit-image's, JPEG q90), largest probability difference per form,
reduced JPEG decode on (the default): timm checkpoint 0.0002, timm hub 0.0085, Lightning 0.0015,
efficientnet_b3 0.0009, HF ViT 0.0011, HF ConvNeXt 0.0000; off: 0.0002, 0.0029, 0.0015, 0.0009, 0.0000,
0.0000. A wrong recipe (ImageNet 256/224 bilinear) moves them by 0.011 to 0.03. The bound is ``BOUND``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import demo_models
import reference
import zoo_models
from client import KeyRing, RestClient
from kit import Server, run_make, serving
from user_models import GridDetector, apply_edits

pytestmark = pytest.mark.e2e
BOUND = 0.01  # largest |served - owner's pipeline| probability allowed for a classifier
SCENES = [(200, 150), (320, 320), (600, 450), (640, 213), (333, 500)]  # scaled up, as is, down, wide, tall


@dataclass
class Zoo:
    forms: dict[str, zoo_models.ZooForm]
    found: dict[str, str]
    written: dict[str, str]  # model-config.yaml as scaffold wrote it, before the test's edits
    models: Path
    server: Server
    rest: RestClient

    def section(self, name: str) -> dict[str, Any]:
        return yaml.safe_load((self.models / name / "model-config.yaml").read_text())["handler"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, np.ndarray]) -> Iterator[Zoo]:
    root = tmp_path_factory.mktemp("zoo")
    files, models, store = root / "files", root / "models", root / "store"
    files.mkdir()
    pil = zoo_models.pil_photos(photos)
    forms = [make(files, pil) for make in [*zoo_models.CLASSIFIER_FORMS, *zoo_models.DETECTOR_FORMS]]
    forms.append(zoo_models.ultralytics_torchscript(files, pil, GridDetector("yolov8")))
    found, written = {}, {}
    for form in forms:
        result = run_make("scaffold", MODELS=models, NAME=form.name, TASK=form.task, **form.make_vars)
        assert result.returncode == 0, f"{form.name}: {result.stderr[-2000:]}"
        found[form.name] = next(line for line in result.stdout.splitlines() if line.startswith("found "))
        written[form.name] = (models / form.name / "model-config.yaml").read_text()
        if form.task == "classification":
            form.edits.setdefault("topk", 10)  # every class, so whole distributions are compared
        apply_edits(models / form.name, form)  # type: ignore[arg-type]
    result = run_make("-j2", "archive", MODELS=models, STORE=store)
    assert result.returncode == 0, result.stderr[-2000:]
    names = [form.name for form in forms]
    with serving(root / "torchserve", store, names, timeout=600) as server:
        rest = RestClient(server.endpoints, KeyRing(server.key_file))
        yield Zoo({form.name: form for form in forms}, found, written, models, server, rest)


FORM_NAMES = [
    "zoo_timm_ckpt", "zoo_timm_hub", "zoo_lightning", "zoo_effnet_b3", "zoo_hf_vit", "zoo_hf_convnext",
    "zoo_ssdlite", "zoo_ssd", "zoo_retinanet", "zoo_ultralytics",
]  # fmt: skip
CLASSIFIERS = FORM_NAMES[:6]


@pytest.mark.parametrize("name", FORM_NAMES)
def test_scaffold_says_what_it_found(zoo: Zoo, name: str) -> None:
    for words in zoo.forms[name].found:
        assert words in zoo.found[name], zoo.found[name]


def test_the_torchvision_recipe_is_written_with_its_source(zoo: Zoo) -> None:
    section = zoo.section("zoo_effnet_b3")
    assert (section["resize"], section["crop"], section["interpolation"]) == (320, 300, "bicubic")
    text = zoo.written["zoo_effnet_b3"]
    assert "# preprocessing: recipe from torchvision EfficientNet_B3_Weights.IMAGENET1K_V1.transforms()" in text
    assert zoo.section("zoo_hf_vit")["resize"] == [96, 96] and zoo.section("zoo_hf_vit")["crop"] == 0


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_served_probabilities_equal_the_owners_pipeline(zoo: Zoo, name: str, jpegs: dict[str, bytes]) -> None:
    pipeline = zoo.forms[name].reference
    worst = 0.0
    for photo, data in jpegs.items():
        reply = zoo.rest.predict(name, data)
        assert reply.status == 200, reply.body
        expected = pipeline(Image.open(io.BytesIO(data)).convert("RGB"))
        assert len(reply.body) == len(expected)
        for item in reply.body:
            worst = max(worst, abs(item["score"] - float(expected[item["index"]])))
        assert (
            reply.body[0]["index"] == int(expected.argmax()) or reply.body[0]["score"] - float(expected.max()) <= BOUND
        ), photo
    assert worst <= BOUND, f"{name}: worst probability difference {worst:.4f} over the photos"


@pytest.mark.parametrize("name", ["zoo_ssdlite", "zoo_ssd", "zoo_retinanet"])
def test_anchor_detectors_serve_their_own_class_count(zoo: Zoo, name: str, photos: dict[str, np.ndarray]) -> None:
    form = zoo.forms[name]
    for photo in ("chelsea", "coffee"):
        data = demo_models.encode(photos[photo], "PNG")
        reply = zoo.rest.predict(name, data)
        assert reply.status == 200, reply.body
        expected = reference.model_detections(form.reference, zoo.section(name), photos[photo])
        assert expected, f"{name}: the seeded detector should find something above the threshold"
        reference.assert_detections_match(reply.body, expected, box_tol=0.05, score_tol=1e-4)
        assert {d["label"] for d in reply.body} <= {f"thing{i}" for i in range(1, 5)}


def ultralytics_predict(model: torch.nn.Module, image: np.ndarray, size: int = 320) -> list[dict[str, Any]]:
    """What `yolo predict` answers, written here from ultralytics' published behaviour: LetterBox (OpenCV
    INTER_LINEAR on uint8, 114 padding, round(d -/+ 0.1) pads), conf 0.25 (strict), best class, class-offset
    NMS at iou 0.7, max_det 300, scale_boxes (one gain, round((size - side * gain) / 2 - 0.1) pad), clip."""
    import cv2
    import torchvision

    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = round(w * r), round(h * r)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    img = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR) if (w, h) != (new_w, new_h) else image
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        rows = model(x)[0].T  # A x (4 + C)
    xy, wh = rows[:, :2], rows[:, 2:4]
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1)
    conf, cls = rows[:, 4:].max(1)
    keep = conf > 0.25
    boxes, conf, cls = boxes[keep], conf[keep], cls[keep]
    kept = torchvision.ops.nms(boxes + cls[:, None].float() * 7680, conf, 0.7)[:300]
    boxes, conf, cls = boxes[kept], conf[kept], cls[kept]
    gain = min(size / h, size / w)
    pad_x, pad_y = round((size - w * gain) / 2 - 0.1), round((size - h * gain) / 2 - 0.1)
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - pad_x) / gain).clamp(0, w)
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pad_y) / gain).clamp(0, h)
    names = zoo_models.ULTRALYTICS_NAMES
    return [
        {"label": names[int(c)], "index": int(c), "score": float(s), "box": b.tolist()}
        for b, s, c in zip(boxes, conf, cls)
    ]


@pytest.mark.parametrize(("width", "height"), SCENES)
def test_ultralytics_export_answers_as_yolo_predict(zoo: Zoo, width: int, height: int) -> None:
    """Boxes equal the reference letterbox's at sizes the letterbox scales up, keeps and scales down,
    and the labels are the export's own class names."""
    rng = np.random.default_rng(width * height)
    cells = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    scene = np.asarray(Image.fromarray(cells).resize((width, height), Image.NEAREST))
    data = demo_models.encode(scene, "PNG")
    reply = zoo.rest.predict("zoo_ultralytics", data)
    assert reply.status == 200, reply.body
    expected = ultralytics_predict(zoo.forms["zoo_ultralytics"].reference, scene)
    assert expected, "the scene should hold detections"
    got = sorted(reply.body, key=lambda d: (-d["score"], d["box"]))
    want = sorted(expected, key=lambda d: (-d["score"], d["box"]))
    assert [d["label"] for d in got] == [d["label"] for d in want]
    for a, b in zip(got, want):
        assert abs(a["score"] - b["score"]) <= 1e-4
        assert max(abs(p - q) for p, q in zip(a["box"], b["box"])) <= 0.02, (a, b)
