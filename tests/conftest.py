"""Shared fixtures: real images, archives built by `make` extracted and loaded by TorchServe's own loader, a real
server. Plain helpers (paths, artifacts, `make`, a TorchServe context) are in ``support/kit.py``: a conftest is
not imported by name."""

from __future__ import annotations

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
from kit import EDGE_ARCHIVES, MODEL_STORE, MODELS, SERVED_VARIANTS, ZOO_DEMOS, Server, archive, serving


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


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real `torchserve` serving every demo archive on free loopback ports, token auth on."""
    served = [*MODELS, *SERVED_VARIANTS, *ZOO_DEMOS, *EDGE_ARCHIVES]
    for name in served:
        archive(name)
    with serving(tmp_path_factory.mktemp("torchserve"), MODEL_STORE, served) as running:
        yield running
