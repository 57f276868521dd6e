"""AOTInductor package of a model folder (``make aoti MODEL=<name>``) -> ``build/aoti/<name>/model.pt2``.

The exported program itself is kept beside it as ``program.pt2`` (served as format ``exported``).

The folder's network is exported with ``torch.export`` (dynamic batch from 1 to the folder's
``batchSize``, at most ``AOTI_MAX_BATCH``; height and width are the classifier's crop, which the kit
always feeds), compiled with ``torch._inductor.aoti_compile_and_package``, loaded back and checked
against eager at batch 1 and at the largest batch (max abs difference of the logits reported). The
package is native code for this machine's CPU (or GPU): build it where it runs, and never serve one
taken from a stranger.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from cli import report
from servekit.config import ClassifierConfig, read_model_config, read_model_document
from servekit.errors import ConfigError
from servekit.loading import load_model
from servekit.program_backend import AOTI_MAX_BATCH, SERVEKIT_BATCH, SERVEKIT_SIZE, torch_module

TOLERANCE = 1e-3


def compile_package(name: str, models: Path, out: Path) -> str:
    """Export, compile, load back and compare; return the line that reports it."""
    folder = models / name
    config = read_model_config(folder)
    if not isinstance(config, ClassifierConfig):
        raise ConfigError(f"{name} is a detector; make aoti compiles classifiers")
    max_batch = min(int(read_model_document(folder).get("batchSize", 1)), AOTI_MAX_BATCH)
    model = torch_module(load_model(folder, config.model, torch.device("cpu")))
    if model is None:
        raise ConfigError(
            f"{name} is format {config.model.format}; make aoti needs a state_dict, safetensors or exported folder"
        )
    torch.manual_seed(0)
    example = torch.randn(max(2, min(max_batch, 4)), 3, *config.input_size)
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        target = out / name / "model.pt2"
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(out / name / "program.pt2"))  # the same program, served as `exported`
        metadata = {
            SERVEKIT_BATCH: f"1-{max(2, max_batch)}",
            SERVEKIT_SIZE: f"{config.input_size[0]}x{config.input_size[1]}",
        }
        # No run-time lower bound of 2 on the batch: the kit's workers send single images too.
        configs = {"aot_inductor.metadata": metadata, "aot_inductor.check_lowerbound": False}
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(target), inductor_configs=configs)
    seconds = time.perf_counter() - start
    os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
    compiled = torch._inductor.aoti_load_package(package)
    worst = 0.0
    with torch.inference_mode():
        for size in sorted({1, max_batch}):
            x = torch.randn(size, 3, *config.input_size)
            eager = model(x)
            worst = max(worst, float((compiled(x) - eager).abs().max()))
            scale = max(1.0, float(eager.abs().max()))
    if worst > TOLERANCE * scale:
        raise ConfigError(f"the AOTInductor package differs from eager by {worst:.2e} (limit {TOLERANCE * scale:.1e})")
    isa = compiled.get_metadata().get("AOTI_CPU_ISA", "")
    return (
        f"wrote {target} in {seconds:.0f} s (batch 1-{max_batch}, {config.input_size[0]}x{config.input_size[1]}, "
        f"CPU ISA {isa or '-'}); "
        f"max abs difference from eager: {worst:.2e}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("build/aoti"))
    args = parser.parse_args(argv)
    logging.getLogger("torch").setLevel(logging.ERROR)
    return report(lambda: compile_package(args.name, args.models, args.out), f"compile {args.name}")


if __name__ == "__main__":
    sys.exit(main())
