"""``make bench-explain``: what an explanation costs next to a prediction, and how big its answer is.

In process, through each demo model's service (the same code TorchServe's worker runs), one image at a time:
the median wall time of a prediction and of an explanation with the model's configured method (Grad-CAM for
eager CNNs, occlusion within the budget otherwise) and with Captum Integrated Gradients, and the bytes of each
answer; beside them the size of the answer TorchServe's stock handlers give ``/explanations`` (Integrated
Gradients as a nested list the shape of the input). Writes ``<out>/results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import demo_models
import shapes
from bench_report import machine
from servekit.config import read_model_config
from servekit.service import build_service

logger = logging.getLogger("bench_explain")
MODELS = ("digits", "resnet18", "mobilenet_v3_small", "timm_convnext", "hf_vit", "shapes_seg")


def median_ms(call: Any, repeat: int) -> float:
    call()  # warm
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def payload(name: str) -> bytes:
    if name == "digits":
        images, _ = demo_models.digit_images("test")
        return demo_models.encode(images[0], "PNG")
    if name == "shapes_seg":
        return shapes.encode_jpeg(shapes.make_scene(shapes.HELD_OUT_SEED).image)
    return demo_models.encode(demo_models.sample_photos(("chelsea",))["chelsea"], "JPEG", quality=90)


def stock_answer_bytes(shape: tuple[int, ...]) -> int:
    """The JSON bytes of an Integrated Gradients attribution the shape of the input, as TorchServe's stock
    vision handlers answer it (``attributions.tolist()``, float32 values as Python floats)."""
    return len(json.dumps(torch.randn(shape).tolist()))


def measure(name: str, repeat: int) -> dict[str, Any]:
    folder = Path("models") / name
    config = read_model_config(folder)
    service = build_service(config, folder, torch.device("cpu"), 8, name)
    row = {"body": payload(name)}
    predicted = service.handle([row]).answers[0]
    explained = service.handle([row], [True]).answers[0]["explanation"]
    result = {
        "model": name,
        "method": explained["method"],
        "predict_ms": median_ms(lambda: service.handle([row]), repeat * 3),
        "explain_ms": median_ms(lambda: service.handle([row], [True]), repeat),
        "predict_bytes": len(json.dumps(predicted)),
        "explain_bytes": len(json.dumps({"explanation": explained})),
    }
    if name in ("resnet18", "digits"):  # Captum's Integrated Gradients, the stock handlers' method
        chosen, service.explain_method = service.explain_method, "integrated_gradients"
        result["ig_ms"] = median_ms(lambda: service.handle([row], [True]), repeat)
        service.explain_method = chosen
    height, width = getattr(config, "input_size", (320, 320))
    result["stock_ig_bytes"] = stock_answer_bytes((3, height, width))
    return result


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Explanations next to predictions (`make bench-explain`)",
        "",
        f"Machine: {machine()}. In process through each model's service, one image per call, median wall time.",
        "",
        "| model | method | predict ms | explain ms | explain / predict | IG ms | answer bytes "
        "| stock IG answer bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ig = f"{r['ig_ms']:.0f}" if "ig_ms" in r else "-"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['predict_ms']:.1f} | {r['explain_ms']:.1f} | "
            f"{r['explain_ms'] / r['predict_ms']:.1f}x | {ig} | {r['explain_bytes']:,} | {r['stock_ig_bytes']:,} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench-explain"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    for name in MODELS:
        rows.append(measure(name, args.repeat))
        logger.info("%s", rows[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (args.out / "results.md").write_text(markdown(rows), encoding="utf-8")
    logger.info("%s", markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
