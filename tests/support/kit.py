"""What the tests share besides fixtures: the repository's paths, the artifacts `make test` builds (archives,
ONNX graphs, the Triton repository), `make` run as a user runs it, and a real TorchServe as a context manager."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tsctl import Endpoints, Keys, TorchServe, derive_config, random_endpoints

REPO = Path(__file__).resolve().parents[2]
# the core and the tools, as the Makefile's PYTHONPATH has them (scripts/ grouped by what each part is for)
SOURCE_PATH = ":".join(
    str(REPO / d)
    for d in ("handlers", "scripts/packaging", "scripts/serve", "scripts/bench", "scripts/deploy", "scripts/eval")
)
MODEL_STORE = REPO / "model_store"
ONNX_DIR = REPO / "build" / "onnx"
TRITON_REPOSITORY = REPO / "model_repository"
# the detectors' ONNX Runtime archives, to compare with Triton's ONNX models
SERVED_VARIANTS = ["fasterrcnn_onnx", "shapes_onnx"]
# the ExecuTorch program of the digits (make pte MODEL=digits: format executorch), in the shared TorchServe
EDGE_ARCHIVES = ["digits_pte"]
MODELS = ("digits", "resnet18", "mobilenet_v3_small", "fasterrcnn", "shapes", "shapes_seg")
ZOO_DEMOS = ("timm_convnext", "hf_vit")  # a timm and a Hugging Face classifier, served and in the Triton repository
# the ensembles `make triton-repo` writes, and what the tests' tritonservers load from the CPU repository
# (a module may load more: TRITON_LOADS; each python step is a process of ~0.7 GB, on a 24 GB machine)
TRITON_MODELS = (*MODELS, *ZOO_DEMOS, "hf_rtdetr")
TRITON_SERVED = ["resnet18", "fasterrcnn", "shapes", "shapes_seg", *ZOO_DEMOS]


def archive(name: str) -> Path:
    path = MODEL_STORE / f"{name}.mar"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run the tests with `make test` (it builds the archives)")
    return path


def onnx_file(name: str, variant: str = "model.onnx") -> Path:
    path = ONNX_DIR / name / variant
    if not path.is_file():
        pytest.fail(f"{path} is missing: run the tests with `make test` (it runs `make onnx int8`)")
    return path


def triton_repository(kind: str) -> Path:
    path = TRITON_REPOSITORY / kind
    if not (TRITON_REPOSITORY / ".generated").is_file():
        pytest.fail(f"{path} is missing: run the tests with `make test` (it runs `make triton-repo`)")
    return path


def demo_data(name: str) -> Path:
    """A demo split ``make eval-data`` writes under build/data (``letters/test``, ``shapes/val``, ...)."""
    path = REPO / "build" / "data" / name
    if not path.is_dir():
        pytest.fail(f"{path} is missing: run the tests with `make test` (it runs `make eval-data`)")
    return path


def run_make(*args: str, **variables: Any) -> subprocess.CompletedProcess[str]:
    """``make --no-print-directory <args> VAR=value ...`` in the repo, output captured, run as a user's own
    top-level make would be (not as a sub-make of `make test`, whose MAKELEVEL turns ``make:`` into ``make[1]:``)."""
    command = ["make", "--no-print-directory", *args, *(f"{k}={v}" for k, v in variables.items())]
    env = {k: v for k, v in os.environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)


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
