"""Running a benchmark plan: the raw model in process per backend, then every served row on one TorchServe and
on Triton through the closed-loop client, with the kit's per-stage milliseconds and the workers' peak memory."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests
import torch

import demo_models
from bench_plan import AOTI_DIR, CPU, INPROCESS, STORES, Plan, Row, Served
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


class Progress:
    """One line per finished step, with the count and the time so far."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        logger.info("[%d/%d %4.0fs] %s", self.done, self.total, time.monotonic() - self.start, text)

    def note(self, text: str) -> None:
        logger.info("[%d/%d %4.0fs] %s", self.done, self.total, time.monotonic() - self.start, text)


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
