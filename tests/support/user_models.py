"""Model files saved the way training code and tutorials save them, for the bring-your-own-model tests.

Each :class:`Form` makes one file in a folder and returns the ``make scaffold`` variables for it and
the in-process module whose answers the served model must equal.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml

TINY_SOURCE = '''import torch


class TinyNet(torch.nn.Module):
    """A small CNN a user might write: conv, pool, linear head."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU()
        )
        self.head = torch.nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))
'''


@dataclass
class Form:
    """One way a model is saved: its scaffold variables and its in-process reference module."""

    name: str
    task: str
    make_vars: dict[str, str]
    reference: Any
    edits: dict[str, Any] = field(default_factory=dict)  # handler keys a user would set after scaffold
    frontend: dict[str, Any] = field(default_factory=dict)  # frontend keys (batchSize, ...) likewise


def seeded(arch: str, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(arch, weights=None, **kwargs).eval()


def tiny_class(folder: Path) -> type:
    """Write ``tiny_net.py`` into ``folder`` and import its class."""
    import importlib.util

    path = folder / "tiny_net.py"
    path.write_text(TINY_SOURCE)
    spec = importlib.util.spec_from_file_location("tests_tiny_net", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TinyNet


def checkpoint_with_prefix(folder: Path) -> Form:
    """A training checkpoint: weights under 'model' with DataParallel's 'module.' prefix, plus optimizer state."""
    model = seeded("resnet18", num_classes=7)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = folder / "epoch3.ckpt"
    torch.save({"epoch": 3, "model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, path)
    return Form("byom_ckpt", "classification", {"PT": str(path), "ARCH": "resnet18"}, model)


def efficientnet_five(folder: Path) -> Form:
    """A 5-class efficientnet_b0 state_dict (``.bin``) with a 5-line labels file."""
    model = seeded("efficientnet_b0", num_classes=5)
    torch.save(model.state_dict(), folder / "flowers.bin")
    (folder / "flowers.txt").write_text("daisy\ndandelion\nroses\nsunflowers\ntulips\n")
    make_vars = {"PT": str(folder / "flowers.bin"), "ARCH": "efficientnet_b0", "LABELS": str(folder / "flowers.txt")}
    return Form("byom_effnet", "classification", make_vars, model)


def safetensors_compiled(folder: Path) -> Form:
    """safetensors of a model trained under torch.compile (keys carry '_orig_mod.')."""
    from safetensors.torch import save_file

    model = seeded("mobilenet_v3_small", num_classes=10)
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in model.state_dict().items()}, folder / "mnv3.safetensors")
    return Form(
        "byom_safetensors",
        "classification",
        {"PT": str(folder / "mnv3.safetensors"), "ARCH": "mobilenet_v3_small"},
        model,
    )


def torchscript_file(folder: Path) -> Form:
    model = seeded("mobilenet_v3_small", num_classes=4)
    torch.jit.save(torch.jit.script(model), folder / "mnv3.torchscript")
    return Form("byom_torchscript", "classification", {"PT": str(folder / "mnv3.torchscript")}, model)


def exported_batch_one(folder: Path) -> Form:
    """A torch.export program traced with batch 1 (static): the kit serves batches in chunks."""
    model = seeded("resnet18", num_classes=7)
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 224, 224),)), folder / "resnet.pt2")
    return Form("byom_exported", "classification", {"PT": str(folder / "resnet.pt2")}, model)


def aoti_package(folder: Path) -> Form:
    """An AOTInductor package a user compiled (dynamic batch 1-8, 64x64 input)."""
    torch.manual_seed(0)
    model = tiny_class(folder)(num_classes=3).eval()
    batch = torch.export.Dim("batch", min=1, max=8)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(folder / "tiny_aoti.pt2"))
    make_vars = {"PT": str(folder / "tiny_aoti.pt2"), "MAX_BATCH": "8", "SIZE": "64"}
    return Form("byom_aoti", "classification", make_vars, model)


def onnx_file(folder: Path) -> Form:
    """ONNX as torch.onnx.export writes it with a user's names (input 'x') and a dynamic batch."""
    model = seeded("resnet18", num_classes=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 224, 224),),
            str(folder / "resnet.onnx"),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            dynamo=False,
        )
    return Form("byom_onnx", "classification", {"PT": str(folder / "resnet.onnx")}, model)


def detector_four(folder: Path) -> Form:
    """A torchvision detector fine-tuned to 3 classes + background, with a 3-name labels file."""
    model = seeded("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=4, weights_backbone=None)
    torch.save(model.state_dict(), folder / "shapes_detector.pth")
    (folder / "shapes.txt").write_text("circle\nsquare\ntriangle\n")
    make_vars = {
        "PT": str(folder / "shapes_detector.pth"),
        "ARCH": "fasterrcnn_mobilenet_v3_large_320_fpn",
        "LABELS": str(folder / "shapes.txt"),
    }
    return Form("byom_detector", "detection", make_vars, model, {"score_threshold": 0.05})


def model_file_compiled(folder: Path) -> Form:
    """A state_dict of the user's own class (MODEL_FILE/CLASS), served with handler.compile."""
    torch.manual_seed(1)
    model = tiny_class(folder)(num_classes=3).eval()
    torch.save(model.state_dict(), folder / "tiny.pt")
    make_vars = {
        "PT": str(folder / "tiny.pt"),
        "MODEL_FILE": str(folder / "tiny_net.py"),
        "CLASS": "TinyNet",
        "SIZE": "64",
    }
    edits = {"compile": {"mode": "default", "dynamic": False}}
    return Form("byom_compiled", "classification", make_vars, model, edits, {"batchSize": 4})


FORMS: list[Callable[[Path], Form]] = [
    checkpoint_with_prefix,
    efficientnet_five,
    safetensors_compiled,
    torchscript_file,
    exported_batch_one,
    aoti_package,
    onnx_file,
    detector_four,
    model_file_compiled,
]


class GridDetector(torch.nn.Module):
    """A deterministic raw-output detector: one box per grid cell, class scores from the cell's colour.

    Classes are red, green and blue; boxes are 1.5 cells wide, so neighbours overlap and NMS matters.
    ``layout`` picks the output: yolov8 ``[N, 4+C, A]``, yolov5 ``[N, A, 5+C]``, end2end ``[N, K, 6]``.
    """

    def __init__(self, layout: str, grid: int = 10, keep: int = 20) -> None:
        super().__init__()
        self.layout, self.grid, self.keep = layout, grid, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, size = x.shape[0], x.shape[-1]
        cells = torch.nn.functional.adaptive_avg_pool2d(x, self.grid)
        others = cells.sum(1, keepdim=True) - cells
        scores = torch.sigmoid((cells - others / 2 - 0.3) * 10)  # n, 3, g, g
        step = size / self.grid
        centers = (torch.arange(self.grid, dtype=x.dtype) + 0.5) * step
        cy, cx = torch.meshgrid(centers, centers, indexing="ij")
        width = step * (1.2 + 0.6 * cells.mean(1))  # n, g, g
        boxes = torch.stack([cx.expand(n, -1, -1), cy.expand(n, -1, -1), width, width * 0.9], 1)
        if self.layout == "yolov8":
            return torch.cat([boxes, scores], 1).flatten(2)
        if self.layout == "yolov5":
            objectness = scores.amax(1, keepdim=True).sqrt()
            return torch.cat([boxes, objectness, scores], 1).flatten(2).transpose(1, 2)
        best, classes = scores.flatten(2).max(1)  # n, A
        top, index = best.topk(self.keep, dim=1)
        flat = boxes.flatten(2).transpose(1, 2)  # n, A, 4
        chosen = torch.gather(flat, 1, index.unsqueeze(-1).expand(-1, -1, 4))
        xyxy = torch.cat([chosen[..., :2] - chosen[..., 2:] / 2, chosen[..., :2] + chosen[..., 2:] / 2], -1)
        picked = torch.gather(classes, 1, index).to(x.dtype)
        return torch.cat([xyxy, top.unsqueeze(-1), picked.unsqueeze(-1)], -1)


def rcnn_form(folder: Path, name: str, architecture: str, label: str) -> Form:
    """A seeded one-class Mask/Keypoint R-CNN, at a small input size for a 2-core CI."""
    sizes = {"min_size": 320, "max_size": 480}
    model = seeded(architecture, num_classes=2, weights_backbone=None, **sizes)
    torch.save(model.state_dict(), folder / f"{name}.pth")
    (folder / f"{name}.txt").write_text(f"{label}\n")
    make_vars = {"PT": str(folder / f"{name}.pth"), "ARCH": architecture, "LABELS": str(folder / f"{name}.txt")}
    edits = {"score_threshold": 0.05, "max_detections": 5, "model": {"kwargs": sizes}}
    return Form(name, "detection", make_vars, model, edits, {"batchSize": 2, "responseTimeout": 300})


def mask_rcnn(folder: Path) -> Form:
    return rcnn_form(folder, "byom_maskrcnn", "maskrcnn_resnet50_fpn", "thing")


def keypoint_rcnn(folder: Path) -> Form:
    return rcnn_form(folder, "byom_keypointrcnn", "keypointrcnn_resnet50_fpn", "person")


MASK_FORMS: list[Callable[[Path], Form]] = [mask_rcnn, keypoint_rcnn]


YOLO_FRONTEND = {"batchSize": 3, "maxBatchDelay": 1000}


def yolov8_torchscript(folder: Path) -> Form:
    model = GridDetector("yolov8").eval()
    torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, 320, 320)), str(folder / "grid_v8.torchscript"))
    (folder / "rgb.txt").write_text("red\ngreen\nblue\n")
    make_vars = {"PT": str(folder / "grid_v8.torchscript"), "LABELS": str(folder / "rgb.txt"), "SIZE": "320"}
    return Form("yolo_v8", "detection", make_vars, model, {}, YOLO_FRONTEND)


def yolov5_onnx(folder: Path) -> Form:
    model = GridDetector("yolov5").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.rand(1, 3, 320, 320),), str(folder / "grid_v5.onnx"), input_names=["images"],
            output_names=["output0"], dynamic_axes={"images": {0: "n"}, "output0": {0: "n"}}, dynamo=False,
        )  # fmt: skip
    (folder / "rgb.txt").write_text("red\ngreen\nblue\n")
    make_vars = {"PT": str(folder / "grid_v5.onnx"), "LABELS": str(folder / "rgb.txt")}
    return Form("yolo_v5", "detection", make_vars, model, {}, YOLO_FRONTEND)


def end2end_exported(folder: Path) -> Form:
    model = GridDetector("end2end").eval()
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(model, (torch.rand(2, 3, 320, 320),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "grid_e2e.pt2"))
    (folder / "rgb.txt").write_text("red\ngreen\nblue\n")
    make_vars = {"PT": str(folder / "grid_e2e.pt2"), "LABELS": str(folder / "rgb.txt")}
    return Form("yolo_e2e", "detection", make_vars, model, {}, YOLO_FRONTEND)


YOLO_FORMS: list[Callable[[Path], Form]] = [yolov8_torchscript, yolov5_onnx, end2end_exported]


def apply_edits(folder: Path, form: Form) -> None:
    """Set the model-config keys a user would set by hand after scaffolding."""
    path = folder / "model-config.yaml"
    document = yaml.safe_load(path.read_text())
    document.update(form.frontend)
    for key, value in form.edits.items():
        if isinstance(value, dict) and isinstance(document["handler"].get(key), dict):
            merged = {**document["handler"][key]}
            for inner, item in value.items():
                merged[inner] = {**merged.get(inner, {}), **item} if isinstance(item, dict) else item
            document["handler"][key] = merged
        else:
            document["handler"][key] = value
    path.write_text(yaml.safe_dump(document, sort_keys=False))
