"""ExecuTorch programs (``format: executorch``, a ``.pte``) behind the same call the services make on a torch module.

A ``.pte`` is what ``make pte`` writes (``scripts/packaging/export_pte.py``): the folder's network lowered to
XNNPACK, with a batch dimension bounded by the folder's ``batchSize``. The runtime plans memory for the
largest input the program was exported for (its method's input metadata says which), so a larger batch runs in
chunks (:class:`~servekit.program_backend.BoundedBatch`), and an input of another height or width is refused
in one line (the runtime would otherwise run it on a plan made for other shapes). It answers torch tensors,
so the output families (top-k, segmentation logits, raw YOLO rows) read it as they read a torch network.

XNNPACK's threadpool is one per process: loading sets it to the worker's thread budget. The package imports
only when such a model is loaded (``executorch``, pinned in ``requirements-executorch.txt``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from servekit.errors import ConfigError, plain_line, require
from servekit.program_backend import BoundedBatch, InputSpec

logger = logging.getLogger(__name__)
INSTALL = "pip install --no-deps -r requirements-executorch.txt"
METHOD = "forward"


def pte_input_spec(sizes: Sequence[int], takes_one: bool = True) -> InputSpec:
    """What a ``.pte``'s image input accepts, from its largest (memory-planned) N x 3 x H x W sizes: batches
    of 1 to N, or exactly N when the program does not take fewer (``takes_one`` False: a static batch)."""
    if len(sizes) != 4:
        raise ConfigError(f"the ExecuTorch program's input has sizes {list(sizes)}; an image model takes N x 3 x H x W")
    batch, _, height, width = (int(s) for s in sizes)
    return InputSpec(1 if takes_one else batch, batch, height, width)


def runtime() -> Any:
    """The ExecuTorch Python runtime module, or one line naming the package."""
    return require("executorch.runtime", "format executorch (an ExecuTorch .pte)", install=INSTALL)


@contextlib.contextmanager
def native_log_quiet() -> Iterator[None]:
    """The runtime's native log lines (the threadpool's resets, cpuinfo probing ARM registers on x86) kept
    off the process's stderr while it loads; failures still reach the caller as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def set_threads(threads: int) -> int:
    """Size XNNPACK's threadpool (one per process) to ``threads``; return what it holds now."""
    from executorch.extension.pybindings import portable_lib

    wanted = max(1, threads)
    with native_log_quiet():
        if portable_lib._threadpool_get_thread_count() != wanted:
            portable_lib._unsafe_reset_threadpool(wanted)
        return int(portable_lib._threadpool_get_thread_count())


class ExecuTorchModel:
    """The part of ``torch.nn.Module`` the services use (``eval``, ``__call__``), over a loaded ``.pte`` method."""

    def __init__(self, program: Any, name: str, max_batch: int = 0) -> None:
        self.program = program  # the method's memory lives as long as its program
        self.method = program.load_method(METHOD)
        self.name = name
        sizes = tuple(self.method.metadata.input_tensor_meta(0).sizes())
        spec = pte_input_spec(sizes, takes_one=sizes[0] == 1 or self._takes_one(sizes))
        if max_batch and (spec.max_batch or 0) > max_batch and not spec.static_batch:
            spec = InputSpec(spec.min_batch, max_batch, spec.height, spec.width)
        self.spec = spec
        self._bounded = BoundedBatch(self._run, spec, torch.device("cpu"))

    def _takes_one(self, sizes: tuple[int, ...]) -> bool:
        """Whether a program planned for batch ``sizes[0]`` takes a single image (a bounded dynamic batch)."""
        try:
            self.method.execute([torch.zeros(1, *sizes[1:])])
        except RuntimeError:
            return False
        return True

    def eval(self) -> ExecuTorchModel:
        return self

    def __call__(self, batch: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not isinstance(batch, torch.Tensor):
            raise ConfigError("format executorch serves networks that take one image batch (not torchvision detectors)")
        return self._bounded(batch)

    def _run(self, batch: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        height, width = int(batch.shape[-2]), int(batch.shape[-1])
        if (height, width) != (self.spec.height, self.spec.width):
            raise ConfigError(
                f"{self.name} takes {self.spec.height}x{self.spec.width} images, the recipe gives {height}x{width}: "
                "rebuild it with `make pte` from this folder"
            )
        found = self.method.execute([batch.to(torch.float32).contiguous()])
        outputs = [o for o in found if isinstance(o, torch.Tensor)]
        if not outputs:
            raise ConfigError(f"{self.name} answered no tensor")
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def load_executorch(path: Path, device: torch.device, threads: int, max_batch: int = 0) -> ExecuTorchModel:
    """Load a ``.pte`` with the ExecuTorch runtime, its XNNPACK threadpool sized to ``threads``.

    It runs on the CPU whatever ``device`` is (the XNNPACK delegate is a CPU backend); answers are CPU tensors.

    Raises:
        ConfigError: the package is missing, or the file is not a program this runtime can load.
    """
    module = runtime()
    if device.type != "cpu":
        logger.info("format executorch runs on the CPU (XNNPACK); the worker's %s is not used", device)
    held = set_threads(threads)
    try:
        with native_log_quiet():
            model = ExecuTorchModel(module.Runtime.get().load_program(str(path)), path.name, max_batch)
    except ConfigError:
        raise
    except Exception as exc:
        why = f"{type(exc).__name__}: {plain_line(str(exc))}"
        raise ConfigError(f"cannot load {path.name} as an ExecuTorch program: {why}") from None
    spec = model.spec
    logger.info("ExecuTorch program %s: batch %d-%s, %d threads", path.name, spec.min_batch, spec.max_batch, held)
    return model


def read_input_spec(path: Path) -> InputSpec:
    """The batch range and the height and width a ``.pte`` takes, as its loaded method says (``make scaffold``)."""
    return load_executorch(path, torch.device("cpu"), torch.get_num_threads()).spec
