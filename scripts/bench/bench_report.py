"""A benchmark run as markdown: the targets and whether each is met, the plain archive against stock, the
segmentation and DETR rows, the tuned keys, and the tables of every row."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from bench_plan import INPROCESS, PHOTO_SETS, PLAIN_BACKENDS, Row


def rate_of(rows: Sequence[Row], **match: Any) -> float | None:
    found = [r.rate for r in rows if all(getattr(r, k) == v for k, v in match.items())]
    return max(found) if found else None


PHOTO_TARGETS = (  # (model, images, target ratio of the kit's fastest archive to the stock handler)
    ("resnet18", "phone", 5.0),
    ("resnet18", "640x480", 2.5),
    ("mobilenet_v3_small", "640x480", 2.0),
    ("resnet18", "1080p", 3.0),
)


PHOTO_NAMES = {
    "phone": "4032x3024 JPEG",
    "1080p": "1920x1080 JPEG",
    "640x480": "640x480 JPEG",
    "screenshot": "1280x800 PNG",
    "same": "451x300 JPEG",
}


MEMORY_TARGET_MIB = 1.5 * 1024


def targets(rows: Sequence[Row], concurrency: int) -> list[tuple[str, str, float | None, float]]:
    """The issues' ratios: (what, how it is computed, measured, target)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def served(model: str, where: str, images: str = "same", **match: Any) -> float | None:
        return rate_of(rows, model=model, where=where, concurrency=concurrency, images=images, **match)

    how = f"req/s at c={concurrency}"
    out = [
        (
            "kit fastest vs stock, resnet18, 451x300",
            how,
            ratio(served("resnet18", "kit"), served("resnet18", "stock")),
            2.0,
        ),
        (
            "kit fastest vs stock, mobilenet_v3_small, 451x300",
            how,
            ratio(served("mobilenet_v3_small", "kit"), served("mobilenet_v3_small", "stock")),
            1.5,
        ),
        (
            "kit vs stock object_detector, same-size",
            how,
            ratio(served("fasterrcnn", "kit"), served("fasterrcnn", "stock")),
            1.2,
        ),
        (
            "kit resnet18.mar (as make archive builds it) vs stock, 451x300",
            how,
            ratio(served("resnet18", "kit", backend="torch"), served("resnet18", "stock")),
            1.5,
        ),
    ]
    for model, images, target in PHOTO_TARGETS:
        what = f"kit fastest vs stock, {model}, {PHOTO_NAMES[images]}"
        out.append((what, how, ratio(served(model, "kit", images), served(model, "stock", images)), target))
    for model in ("resnet18", "mobilenet_v3_small", "fasterrcnn", "shapes"):
        what = f"kit vs Triton, same backend (ONNX), {model}"
        out.append(
            (what, how, ratio(served(model, "kit", backend="onnx"), served(model, "triton", backend="onnx")), 1.0)
        )
    batch = max(r.concurrency for r in rows if r.where == "in-process")
    for model in ("resnet18", "mobilenet_v3_small"):
        for backend in INPROCESS[model]:
            kit = served(model, "kit", backend=backend)
            raw = rate_of(rows, model=model, where="in-process", backend=backend, concurrency=batch)
            what = f"kit served vs raw in process, {model} {backend}"
            out.append((what, f"req/s at c={concurrency} / img/s at batch {batch}", ratio(kit, raw), 0.9))
        int8 = rate_of(rows, model=model, where="in-process", backend="int8", concurrency=batch)
        fp32 = rate_of(rows, model=model, where="in-process", backend="onnx", concurrency=batch)
        out.append((f"int8 vs fp32 ONNX Runtime, {model}", f"img/s at batch {batch}", ratio(int8, fp32), 1.5))
    return out


def peak_memory(rows: Sequence[Row]) -> float | None:
    """The largest worker RSS (MiB) seen while 16 concurrent 12 MP phone photos were served to a classifier
    (the segmenter's 12 MP rows, at concurrency 4, hold a label map of the photo's size: reported apart)."""
    seen = [
        r.peak_worker_mib
        for r in rows
        if r.images == "phone" and r.where == "kit" and r.concurrency == 16 and r.peak_worker_mib > 0
    ]
    return max(seen) if seen else None


def shapes_ratios(rows: Sequence[Row]) -> list[tuple[str, float | None]]:
    """The shapes detector side by side: served vs raw, Triton vs TorchServe, mixed vs one size."""

    def rate(**match: Any) -> float | None:
        return rate_of(rows, model="shapes", **match)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    top = max((r.concurrency for r in rows if r.model == "shapes" and r.where != "in-process"), default=0)
    batch = max((r.concurrency for r in rows if r.model == "shapes" and r.where == "in-process"), default=0)
    out = []
    for backend in INPROCESS["shapes"]:
        served = rate(where="kit", backend=backend, images="same", concurrency=top)
        raw = rate(where="in-process", backend=backend, concurrency=batch)
        out.append((f"kit served (c={top}) / raw in process (batch {batch}), {backend}", ratio(served, raw)))
    for images in ("same", "mixed"):
        triton = rate(where="triton", backend="onnx", images=images, concurrency=top)
        kit = rate(where="kit", backend="onnx", images=images, concurrency=top)
        out.append((f"Triton / TorchServe kit, ONNX, {images} images, c={top}", ratio(triton, kit)))
    for where in ("kit", "triton"):
        mixed = rate(where=where, backend="onnx", images="mixed", concurrency=top)
        same = rate(where=where, backend="onnx", images="same", concurrency=top)
        out.append((f"{where} mixed sizes / one size, ONNX, c={top}", ratio(mixed, same)))
    return out


def target_lines(rows: Sequence[Row]) -> list[str]:
    """The targets table: each ratio this run measured, with its target and whether it was met."""
    lines = ["| measure | how | measured | target | met |", "|---|---|---|---|---|"]
    top = max(r.concurrency for r in rows if r.where != "in-process")
    for what, how, value, target in targets(rows, top):
        if value is None:
            continue  # a model, image set or server this plan does not run
        met = "yes" if value >= target else "no"
        lines.append(f"| {what} | {how} | {value:.2f}x | >= {target}x | {met} |")
    memory = peak_memory(rows)
    if memory is not None:
        met = "yes" if memory <= MEMORY_TARGET_MIB else "no"
        lines.append(
            f"| peak worker memory, 16 concurrent 12 MP requests | largest worker RSS | {memory:.0f} MiB "
            f"| <= {MEMORY_TARGET_MIB:.0f} MiB | {met} |"
        )
    return lines


TUNE_DIR = Path("build/tune")


TUNE_TARGET = 0.95


def tuned_lines(tune_dir: Path = TUNE_DIR, models_dir: Path = Path("models")) -> list[str]:
    """Shipped settings against ``make tune``'s best, per demo model (from its own run, not this one)."""
    lines = []
    for report in sorted(tune_dir.glob("*/results.json")):
        found = json.loads(report.read_text(encoding="utf-8"))
        config = models_dir / found["model"] / "model-config.yaml"
        if not config.is_file():
            continue
        document = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        chosen = found["chosen"]
        now = (int(document.get("batchSize", 1)), int(document.get("maxBatchDelay", 100)))
        keys = (
            "measured before the shipped keys were set to its chosen batch/delay"
            if now == (chosen["batch"], chosen["delay_ms"])
            else "shipped keys unchanged since"
        )
        value = found.get("shipped_vs_best_same_archive")
        if value is None:
            continue
        met = "yes" if value >= TUNE_TARGET else "no"
        lines.append(
            f"| shipped vs tuned best, {found['model']} (archive {found['shipped']['archive']}) "
            f"| make tune MODEL={found['model']}, req/s at c={found['concurrency']}, same p99; "
            f"{keys} | {value:.2f}x | >= {TUNE_TARGET}x | {met} |"
        )
    return lines


def plain_lines(rows: Sequence[Row]) -> list[str]:
    """The archive ``make archive`` builds against the stock handler, per model and image size, same run."""
    top = max((r.concurrency for r in rows if r.where == "stock"), default=0)
    found = []
    for model, backend in PLAIN_BACKENDS.items():
        for images in ("same", *PHOTO_SETS):
            stock = rate_of(rows, model=model, where="stock", images=images, concurrency=top)
            kit = rate_of(rows, model=model, where="kit", backend=backend, images=images, concurrency=top)
            if stock and kit:
                flag = " **below stock**" if kit < stock else ""
                shown = PHOTO_NAMES.get(images, images)
                found.append(f"| {model} | {shown} | {stock:.1f} | {kit:.1f} | {kit / stock:.2f}x{flag} |")
    if not found:
        return []
    return [
        "",
        f"## The plain archive (what `make archive` builds) against TorchServe's stock handler, c={top}, same run",
        "",
        "| model | images | stock req/s | kit req/s | kit / stock |",
        "|---|---|---|---|---|",
        *found,
    ]


def segmentation_lines(rows: Sequence[Row]) -> list[str]:
    """Segmenters side by side: throughput and the bytes of one answer, per handler and image size."""
    found = [r for r in rows if r.model in ("lraspp", "shapes_seg") and r.where != "in-process"]
    if not found:
        return []
    lines = ["", "## Semantic segmentation (same run)", ""]
    lines += [
        "| model | handler | backend | images | c | req/s | p50 ms | answer bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in found:
        shown = PHOTO_NAMES.get(r.images, r.images)
        lines.append(
            f"| {r.model} | {r.where} | {r.backend} | {shown} | {r.concurrency} | {r.rate:.1f} | {r.p50_ms:.0f} "
            f"| {r.answer_bytes:,} |"
        )
    return lines


def detr_lines(rows: Sequence[Row]) -> list[str]:
    """The DETR-family detector served against its network run raw in process on preprocessed tensors."""
    batch = max((r.concurrency for r in rows if r.model == "hf_rtdetr" and r.where == "in-process"), default=0)
    raw = rate_of(rows, model="hf_rtdetr", where="in-process", concurrency=batch)
    found = [r for r in rows if r.model == "hf_rtdetr" and r.where == "kit"]
    if not raw or not found:
        return []
    lines = ["", "## A DETR-family detector served vs raw (seeded RT-DETR, 640 x 640, same run)", ""]
    lines += [f"| images | c | served req/s | p50 ms | raw img/s (batch {batch}) | served / raw |", "|---" * 6 + "|"]
    for r in found:
        shown = PHOTO_NAMES.get(r.images, r.images)
        lines.append(f"| {shown} | {r.concurrency} | {r.rate:.1f} | {r.p50_ms:.0f} | {raw:.1f} | {r.rate / raw:.2f}x |")
    return lines


def markdown(rows: Sequence[Row], plan_name: str, fidelity_report: dict[str, Any], command: str) -> str:
    lines = [
        f"# Benchmark ({plan_name})",
        "",
        f"Command: `{command}`. Machine: {machine()}.",
        "",
        "## Targets",
        "",
        *target_lines(rows),
    ]
    if plan_name == "full":
        lines += tuned_lines()
    lines += plain_lines(rows)
    lines += segmentation_lines(rows)
    lines += detr_lines(rows)
    if any(r.model == "shapes" for r in rows):
        lines += ["", "## The shapes detector side by side (same run)", "", "| ratio | measured |", "|---|---|"]
        lines += [f"| {what} | {value:.2f}x |" if value else f"| {what} | n/a |" for what, value in shapes_ratios(rows)]
    if rate_of(rows, model="resnet18", where="in-process", backend="torch"):
        lines += ["", "## Backends against eager torch (resnet18, in process, same run)", ""]
        lines += ["| backend | batch | img/s | vs eager |", "|---|---|---|---|"]
    for r in rows:
        eager = rate_of(rows, model="resnet18", where="in-process", backend="torch", concurrency=r.concurrency)
        if r.model == "resnet18" and r.where == "in-process" and eager:
            lines.append(f"| {r.backend} | {r.concurrency} | {r.rate:.1f} | {r.rate / eager:.2f}x |")
    lines += ["", "## In process (the model alone, preprocessed tensors)", ""]
    lines += ["| model | backend | batch | img/s |", "|---|---|---|---|"]
    lines += [f"| {r.model} | {r.backend} | {r.concurrency} | {r.rate:.1f} |" for r in rows if r.where == "in-process"]
    lines += ["", "## Served (closed loop, JPEG bodies; TorchServe over REST, Triton over tritonclient HTTP)", ""]
    lines += [
        "| model | handler | backend | images | concurrency | req/s | p50 ms | p90 ms | p99 ms | errors "
        "| mean batch | pre ms | infer ms | post ms | peak worker MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.where == "in-process":
            continue
        s = r.stage_ms
        stages = " | ".join(
            f"{s[k]:.2f}" if k in s else "-" for k in ("batch", "preprocess", "inference", "postprocess")
        )
        lines.append(
            f"| {r.model} | {r.where} | {r.backend} | {r.images} | {r.concurrency} | {r.rate:.1f} | {r.p50_ms:.0f} "
            f"| {r.p90_ms:.0f} | {r.p99_ms:.0f} | {r.errors} | {stages} | {r.peak_worker_mib:.0f} |"
        )
    lines += [
        "",
        "Stage times are the kit handler's milliseconds per request (a batch's time shared by its requests).",
        "",
    ]
    lines += ["## Fidelity against eager fp32 (fixed image set)", ""]
    lines += ["| model | backend | max abs prob diff | top-1 agreement | accuracy |", "|---|---|---|---|---|"]
    for model, backends in fidelity_report.items():
        for backend, f in backends.items():
            acc = f"{f['accuracy'] * 100:.1f} %" if "accuracy" in f else "-"
            lines.append(
                f"| {model} | {backend} | {f['max_abs_probability']:.2e} | {f['top1_agreement'] * 100:.1f} % | {acc} |"
            )
    return "\n".join(lines) + "\n"


def machine() -> str:
    import os

    from servekit.host import cpu_flags, cpu_model

    cpu = cpu_model() or "cpu"

    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    flags = " ".join(f for f in wanted if f in cpu_flags()) or "none of AVX2/AVX-512/AMX"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores, {cpu} (flags: {flags}), torch {torch.__version__}, {gpu}"
