"""The ``exported`` (``torch.export``) and ``aoti`` (AOTInductor package) formats.

Both are graphs traced for input shapes fixed when they were made: a program exported with batch 1
takes only batch 1. :class:`BoundedBatch` runs a batch in chunks the graph accepts, padding a chunk
when the graph's batch size is static, so a TorchServe batch of 8 works against any of them.

An AOTInductor package is native code compiled for one CPU instruction set or GPU: loading one runs
that code, so load only packages you built (``make aoti``), never one taken from a stranger.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from servekit.errors import ConfigError, plain_line, require
from servekit.host import cpu_flags

logger = logging.getLogger(__name__)
# CPU instruction sets an AOTInductor package may be compiled for, from the lowest.
# Package metadata written by `make aoti` (scripts/packaging/compile_aoti.py): batch range "1-8", size "224x224".
SERVEKIT_BATCH, SERVEKIT_SIZE = "servekit_batch", "servekit_size"
# `make aoti` compiles for batches of at most this many; a larger batchSize runs in chunks. (torch 2.14.1:
# a package exported with a dynamic batch up to 16 or more refused batches over 15 at run time.)
AOTI_MAX_BATCH = 8
_ISA_FLAGS = {"AVX2": ("avx2",), "AVX512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")}


@dataclass(frozen=True)
class InputSpec:
    """What a traced graph's image input accepts: a batch range (None: any) and static H, W if any."""

    min_batch: int = 1
    max_batch: int | None = None
    height: int | None = None
    width: int | None = None

    @property
    def static_batch(self) -> bool:
        return self.max_batch is not None and self.min_batch == self.max_batch


class BoundedBatch:
    """Run a graph on a batch in chunks of sizes it accepts; results concatenated in order."""

    def __init__(
        self, run: Callable[[torch.Tensor], Any], spec: InputSpec, device: torch.device, program: Any = None
    ) -> None:
        self.run = run
        self.spec = spec
        self.device = device
        self.program = program  # the ExportedProgram ``run`` is the module of (format exported), else None

    def with_run(self, run: Callable[[torch.Tensor], Any]) -> BoundedBatch:
        """The same bounds around another callable (the module compiled, say)."""
        return BoundedBatch(run, self.spec, self.device, self.program)

    def eval(self) -> BoundedBatch:
        return self

    def __call__(self, batch: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        size = self.spec.max_batch or len(batch)
        outputs = [self._chunk(batch[i : i + size]) for i in range(0, len(batch), size)]
        if isinstance(outputs[0], tuple):  # several batch-major outputs (a DETR graph's logits and boxes)
            return tuple(torch.cat(parts) for parts in zip(*outputs))
        return torch.cat(outputs)

    def _chunk(self, chunk: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        wanted = max(len(chunk), self.spec.min_batch)
        if self.spec.static_batch:
            wanted = self.spec.max_batch or wanted
        padded = chunk
        if wanted > len(chunk):
            padded = torch.cat([chunk, chunk[-1:].expand(wanted - len(chunk), *chunk.shape[1:])])
        out = self.run(padded.to(self.device).contiguous())
        if isinstance(out, (tuple, list)):
            batched = all(isinstance(o, torch.Tensor) and o.dim() and o.shape[0] == wanted for o in out)
            if len(out) > 1 and batched:
                return tuple(o[: len(chunk)] for o in out)
            out = out[0]
        return out[: len(chunk)]


def exported_input_spec(program: Any) -> InputSpec:
    """The image input's batch range and static height/width of an ``ExportedProgram``."""
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ConfigError(f"the exported program takes {len(user_inputs)} inputs; an image model takes one")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    value = node.meta.get("val")
    if value is None or value.dim() != 4:
        raise ConfigError("the exported program's input is not an N x 3 x H x W image batch")
    dims = list(value.shape)
    ranges = {str(sym): rng for sym, rng in program.range_constraints.items()}

    def bounds(dim: Any) -> tuple[int, int | None]:
        if isinstance(dim, int):
            return dim, dim
        rng = ranges.get(str(dim))
        if rng is None:
            return 1, None
        upper = rng.upper
        return max(1, int(rng.lower)), (None if upper is None or str(upper) in ("oo", "int_oo") else int(upper))

    low, high = bounds(dims[0])
    height = dims[2] if isinstance(dims[2], int) else None
    width = dims[3] if isinstance(dims[3], int) else None
    return InputSpec(low, high, height, width)


QUANTIZED_OPS = b"quantized_decomposed"  # the namespace of pt2e's quantize/dequantize ops (torchao registers it)


def holds_quantized_ops(path: Path) -> bool:
    """Whether a saved program's graph calls pt2e's int8 ops (the ``torch_int8`` variant, ``make qat``)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            graphs = [n for n in archive.namelist() if "/models/" in n and n.endswith(".json")]
            return any(QUANTIZED_OPS in archive.read(n) for n in graphs)
    except (OSError, zipfile.BadZipFile):
        return False


def register_quantized_ops() -> None:
    """Import torchao's pt2e ops, which an int8 program's graph calls.

    Raises:
        ConfigError: torchao is not installed.
    """
    require("torchao.quantization.pt2e", "an int8 program (pt2e)")


def load_exported(path: Path, device: torch.device, max_batch: int = 0) -> BoundedBatch:
    """A ``torch.export.save`` program as a callable module on ``device`` (torchao's ops registered first
    when its graph is int8)."""
    if holds_quantized_ops(path):
        register_quantized_ops()
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        why = f"{type(exc).__name__}: {plain_line(str(exc))}"
        raise ConfigError(f"cannot load {path.name} as a torch.export program: {why}") from None
    spec = exported_input_spec(program)
    if max_batch and (spec.max_batch is None or spec.max_batch > max_batch):
        spec = InputSpec(spec.min_batch, max_batch, spec.height, spec.width)
    module = program.module().to(device)
    return BoundedBatch(module, spec, device, program)


def torch_module(model: Any) -> torch.nn.Module | None:
    """The torch module beneath a loaded network (an eager module, or an exported program's), else None
    (TorchScript, ONNX, OpenVINO, AOTInductor: nothing to export, compile or quantize again)."""
    if isinstance(model, BoundedBatch):
        return model.run if model.program is not None and isinstance(model.run, torch.nn.Module) else None
    if isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        return model
    return None


def check_package_cpu(metadata: dict[str, str], cpu_flags: set[str]) -> None:
    """Refuse an AOTInductor CPU package compiled for instructions this CPU lacks."""
    isa = metadata.get("AOTI_CPU_ISA", "")
    needed = _ISA_FLAGS.get(isa.upper(), ())
    missing = [flag for flag in needed if flag not in cpu_flags]
    if missing:
        raise ConfigError(
            f"this AOTInductor package was compiled for {isa} but this CPU lacks {missing}: "
            "rebuild it on this machine with `make aoti`"
        )


def aoti_input_spec(metadata: dict[str, str], max_batch: int) -> InputSpec:
    """The batch range (and size) of a package: from ``make aoti``'s metadata, else from ``max_batch``.

    A package exported with a dynamic batch checks a lower bound of 2 at run time unless it was
    compiled without that check, so an unknown package takes batches of 2 to ``max_batch`` (a single
    image is padded) or, with ``max_batch`` 0 or 1, exactly one image.
    """
    if SERVEKIT_BATCH in metadata:
        low, _, high = metadata[SERVEKIT_BATCH].partition("-")
        height, _, width = metadata.get(SERVEKIT_SIZE, "").partition("x")
        size = (int(height), int(width)) if height.isdigit() and width.isdigit() else (None, None)
        return InputSpec(int(low), min(int(high), max_batch or int(high)), *size)
    if max_batch <= 1:
        return InputSpec(1, 1)
    return InputSpec(2, max_batch)


def load_aoti(path: Path, device: torch.device, max_batch: int = 0) -> BoundedBatch:
    """An AOTInductor ``.pt2`` package (``aoti_compile_and_package``) as a callable, batches split to fit.

    The package runs on the device it was compiled for, with its input shapes checked at run time
    (``AOTI_RUNTIME_CHECK_INPUTS=1``: a wrong shape is an error, not a memory fault); ``max_batch``
    is the largest batch it takes (see :func:`aoti_input_spec`).
    """
    from torch._inductor import aoti_load_package

    os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
    try:
        compiled = aoti_load_package(str(path))
    except Exception as exc:
        why = f"{type(exc).__name__}: {plain_line(str(exc))}"
        raise ConfigError(f"cannot load {path.name} as an AOTInductor package: {why}") from None
    metadata = dict(compiled.get_metadata())
    package_device = torch.device(metadata.get("AOTI_DEVICE_KEY") or "cpu")
    if package_device.type == "cpu":
        check_package_cpu(metadata, cpu_flags())
    elif device.type != package_device.type:
        raise ConfigError(f"{path.name} was compiled for {package_device.type} but the worker runs on {device.type}")
    logger.info("AOTInductor package %s: %s", path.name, metadata)
    return BoundedBatch(compiled, aoti_input_spec(metadata, max_batch), package_device)
