"""Shared fixtures: repo paths, real images, archives built by `make`, TorchServe's own loader, a real server."""

from __future__ import annotations

import contextlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import demo_models
import shapes
from tsctl import Endpoints, Keys, TorchServe, derive_config, random_endpoints

REPO = Path(__file__).resolve().parents[1]
# the core and the tools, as the Makefile's PYTHONPATH has them (scripts/ grouped by what each part is for)
SOURCE_PATH = ":".join(
    str(REPO / d) for d in ("handlers", "scripts/packaging", "scripts/serve", "scripts/bench", "scripts/deploy")
)
MODEL_STORE = REPO / "model_store"
# the detectors' ONNX Runtime archives, to compare with Triton's ONNX models
SERVED_VARIANTS = ["fasterrcnn_onnx", "shapes_onnx"]
MODELS = ("digits", "resnet18", "mobilenet_v3_small", "fasterrcnn", "shapes", "shapes_seg")
ZOO_DEMOS = ("timm_convnext", "hf_vit")  # a timm and a Hugging Face classifier, served and in the Triton repository


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real RGB photos shipped by scikit-image."""
    return demo_models.sample_photos()


@pytest.fixture(scope="session")
def jpegs(photos: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {name: demo_models.encode(image, "JPEG", quality=90) for name, image in photos.items()}


@pytest.fixture(scope="session")
def digits_test() -> tuple[list[bytes], list[int]]:
    """The held-out digits (never seen in training), as PNG bytes, with their labels."""
    images, labels = demo_models.digit_images("test")
    return [demo_models.encode(img, "PNG") for img in images], labels


@pytest.fixture(scope="session")
def shape_scenes() -> tuple[list[shapes.Scene], list[bytes]]:
    """The held-out shapes scenes (never in training) and their JPEG bytes."""
    scenes = shapes.held_out(shapes.HELD_OUT_COUNT)
    return scenes, [shapes.encode_jpeg(s.image) for s in scenes]


def archive(name: str) -> Path:
    path = MODEL_STORE / f"{name}.mar"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run the tests with `make test` (it builds the archives)")
    return path


@pytest.fixture(scope="session")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Extract a built .mar once per session, as TorchServe does, and return its folder."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"mar_{name}")
            with zipfile.ZipFile(archive(name)) as mar:
                mar.extractall(folder)
            cache[name] = folder
        return cache[name]

    return get


@dataclass
class LoadedHandler:
    """A .mar loaded in-process by TorchServe's own model loader, driven like its worker does."""

    service: Any

    def handle(self, rows: list[dict[str, Any]]) -> list[tuple[int, Any]]:
        """Run one batch; return (status, parsed JSON body) per row."""
        from ts.context import RequestProcessor

        context = self.service.context
        context.request_processor = [RequestProcessor({}) for _ in rows]
        context.request_ids = {i: f"req-{i}" for i in range(len(rows))}
        context.metrics.request_ids = context.request_ids
        bodies = self.service._entry_point(rows, context)
        assert isinstance(bodies, list) and len(bodies) == len(rows)
        statuses = [context.get_response_status(i)[0] or 200 for i in range(len(rows))]
        return [(s, json.loads(b)) for s, b in zip(statuses, bodies)]


@pytest.fixture(scope="session")
def load_handler(extracted: Any) -> Any:
    """Load an archive's handler through ``ts.model_loader.TsModelLoader`` with a real metrics cache."""
    import ts
    import yaml
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader

    cache: dict[str, LoadedHandler] = {}

    def get(name: str) -> LoadedHandler:
        if name not in cache:
            folder = extracted(name)
            manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
            metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
            metrics.initialize_cache()
            service = TsModelLoader().load(
                name, str(folder), manifest["model"]["handler"], None, 8, metrics_cache=metrics
            )
            assert service.context.model_yaml_config == yaml.safe_load((folder / "model-config.yaml").read_text())
            cache[name] = LoadedHandler(service)
        return cache[name]

    return get


@dataclass
class Server:
    """A running TorchServe started from the shipped config.properties (only the ports changed)."""

    process: TorchServe
    keys: Keys

    @property
    def endpoints(self) -> Endpoints:
        return self.process.endpoints

    @property
    def key_file(self) -> Path:
        return self.process.workdir / "key_file.json"


@contextlib.contextmanager
def serving(workdir: Path, store: Path, served: list[str], timeout: float = 300) -> Iterator[Server]:
    """A real `torchserve` from the shipped config.properties (free loopback ports, token auth on)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = derive_config(REPO / "config.properties", workdir / "config.properties", random_endpoints().properties())
    process = TorchServe(workdir, config, store, [f"{n}={n}.mar" for n in served])
    process.start()
    try:
        keys = process.wait_ready(served, timeout=timeout)
        yield Server(process, keys)
    finally:
        process.stop()
    assert process.processes() == [], "torchserve left processes behind"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real `torchserve` serving every demo archive on free loopback ports, token auth on."""
    served = [*MODELS, *SERVED_VARIANTS, *ZOO_DEMOS]
    for name in served:
        archive(name)
    with serving(tmp_path_factory.mktemp("torchserve"), MODEL_STORE, served) as running:
        yield running
