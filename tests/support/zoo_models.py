"""Models as timm, Hugging Face, Lightning, torchvision and ultralytics hand them over, for the zoo tests.

Each form saves one file or folder the way its tool saves it and returns the ``make scaffold`` variables,
plus the owner's own pipeline: for a classifier, a function from a PIL image to probabilities through
the zoo's preprocessing (torchvision ``weights.transforms()``, timm ``create_transform``, Hugging Face
``AutoImageProcessor``); for a torchvision detector, the module (its transform is inside it).

A random network answers almost the same whatever the preprocessing, so the classifiers are made
sensitive first: BatchNorm statistics taken from the photos, a head scaled so logits spread by about 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

Pipeline = Callable[[Image.Image], torch.Tensor]
LOGIT_SPREAD = 2.0


@dataclass
class ZooForm:
    """One model as its tool saves it: scaffold variables, the owner's pipeline, what scaffold should say."""

    name: str
    task: str
    make_vars: dict[str, str]
    reference: Any  # Pipeline for classifiers, the torch module for detectors
    found: list[str] = field(default_factory=list)
    edits: dict[str, Any] = field(default_factory=dict)
    frontend: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """A training script's own config class: not on the kit's allow-list of checkpoint metadata."""

    lr: float = 0.1


def sensitize(model: torch.nn.Module, batch: torch.Tensor) -> torch.nn.Module:
    """BatchNorm statistics from ``batch`` (the photos, preprocessed as the owner does), then the last
    linear layer scaled so the logits on those photos spread by about ``LOGIT_SPREAD``."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        if norms:
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over the photos
            model.train()
            model(batch)
        model.eval()
        heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        head = (heads or [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)])[-1]  # SqueezeNet: a conv
        spread = float(_logits(model(batch)).std())
        head.weight.mul_(LOGIT_SPREAD / max(spread, 1e-6))
        if head.bias is not None:
            head.bias.mul_(LOGIT_SPREAD / max(spread, 1e-6))
    return model.eval()


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def pil_photos(photos: dict[str, np.ndarray]) -> list[Image.Image]:
    return [Image.fromarray(image) for image in photos.values()]


def torch_pipeline(model: torch.nn.Module, transform: Callable[[Image.Image], torch.Tensor]) -> Pipeline:
    """Probabilities of ``model`` on a PIL image preprocessed by ``transform``."""

    def run(image: Image.Image) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(_logits(model(transform(image)[None])), 1)[0]

    return run


def timm_train_checkpoint(folder: Path, photos: Sequence[Image.Image]) -> ZooForm:
    """A timm ``train.py`` checkpoint: args as an argparse.Namespace (with a pathlib path and numpy
    scalars), state_dict and state_dict_ema, optimizer state, metric."""
    import timm
    import timm.data

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    sensitize(model, torch.stack([transform(p) for p in photos]))
    args = argparse.Namespace(
        model="convnext_atto", num_classes=10, input_size=None, img_size=None, crop_pct=None, mean=None, std=None,
        interpolation="", lr=np.float64(4e-3), output=pathlib.PosixPath("/runs/convnext"), epochs=np.int64(5),
    )  # fmt: skip
    state = model.state_dict()
    checkpoint = {
        "epoch": 4, "arch": "convnext_atto", "state_dict": state, "state_dict_ema": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3}]}, "version": 2, "args": args,
        "metric": np.float64(71.5),
    }  # fmt: skip
    torch.save(checkpoint, folder / "model_best.pth.tar")
    return ZooForm(
        "zoo_timm_ckpt",
        "classification",
        {"PT": str(folder / "model_best.pth.tar")},
        torch_pipeline(model, transform),
        ["timm train.py checkpoint of convnext_atto", "timm:convnext_atto, 10 classes", "bicubic"],
    )


def timm_hub_folder(folder: Path, photos: Sequence[Image.Image]) -> ZooForm:
    """A timm hub folder as ``save_for_hf`` writes it: config.json (architecture, num_classes,
    pretrained_cfg, label_names) and model.safetensors."""
    import timm
    import timm.data
    from timm.models._hub import save_for_hf

    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=6).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    sensitize(model, torch.stack([transform(p) for p in photos]))
    target = folder / "timm_hub"
    names = [f"flower_{i}" for i in range(6)]
    save_for_hf(model, str(target), model_config={"label_names": names}, safe_serialization=True)
    return ZooForm(
        "zoo_timm_hub",
        "classification",
        {"PT": str(target)},
        torch_pipeline(model, transform),
        [
            "a timm hub folder (test_efficientnet",
            "timm:test_efficientnet, 6 classes",
            "resize short side 168 bicubic",
            "labels from config.json label_names",
        ],
    )


def hf_folder(folder: Path, photos: Sequence[Image.Image], kind: str) -> ZooForm:
    """A Hugging Face ``save_pretrained`` folder: config.json (id2label), model.safetensors and
    preprocessor_config.json; ``kind`` vit (exact resize, mean 0.5) or convnext (crop_pct, bicubic)."""
    import transformers

    labels = {0: "cat", 1: "dog", 2: "bird", 3: "fish", 4: "horse"}
    common = {"num_labels": 5, "id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    torch.manual_seed(2)
    if kind == "vit":
        config = transformers.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=96,
            patch_size=16, **common,
        )  # fmt: skip
        model = transformers.ViTForImageClassification(config).eval()
        processor = transformers.ViTImageProcessor(size={"height": 96, "width": 96})
        found = ["ViTForImageClassification, 5 classes", "resize to 96x96 bilinear, no crop"]
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], **common)
        model = transformers.ConvNextForImageClassification(config).eval()
        processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
        found = ["ConvNextForImageClassification, 5 classes", "resize short side 256 bicubic, crop 224"]

    def transform(image: Image.Image) -> torch.Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    sensitize(model, torch.stack([transform(p) for p in photos]))
    target = folder / f"hf_{kind}"
    model.save_pretrained(str(target))
    processor.save_pretrained(str(target))
    found.append("labels from config.json id2label")
    return ZooForm(f"zoo_hf_{kind}", "classification", {"PT": str(target)}, torch_pipeline(model, transform), found)


def lightning_checkpoint(folder: Path, photos: Sequence[Image.Image]) -> ZooForm:
    """A Lightning checkpoint: the network under the module's attribute ``net.``, a loss's class weights
    beside it, loops and callbacks state, hyperparameters."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.resnet18(weights=None, num_classes=6).eval()
    transform = weights.transforms()
    sensitize(model, torch.stack([transform(p) for p in photos]))
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    state["criterion.weight"] = torch.ones(6)
    checkpoint = {
        "epoch": 9, "global_step": 1200, "pytorch-lightning_version": "2.5.1", "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 10}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {"best_model_score": torch.tensor(0.8)}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01}]}], "lr_schedulers": [],
        "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.01, "num_classes": 6},
    }  # fmt: skip
    torch.save(checkpoint, folder / "epoch=9-step=1200.ckpt")
    return ZooForm(
        "zoo_lightning",
        "classification",
        {"PT": str(folder / "epoch=9-step=1200.ckpt"), "ARCH": "resnet18"},
        torch_pipeline(model, transform),
        ["a Lightning checkpoint (pytorch-lightning 2.5.1)", "prefix 'net.' stripped", "'criterion.weight'",
         "resnet18, 6 classes"],
    )  # fmt: skip


def efficientnet_b3(folder: Path, photos: Sequence[Image.Image]) -> ZooForm:
    """A torchvision efficientnet_b3 state_dict with 10 classes: its recipe is 320 / 300 bicubic."""
    weights = torchvision.models.EfficientNet_B3_Weights.IMAGENET1K_V1
    torch.manual_seed(4)
    model = torchvision.models.efficientnet_b3(weights=None, num_classes=10).eval()
    transform = weights.transforms()
    sensitize(model, torch.stack([transform(p) for p in photos]))
    torch.save(model.state_dict(), folder / "effnet_b3.pth")
    return ZooForm(
        "zoo_effnet_b3",
        "classification",
        {"PT": str(folder / "effnet_b3.pth"), "ARCH": "efficientnet_b3"},
        torch_pipeline(model, transform),
        ["efficientnet_b3, 10 classes", "EfficientNet_B3_Weights.IMAGENET1K_V1.transforms()",
         "resize short side 320 bicubic, crop 300"],
    )  # fmt: skip


def seeded_detector(architecture: str, classes: int, seed: int, **kwargs: Any) -> torch.nn.Module:
    """A torchvision detector with ``classes`` classes, seeded, no weights downloaded, in eval mode."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(
            architecture, weights=None, weights_backbone=None, num_classes=classes, **kwargs
        ).eval()


def anchor_detector(folder: Path, name: str, architecture: str, classes: int, **sizes: Any) -> ZooForm:
    """A torchvision anchor-based detector (SSD, SSDlite, RetinaNet) fine-tuned to its own class count."""
    model = seeded_detector(architecture, classes, 5, **sizes)
    torch.save(model.state_dict(), folder / f"{name}.pth")
    (folder / f"{name}.txt").write_text("".join(f"thing{i}\n" for i in range(1, classes)))
    make_vars = {"PT": str(folder / f"{name}.pth"), "ARCH": architecture, "LABELS": str(folder / f"{name}.txt")}
    edits: dict[str, Any] = {"score_threshold": 0.005, "max_detections": 10}
    if sizes:
        edits["model"] = {"kwargs": sizes}
    return ZooForm(name, "detection", make_vars, model, [f"{architecture}, {classes} classes"], edits, {"batchSize": 2})


def ssdlite(folder: Path, photos: Sequence[Image.Image]) -> ZooForm:
    return anchor_detector(folder, "zoo_ssdlite", "ssdlite320_mobilenet_v3_large", 4)


def ssd300(folder: Path, photos: Sequence[Image.Image]) -> ZooForm:
    return anchor_detector(folder, "zoo_ssd", "ssd300_vgg16", 3)


def retinanet(folder: Path, photos: Sequence[Image.Image]) -> ZooForm:
    # RetinaNet's focal-loss prior starts scores near 0.01, under its own score_thresh of 0.05
    sizes = {"min_size": 320, "max_size": 480, "score_thresh": 0.001}
    return anchor_detector(folder, "zoo_retinanet", "retinanet_resnet50_fpn_v2", 5, **sizes)


ULTRALYTICS_NAMES = {0: "red", 1: "green", 2: "blue"}


def ultralytics_torchscript(folder: Path, photos: Sequence[Image.Image], detector: torch.nn.Module) -> ZooForm:
    """A YOLOv8-layout TorchScript with the metadata ultralytics' exporter writes (``extra/config.txt``)."""
    metadata = {
        "description": "grid detector", "author": "tests", "stride": 32, "task": "detect", "batch": 1,
        "imgsz": [320, 320], "names": ULTRALYTICS_NAMES, "args": {"batch": 1, "half": False, "dynamic": False},
    }  # fmt: skip
    traced = torch.jit.trace(detector.eval(), torch.rand(1, 3, 320, 320))
    path = folder / "best.torchscript"
    torch.jit.save(traced, str(path), _extra_files={"config.txt": json.dumps(metadata)})
    return ZooForm(
        "zoo_ultralytics",
        "detection",
        {"PT": str(path)},
        detector,
        ["ultralytics detect export metadata: 3 class names, imgsz 320x320, stride 32", "labels from the export's"],
        {},
        {"batchSize": 3, "maxBatchDelay": 200},
    )


CLASSIFIER_FORMS = [timm_train_checkpoint, timm_hub_folder, lightning_checkpoint, efficientnet_b3]
DETECTOR_FORMS = [ssdlite, ssd300, retinanet]


def hf_vit(folder: Path, photos: Sequence[Image.Image]) -> ZooForm:
    return hf_folder(folder, photos, "vit")


def hf_convnext(folder: Path, photos: Sequence[Image.Image]) -> ZooForm:
    return hf_folder(folder, photos, "convnext")


CLASSIFIER_FORMS += [hf_vit, hf_convnext]
