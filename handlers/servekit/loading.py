"""One entry point that loads a model folder's network, whatever its format, plus labels and threads.

:func:`load_model` dispatches on ``handler.model.format`` to one small module per format:
``weights`` (``state_dict``, ``safetensors``; torchvision, timm or a user's class), ``hf_source``
(``transformers``), ``program_backend`` (``exported``, ``aoti``),
``onnx_backend`` (``onnx``), ``openvino_backend`` (``openvino``), ``executorch_backend`` (``executorch``) and
TorchScript here; ``precision: bf16``
wraps a torch model in autocast. Each returns something the services call alike.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from servekit.config import WEIGHT_FORMATS, CompileSettings, ModelSource
from servekit.errors import ConfigError, plain_line
from servekit.host import cpu_flags

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
    """Read a model folder's labels file (see :func:`parse_label_names`)."""
    if not path.is_file():
        raise ConfigError(f"labels file {path.name} is missing from the model folder")
    return parse_label_names(path.read_text(encoding="utf-8"), path.name)


def parse_label_names(text: str, name: str) -> list[str]:
    """Class names from a JSON list, TorchServe's ``{"0": "name"}`` (or ``{"0": ["id", "name"]}``)
    mapping, or plain text with one name a line."""
    try:
        data = json.loads(text)
    except ValueError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, list):
        return [str(x) for x in data]
    if isinstance(data, dict):
        try:
            indexed = {int(k): v for k, v in data.items()}
        except ValueError:
            raise ConfigError(f"labels file {name}: keys must be class indices") from None
        names = [indexed.get(i, i) for i in range(max(indexed, default=-1) + 1)]
        return [str(n[-1]) if isinstance(n, list) and n else str(n) for n in names]
    raise ConfigError(f"labels file {name} must hold a JSON list, an index->name mapping, or one name a line")


def load_model(model_dir: Path, source: ModelSource, device: torch.device) -> Any:
    """Build the network of a model folder on ``device``, in eval mode.

    Raises:
        ConfigError: a missing or damaged file, an unknown architecture, weights that do not fit
            it, or a file holding pickled code (refused; nothing in it runs).
    """
    path = model_dir / source.file
    if not path.is_file():
        raise ConfigError(f"model file {source.file} is missing from the model folder")
    if source.precision == "bf16" and device.type == "cpu":
        check_bf16(cpu_flags())
    model = LOADERS[source.format](path, model_dir, source, device).eval()
    if source.precision == "bf16" and source.format != "openvino":
        return Autocast(model, device)
    return model


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def check_bf16(flags: set[str]) -> None:
    """Refuse bf16 on a CPU that would only emulate it (slower than fp32, not faster).

    Raises:
        ConfigError: the CPU has neither AVX512-BF16 nor AMX.
    """
    if not any(flag in flags for flag in BF16_FLAGS):
        has = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags) or "none of AVX2/AVX-512"
        raise ConfigError(
            f"model.precision bf16 needs a CPU with AVX512-BF16 or AMX; this one has {has}: use fp32 (or int8)"
        )


class Autocast:
    """A torch model run under bf16 autocast; outputs come back as float32."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device_type = device.type

    def eval(self) -> Autocast:
        self.model.eval()
        return self

    def __call__(self, *args: Any) -> Any:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return _to_float(self.model(*args))


def _to_float(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, (list, tuple)):
        return type(output)(_to_float(o) for o in output)
    if isinstance(output, dict):
        return {k: _to_float(v) for k, v in output.items()}
    return output


def _weights(path: Path, model_dir: Path, source: ModelSource, device: torch.device) -> Any:
    from servekit.weights import load_weights

    return load_weights(path, model_dir, source).to(device)


def _transformers(path: Path, model_dir: Path, source: ModelSource, device: torch.device) -> Any:
    from servekit.hf_source import load_transformers

    return load_transformers(model_dir).to(device)


def _torchscript(path: Path, model_dir: Path, source: ModelSource, device: torch.device) -> Any:
    with warnings.catch_warnings():  # torch.jit.load warns that TorchScript is deprecated
        warnings.simplefilter("ignore")
        try:
            return torch.jit.load(str(path), map_location=device)
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot load {path.name} as TorchScript: {plain_line(str(exc)) or 'unreadable'}"
            ) from None


def _exported(path: Path, model_dir: Path, source: ModelSource, device: torch.device) -> Any:
    from servekit.program_backend import load_exported

    return load_exported(path, device, source.max_batch)


def _aoti(path: Path, model_dir: Path, source: ModelSource, device: torch.device) -> Any:
    from servekit.program_backend import load_aoti

    return load_aoti(path, device, source.max_batch)


def _onnx(path: Path, model_dir: Path, source: ModelSource, device: torch.device) -> Any:
    from servekit.onnx_backend import load_onnx

    return load_onnx(path, device, torch.get_num_threads(), source.max_batch)


def _openvino(path: Path, model_dir: Path, source: ModelSource, device: torch.device) -> Any:
    from servekit.openvino_backend import load_openvino

    return load_openvino(path, device, torch.get_num_threads(), source.precision)


def _executorch(path: Path, model_dir: Path, source: ModelSource, device: torch.device) -> Any:
    from servekit.executorch_backend import load_executorch

    return load_executorch(path, device, torch.get_num_threads(), source.max_batch)


Loader = Callable[[Path, Path, ModelSource, torch.device], Any]
LOADERS: dict[str, Loader] = {
    **dict.fromkeys(WEIGHT_FORMATS, _weights),
    "transformers": _transformers,
    "torchscript": _torchscript,
    "exported": _exported,
    "aoti": _aoti,
    "onnx": _onnx,
    "openvino": _openvino,
    "executorch": _executorch,
}


def compile_module(model: Any, settings: CompileSettings, warmup: list[torch.Tensor]) -> Any:
    """``torch.compile`` a module and run it once per warm-up batch, so no request pays a compile.

    Raises:
        ConfigError: the module is not a torch module, or compiling or a warm-up run failed.
    """
    from servekit.program_backend import BoundedBatch, torch_module

    module = torch_module(model)
    if module is None:
        raise ConfigError("handler.compile needs a torch module: a state_dict, safetensors or exported model")
    import torch._inductor.config as inductor

    try:
        compiled = torch.compile(module, mode=settings.mode, dynamic=settings.dynamic)
        if isinstance(model, BoundedBatch):  # an exported program: its batch bounds still split the batches
            compiled = model.with_run(compiled)
        # the graphs compile at their first call: every batch size a request can bring is warmed up here
        with torch.inference_mode(), inductor.patch(freezing=settings.freezing):
            for batch in warmup:
                compiled(batch)
    except Exception as exc:
        why = f"{type(exc).__name__}: {plain_line(str(exc))}"
        raise ConfigError(f"handler.compile (mode {settings.mode}) failed: {why}") from None
    logger.info("compiled with mode %s, warmed up at batch sizes %s", settings.mode, [len(b) for b in warmup])
    return compiled
