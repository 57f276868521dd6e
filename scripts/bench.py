"""``make bench`` / ``make bench-quick``: the kit side by side with the raw model and TorchServe's stock handlers.

One run, the same weights, images and client for every row:

1. the raw model in process, per backend (torch eager, ONNX Runtime fp32, ONNX Runtime int8): the ceiling;
2. TorchServe with its stock handler (``image_classifier``, ``object_detector``) on the same weights;
3. TorchServe with the kit's handlers, per backend.

Served rows use a closed-loop client (``scripts/loadgen.py``) at each concurrency for a fixed time after
a warm-up, count errors, and read the kit's per-stage milliseconds from its Prometheus counters. Writes
``results.md``, ``results.json`` and PNG plots to the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
import torch
import yaml

import demo_models
from client import KeyRing, RestClient
from loadgen import LoadResult, closed_loop, servekit_counters
from servekit.config import ClassifierConfig, CompileSettings, SegmenterConfig, read_model_config
from servekit.loading import compile_module, load_model
from servekit.onnx_backend import load_onnx
from servekit.openvino_backend import load_openvino
from servekit.program_backend import load_aoti, load_exported
from servekit.service import detr_item
from servekit.transforms import classifier_batch, detector_inputs, segmenter_input
from servekit.yolo import letterbox
from tsctl import Endpoints, Keys, TorchServe, derive_config, random_endpoints, worker_pids

logger = logging.getLogger("bench")
CPU = torch.device("cpu")
STORES = (Path("model_store"), Path("build/stock_store"))
AOTI_DIR = Path("build/aoti")


@dataclass(frozen=True)
class Served:
    """One served configuration: a TorchServe model name and how to label it."""

    model: str  # the demo model it serves (resnet18, ...)
    server: str  # "stock" or "kit"
    backend: str  # torch, torchscript, onnx, int8
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
    backends: frozenset[str] = frozenset(
        ("torch", "torchscript", "onnx", "int8", "openvino", "exported", "aoti", "compile")
    )


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
            ("torchscript", "mobilenet_v3_small"),
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
# The shapes detector (the yolo path): TorchScript and ONNX archives and the Triton ensemble, scenes of
# one size and of three sizes.
SHAPES_SERVED = tuple(
    Served("shapes", server, backend, archive, images=images)
    for images in ("same", "mixed")
    for server, backend, archive in (
        ("kit", "torchscript", "shapes"),
        ("kit", "onnx", "shapes_onnx"),
        ("kit", "openvino", "shapes_openvino"),
        ("triton", "onnx", "shapes"),
    )
)
# Photos as users send them (scripts/demo_models.py USER_IMAGES): the stock handler and the kit's archives.
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
            ("kit", "torchscript", "mobilenet_v3_small"),
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
PLAIN_BACKENDS = {"resnet18": "torch", "mobilenet_v3_small": "torchscript", "fasterrcnn": "torch"}
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
    "segmentation": Plan(10.0, 3.0, (4,), 4.0, (1, 4), SEG_SERVED, frozenset(("torch", "torchscript", "onnx"))),
    "detr": Plan(10.0, 3.0, (4,), 4.0, (1, 4), DETR_SERVED, frozenset(("torch",))),
    "plain": Plan(10.0, 3.0, (16,), 4.0, (8,), PLAIN_SERVED, frozenset(("torch", "torchscript"))),
    "quick": Plan(
        5.0,
        2.0,
        (16,),
        2.0,
        (8,),
        QUICK_SERVED,
        frozenset(("torch", "torchscript", "onnx", "int8", "exported", "aoti")),
    ),
}
INPROCESS = {
    "resnet18": ("torch", "onnx", "int8", "openvino", "exported", "aoti", "compile"),
    "mobilenet_v3_small": ("torchscript", "onnx", "int8"),
    "fasterrcnn": ("torch", "onnx"),
    "shapes": ("torchscript", "onnx", "openvino"),
    "timm_convnext": ("torch", "onnx", "openvino"),
    "lraspp": ("torch",),
    "shapes_seg": ("torchscript", "onnx"),
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


# ---------------------------------------------------------------- in process


def backend_model(name: str, backend: str, onnx_dir: Path, batches: Sequence[int]) -> Callable[[Any], Any]:
    """The network of ``name`` on ``backend``, as the kit's services call it (``make aoti`` builds the .pt2)."""
    threads = torch.get_num_threads()
    if backend in ("onnx", "int8"):
        return load_onnx(onnx_dir / name / ("model.onnx" if backend == "onnx" else "model.int8.onnx"), CPU, threads)
    if backend == "openvino":
        return load_openvino(onnx_dir / name / "model.onnx", CPU, threads)
    if backend == "exported":
        return load_exported(AOTI_DIR / name / "program.pt2", CPU)
    if backend == "aoti":
        return load_aoti(AOTI_DIR / name / "model.pt2", CPU, max(batches))
    folder = Path("models") / name
    config = read_model_config(folder)
    model = load_model(folder, config.model, CPU)
    if backend == "compile" and isinstance(config, ClassifierConfig):
        warmup = [torch.zeros(b, 3, *config.input_size) for b in batches]
        return compile_module(model, CompileSettings("default", False), warmup)
    return model


def images_per_second(model: Callable[[Any], Any], inputs: Any, count: int, seconds: float) -> float:
    """Run ``model(inputs)`` (``count`` images each) for ``seconds`` after two warm-up calls."""
    with torch.inference_mode():
        model(inputs)
        model(inputs)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(inputs)
            done += count
    return done / (time.perf_counter() - start)


def model_inputs(name: str, photo: Any, wanted: int) -> tuple[Any, int]:
    """What the kit's service hands ``name``'s network for a batch of ``wanted`` copies of one image."""
    config = read_model_config(Path("models") / name)
    pixels = torch.from_numpy(photo.copy()).permute(2, 0, 1)
    if isinstance(config, ClassifierConfig):
        return demo_models.classifier_inputs([photo] * wanted, config), wanted
    if isinstance(config, SegmenterConfig):
        return classifier_batch([segmenter_input(pixels, config)] * wanted, config), wanted
    if config.output == "detr":
        return classifier_batch([detr_item({"body": demo_models.encode(photo)}, config)[0]] * wanted, config), wanted
    if config.output == "yolo":
        square, _ = letterbox(pixels, config.input_size)
        return square.float().div(255).expand(wanted, -1, -1, -1).contiguous(), wanted
    batch = min(wanted, 4)  # the detector archive's batchSize
    return detector_inputs([pixels]) * batch, batch


def inprocess_rows(plan: Plan, onnx_dir: Path, photos: dict[str, Any], progress: Progress) -> list[Row]:
    rows = []
    served_models = {s.model for s in plan.served}
    for name, backends in INPROCESS.items():
        if name not in served_models:
            continue
        for backend in backends:
            if backend not in plan.backends:
                continue
            model = backend_model(name, backend, onnx_dir, plan.inprocess_batches)
            for wanted in plan.inprocess_batches:
                inputs, batch = model_inputs(name, photos.get(name, photos["*"]), wanted)
                rate = images_per_second(model, inputs, batch, plan.inprocess_seconds)
                rows.append(Row(name, "in-process", backend, "same", batch, rate))
                progress.step(f"{name} in process, {backend}, batch {batch}: {rate:.1f} img/s")
    return rows


# ---------------------------------------------------------------- served


def stage_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds per request of each handler stage between two counter readings."""
    requests_done = after.get("Requests", 0.0) - before.get("Requests", 0.0)
    if requests_done <= 0:
        return {}
    stages = {"preprocess": "PreprocessMs", "inference": "InferenceMs", "postprocess": "PostprocessMs"}
    per = {k: (after.get(v, 0.0) - before.get(v, 0.0)) / requests_done for k, v in stages.items()}
    per["batch"] = requests_done / max(1.0, after.get("Batches", 0.0) - before.get("Batches", 0.0))
    return per


class PeakMemory:
    """The largest RSS any of ``pids`` reaches, sampled every 50 ms on a thread while in the ``with``."""

    def __init__(self, pids: Sequence[int]) -> None:
        import threading

        self.pids, self.peak, self._stop = list(pids), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.05):
            for pid in self.pids:
                try:
                    self.peak = max(self.peak, psutil.Process(pid).memory_info().rss)
                except psutil.Error:
                    continue

    def __enter__(self) -> PeakMemory:
        if self.pids:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.pids:
            self._thread.join()


def served_row(
    served: Served,
    concurrency: int,
    plan: Plan,
    *,
    client: Any,
    payloads: list[bytes],
    metrics: str | None,
    workers: Callable[[str], list[int]] | None = None,
) -> Row:
    def send(number: int) -> int:
        return client.predict(served.archive, payloads[number % len(payloads)]).status

    def read() -> dict[str, float]:
        return servekit_counters(requests.get(metrics, timeout=10).text, served.archive) if metrics else {}

    first = client.predict(served.archive, payloads[0])
    before = read()
    with PeakMemory(workers(served.archive) if workers else []) as memory:
        load: LoadResult = closed_loop(send, concurrency=concurrency, seconds=plan.seconds, warmup=plan.warmup)
    row = Row(served.model, served.server, served.backend, served.images, concurrency, load.rate)
    row.peak_worker_mib = memory.peak / 2**20 if memory.peak else float("nan")
    row.p50_ms, row.p90_ms, row.p99_ms = (load.percentile(q) for q in (50, 90, 99))
    row.errors = load.errors
    row.stage_ms = stage_ms(before, read())
    row.answer_bytes = len(json.dumps(first.body)) if first.status == 200 else 0
    return row


def measure_all(
    rows_for: Sequence[Served],
    plan: Plan,
    *,
    payloads: dict[str, list[bytes]],
    client: Any,
    metrics: str | None,
    progress: Progress,
    workers: Callable[[str], list[int]] | None = None,
) -> list[Row]:
    """Every (configuration, concurrency) point against one running server."""
    rows = []
    for served in rows_for:
        for concurrency in served.concurrencies or plan.concurrencies:
            images = payloads.get(f"{served.model}:{served.images}", payloads[served.images])
            row = served_row(
                served, concurrency, plan, client=client, payloads=images, metrics=metrics, workers=workers
            )
            rows.append(row)
            progress.step(
                f"{served.model} {served.server} {served.backend} ({served.images} images) c={concurrency}: "
                f"{row.rate:.1f} req/s, p50 {row.p50_ms:.0f} ms, p99 {row.p99_ms:.0f} ms, {row.errors} errors"
            )
    return rows


def torchserve_rows(plan: Plan, payloads: dict[str, list[bytes]], workdir: Path, progress: Progress) -> list[Row]:
    wanted = [s for s in plan.served if s.server != "triton"]
    archives = sorted({s.archive for s in wanted})
    workdir.mkdir(parents=True, exist_ok=True)
    endpoints: Endpoints = random_endpoints()
    config = derive_config(Path("config.properties"), workdir / "config.properties", endpoints.properties())
    server = TorchServe(workdir, config, link_store(archives, workdir / "store"), [f"{a}={a}.mar" for a in archives])
    progress.note(f"starting TorchServe with {len(archives)} archives: {', '.join(archives)}")
    server.start()
    try:
        server.wait_ready(archives, timeout=600)
        client = RestClient(server.endpoints, KeyRing(server.workdir / "key_file.json"))
        metrics = f"{server.endpoints.url('metrics')}/metrics"
        keys = Keys.read(server.workdir / "key_file.json")
        return measure_all(
            wanted,
            plan,
            payloads=payloads,
            client=client,
            metrics=metrics,
            progress=progress,
            workers=lambda archive: worker_pids(server.endpoints, keys, archive),
        )
    finally:
        server.stop()


def triton_rows(plan: Plan, payloads: dict[str, list[bytes]], workdir: Path, progress: Progress) -> list[Row]:
    """The same load through tritonclient (HTTP) against the bundled tritonserver over the CPU repository."""
    from client import TritonClient
    from tritonctl import Triton, TritonEndpoints

    wanted = [s for s in plan.served if s.server == "triton"]
    if not wanted:
        return []
    ensembles = sorted({s.archive for s in wanted})
    server = Triton(workdir, Path("model_repository/cpu"), ensembles, TritonEndpoints.random())
    progress.note(f"starting tritonserver with ensembles: {', '.join(ensembles)}")
    server.start()
    try:
        server.wait_ready()
        client = TritonClient(server.endpoints.http_url, "http")
        return measure_all(wanted, plan, payloads=payloads, client=client, metrics=None, progress=progress)
    finally:
        server.stop()


def link_store(archives: Sequence[str], store: Path) -> Path:
    """A model store holding just ``archives`` (hard links to ``model_store/`` and ``build/stock_store/``)."""
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    for name in archives:
        source = next((d / f"{name}.mar" for d in STORES if (d / f"{name}.mar").is_file()), None)
        if source is None:
            raise SystemExit(f"{name}.mar is missing; `make bench` builds it")
        (store / source.name).hardlink_to(source.resolve())
    return store


# ---------------------------------------------------------------- report


class Progress:
    """One line per finished step, with the count and the time so far."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        logger.info("[%d/%d %4.0fs] %s", self.done, self.total, time.monotonic() - self.start, text)

    def note(self, text: str) -> None:
        logger.info("[%d/%d %4.0fs] %s", self.done, self.total, time.monotonic() - self.start, text)


def rate_of(rows: Sequence[Row], **match: Any) -> float | None:
    found = [r.rate for r in rows if all(getattr(r, k) == v for k, v in match.items())]
    return max(found) if found else None


PHOTO_TARGETS = (  # (model, images, target ratio of the kit's fastest archive to the stock handler)
    ("resnet18", "phone", 5.0),
    ("resnet18", "640x480", 2.5),
    ("mobilenet_v3_small", "640x480", 2.0),
    ("resnet18", "1080p", 3.0),
)
PHOTO_NAMES = {
    "phone": "4032x3024 JPEG",
    "1080p": "1920x1080 JPEG",
    "640x480": "640x480 JPEG",
    "screenshot": "1280x800 PNG",
    "same": "451x300 JPEG",
}
MEMORY_TARGET_MIB = 1.5 * 1024


def targets(rows: Sequence[Row], concurrency: int) -> list[tuple[str, str, float | None, float]]:
    """The issues' ratios: (what, how it is computed, measured, target)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def served(model: str, where: str, images: str = "same", **match: Any) -> float | None:
        return rate_of(rows, model=model, where=where, concurrency=concurrency, images=images, **match)

    how = f"req/s at c={concurrency}"
    out = [
        (
            "kit fastest vs stock, resnet18, 451x300",
            how,
            ratio(served("resnet18", "kit"), served("resnet18", "stock")),
            2.0,
        ),
        (
            "kit fastest vs stock, mobilenet_v3_small, 451x300",
            how,
            ratio(served("mobilenet_v3_small", "kit"), served("mobilenet_v3_small", "stock")),
            1.5,
        ),
        (
            "kit vs stock object_detector, same-size",
            how,
            ratio(served("fasterrcnn", "kit"), served("fasterrcnn", "stock")),
            1.2,
        ),
        (
            "kit resnet18.mar (as make archive builds it) vs stock, 451x300",
            how,
            ratio(served("resnet18", "kit", backend="torch"), served("resnet18", "stock")),
            1.5,
        ),
    ]
    for model, images, target in PHOTO_TARGETS:
        what = f"kit fastest vs stock, {model}, {PHOTO_NAMES[images]}"
        out.append((what, how, ratio(served(model, "kit", images), served(model, "stock", images)), target))
    for model in ("resnet18", "mobilenet_v3_small", "fasterrcnn", "shapes"):
        what = f"kit vs Triton, same backend (ONNX), {model}"
        out.append(
            (what, how, ratio(served(model, "kit", backend="onnx"), served(model, "triton", backend="onnx")), 1.0)
        )
    batch = max(r.concurrency for r in rows if r.where == "in-process")
    for model in ("resnet18", "mobilenet_v3_small"):
        for backend in INPROCESS[model]:
            kit = served(model, "kit", backend=backend)
            raw = rate_of(rows, model=model, where="in-process", backend=backend, concurrency=batch)
            what = f"kit served vs raw in process, {model} {backend}"
            out.append((what, f"req/s at c={concurrency} / img/s at batch {batch}", ratio(kit, raw), 0.9))
        int8 = rate_of(rows, model=model, where="in-process", backend="int8", concurrency=batch)
        fp32 = rate_of(rows, model=model, where="in-process", backend="onnx", concurrency=batch)
        out.append((f"int8 vs fp32 ONNX Runtime, {model}", f"img/s at batch {batch}", ratio(int8, fp32), 1.5))
    return out


def peak_memory(rows: Sequence[Row]) -> float | None:
    """The largest worker RSS (MiB) seen while 16 concurrent 12 MP phone photos were served to a classifier
    (the segmenter's 12 MP rows, at concurrency 4, hold a label map of the photo's size: reported apart)."""
    seen = [
        r.peak_worker_mib
        for r in rows
        if r.images == "phone" and r.where == "kit" and r.concurrency == 16 and r.peak_worker_mib > 0
    ]
    return max(seen) if seen else None


def shapes_ratios(rows: Sequence[Row]) -> list[tuple[str, float | None]]:
    """The shapes detector side by side: served vs raw, Triton vs TorchServe, mixed vs one size."""

    def rate(**match: Any) -> float | None:
        return rate_of(rows, model="shapes", **match)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    top = max((r.concurrency for r in rows if r.model == "shapes" and r.where != "in-process"), default=0)
    batch = max((r.concurrency for r in rows if r.model == "shapes" and r.where == "in-process"), default=0)
    out = []
    for backend in INPROCESS["shapes"]:
        served = rate(where="kit", backend=backend, images="same", concurrency=top)
        raw = rate(where="in-process", backend=backend, concurrency=batch)
        out.append((f"kit served (c={top}) / raw in process (batch {batch}), {backend}", ratio(served, raw)))
    for images in ("same", "mixed"):
        triton = rate(where="triton", backend="onnx", images=images, concurrency=top)
        kit = rate(where="kit", backend="onnx", images=images, concurrency=top)
        out.append((f"Triton / TorchServe kit, ONNX, {images} images, c={top}", ratio(triton, kit)))
    for where in ("kit", "triton"):
        mixed = rate(where=where, backend="onnx", images="mixed", concurrency=top)
        same = rate(where=where, backend="onnx", images="same", concurrency=top)
        out.append((f"{where} mixed sizes / one size, ONNX, c={top}", ratio(mixed, same)))
    return out


def target_lines(rows: Sequence[Row]) -> list[str]:
    """The targets table: each ratio this run measured, with its target and whether it was met."""
    lines = ["| measure | how | measured | target | met |", "|---|---|---|---|---|"]
    top = max(r.concurrency for r in rows if r.where != "in-process")
    for what, how, value, target in targets(rows, top):
        if value is None:
            continue  # a model, image set or server this plan does not run
        met = "yes" if value >= target else "no"
        lines.append(f"| {what} | {how} | {value:.2f}x | >= {target}x | {met} |")
    memory = peak_memory(rows)
    if memory is not None:
        met = "yes" if memory <= MEMORY_TARGET_MIB else "no"
        lines.append(
            f"| peak worker memory, 16 concurrent 12 MP requests | largest worker RSS | {memory:.0f} MiB "
            f"| <= {MEMORY_TARGET_MIB:.0f} MiB | {met} |"
        )
    return lines


TUNE_DIR = Path("build/tune")
TUNE_TARGET = 0.95


def tuned_lines(tune_dir: Path = TUNE_DIR, models_dir: Path = Path("models")) -> list[str]:
    """Shipped settings against ``make tune``'s best, per demo model (from its own run, not this one)."""
    lines = []
    for report in sorted(tune_dir.glob("*/results.json")):
        found = json.loads(report.read_text(encoding="utf-8"))
        config = models_dir / found["model"] / "model-config.yaml"
        if not config.is_file():
            continue
        document = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        chosen = found["chosen"]
        now = (int(document.get("batchSize", 1)), int(document.get("maxBatchDelay", 100)))
        keys = (
            "measured before the shipped keys were set to its chosen batch/delay"
            if now == (chosen["batch"], chosen["delay_ms"])
            else "shipped keys unchanged since"
        )
        value = found.get("shipped_vs_best_same_archive")
        if value is None:
            continue
        met = "yes" if value >= TUNE_TARGET else "no"
        lines.append(
            f"| shipped vs tuned best, {found['model']} (archive {found['shipped']['archive']}) "
            f"| make tune MODEL={found['model']}, req/s at c={found['concurrency']}, same p99; "
            f"{keys} | {value:.2f}x | >= {TUNE_TARGET}x | {met} |"
        )
    return lines


def plain_lines(rows: Sequence[Row]) -> list[str]:
    """The archive ``make archive`` builds against the stock handler, per model and image size, same run."""
    top = max((r.concurrency for r in rows if r.where == "stock"), default=0)
    found = []
    for model, backend in PLAIN_BACKENDS.items():
        for images in ("same", *PHOTO_SETS):
            stock = rate_of(rows, model=model, where="stock", images=images, concurrency=top)
            kit = rate_of(rows, model=model, where="kit", backend=backend, images=images, concurrency=top)
            if stock and kit:
                flag = " **below stock**" if kit < stock else ""
                shown = PHOTO_NAMES.get(images, images)
                found.append(f"| {model} | {shown} | {stock:.1f} | {kit:.1f} | {kit / stock:.2f}x{flag} |")
    if not found:
        return []
    return [
        "",
        f"## The plain archive (what `make archive` builds) against TorchServe's stock handler, c={top}, same run",
        "",
        "| model | images | stock req/s | kit req/s | kit / stock |",
        "|---|---|---|---|---|",
        *found,
    ]


def segmentation_lines(rows: Sequence[Row]) -> list[str]:
    """Segmenters side by side: throughput and the bytes of one answer, per handler and image size."""
    found = [r for r in rows if r.model in ("lraspp", "shapes_seg") and r.where != "in-process"]
    if not found:
        return []
    lines = ["", "## Semantic segmentation (same run)", ""]
    lines += [
        "| model | handler | backend | images | c | req/s | p50 ms | answer bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in found:
        shown = PHOTO_NAMES.get(r.images, r.images)
        lines.append(
            f"| {r.model} | {r.where} | {r.backend} | {shown} | {r.concurrency} | {r.rate:.1f} | {r.p50_ms:.0f} "
            f"| {r.answer_bytes:,} |"
        )
    return lines


def detr_lines(rows: Sequence[Row]) -> list[str]:
    """The DETR-family detector served against its network run raw in process on preprocessed tensors."""
    batch = max((r.concurrency for r in rows if r.model == "hf_rtdetr" and r.where == "in-process"), default=0)
    raw = rate_of(rows, model="hf_rtdetr", where="in-process", concurrency=batch)
    found = [r for r in rows if r.model == "hf_rtdetr" and r.where == "kit"]
    if not raw or not found:
        return []
    lines = ["", "## A DETR-family detector served vs raw (seeded RT-DETR, 640 x 640, same run)", ""]
    lines += [f"| images | c | served req/s | p50 ms | raw img/s (batch {batch}) | served / raw |", "|---" * 6 + "|"]
    for r in found:
        shown = PHOTO_NAMES.get(r.images, r.images)
        lines.append(f"| {shown} | {r.concurrency} | {r.rate:.1f} | {r.p50_ms:.0f} | {raw:.1f} | {r.rate / raw:.2f}x |")
    return lines


def markdown(rows: Sequence[Row], plan_name: str, fidelity_report: dict[str, Any], command: str) -> str:
    lines = [
        f"# Benchmark ({plan_name})",
        "",
        f"Command: `{command}`. Machine: {machine()}.",
        "",
        "## Targets",
        "",
        *target_lines(rows),
    ]
    if plan_name == "full":
        lines += tuned_lines()
    lines += plain_lines(rows)
    lines += segmentation_lines(rows)
    lines += detr_lines(rows)
    if any(r.model == "shapes" for r in rows):
        lines += ["", "## The shapes detector side by side (same run)", "", "| ratio | measured |", "|---|---|"]
        lines += [f"| {what} | {value:.2f}x |" if value else f"| {what} | n/a |" for what, value in shapes_ratios(rows)]
    if rate_of(rows, model="resnet18", where="in-process", backend="torch"):
        lines += ["", "## Backends against eager torch (resnet18, in process, same run)", ""]
        lines += ["| backend | batch | img/s | vs eager |", "|---|---|---|---|"]
    for r in rows:
        eager = rate_of(rows, model="resnet18", where="in-process", backend="torch", concurrency=r.concurrency)
        if r.model == "resnet18" and r.where == "in-process" and eager:
            lines.append(f"| {r.backend} | {r.concurrency} | {r.rate:.1f} | {r.rate / eager:.2f}x |")
    lines += ["", "## In process (the model alone, preprocessed tensors)", ""]
    lines += ["| model | backend | batch | img/s |", "|---|---|---|---|"]
    lines += [f"| {r.model} | {r.backend} | {r.concurrency} | {r.rate:.1f} |" for r in rows if r.where == "in-process"]
    lines += ["", "## Served (closed loop, JPEG bodies; TorchServe over REST, Triton over tritonclient HTTP)", ""]
    lines += [
        "| model | handler | backend | images | concurrency | req/s | p50 ms | p90 ms | p99 ms | errors "
        "| mean batch | pre ms | infer ms | post ms | peak worker MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.where == "in-process":
            continue
        s = r.stage_ms
        stages = " | ".join(
            f"{s[k]:.2f}" if k in s else "-" for k in ("batch", "preprocess", "inference", "postprocess")
        )
        lines.append(
            f"| {r.model} | {r.where} | {r.backend} | {r.images} | {r.concurrency} | {r.rate:.1f} | {r.p50_ms:.0f} "
            f"| {r.p90_ms:.0f} | {r.p99_ms:.0f} | {r.errors} | {stages} | {r.peak_worker_mib:.0f} |"
        )
    lines += [
        "",
        "Stage times are the kit handler's milliseconds per request (a batch's time shared by its requests).",
        "",
    ]
    lines += ["## Fidelity against eager fp32 (fixed image set)", ""]
    lines += ["| model | backend | max abs prob diff | top-1 agreement | accuracy |", "|---|---|---|---|---|"]
    for model, backends in fidelity_report.items():
        for backend, f in backends.items():
            acc = f"{f['accuracy'] * 100:.1f} %" if "accuracy" in f else "-"
            lines.append(
                f"| {model} | {backend} | {f['max_abs_probability']:.2e} | {f['top1_agreement'] * 100:.1f} % | {acc} |"
            )
    return "\n".join(lines) + "\n"


def machine() -> str:
    import os

    from servekit.host import cpu_flags, cpu_model

    cpu = cpu_model() or "cpu"

    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    flags = " ".join(f for f in wanted if f in cpu_flags()) or "none of AVX2/AVX-512/AMX"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores, {cpu} (flags: {flags}), torch {torch.__version__}, {gpu}"


def plots(rows: Sequence[Row], out: Path) -> list[Path]:
    """Throughput vs concurrency, and p50/p90/p99 latency at the top concurrency, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    served = [r for r in rows if r.where != "in-process"]
    models = sorted({r.model for r in served})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        series: dict[str, list[Row]] = {}
        for r in served:
            if r.model == model:
                series.setdefault(f"{r.where} {r.backend} ({r.images})", []).append(r)
        for label, points in series.items():
            ax.plot([p.concurrency for p in points], [p.rate for p in points], marker="o", label=label)
        ax.set(
            title=model,
            xlabel="concurrency",
            ylabel="req/s",
            xscale="log",
            xticks=sorted({r.concurrency for r in served}),
        )
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "throughput.png")
    fig.savefig(written[-1], dpi=110)
    top = max(r.concurrency for r in served)
    at_top = [r for r in served if r.concurrency == top]
    fig, ax = plt.subplots(figsize=(max(6, len(at_top) * 0.9), 4))
    labels = [f"{r.model}\n{r.where} {r.backend}\n{r.images}" for r in at_top]
    width = 0.27
    for k, (name, attr) in enumerate((("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"))):
        ax.bar([i + (k - 1) * width for i in range(len(at_top))], [getattr(r, attr) for r in at_top], width, label=name)
    ax.set_xticks(range(len(at_top)), labels, fontsize=6)
    ax.set(ylabel="ms", title=f"latency at concurrency {top}")
    ax.legend()
    fig.tight_layout()
    written.append(out / "latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close("all")
    return written


# ---------------------------------------------------------------- main


def payload_sets() -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """The 451x300 photo (as JPEG) for every row; three sizes for the mixed detector rows; the user-sized
    images (a 12 MP phone JPEG, a 1080p frame, a 640x480 JPEG, a 1280x800 PNG screenshot). The shapes
    detector gets held-out scenes instead: the first for "same"; the smallest, the middle and the largest
    of the first 20 for "mixed"."""
    import shapes

    photos = demo_models.sample_photos(("chelsea", "astronaut", "coffee"))
    jpegs = [demo_models.encode(photos[n], "JPEG", quality=90) for n in ("chelsea", "astronaut", "coffee")]
    ranked = sorted(shapes.held_out(20), key=lambda s: s.image.shape[0] * s.image.shape[1])
    scenes, one = [ranked[0], ranked[10], ranked[-1]], shapes.make_scene(shapes.HELD_OUT_SEED)
    named = dict(zip(("phone", "1080p", "640x480", "screenshot"), (n for n, *_ in demo_models.USER_IMAGES)))
    payloads = {
        **{key: [demo_models.user_image(name)] for key, name in named.items()},
        "same": jpegs[:1],
        "mixed": jpegs,
        "shapes:same": [shapes.encode_jpeg(one.image)],
        "shapes:mixed": [shapes.encode_jpeg(s.image) for s in scenes],
        "shapes_seg:same": [shapes.encode_jpeg(one.image)],
        "shapes_seg:mixed": [shapes.encode_jpeg(s.image) for s in scenes],
    }
    return {"*": photos["chelsea"], "shapes": one.image}, payloads


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


def render(plan_name: str, out: Path) -> None:
    """``results.md`` and the plots from the run saved in ``out/results.json`` (measured by ``run``)."""
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = [Row(**row) for row in saved["rows"]]
    (out / "results.md").write_text(markdown(rows, plan_name, saved["fidelity"], COMMANDS[plan_name]), encoding="utf-8")
    plots(rows, out)


def run(plan_name: str, out: Path, onnx_dir: Path) -> Path:
    plan = PLANS[plan_name]
    out.mkdir(parents=True, exist_ok=True)
    photos, payloads = payload_sets()
    models = {s.model for s in plan.served}
    per_batch = sum(len(plan.backends.intersection(b)) for m, b in INPROCESS.items() if m in models)
    inprocess_total = per_batch * len(plan.inprocess_batches)
    progress = Progress(inprocess_total + sum(len(s.concurrencies or plan.concurrencies) for s in plan.served))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = inprocess_rows(plan, onnx_dir, photos, progress)
    rows += torchserve_rows(plan, payloads, Path("build") / f"bench-{plan_name}-server", progress)
    rows += triton_rows(plan, payloads, Path("build") / f"bench-{plan_name}-triton", progress)
    import fidelity

    models = {"backends": ("resnet18",), "full": FIDELITY_MODELS, "quick": FIDELITY_MODELS}.get(plan_name, ())
    report = {
        m: fidelity.compare_backends(
            m, Path("models"), {"onnx": onnx_dir / m / "model.onnx", "int8": onnx_dir / m / "model.int8.onnx"}
        )
        for m in models
    }
    (out / "results.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "fidelity": report}, indent=1))
    render(plan_name, out)
    logger.info("wrote %s", out / "results.md")
    return out / "results.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=sorted(PLANS), default="full")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--onnx-dir", type=Path, default=Path("build/onnx"))
    parser.add_argument("--render", action="store_true", help="rewrite results.md from out/results.json only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.render:
        render(args.mode, args.out)
    else:
        run(args.mode, args.out, args.onnx_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
