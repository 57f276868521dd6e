"""Torch-native int8 of a classifier's network: pt2e static quantization with torchao's X86 inductor quantizer.

The ``torch_int8`` variant kind (``make variants``) and the last step of ``make qat`` both end here:

1. a strict ``torch.export`` of the network with a dynamic batch (strict: the non-strict trace of torch
   2.14.1 merges the call sites of a module used twice, a reused ReLU, and the quantizer then refuses them);
2. ``prepare_pt2e`` (or ``prepare_qat_pt2e`` for training) with ``X86InductorQuantizer``: per-channel int8
   weights, per-tensor int8 activations, observers calibrated on the batches the network receives;
3. ``convert_pt2e``, then the quantized graph exported again (batch 2 to the folder's ``batchSize``: a single
   image is padded to two, so one compiled graph serves every batch) and saved as ``model.int8.pt2``.

The worker loads that file as format ``exported`` and compiles it at load (``handler.compile``: dynamic,
``freezing`` so inductor packs the int8 weights for oneDNN); the file itself answers as the int8 graph does
in process, which is what the tests hold it to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from servekit.errors import ConfigError, plain_line, require
from servekit.program_backend import BoundedBatch, InputSpec, torch_module

MIN_BATCH = 2  # the saved program's smallest batch: batch 1 would be a graph of its own at compile time
# handler.compile of a folder serving an int8 program: one graph for every batch size (two on mobilenets: a
# batch of 16 meets a guard of its own), frozen so inductor packs the int8 weights for oneDNN
INT8_COMPILE = {"mode": "default", "dynamic": True, "freezing": True}


def pt2e(module: str = "quantize_pt2e") -> Any:
    """A module of torchao's pt2e quantization (``quantize_pt2e``: prepare, convert; ``""``: the package),
    imported quietly (servekit.errors.require)."""
    return require(f"torchao.quantization.pt2e.{module}".rstrip("."), "torch-native int8 (pt2e)")


def x86_quantizer(qat: bool = False) -> Any:
    """torchao's X86 inductor quantizer, static int8 (fake-quantized for training when ``qat``)."""
    xiq = pt2e("quantizer.x86_inductor_quantizer")
    return xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=qat))


def traced(network: torch.nn.Module, size: tuple[int, int], max_batch: int, *, training: bool = False) -> Any:
    """The network as a strictly exported graph module, dynamic in the batch (2 to ``max_batch``)."""
    set_mode(network, training)
    example = torch.randn(min(4, max_batch), 3, *size)
    batch = torch.export.Dim("batch", min=MIN_BATCH, max=max_batch)
    guards = logging.getLogger("torch._guards")  # a refused trace logs its guard's traceback: the error says it
    level = guards.level
    guards.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad() if not training else torch.enable_grad():
            program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},), strict=True)
    except Exception as exc:
        why = f"{type(exc).__name__}: {plain_line(str(exc))}"
        raise ConfigError(f"torch.export (strict) of the network failed, so pt2e cannot quantize it: {why}") from None
    finally:
        guards.setLevel(level)
    return program.module()


def batch_bound(model: Any, batch_size: int) -> int:
    """The largest batch the int8 program is made for: the folder's ``batchSize`` (at least 2), within what
    an exported folder's own program takes."""
    bound = max(MIN_BATCH, batch_size)
    spec = getattr(model, "spec", None)
    if spec is not None and spec.max_batch:
        bound = max(MIN_BATCH, min(bound, spec.max_batch))
    return bound


def set_mode(network: torch.nn.Module, training: bool) -> None:
    """``network.train(training)``, for an exported program's module too (whose ``train()`` refuses)."""
    try:
        network.train(training)
    except NotImplementedError:
        switch = pt2e("").move_exported_model_to_train if training else pt2e("").move_exported_model_to_eval
        switch(network)


def calibrated(network: torch.nn.Module, size: tuple[int, int], max_batch: int, batches: Iterable[torch.Tensor]) -> Any:
    """Post-training int8: the traced network with observers, run on ``batches``, converted."""
    prepared = pt2e().prepare_pt2e(traced(network, size, max_batch), x86_quantizer())
    observe = bounded(prepared, max_batch)
    seen = 0
    with torch.no_grad():
        for batch in batches:
            observe(batch)
            seen += len(batch)
    if seen == 0:
        raise ConfigError("int8 calibration got no images")
    return pt2e().convert_pt2e(prepared)


def bounded(graph: Any, max_batch: int) -> BoundedBatch:
    """``graph`` run as the kit runs a bounded program: batches under ``MIN_BATCH`` padded (the last image
    repeated), batches over ``max_batch`` in chunks (its guards refuse them whole)."""
    return BoundedBatch(graph, InputSpec(MIN_BATCH, max(MIN_BATCH, max_batch)), torch.device("cpu"))


class Program(torch.nn.Module):
    """An exported graph module called as a module: batches of one padded to ``MIN_BATCH``, batches over the
    ``max_batch`` it was traced for run in chunks (its guards refuse them whole), and ``train()`` / ``eval()``
    switching its batch-norm and dropout ops (torchao's ``move_exported_model_to_*``)."""

    def __init__(self, graph: torch.nn.Module, max_batch: int) -> None:
        super().__init__()
        self.graph = graph
        self.max_batch = max_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bounded(self.graph, self.max_batch)(x)

    def train(self, mode: bool = True) -> Program:
        set_mode(self.graph, mode)
        self.training = mode
        return self


@dataclass(frozen=True)
class Saved:
    """A saved int8 program and how far it is from the graph it was saved from."""

    path: Path
    max_abs_diff: float
    seconds: float
    megabytes: float


def drop_unused_attributes(graph: Any) -> None:
    """Remove the parameters and buffers no node of the converted graph reads (the fp32 weights its int8
    constants replaced), which a new export would otherwise save beside them: 7.5 MB against 2.9 MB here."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    names = [name for name, _ in [*graph.named_parameters(), *graph.named_buffers()]]
    for name in names:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, leaf)


def save_program(quantized: Any, size: tuple[int, int], max_batch: int, path: Path, check: torch.Tensor) -> Saved:
    """Export the converted graph again (batch 2 to ``max_batch``), save it, load it back as a worker does and
    compare it with ``quantized`` on ``check``: the largest logit difference."""
    started = time.perf_counter()
    drop_unused_attributes(quantized)
    example = torch.randn(min(4, max_batch), 3, *size)
    batch = torch.export.Dim("batch", min=MIN_BATCH, max=max_batch)
    with torch.no_grad():
        program = torch.export.export(quantized, (example,), dynamic_shapes=({0: batch},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    x = check[:max_batch]
    with torch.inference_mode():
        worst = float((bounded(loaded, max_batch)(x) - bounded(quantized, max_batch)(x)).abs().max())
    return Saved(path, worst, time.perf_counter() - started, path.stat().st_size / 1e6)


def quantize_to_file(
    model: Any, size: tuple[int, int], batch_size: int, batches: list[torch.Tensor], path: Path
) -> Saved:
    """The folder's loaded ``model`` (its torch network beneath) calibrated on ``batches`` and saved as an int8
    program at ``path`` for batches up to ``batch_size``."""
    network = torch_module(model)
    if network is None:
        raise ConfigError("torch-native int8 needs a torch network: a state_dict, safetensors or exported folder")
    if not batches:
        raise ConfigError("int8 calibration got no images")
    bound = batch_bound(model, batch_size)
    quantized = calibrated(network, size, bound, batches)
    return save_program(quantized, size, bound, path, batches[0])
