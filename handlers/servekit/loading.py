"""Loading a model folder safely: state_dicts with ``weights_only=True``, TorchScript, labels, threads."""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
import torchvision

from servekit.config import ModelSource
from servekit.errors import ConfigError

logger = logging.getLogger(__name__)


def choose_device(gpu_id: int | None) -> torch.device:
    """Return the worker's CUDA device when CUDA is there and a gpu id was given, else the CPU."""
    if gpu_id is not None and gpu_id >= 0 and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def intra_op_threads(requested: int, workers: int, cores: int) -> int:
    """Threads per worker so that workers x threads does not exceed the cores (``requested`` wins if > 0)."""
    if requested > 0:
        return requested
    return max(1, cores // max(1, workers))


def load_labels(path: Path) -> list[str]:
    """Read labels from a JSON list, or a TorchServe-style ``{"0": "name", ...}`` mapping."""
    if not path.is_file():
        raise ConfigError(f"labels file {path.name} is missing from the model folder")
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return [str(x) for x in data]
    if isinstance(data, dict):
        try:
            indexed = {int(k): v for k, v in data.items()}
        except ValueError:
            raise ConfigError(f"labels file {path.name}: keys must be class indices") from None
        names = [indexed.get(i, i) for i in range(max(indexed, default=-1) + 1)]
        return [str(n[-1]) if isinstance(n, list) and n else str(n) for n in names]
    raise ConfigError(f"labels file {path.name} must hold a JSON list or an index->name mapping")


def load_model(model_dir: Path, source: ModelSource, device: torch.device) -> Any:
    """Build the network of a model folder on ``device``, in eval mode.

    An ONNX file opens an ONNX Runtime session with the worker's torch thread count.

    Raises:
        ConfigError: a missing file, an unknown architecture, or a ``.pt`` that holds pickled code
            rather than tensors (refused by ``torch.load(weights_only=True)``; nothing in it runs).
    """
    path = model_dir / source.file
    if not path.is_file():
        raise ConfigError(f"model file {source.file} is missing from the model folder")
    if source.format == "onnx":
        from servekit.onnx_backend import load_onnx

        return load_onnx(path, device, torch.get_num_threads())
    if source.format == "torchscript":
        model = torch.jit.load(str(path), map_location=device)
    else:
        model = _build_network(model_dir, source)
        model.load_state_dict(load_state_dict(path))
        model = model.to(device)
    return model.eval()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors only: a file holding pickled code is refused with a clear message."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"refused to load {path.name}: it is not a plain state_dict of tensors "
            f"(torch.load with weights_only=True said: {first})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path.name} holds a {type(state).__name__}, not a state_dict")
    return state


def _build_network(model_dir: Path, source: ModelSource) -> torch.nn.Module:
    kwargs: dict[str, Any] = dict(source.kwargs)
    if source.architecture is not None:
        try:
            builder = torchvision.models.get_model_builder(source.architecture)
        except ValueError:
            raise ConfigError(f"unknown torchvision architecture {source.architecture!r}") from None
        params = inspect.signature(builder).parameters
        kwargs.setdefault("weights", None)  # never download: the weights are in the .pt
        if "weights_backbone" in params:
            kwargs.setdefault("weights_backbone", None)
        return builder(**kwargs)
    assert source.model_file is not None and source.model_class is not None
    module_path = model_dir / source.model_file
    if not module_path.is_file():
        raise ConfigError(f"model_file {source.model_file} is missing from the model folder")
    spec = importlib.util.spec_from_file_location(f"servekit_user_model_{module_path.stem}", module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, source.model_class, None)
    if cls is None:
        raise ConfigError(f"model_class {source.model_class!r} is not defined in {source.model_file}")
    return cls(**kwargs)
