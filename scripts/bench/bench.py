"""``make bench`` / ``make bench-quick``: the kit side by side with the raw model and TorchServe's stock handlers.

One run, the same weights, images and client for every row:

1. the raw model in process, per backend (torch eager, ONNX Runtime fp32, ONNX Runtime int8): the ceiling;
2. TorchServe with its stock handler (``image_classifier``, ``object_detector``) on the same weights;
3. TorchServe with the kit's handlers, per backend.

Served rows use a closed-loop client (``scripts/serve/loadgen.py``) at each concurrency for a fixed time after
a warm-up, count errors, and read the kit's per-stage milliseconds from its Prometheus counters. Writes
``results.md``, ``results.json`` and PNG plots to the output folder.

The parts: ``bench_plan`` (what is measured), ``bench_run`` (measuring), ``bench_report`` (markdown),
``bench_plots`` (plots); this module is the entry point of every ``make bench*`` target.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench_plan import COMMANDS, FIDELITY_MODELS, INPROCESS, PLANS, Row
from bench_plots import plots
from bench_report import markdown
from bench_run import Progress, inprocess_rows, payload_sets, torchserve_rows, triton_rows

logger = logging.getLogger("bench")


def render(plan_name: str, out: Path) -> None:
    """``results.md`` and the plots from the run saved in ``out/results.json`` (measured by ``run``)."""
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = [Row(**row) for row in saved["rows"]]
    (out / "results.md").write_text(markdown(rows, plan_name, saved["fidelity"], COMMANDS[plan_name]), encoding="utf-8")
    plots(rows, out)


def run(plan_name: str, out: Path, onnx_dir: Path, seconds: float | None = None) -> Path:
    plan = PLANS[plan_name]
    if seconds is not None:  # a shorter run that proves the tooling (the tests), every figure noisier
        plan = replace(
            plan,
            seconds=seconds,
            warmup=min(plan.warmup, seconds),
            inprocess_seconds=min(plan.inprocess_seconds, seconds),
        )
    out.mkdir(parents=True, exist_ok=True)
    photos, payloads = payload_sets()
    models = {s.model for s in plan.served}
    per_batch = sum(len(plan.backends.intersection(b)) for m, b in INPROCESS.items() if m in models)
    inprocess_total = per_batch * len(plan.inprocess_batches)
    progress = Progress(inprocess_total + sum(len(s.concurrencies or plan.concurrencies) for s in plan.served))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = inprocess_rows(plan, onnx_dir, photos, progress)
    rows += torchserve_rows(plan, payloads, Path("build") / f"bench-{plan_name}-server", progress)
    rows += triton_rows(plan, payloads, Path("build") / f"bench-{plan_name}-triton", progress)
    import fidelity

    models = {"backends": ("resnet18",), "full": FIDELITY_MODELS, "quick": FIDELITY_MODELS}.get(plan_name, ())
    report = {
        m: fidelity.compare_backends(
            m, Path("models"), {"onnx": onnx_dir / m / "model.onnx", "int8": onnx_dir / m / "model.int8.onnx"}
        )
        for m in models
    }
    (out / "results.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "fidelity": report}, indent=1))
    render(plan_name, out)
    logger.info("wrote %s", out / "results.md")
    return out / "results.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=sorted(PLANS), default="full")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--onnx-dir", type=Path, default=Path("build/onnx"))
    parser.add_argument("--render", action="store_true", help="rewrite results.md from out/results.json only")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per point (default: the mode's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.render:
        render(args.mode, args.out)
    else:
        run(args.mode, args.out, args.onnx_dir, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
