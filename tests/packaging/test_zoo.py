"""The zoo's recipes, checkpoints and exports read as the kit's config, in process: pure functions and
`make scaffold`'s one-line refusals (no server)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from kit import run_make
from servekit.checkpoint import infer_num_classes, strip_prefixes
from servekit.config import ClassifierConfig, parse_handler_config
from servekit.errors import ConfigError
from servekit.recipes import hf_recipe, timm_recipe, torchvision_recipe
from servekit.transforms import classifier_crop
from servekit.ultralytics_source import parse_metadata
from servekit.yolo import ultralytics_letterbox
from zoo_models import TrainConfig


def test_torchvision_recipe_is_read_from_the_weights_entry() -> None:
    entry = torchvision.models.EfficientNet_B3_Weights.IMAGENET1K_V1
    recipe = torchvision_recipe(entry.transforms(), "tv")
    assert (recipe.resize, recipe.crop, recipe.interpolation) == (320, 300, "bicubic")
    assert recipe.section()["mean"] == [0.485, 0.456, 0.406]


def test_timm_recipe_center_and_squash() -> None:
    config = {
        "input_size": (3, 224, 224),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
    }
    center = timm_recipe(config, "timm")
    assert (center.resize, center.crop, center.interpolation) == (235, 224, "bicubic")
    squash = timm_recipe({**config, "crop_mode": "squash", "input_size": (3, 256, 192)}, "timm")
    assert (squash.resize, squash.crop) == ((269, 202), (256, 192))


def test_hf_recipes_exact_resize_crop_pct_and_rescale_folded() -> None:
    vit = hf_recipe(
        {"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, "vit"
    )
    assert (vit.resize, vit.crop, vit.interpolation, vit.crop_rounding) == ((224, 224), 0, "bilinear", "floor")
    kind = {"image_processor_type": "ConvNextImageProcessor"}
    convnext = hf_recipe({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3, **kind}, "convnext")
    assert (convnext.resize, convnext.crop, convnext.interpolation) == (256, 224, "bicubic")
    large = hf_recipe({"size": {"shortest_edge": 384}, "crop_pct": 0.875, "resample": 3, **kind}, "convnext")
    assert (large.resize, large.crop) == ((384, 384), 0)
    raw = hf_recipe(
        {"size": {"height": 32, "width": 32}, "do_rescale": False, "image_mean": [0, 0, 0], "image_std": [255] * 3}, "r"
    )
    assert raw.std == pytest.approx((1.0, 1.0, 1.0)) and raw.mean == (0.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="without a crop, so the input size varies"):
        hf_recipe({"size": {"shortest_edge": 800}}, "detr")


MOBILENET_V2 = {  # google/mobilenet_v2_1.0_224's preprocessor_config.json: a crop_pct its class never reads
    "image_processor_type": "MobileNetV2ImageProcessor", "crop_pct": 0.875, "size": {"shortest_edge": 256},
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "resample": 2,
    "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
}  # fmt: skip


def test_hf_processors_are_read_as_their_class_reads_them() -> None:
    mobilenet = hf_recipe(MOBILENET_V2, "mobilenet_v2")
    assert (mobilenet.resize, mobilenet.crop) == (256, 224)
    levit = hf_recipe(
        {**MOBILENET_V2, "image_processor_type": "LevitImageProcessor", "size": {"shortest_edge": 224}}, "l"
    )
    assert (levit.resize, levit.crop) == (256, 224)
    pool = hf_recipe({**MOBILENET_V2, "image_processor_type": "PoolFormerImageProcessor", "crop_pct": 0.9}, "p")
    assert pool.resize == 284
    mobilevit = hf_recipe(
        {"image_processor_type": "MobileViTImageProcessor", "size": {"shortest_edge": 288}, "do_center_crop": True,
         "crop_size": {"height": 256, "width": 256}, "do_flip_channel_order": True, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3, "resample": 3}, "mobilevit",
    )  # fmt: skip
    assert mobilevit.channel_order == "bgr" and mobilevit.mean == (0.0,) * 3 and mobilevit.std == (1.0,) * 3
    assert mobilevit.section()["channel_order"] == "bgr" and "channels flipped to BGR" in mobilevit.describe()
    effnet = hf_recipe(
        {"image_processor_type": "EfficientNetImageProcessor", "size": {"height": 224, "width": 224},
         "rescale_offset": True, "include_top": True, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}, "effnet",
    )  # fmt: skip
    pixel = torch.tensor([0.0, 100.0, 255.0])  # (p / 255 - 1 - 0.5) / 0.25 / 0.25, as the processor computes
    assert torch.allclose((pixel / 255 - effnet.mean[0]) / effnet.std[0], ((pixel / 255 - 1) - 0.5) / 0.25 / 0.25)
    dpt = hf_recipe(
        {"image_processor_type": "DPTImageProcessor", "size": {"height": 384, "width": 384}, "keep_aspect_ratio": True,
         "ensure_multiple_of": 32, "resample": 3}, "dpt", task="segmentation",
    )  # fmt: skip
    wanted = {"resize": [384, 384], "keep_aspect_ratio": True, "ensure_multiple_of": 32}
    assert wanted.items() <= dpt.section("segmentation").items()
    with pytest.raises(ConfigError, match="vary the input size of a classifier"):
        hf_recipe({"image_processor_type": "DPTImageProcessor", "size": {"height": 384, "width": 384},
                   "keep_aspect_ratio": True}, "dpt")  # fmt: skip


@pytest.mark.parametrize(("height", "width"), [(240, 320), (333, 250), (480, 1280), (384, 384)])
def test_dpt_resize_shape_is_hugging_faces(height: int, width: int) -> None:
    from transformers.models.dpt.image_processing_dpt import get_resize_output_image_size

    from servekit.transforms import resized_shape

    for keep in (True, False):
        theirs = get_resize_output_image_size(torch.zeros(3, height, width), (384, 384), keep, 32)
        assert resized_shape(height, width, (384, 384), keep_aspect=keep, multiple=32) == (theirs.height, theirs.width)


def test_weights_keep_their_metadata_and_eval_mode_aux_heads_may_be_missing() -> None:
    from servekit.config import ModelSource
    from servekit.weights import fit_weights

    mnasnet = torchvision.models.mnasnet0_5(num_classes=4).state_dict()
    prefixed = {f"module.{k}": v for k, v in mnasnet.items()}  # stripped, the file's _metadata is lost
    for obj in (mnasnet, {"model": mnasnet}, prefixed):
        fitted = fit_weights(obj, Path("."), ModelSource(architecture="mnasnet0_5"))
        assert fitted.num_classes == 4 and fitted.state._metadata[""]["version"] == 2
    googlenet = torchvision.models.googlenet(num_classes=3, aux_logits=False, init_weights=False).state_dict()
    fitted = fit_weights(googlenet, Path("."), ModelSource(architecture="googlenet"))
    assert fitted.kwargs == {"aux_logits": False} and "aux_logits false" in fitted.steps[-1]


def test_distilled_hugging_face_classes_are_classifiers() -> None:
    from servekit.hf_source import model_task

    for named in ("DeiTForImageClassificationWithTeacher", "LevitForImageClassificationWithTeacher"):
        assert model_task({"architectures": [named]}) == ("classification", named)


def test_exact_resize_and_no_crop_parse_and_shape_the_input() -> None:
    section = {"task": "classification", "model": {"architecture": "resnet18"}}
    config = parse_handler_config({**section, "resize": [96, 128], "crop": 0, "interpolation": "lanczos"})
    assert isinstance(config, ClassifierConfig) and config.input_size == (96, 128)
    assert classifier_crop(torch.zeros(3, 300, 500, dtype=torch.uint8), config).shape == (3, 96, 128)
    with pytest.raises(ConfigError, match="handler.crop 0 \\(no crop\\) needs resize as \\[height, width\\]"):
        parse_handler_config({**section, "resize": 96, "crop": 0})
    with pytest.raises(ConfigError, match="'handler.resize' must be int or a list"):
        parse_handler_config({**section, "resize": "big"})
    with pytest.raises(ConfigError, match="'handler.interpolation' must be one of"):
        parse_handler_config({**section, "interpolation": "area"})


@pytest.mark.parametrize(
    ("architecture", "classes"),
    [
        ("ssdlite320_mobilenet_v3_large", 4),
        ("ssd300_vgg16", 3),
        ("retinanet_resnet50_fpn_v2", 5),
        ("fcos_resnet50_fpn", 7),
    ],
)
def test_anchor_heads_give_their_class_count(architecture: str, classes: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build = torchvision.models.get_model
        mine = build(architecture, weights=None, weights_backbone=None, num_classes=classes).state_dict()
        default = build(architecture, weights=None, weights_backbone=None).state_dict()
    assert infer_num_classes(mine, default, 91) == classes


def test_lightning_attribute_prefix_is_found_and_loss_weights_dropped() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    expected = {"0.weight", "0.bias", "2.weight", "2.bias"}
    state = {f"backbone.{k}": torch.zeros(1) for k in expected} | {"criterion.weight": torch.ones(2)}
    stripped, steps = strip_prefixes(state, expected)
    assert set(stripped) == expected
    assert steps == [
        "prefix 'backbone.' stripped",
        "1 key outside 'backbone.' dropped, not layers of the network: 'criterion.weight'",
    ]
    del net
    partial = {"backbone.0.weight": torch.zeros(1), "head.x": torch.zeros(1)}
    assert set(strip_prefixes(partial, expected)[0]) == {"0.weight", "head.x"}  # nothing dropped unless all fit


def test_ultralytics_metadata_json_and_python_literals() -> None:
    as_json = parse_metadata(json.loads(json.dumps({"names": {0: "a", 1: "b"}, "imgsz": [640, 640], "stride": 32})))
    as_onnx = parse_metadata({"names": "{0: 'a', 1: 'b'}", "imgsz": "[640, 640]", "stride": "32", "task": "detect"})
    assert as_json == as_onnx and as_json is not None and as_json.names == ["a", "b"] and as_json.imgsz == (640, 640)
    assert parse_metadata({"description": "not ultralytics"}) is None


@pytest.mark.parametrize(("width", "height"), [(200, 150), (320, 320), (601, 451), (640, 213)])
def test_ultralytics_letterbox_geometry(width: int, height: int) -> None:
    import cv2

    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    canvas, geometry = ultralytics_letterbox(torch.from_numpy(image).permute(2, 0, 1), 320)
    r = min(320 / height, 320 / width)
    new_w, new_h = round(width * r), round(height * r)
    top, left = round((320 - new_h) / 2 - 0.1), round((320 - new_w) / 2 - 0.1)
    resized = (
        cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        if (new_w, new_h) != (width, height)
        else image
    )
    assert np.array_equal(canvas.permute(1, 2, 0).numpy()[top : top + new_h, left : left + new_w], resized)
    assert int(canvas[0, 0, 0]) == 114 or (top == 0 and left == 0)
    assert (geometry.scale_x, geometry.left) == (r, round((320 - width * r) / 2 - 0.1))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import transformers

    root = tmp_path_factory.mktemp("zoo_bad")
    (root / "neither").mkdir()
    (root / "neither" / "weights.txt").write_text("hello")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32
    )
    transformers.ViTModel(config).save_pretrained(str(root / "vit_base"))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), root / "resnet.pt")
    state = torchvision.models.resnet18(weights=None, num_classes=3).state_dict()
    torch.save({"state_dict": state, "config": TrainConfig()}, root / "custom.ckpt")
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize(
    ("pt", "arch", "message"),
    [
        ("neither", "", "is a folder holding neither a timm hub folder"),
        ("vit_base", "", "the Hugging Face folder holds ViTModel, which the kit does not serve"),
        ("resnet.pt", "timm:resnet_18x", "unknown timm model 'resnet_18x'"),
        (
            "custom.ckpt",
            "resnet18",
            "it is a checkpoint whose metadata holds zoo_models.TrainConfig, which is not one of",
        ),
    ],
)
def test_bad_zoo_inputs_get_one_line(
    bad_inputs: dict[str, Path], tmp_path: Path, pt: str, arch: str, message: str
) -> None:
    variables = {"MODELS": tmp_path, "NAME": "bad", "TASK": "classification", "PT": bad_inputs[pt]}
    result = run_make("scaffold", **variables, **({"ARCH": arch} if arch else {}))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if not line.startswith("make")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert len(lines[0]) < 600


def test_a_worker_without_the_package_fails_its_load_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from servekit.config import ModelSource
    from servekit.weights import build_network

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ConfigError, match="needs the Python package 'timm', which this Python lacks"):
        build_network(Path("."), ModelSource(architecture="timm:convnext_atto"))
