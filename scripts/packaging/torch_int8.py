"""Torch-native int8 of a classifier's network: pt2e static quantization with torchao's X86 inductor quantizer.

The ``torch_int8`` variant kind (``make variants``) and the last step of ``make qat`` both end here:

1. a strict ``torch.export`` of the network with a dynamic batch (strict: the non-strict trace of torch
   2.14.1 merges the call sites of a module used twice, a reused ReLU, and the quantizer then refuses them);
2. ``prepare_pt2e`` (or ``prepare_qat_pt2e`` for training) with ``X86InductorQuantizer``: per-channel int8
   weights, per-tensor int8 activations, observers calibrated on the batches the network receives;
3. ``convert_pt2e``, then the quantized graph exported again (batch from 2 up: a single image is padded to
   two, so one compiled graph serves every batch) and saved as ``model.int8.pt2``.

The worker loads that file as format ``exported`` and compiles it at load (``handler.compile``: dynamic,
``freezing`` so inductor packs the int8 weights for oneDNN); the file itself answers as the int8 graph does
in process, which is what the tests hold it to.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from servekit.errors import ConfigError, plain_line
from servekit.program_backend import register_quantized_ops

MIN_BATCH = 2  # the saved program's smallest batch: batch 1 would be a graph of its own at compile time
# handler.compile of a folder serving an int8 program: one graph for every batch size (two on mobilenets: a
# batch of 16 meets a guard of its own), frozen so inductor packs the int8 weights for oneDNN
INT8_COMPILE = {"mode": "default", "dynamic": True, "freezing": True}


def x86_quantizer(qat: bool = False) -> Any:
    """torchao's X86 inductor quantizer, static int8 (fake-quantized for training when ``qat``)."""
    register_quantized_ops()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    return xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=qat))


def traced(network: torch.nn.Module, size: tuple[int, int], *, training: bool = False) -> torch.fx.GraphModule:
    """The network as a strictly exported graph module, dynamic in the batch (at least 2)."""
    network.train(training)
    example = torch.randn(4, 3, *size)
    batch = torch.export.Dim("batch", min=MIN_BATCH)
    try:
        with torch.no_grad() if not training else torch.enable_grad():
            program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},), strict=True)
    except Exception as exc:
        why = f"{type(exc).__name__}: {plain_line(str(exc))}"
        raise ConfigError(f"torch.export (strict) of the network failed, so pt2e cannot quantize it: {why}") from None
    return program.module()


def calibrated(network: torch.nn.Module, size: tuple[int, int], batches: Iterable[torch.Tensor]) -> Any:
    """Post-training int8: the traced network with observers, run on ``batches``, converted."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(traced(network, size), x86_quantizer())
    seen = 0
    with torch.no_grad():
        for batch in batches:
            for chunk in padded(batch).split(64):
                prepared(padded(chunk))
            seen += len(batch)
    if seen == 0:
        raise ConfigError("int8 calibration got no images")
    return convert_pt2e(prepared)


def padded(batch: torch.Tensor) -> torch.Tensor:
    """A batch of at least ``MIN_BATCH`` (the last image repeated)."""
    if len(batch) >= MIN_BATCH:
        return batch
    return torch.cat([batch, batch[-1:].expand(MIN_BATCH - len(batch), *batch.shape[1:])])


class Program(torch.nn.Module):
    """An exported graph module called as a module: batches of one padded to ``MIN_BATCH``, and ``train()`` /
    ``eval()`` switching its batch-norm and dropout ops (torchao's ``move_exported_model_to_*``)."""

    def __init__(self, graph: torch.nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(padded(x))[: len(x)]

    def train(self, mode: bool = True) -> Program:
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        self.training = mode
        return self


@dataclass(frozen=True)
class Saved:
    """A saved int8 program and how far it is from the graph it was saved from."""

    path: Path
    max_abs_diff: float
    seconds: float
    megabytes: float


def save_program(quantized: Any, size: tuple[int, int], path: Path, check: torch.Tensor | None = None) -> Saved:
    """Export the converted graph again (dynamic batch from 2), save it, load it back as a worker does and
    compare it with ``quantized`` on ``check`` (or random images): the largest logit difference."""
    started = time.perf_counter()
    example = torch.randn(4, 3, *size)
    batch = torch.export.Dim("batch", min=MIN_BATCH)
    with torch.no_grad():
        program = torch.export.export(quantized, (example,), dynamic_shapes=({0: batch},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    x = padded(check if check is not None else torch.randn(3, 3, *size))
    with torch.inference_mode():
        worst = float((loaded(x) - quantized(x)).abs().max())
    return Saved(path, worst, time.perf_counter() - started, path.stat().st_size / 1e6)


def quantize_to_file(network: torch.nn.Module, size: tuple[int, int], batches: list[torch.Tensor], path: Path) -> Saved:
    """``network`` calibrated on ``batches`` and saved as an int8 program at ``path``."""
    quantized = calibrated(network, size, batches)
    return save_program(quantized, size, path, check=batches[0][:8] if batches else None)
