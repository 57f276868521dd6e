"""What ``make bench`` and its parts measure: the served rows (model, server, backend, archive, images,
concurrencies), the in-process backends, and a plan per mode; the row type every part shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

CPU = torch.device("cpu")


STORES = (Path("model_store"), Path("build/stock_store"))


AOTI_DIR = Path("build/aoti")


@dataclass(frozen=True)
class Served:
    """One served configuration: a TorchServe model name and how to label it."""

    model: str  # the demo model it serves (resnet18, ...)
    server: str  # "stock" or "kit"
    backend: str  # torch, onnx, int8, openvino, exported, aoti, compile
    archive: str  # the registered model name
    images: str = "same"  # "same": one image; "mixed": three sizes (detector, kit only); or a PHOTO_SETS key
    concurrencies: tuple[int, ...] | None = None  # None: the plan's


@dataclass(frozen=True)
class Plan:
    """What one bench mode runs."""

    seconds: float
    warmup: float
    concurrencies: tuple[int, ...]
    inprocess_seconds: float
    inprocess_batches: tuple[int, ...]
    served: tuple[Served, ...]
    backends: frozenset[str] = frozenset(("torch", "onnx", "int8", "openvino", "exported", "aoti", "compile"))


def _served(model: str, stock: bool, kit: Sequence[tuple[str, str]]) -> list[Served]:
    rows = [Served(model, "stock", "torch", f"{model}_stock")] if stock else []
    return rows + [Served(model, "kit", backend, archive) for backend, archive in kit]


RESNET_KIT = [
    ("torch", "resnet18"),
    ("onnx", "resnet18_onnx"),
    ("int8", "resnet18_int8"),
    ("exported", "resnet18_exported"),
    ("aoti", "resnet18_aoti"),
    ("compile", "resnet18_compile"),
]


FULL_SERVED = (
    *_served("resnet18", True, RESNET_KIT),
    *_served(
        "mobilenet_v3_small",
        True,
        [
            ("torch", "mobilenet_v3_small"),
            ("onnx", "mobilenet_v3_small_onnx"),
            ("int8", "mobilenet_v3_small_int8"),
        ],
    ),
    *_served("fasterrcnn", True, [("torch", "fasterrcnn"), ("onnx", "fasterrcnn_onnx")]),
    Served("fasterrcnn", "kit", "torch", "fasterrcnn", images="mixed"),
    Served("fasterrcnn", "kit", "onnx", "fasterrcnn_onnx", images="mixed"),
    *(Served(m, "triton", "onnx", m) for m in ("resnet18", "mobilenet_v3_small", "fasterrcnn")),
    Served("fasterrcnn", "triton", "onnx", "fasterrcnn", images="mixed"),
)


# The shapes detector (the yolo path): eager, ONNX and OpenVINO archives and the Triton ensemble, scenes of
# one size and of three sizes.
SHAPES_SERVED = tuple(
    Served("shapes", server, backend, archive, images=images)
    for images in ("same", "mixed")
    for server, backend, archive in (
        ("kit", "torch", "shapes"),
        ("kit", "onnx", "shapes_onnx"),
        ("kit", "openvino", "shapes_openvino"),
        ("triton", "onnx", "shapes"),
    )
)


# Photos as users send them (scripts/packaging/demo_models.py USER_IMAGES): the stock handler and the kit's archives.
PHOTO_SETS = ("phone", "1080p", "640x480", "screenshot")


PHOTOS_SERVED = (
    *(
        Served("resnet18", where, backend, archive, images=images, concurrencies=(16,))
        for images in PHOTO_SETS
        for where, backend, archive in (
            ("stock", "torch", "resnet18_stock"),
            ("kit", "torch", "resnet18"),
            ("kit", "int8", "resnet18_int8"),
            ("kit", "openvino", "resnet18_openvino"),
        )
    ),
    *(
        Served("mobilenet_v3_small", where, backend, archive, images="640x480", concurrencies=(16,))
        for where, backend, archive in (
            ("stock", "torch", "mobilenet_v3_small_stock"),
            ("kit", "torch", "mobilenet_v3_small"),
            ("kit", "int8", "mobilenet_v3_small_int8"),
            ("kit", "openvino", "mobilenet_v3_small_openvino"),
        )
    ),
)


QUICK_SERVED = (
    *_served("resnet18", True, [("torch", "resnet18"), ("int8", "resnet18_int8"), ("aoti", "resnet18_aoti")]),
    *_served("mobilenet_v3_small", True, [("onnx", "mobilenet_v3_small_onnx")]),
    *_served("fasterrcnn", True, [("torch", "fasterrcnn"), ("onnx", "fasterrcnn_onnx")]),
    Served("resnet18", "triton", "onnx", "resnet18"),
)


BACKENDS_SERVED = tuple(_served("resnet18", True, RESNET_KIT))


# The archive `make archive` builds against TorchServe's stock handler on the same weights and keys, at every
# image size users send (`make bench-plain`): a regression of the default path shows as a ratio below 1.0x.
# Every demo model TorchServe has a stock handler for (digits and shapes have none: their inputs and outputs
# are not ImageNet's or torchvision's detection dicts).
PLAIN_BACKENDS = {"resnet18": "torch", "mobilenet_v3_small": "torch", "fasterrcnn": "torch"}


PLAIN_SERVED = (
    *(
        Served(model, where, backend, archive, images=images, concurrencies=(16,))
        for model, backend in PLAIN_BACKENDS.items()
        if model != "fasterrcnn"
        for images in ("same", *PHOTO_SETS)
        for where, archive in (("stock", f"{model}_stock"), ("kit", model))
    ),
    *_served("fasterrcnn", True, [("torch", "fasterrcnn")]),
)


def unique(*groups: Sequence[Served]) -> tuple[Served, ...]:
    """The served rows of every group, each (model, server, backend, archive, images) once: the first wins."""
    seen: dict[tuple[str, ...], Served] = {}
    for group in groups:
        for s in group:
            seen.setdefault((s.model, s.server, s.backend, s.archive, s.images), s)
    return tuple(seen.values())


# Semantic segmentation (`make bench-seg`): torchvision's lraspp under the kit and under TorchServe's stock
# image_segmenter (224 x 224 center crop, a [class, probability] pair per pixel), answer bytes beside req/s;
# the trained shapes segmenter's ONNX graph under TorchServe and under the Triton ensemble.
SEG_SERVED = (
    *(
        Served("lraspp", where, "torch", archive, images=images, concurrencies=(4,))
        for images in ("same", "640x480", "1080p", "phone")
        for where, archive in (("stock", "lraspp_stock"), ("kit", "lraspp"))
    ),
    *(
        Served("shapes_seg", where, "onnx", archive, images=images, concurrencies=(8,))
        for images in ("same", "mixed")
        for where, archive in (("kit", "shapes_seg_onnx"), ("triton", "shapes_seg"))
    ),
)


# A DETR-family detector (`make bench-detr`): the seeded Hugging Face RT-DETR served by the kit (fixed
# 640 x 640 input, sigmoid scoring, no NMS) against the same network run raw in process.
DETR_SERVED = tuple(
    Served("hf_rtdetr", "kit", "torch", "hf_rtdetr", images=images, concurrencies=(4,)) for images in ("same", "mixed")
)


# What a timm and a Hugging Face classifier cost next to resnet18 (`make bench-zoo`): eager, ONNX Runtime and
# OpenVINO, served by the kit and run raw in process, on the same 451x300 JPEG.
ZOO_MODELS = ("resnet18", "timm_convnext", "hf_vit")


ZOO_SERVED = tuple(
    Served(model, "kit", backend, archive)
    for model in ZOO_MODELS
    for backend, archive in (
        ("torch", model),
        ("onnx", f"{model}_onnx"),
        ("openvino", f"{model}_openvino"),
    )
)


PLANS = {
    "full": Plan(
        15.0,
        4.0,
        (1, 4, 16),
        6.0,
        (1, 8),
        unique(FULL_SERVED, SHAPES_SERVED, PHOTOS_SERVED, PLAIN_SERVED, ZOO_SERVED, SEG_SERVED, DETR_SERVED),
    ),
    # Photos at the sizes users send (`make bench-photos`), at concurrency 16; also part of the full bench.
    "photos": Plan(10.0, 3.0, (16,), 4.0, (8,), PHOTOS_SERVED, frozenset(("torch", "int8", "openvino"))),
    # The shapes detector alone (`make bench-shapes`).
    "shapes": Plan(10.0, 3.0, (1, 4, 16), 4.0, (1, 8), SHAPES_SERVED),
    # Quick leaves out compile (minutes of inductor compilation on 2 cores): the full bench has it.
    # resnet18 on every backend, in process and served, side by side (`make bench-backends`).
    "backends": Plan(10.0, 4.0, (16,), 4.0, (1, 8), BACKENDS_SERVED),
    "zoo": Plan(10.0, 3.0, (1, 16), 4.0, (1, 8), ZOO_SERVED, frozenset(("torch", "onnx", "openvino"))),
    "segmentation": Plan(10.0, 3.0, (4,), 4.0, (1, 4), SEG_SERVED, frozenset(("torch", "onnx"))),
    "detr": Plan(10.0, 3.0, (4,), 4.0, (1, 4), DETR_SERVED, frozenset(("torch",))),
    "plain": Plan(10.0, 3.0, (16,), 4.0, (8,), PLAIN_SERVED, frozenset(("torch",))),
    "quick": Plan(
        5.0,
        2.0,
        (16,),
        2.0,
        (8,),
        QUICK_SERVED,
        frozenset(("torch", "onnx", "int8", "exported", "aoti")),
    ),
}


INPROCESS = {
    "resnet18": ("torch", "onnx", "int8", "openvino", "exported", "aoti", "compile"),
    "mobilenet_v3_small": ("torch", "onnx", "int8"),
    "fasterrcnn": ("torch", "onnx"),
    "shapes": ("torch", "onnx", "openvino"),
    "timm_convnext": ("torch", "onnx", "openvino"),
    "lraspp": ("torch",),
    "shapes_seg": ("torch", "onnx"),
    "hf_vit": ("torch", "onnx", "openvino"),
    "hf_rtdetr": ("torch",),
}


@dataclass
class Row:
    """One line of the results table."""

    model: str
    where: str  # "in-process", "stock", "kit"
    backend: str
    images: str
    concurrency: int  # the batch size for in-process rows
    rate: float  # req/s served, or img/s in process
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    peak_worker_mib: float = float("nan")  # the largest RSS of one of the archive's workers during the row
    stage_ms: dict[str, float] = field(default_factory=dict)
    answer_bytes: int = 0  # the JSON answer to the row's first image


FIDELITY_MODELS = ("digits", "resnet18", "mobilenet_v3_small")


COMMANDS = {
    "full": "make bench",
    "quick": "make bench-quick",
    "backends": "make bench-backends",
    "shapes": "make bench-shapes",
    "photos": "make bench-photos",
    "zoo": "make bench-zoo",
    "plain": "make bench-plain",
    "segmentation": "make bench-seg",
    "detr": "make bench-detr",
}
