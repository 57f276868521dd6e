"""Semantic segmentation in process: the label map and answers (pure), and served masks against the zoo's own
reference: torchvision's weights ``transforms()`` then the model, Hugging Face's image processor and
``post_process_semantic_segmentation``, for photos of several sizes in one batch."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scaffold_model
import torch
import torchvision
from PIL import Image
from pycocotools import mask as coco_mask
from torch.nn import functional as F

import demo_models
from servekit.config import ModelSource, SegmenterConfig, read_model_config
from servekit.errors import BadInput, ConfigError
from servekit.segmentation import label_map, segmentation_answer, segmentation_logits
from servekit.service import SegmenterService, build_service

PHOTOS = ("astronaut", "chelsea", "coffee")  # 512x512, 451x300, 600x400


def test_label_map_is_the_argmax_of_bilinear_upsampling() -> None:
    torch.manual_seed(0)
    smooth = F.interpolate(torch.randn(1, 7, 6, 8) * 4, size=(48, 64), mode="bicubic", align_corners=False)[0]
    for logits, size in [(torch.randn(5, 13, 17), (97, 131)), (smooth, (301, 451)), (smooth, (20, 30))]:
        want = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
        got = label_map(logits, *size)
        assert got.dtype == torch.uint8 and tuple(got.shape) == size
        assert torch.equal(got.long(), want)
    assert label_map(torch.randn(300, 4, 4), 8, 8).dtype == torch.int16


def test_answer_lists_classes_largest_first_with_rle_masks_or_one_png() -> None:
    labels_map = torch.zeros(40, 50, dtype=torch.uint8)
    labels_map[:10] = 2  # 25 %
    labels_map[10:12, :5] = 1  # 0.5 %
    names = ["background", "road", "sky"]
    answer = segmentation_answer(labels_map, names)
    assert answer["size"] == [40, 50]
    assert [(c["label"], c["index"], c["area"]) for c in answer["classes"]] == [
        ("background", 0, 0.745),
        ("sky", 2, 0.25),
        ("road", 1, 0.005),
    ]
    for item in answer["classes"]:
        rle = {"size": item["mask"]["size"], "counts": item["mask"]["counts"].encode()}
        assert np.array_equal(coco_mask.decode(rle), (labels_map == item["index"]).numpy())
    trimmed = segmentation_answer(labels_map, names, min_area=0.01, ignore=["background"])
    assert [c["label"] for c in trimmed["classes"]] == ["sky"]
    png = segmentation_answer(labels_map, names, answer_format="png")
    assert all("mask" not in c for c in png["classes"])
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["png"]))))
    assert np.array_equal(decoded, labels_map.numpy())


def test_segmenter_outputs_are_read_from_each_zoo_and_anything_else_refused() -> None:
    logits = torch.zeros(1, 3, 4, 4)
    assert segmentation_logits({"out": logits, "aux": logits + 1}) is logits
    assert segmentation_logits((logits,)) is logits
    with pytest.raises(ConfigError, match=r"must return class logits \[N, C, h, w\]; this model returned \[1, 10\]"):
        segmentation_logits(torch.zeros(1, 10))


def test_a_request_may_ask_for_png_and_a_bad_format_fails_alone() -> None:
    source = ModelSource(format="torchscript")
    config = SegmenterConfig(task="segmentation", model=source, resize=(64, 64), mean=(0.5,) * 3, std=(0.25,) * 3)
    service = SegmenterService(config, torch.nn.Conv2d(3, 3, 1).eval(), ["a", "b", "c"], torch.device("cpu"))
    jpeg = demo_models.encode(demo_models.sample_photos(("chelsea",))["chelsea"], "JPEG", quality=90)
    rows = [
        {"body": jpeg},
        {"data": jpeg, "format": b"png"},  # a multipart form field
        {"body": {"data": base64.b64encode(jpeg).decode(), "format": "PNG"}},  # beside the image in a JSON body
        {"body": jpeg, "format": b"gif"},
    ]
    plain, form, body, bad = service.handle(rows).answers
    assert "png" not in plain and all("mask" in c for c in plain["classes"])
    assert form == body and "png" in form and all("mask" not in c for c in form["classes"])
    assert isinstance(bad, BadInput) and "format must be one of rle, png; got 'gif'" in str(bad)


# ------------------------------------------------------------------ served masks against the zoo's reference


def photos_of_several_sizes() -> dict[str, bytes]:
    photos = demo_models.sample_photos(PHOTOS)
    payloads = {name: demo_models.encode(photos[name], "JPEG", quality=92) for name in PHOTOS}
    payloads["1080p"] = demo_models.user_image("frame_1920x1080.jpg")
    return payloads


def agreement(got: dict, want: np.ndarray) -> tuple[float, float]:
    """Share of pixels with the same class, and the mean IoU over classes covering at least 1 % of the image."""
    height, width = got["size"]
    served = np.full((height, width), -1, np.int64)
    for item in got["classes"]:
        rle = {"size": item["mask"]["size"], "counts": item["mask"]["counts"].encode()}
        served[coco_mask.decode(rle).astype(bool)] = item["index"]
    same = float((served == want).mean())
    ious = []
    for index in np.unique(want):
        truth = want == index
        if truth.mean() >= 0.01:
            ious.append(((served == index) & truth).sum() / ((served == index) | truth).sum())
    return same, float(np.mean(ious))


def serve_folder(folder: Path, payloads: dict[str, bytes]) -> dict[str, dict]:
    """Every photo through the kit's service as one batch."""
    config = read_model_config(folder)
    assert isinstance(config, SegmenterConfig)
    service = build_service(config, folder, torch.device("cpu"), max_batch=len(payloads))
    assert isinstance(service, SegmenterService)
    answers = service.handle([{"body": data} for data in payloads.values()]).answers
    assert not any(isinstance(a, BaseException) for a in answers), answers
    return dict(zip(payloads, answers))


def check_against(
    reference: Callable[[Image.Image], np.ndarray], served: dict[str, dict], payloads: dict, classes: int = 3
) -> None:
    for name, data in payloads.items():
        image = Image.open(io.BytesIO(data)).convert("RGB")
        want = reference(image)
        assert served[name]["size"] == [image.height, image.width]
        same, miou = agreement(served[name], want)
        shown = ", ".join(f"{c['label']} {c['area']:.2f}" for c in served[name]["classes"])
        print(f"{name} {image.width}x{image.height}: {same * 100:.2f} % pixels agree, mIoU {miou:.3f} ({shown})")
        assert same >= 0.99 and miou >= 0.95, (name, same, miou)
    assert max(sum(c["area"] >= 0.01 for c in a["classes"]) for a in served.values()) >= classes  # not one class


@pytest.mark.parametrize("architecture", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_torchvision_segmenters_answer_as_their_weights_transforms_and_model(tmp_path: Path, architecture: str) -> None:
    torch.manual_seed(0)
    kwargs = {"aux_loss": True} if architecture.startswith("deeplab") else {}
    network = torchvision.models.get_model(architecture, weights=None, weights_backbone=None, num_classes=6, **kwargs)
    with torch.no_grad():  # seeded heads answer one class everywhere: let the features decide, as trained ones do
        for layer in network.modules():
            if isinstance(layer, torch.nn.Conv2d) and layer.out_channels == 6:
                layer.weight.mul_(50.0)
                if layer.bias is not None:
                    layer.bias.zero_()
    network.eval()
    torch.save({"epoch": 3, "model": network.state_dict()}, tmp_path / "checkpoint.pth")  # references' train.py
    args = ["--name", "seg", "--task", "segmentation", "--pt", str(tmp_path / "checkpoint.pth")]
    assert scaffold_model.main([*args, "--architecture", architecture, "--root", str(tmp_path)]) == 0
    folder = tmp_path / "seg"
    assert json.loads((folder / "labels.json").read_text()) == [f"class_{i}" for i in range(6)]
    transforms = torchvision.models.get_model_weights(architecture).DEFAULT.transforms()

    def reference(image: Image.Image) -> np.ndarray:
        with torch.inference_mode():
            logits = network(transforms(image)[None])["out"]
        upsampled = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
        return upsampled[0].argmax(0).numpy()

    payloads = photos_of_several_sizes()
    check_against(reference, serve_folder(folder, payloads), payloads)


HF_NAMES = ["sky", "road", "tree", "car", "person"]


def segformer(transformers: Any) -> tuple[Any, Any]:
    config = transformers.SegformerConfig(
        num_labels=5,
        hidden_sizes=[16, 32, 64, 96],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 2, 4],
        decoder_hidden_size=64,
        id2label=dict(enumerate(HF_NAMES)),
    )
    return transformers.SegformerForSemanticSegmentation(config).eval(), transformers.SegformerImageProcessor()


def mask2former(transformers: Any) -> tuple[Any, Any]:
    backbone = transformers.SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=12,
        id2label=dict(enumerate(HF_NAMES)),
    )  # fmt: skip
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    # seeded, every query answers one class with a flat mask: let queries and masks differ, as trained ones do
    embedder = model.model.transformer_module.decoder.mask_predictor.mask_embedder
    last = [layer for layer in embedder.modules() if isinstance(layer, torch.nn.Linear)][-1]
    projection = model.model.pixel_level_module.decoder.mask_projection
    with torch.no_grad():
        model.model.transformer_module.queries_features.weight.normal_(0, 3)
        model.class_predictor.weight.normal_(0, 1)
        for layer, gain in ((model.class_predictor, 1.0), (projection, 10.0), (last, 20.0)):
            layer.weight.mul_(gain)
            layer.bias.zero_()
    # a short side and a long-side cap: the shape varies with the photo, each side rounded up to a multiple of 32
    return model, transformers.Mask2FormerImageProcessor(size={"shortest_edge": 320, "longest_edge": 480})


@pytest.mark.parametrize("make", [segformer, mask2former], ids=["segformer", "mask2former"])
def test_hugging_face_segmenters_answer_as_their_processor_and_post_process(tmp_path: Path, make: Any) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, processor = make(transformers)
    source = tmp_path / "hf"
    model.save_pretrained(str(source))
    processor.save_pretrained(str(source))
    args = ["--name", "seg", "--task", "segmentation", "--pt", str(source), "--root", str(tmp_path)]
    assert scaffold_model.main(args) == 0
    scaffolded = read_model_config(tmp_path / "seg")
    assert isinstance(scaffolded, SegmenterConfig)
    if make is segformer:
        assert scaffolded.resize == (512, 512)
    else:
        assert (scaffolded.resize, scaffolded.max_size, scaffolded.size_divisor) == (320, 480, 32)

    def reference(image: Image.Image) -> np.ndarray:
        with torch.inference_mode():
            outputs = model(**processor(images=image, return_tensors="pt"))
        (found,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])
        return found.numpy()

    payloads = photos_of_several_sizes()
    served = serve_folder(tmp_path / "seg", payloads)
    assert {c["label"] for a in served.values() for c in a["classes"]} <= set(HF_NAMES)
    check_against(reference, served, payloads, classes=3 if make is segformer else 2)
