"""Structured channel pruning with distillation (``make prune MODEL=<name> DATA=<images> [TARGET=0.5]``).

torch-pruning's dependency graph removes whole channels (a convolution's filters together with the batch
norm, the next layer's inputs, a residual's partners and a squeeze-excitation's widths), the least important
first by the L2 magnitude of each coupled group, a little per step, until the network's multiply-accumulates
are at most TARGET of the original's. Channel counts stay multiples of the CPU's vector width (16 floats on
AVX-512, 8 on AVX2; ``ROUND_TO=``), so oneDNN's kernels stay full. The classifier layer keeps all its outputs.

Pruning alone loses accuracy; the pruned network is then fine-tuned by distillation from the unpruned one on
the user's images (``distill.distil``: KL on soft logits, plus the labels' loss when DATA has labels). The
report holds the held-out top-1 (with labels) and the agreement with the unpruned model's top-1, of the
unpruned, the pruned-before-fine-tuning and the pruned-and-distilled networks, with MACs and parameters.

The result is a new model folder ``models/<name>_pruned``: the network as a ``torch.export`` program
(``model.pt2``, format ``exported``, batch 1 to the folder's ``batchSize``), the same recipe and labels; it
archives, serves and goes through ``make variants`` like any other. Never TorchScript.

Refused in one line: detectors and segmenters (classifiers first), a folder whose network is not a torch
module (TorchScript, ONNX, OpenVINO, an exported program, AOTInductor), Hugging Face transformers folders and
networks with attention (heads need pruning per architecture).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill import (
    CompressError,
    Quality,
    Settings,
    data_facts,
    distil,
    macs_and_params,
    predictions,
    quality,
    read_data,
    read_teacher,
    settings_from,
    stamp,
    training_arguments,
    training_fact,
    write_folder,
    write_report,
    written_document,
)
from servekit.host import cpu_flags
from servekit.program_backend import load_exported

logger = logging.getLogger("prune")
MAX_STEPS = 80  # the ratio schedule: each step prunes 1/MAX_STEPS of the way to PRUNE_CEILING
PRUNE_CEILING = 0.95
EXPORT_TOLERANCE = 1e-4


def vector_width(flags: set[str]) -> int:
    """fp32 lanes of the CPU's widest vectors: the channel multiple pruning keeps."""
    return 16 if "avx512f" in flags else 8


def refusal(name: str, fmt: str, network: Any) -> str:
    """Why the network of folder ``name`` (its model format ``fmt``) cannot be pruned here, or empty."""
    if fmt == "transformers":
        return "Hugging Face transformers folders are not pruned: their attention heads need per-architecture handling"
    if not isinstance(network, torch.nn.Module) or isinstance(network, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        return (
            f"{name} is format {fmt}; make prune needs the network as a torch module "
            "(a state_dict, safetensors, checkpoint or timm folder)"
        )
    attention = [
        n
        for n, m in network.named_modules()
        if isinstance(m, torch.nn.MultiheadAttention) or type(m).__name__ == "Attention"
    ]
    if attention:
        return (
            f"{name} has {len(attention)} attention layers ({attention[0]}, ...); make prune prunes "
            "convolutional networks (ResNet, MobileNet, EfficientNet, RegNet, ConvNeXt, ...)"
        )
    return ""


def classifier_layer(network: torch.nn.Module, classes: int) -> torch.nn.Module:
    """The last layer that writes the ``classes`` outputs (a Linear, or a 1x1 convolution head)."""
    heads = [
        m
        for m in network.modules()
        if (isinstance(m, torch.nn.Linear) and m.out_features == classes)
        or (isinstance(m, torch.nn.Conv2d) and m.out_channels == classes)
    ]
    if not heads:
        raise CompressError(f"no layer of the network writes its {classes} classes; it cannot be pruned safely")
    return heads[-1]


@dataclass(frozen=True)
class Pruned:
    """What pruning did: MACs and parameters before and after, steps taken, the channel multiple."""

    macs: tuple[float, float]
    params: tuple[int, int]
    steps: int
    round_to: int
    seconds: float

    @property
    def share(self) -> float:
        return self.macs[1] / self.macs[0]

    def describe(self) -> str:
        return (
            f"MACs {self.macs[0] / 1e6:.1f} M -> {self.macs[1] / 1e6:.1f} M ({self.share:.0%}), parameters "
            f"{self.params[0] / 1e6:.2f} M -> {self.params[1] / 1e6:.2f} M, channels multiples of {self.round_to}"
        )


def prune_network(
    network: torch.nn.Module, size: tuple[int, int], classes: int, target: float, round_to: int
) -> Pruned:
    """Prune ``network`` in place until its MACs are at most ``target`` of what they were."""
    import torch_pruning as tp

    example = torch.zeros(1, 3, *size)
    network.eval()
    before = macs_and_params(network, size)
    pruner = tp.pruner.BasePruner(
        network,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=PRUNE_CEILING,
        iterative_steps=MAX_STEPS,
        ignored_layers=[classifier_layer(network, classes)],
        round_to=round_to,
    )
    started = time.perf_counter()
    steps = 0
    after = before
    while after[0] > target * before[0] and steps < MAX_STEPS:
        pruner.step()
        steps += 1
        after = macs_and_params(network, size)
    if after[0] > target * before[0]:
        logger.warning(
            "pruning stopped at %.0f %% of the MACs (target %.0f %%)", 100 * after[0] / before[0], 100 * target
        )
    return Pruned((before[0], after[0]), (before[1], after[1]), steps, round_to, time.perf_counter() - started)


def export_program(network: torch.nn.Module, size: tuple[int, int], max_batch: int, path: Path) -> float:
    """``network`` as a ``torch.export`` program (batch 1 to ``max_batch``) at ``path``, loaded back the way a
    worker loads it; returns the largest difference from the module's logits."""
    network.eval()
    example = torch.rand(2, 3, *size)
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    with torch.no_grad():
        program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    served = load_exported(path, torch.device("cpu"))
    x = torch.randn(max(2, min(max_batch, 4)), 3, *size)
    with torch.inference_mode():
        expected = network(x)
        worst = float((served(x) - expected).abs().max())
    if worst > EXPORT_TOLERANCE * max(1.0, float(expected.abs().max())):
        raise CompressError(f"the exported program differs from the pruned network by {worst:.2e}")
    return worst


def prune_folder(
    name: str,
    data_path: Path,
    *,
    models: Path,
    target: float,
    settings: Settings,
    out_name: str = "",
    round_to: int = 0,
    label_map: Path | None = None,
    out: Path = Path("build/compress"),
) -> str:
    """``make prune``: prune, distil, write ``models/<name>_pruned``; the summary line."""
    if not 0.05 <= target < 1:
        raise CompressError(f"TARGET={target} is not a share of the MACs to keep between 0.05 and 1 (0.5: half)")
    teacher = read_teacher(name, models, "prune")
    why = refusal(name, teacher.config.model.format, teacher.network)
    if why:
        raise CompressError(why)
    out_name = out_name or f"{name}_pruned"
    data = read_data(data_path, teacher.config, teacher.labels, label_map)
    size = teacher.config.input_size
    student = copy.deepcopy(teacher.network)
    pruned = prune_network(student, size, len(teacher.labels), target, round_to or vector_width(cpu_flags()))
    logger.info("%s: pruned in %d steps (%.0f s): %s", name, pruned.steps, pruned.seconds, pruned.describe())
    reference = predictions(teacher.network, data.held_out, teacher.config)
    unpruned = quality(reference, reference, data.held_out)
    undistilled = quality(predictions(student, data.held_out, teacher.config), reference, data.held_out)
    started = time.perf_counter()
    losses = distil(student, teacher.network, data.train, teacher.config, settings)
    seconds = time.perf_counter() - started
    distilled = quality(predictions(student, data.held_out, teacher.config), reference, data.held_out)
    max_batch = int(teacher.document.get("batchSize", 1))
    difference: list[float] = []

    def write_program(path: Path) -> None:
        difference.append(export_program(student, size, max_batch, path))

    document = written_document(teacher.document, {"file": "model.pt2", "format": "exported"})
    header = (
        f"{out_name}: {name} pruned to {pruned.share:.0%} of its MACs and distilled from it by `make prune` "
        f"({stamp()}) on {data.root}; report build/compress/{out_name}/report.md"
    )
    write_folder(teacher.folder, models / out_name, document, {"model.pt2": write_program}, header)
    facts = {
        "model": f"{name} ({teacher.config.model.architecture or teacher.config.model.format})",
        "pruning": f"{pruned.describe()}; {pruned.steps} steps in {pruned.seconds:.0f} s (torch-pruning, L2 group "
        f"magnitude, target {target:.0%})",
        **data_facts(data),
        "distillation": training_fact(settings, seconds, losses),
        "folder": f"{models / out_name} (model.pt2: torch.export program, batch 1-{max(2, max_batch)}; max abs "
        f"difference from the pruned module {difference[0]:.1e})",
        "date": stamp(),
    }
    rows: list[tuple[str, Quality, str]] = [
        (f"{name} (unpruned)", unpruned, "the teacher"),
        ("pruned, not fine-tuned", undistilled, pruned.describe().split(",")[0]),
        ("pruned + distilled", distilled, f"{out_name}"),
    ]
    report = write_report(out / out_name, f"make prune: {out_name}", facts, rows)
    return (
        f"wrote {models / out_name}: {pruned.describe()}; held out: unpruned {unpruned.describe()}; pruned "
        f"{undistilled.describe()}; pruned + distilled {distilled.describe()}; {report}"
    )


def main(argv: list[str] | None = None) -> int:
    from cli import report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--target", type=float, default=0.5, help="share of the MACs to keep")
    parser.add_argument("--round-to", type=int, default=0, help="channel multiple (0: the CPU's vector width)")
    parser.add_argument("--out-name", default="", help="the new folder (default <name>_pruned)")
    training_arguments(parser, epochs=15)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return report(
        lambda: prune_folder(
            args.name,
            args.data,
            models=args.models,
            target=args.target,
            settings=settings_from(args),
            out_name=args.out_name,
            round_to=args.round_to,
            label_map=args.label_map,
            out=args.out,
        ),
        f"prune {args.name}",
    )


if __name__ == "__main__":
    sys.exit(main())
