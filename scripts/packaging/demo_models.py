"""The kit's demo models and images, all made here: nothing is downloaded.

- ``digits``: a small CNN trained on scikit-learn's bundled digits (rendered as 32x32 RGB images).
- ``resnet18``: torchvision's resnet18 with seeded weights and ImageNet names (state_dict).
- ``mobilenet_v3_small``: the same idea (state_dict; the kit makes no TorchScript of its own).
- ``fasterrcnn``: ``fasterrcnn_mobilenet_v3_large_320_fpn`` with seeded weights and COCO names.

Seeded weights give outputs of no meaning, so BatchNorm statistics are recalibrated on real photos
and the detector's class logits are spread, which makes scores distinct and comparable in tests.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from servekit.config import ClassifierConfig, read_model_config
from servekit.errors import require
from servekit.transforms import classifier_batch, classifier_crop

logger = logging.getLogger(__name__)

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel", "hubble_deep_field")
DIGIT_SIZE = 32
SEED = 0


def sample_photos(names: Sequence[str] = PHOTO_NAMES) -> dict[str, np.ndarray]:
    """RGB uint8 photos that scikit-image ships (no download)."""
    import skimage.data

    return {name: np.ascontiguousarray(getattr(skimage.data, name)()[..., :3]) for name in names}


def encode(image: np.ndarray, fmt: str = "JPEG", **params: object) -> bytes:
    """Encode an HxWx3 (or HxW) uint8 array as image bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height``: a decompression-bomb shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def digit_images(split: str) -> tuple[list[np.ndarray], list[int]]:
    """scikit-learn's digits as 32x32 RGB uint8 images, split 75/25 (seeded, stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(indices, test_size=0.25, random_state=SEED, stratify=digits.target)
    chosen = train if split == "train" else test
    images = [render_digit(digits.images[i]) for i in chosen]
    return images, [int(digits.target[i]) for i in chosen]


def render_digit(grid: np.ndarray) -> np.ndarray:
    """An 8x8 digit (values 0..16) to a 32x32 RGB uint8 image, white on black."""
    gray = Image.fromarray(np.clip(grid * 16, 0, 255).astype(np.uint8))
    return np.asarray(gray.resize((DIGIT_SIZE, DIGIT_SIZE), Image.BILINEAR).convert("RGB"))


def classifier_inputs(images: Iterable[np.ndarray], config: ClassifierConfig) -> torch.Tensor:
    """The exact float batch the served handler builds for these images."""
    crops = [classifier_crop(torch.from_numpy(np.array(img)).permute(2, 0, 1), config) for img in images]
    return classifier_batch(crops, config)


def read_config(model_dir: Path) -> ClassifierConfig:
    config = read_model_config(model_dir)
    assert isinstance(config, ClassifierConfig)
    return config


def train_digits(model_dir: Path, epochs: int = 20) -> float:
    """Train DigitsNet on the training split; save its state_dict; return held-out accuracy."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_model", model_dir / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = read_config(model_dir)
    torch.manual_seed(SEED)
    model = module.DigitsNet(num_classes=10)
    images, labels = digit_images("train")
    x, y = classifier_inputs(images, config), torch.tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
    model.eval()
    test_images, test_labels = digit_images("test")
    with torch.inference_mode():
        predicted = model(classifier_inputs(test_images, config)).argmax(1)
    accuracy = float((predicted == torch.tensor(test_labels)).float().mean())
    torch.save(model.state_dict(), model_dir / "model.pt")
    _write_labels(model_dir, [str(d) for d in range(10)])
    return accuracy


def recalibrate_batchnorm(model: torch.nn.Module, run: callable) -> None:
    """Reset BatchNorm statistics and re-estimate them by running ``run()`` in train mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        run()
    model.eval()


def make_classifier(name: str, model_dir: Path) -> None:
    """A torchvision classifier with seeded weights and recalibrated BatchNorm, with ImageNet names."""
    config = read_config(model_dir)
    torch.manual_seed(SEED)
    model = torchvision.models.get_model(name, weights=None, num_classes=1000)
    photos = list(sample_photos().values())
    batch = classifier_inputs(photos, config)
    recalibrate_batchnorm(model, lambda: model(batch))
    torch.save(model.state_dict(), model_dir / "model.pt")
    categories = torchvision.models.get_model_weights(name).DEFAULT.meta["categories"]
    _write_labels(model_dir, list(categories))


def make_segmenter(model_dir: Path, name: str = "lraspp_mobilenet_v3_large") -> None:
    """A torchvision segmenter with seeded weights and BatchNorm recalibrated on the photos, VOC's 21 names."""
    from servekit.config import SegmenterConfig
    from servekit.transforms import segmenter_input

    config = read_model_config(model_dir)
    assert isinstance(config, SegmenterConfig)
    torch.manual_seed(SEED)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=21)
    square = dataclasses.replace(config, resize=(320, 320))  # one shape: the photos calibrate as one batch
    photos = [torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in sample_photos().values()]
    pixels = [segmenter_input(photo, square) for photo in photos]
    batch = classifier_batch(pixels, config)
    recalibrate_batchnorm(model, lambda: model(batch))
    torch.save(model.state_dict(), model_dir / "model.pt")
    _write_labels(model_dir, list(torchvision.models.get_model_weights(name).DEFAULT.meta["categories"]))


IMAGENET_NAMES_FROM = "resnet18"  # torchvision's weight metadata carries ImageNet's 1000 names offline


def make_timm_classifier(model_dir: Path, name: str = "convnext_atto") -> None:
    """A seeded timm network (``timm.create_model(pretrained=False)``) saved as a state_dict, ImageNet names."""
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    torch.save(model.state_dict(), model_dir / "model.pt")
    _write_labels(model_dir, imagenet_names())


def make_hf_classifier(model_dir: Path) -> None:
    """A seeded ViT-Tiny-sized ViTForImageClassification as ``save_pretrained`` writes it (config.json with
    id2label, model.safetensors) with its ViTImageProcessor (preprocessor_config.json)."""
    transformers = require("transformers", "a Hugging Face demo model")

    names = imagenet_names()
    config = transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, image_size=224,
        patch_size=16, num_labels=len(names), id2label=dict(enumerate(names)),
    )  # fmt: skip
    torch.manual_seed(SEED)
    transformers.ViTForImageClassification(config).eval().save_pretrained(str(model_dir))
    transformers.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(str(model_dir))
    _write_labels(model_dir, names)


def make_hf_detector(model_dir: Path) -> None:
    """A seeded RT-DETR (ResNet-18-vd-sized backbone, 300 queries, COCO's 80 names) as ``save_pretrained``
    writes it, with its RTDetrImageProcessor (640 x 640, pixels / 255): the DETR family's sigmoid scoring.
    Seeded, not trained: it answers few confident boxes, and serves to measure and to test the served path."""
    transformers = require("transformers", "a Hugging Face demo model")

    coco = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    names = [c for c in coco if c not in ("__background__", "N/A")]
    backbone = transformers.RTDetrResNetConfig(
        hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic", downsample_in_bottleneck=False,
        out_features=["stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = transformers.RTDetrConfig(
        backbone_config=backbone, use_pretrained_backbone=False, encoder_in_channels=[128, 256, 512],
        decoder_layers=3, num_labels=len(names), id2label=dict(enumerate(names)),
    )  # fmt: skip
    torch.manual_seed(SEED)
    model = transformers.RTDetrForObjectDetection(config)
    # as initialised, the batch norms shrink the encoder's output to ~1e-6, so every anchor's score ties and the
    # query selection is left to the top-k's tie-break (ONNX Runtime's and torch's differ): recalibrated on the
    # photos, the scores spread and the network and its ONNX export select the same queries
    photos = [torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255 for p in sample_photos().values()]
    batch = torch.cat([torch.nn.functional.interpolate(p, size=(640, 640), mode="bilinear") for p in photos])
    recalibrate_batchnorm(model, lambda: model(pixel_values=batch))
    model.save_pretrained(str(model_dir))
    transformers.RTDetrImageProcessor().save_pretrained(str(model_dir))
    _write_labels(model_dir, names)


def imagenet_names() -> list[str]:
    return list(torchvision.models.get_model_weights(IMAGENET_NAMES_FROM).DEFAULT.meta["categories"])


def make_detector(model_dir: Path) -> None:
    """``fasterrcnn_mobilenet_v3_large_320_fpn`` with seeded weights, distinct scores and COCO names."""
    from torchvision.models import detection

    torch.manual_seed(SEED)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.05
    )
    photos = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in sample_photos().values()]
    images, _ = model.transform(photos)
    recalibrate_batchnorm(model.backbone, lambda: model.backbone(images.tensors))
    with torch.no_grad():  # spread the class logits so scores differ and some pass a threshold
        model.roi_heads.box_predictor.cls_score.weight.mul_(8.0)
        model.roi_heads.box_predictor.cls_score.bias[0] = -1.0
    model.eval()
    torch.save(model.state_dict(), model_dir / "model.pt")
    categories = detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.DEFAULT.meta["categories"]
    _write_labels(model_dir, list(categories))


def _write_labels(model_dir: Path, labels: list[str]) -> None:
    (model_dir / "labels.json").write_text(json.dumps(labels, indent=0) + "\n", encoding="utf-8")


# Images as users send them: (name, width, height, format). The 451x300 JPEG is the kit's old bench image.
USER_IMAGES = (
    ("phone_4032x3024.jpg", 4032, 3024, "JPEG"),
    ("frame_1920x1080.jpg", 1920, 1080, "JPEG"),
    ("photo_640x480.jpg", 640, 480, "JPEG"),
    ("screenshot_1280x800.png", 1280, 800, "PNG"),
    ("chelsea_451x300.jpg", 451, 300, "JPEG"),
)


def user_image(name: str) -> bytes:
    """One of :data:`USER_IMAGES`, made here: a real photo scaled to the size with sensor-like noise
    (so a 12 MP JPEG at quality 90 carries real detail and weighs megabytes), or a screenshot-like PNG."""
    _, width, height, fmt = next(entry for entry in USER_IMAGES if entry[0] == name)
    if name.startswith("chelsea"):
        return encode(sample_photos(("chelsea",))["chelsea"], "JPEG", quality=90)
    if fmt == "PNG":
        return encode(screenshot(width, height), "PNG")
    return encode(photo_at(width, height), "JPEG", quality=90)


def photo_at(width: int, height: int, seed: int = SEED) -> np.ndarray:
    """scikit-image's astronaut and coffee side by side, resized to ``width`` x ``height``, with noise."""
    photos = sample_photos(("astronaut", "coffee"))
    side = np.concatenate([photos["astronaut"][:400, :512], photos["coffee"][:400, :512]], axis=1)
    big = np.asarray(Image.fromarray(side).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = np.random.default_rng(seed).normal(0, 6, size=big.shape).astype(np.int16)
    return np.clip(big + noise, 0, 255).astype(np.uint8)


def screenshot(width: int, height: int) -> np.ndarray:
    """A flat, screenshot-like RGB image: window bars, panels and lines of text."""
    from PIL import ImageDraw

    image = Image.new("RGB", (width, height), (245, 246, 248))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width, 40], fill=(40, 44, 52))
    draw.rectangle([0, 40, 220, height], fill=(230, 232, 236))
    for row, top in enumerate(range(60, height - 20, 22)):
        draw.text(
            (240, top),
            f"line {row}: the quick brown fox jumps over the lazy dog {row * 7919 % 1000}",
            fill=(20, 20, 20),
        )
        draw.text((12, top), f"item {row}", fill=(60, 60, 60))
    draw.rectangle([width - 300, 80, width - 40, 300], outline=(30, 120, 220), width=3, fill=(220, 235, 250))
    return np.asarray(image)
