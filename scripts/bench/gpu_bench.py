"""GPU measurements in process (run on a machine with CUDA; `make gpu-bench`).

Three tables, each side by side in one run, written to ``--out`` as ``gpu_results.md`` and ``.json``:

1. resnet18 and mobilenet_v3_small (seeded torchvision nets): eager fp32, eager fp16 + channels_last,
   ``torch.compile`` (fp16 + channels_last) and an AOTInductor package (fp16 + channels_last), images/s
   per batch size, with the max abs difference of each variant's softmax against eager fp32.
2. JPEG decode of generated photos (4032x3024, 1920x1080, 640x480, quality 90): the kit's CPU decode
   (Pillow, one thread) against nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")`` on a list.
3. The kit's served path (``ClassifierService.handle`` on a batch of 8 JPEG requests, model on the GPU):
   preprocess, inference and postprocess milliseconds per batch.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from servekit.config import ClassifierConfig, ModelSource
from servekit.decode import decode_image
from servekit.service import ClassifierService

logger = logging.getLogger("gpu_bench")
SIZES = {"4032x3024": (4032, 3024), "1920x1080": (1920, 1080), "640x480": (640, 480)}


def detailed_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image with real high-frequency detail (so the JPEG is megabytes, not kilobytes)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, 24, (height, width, 1)).astype(np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def gpu_time(fn: Callable[[], Any], seconds: float, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` (synchronized), over about ``seconds`` of calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seeded(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None).eval()


def half_input(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run ``fn`` on the fp16 channels_last copy of a float batch; return float32."""
    return lambda x: fn(x.half().contiguous(memory_format=torch.channels_last)).float()


def model_variants(arch: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Eager fp32, eager fp16 + channels_last and torch.compile of the latter, each on cuda."""
    half = seeded(arch).cuda().half().to(memory_format=torch.channels_last)
    return {
        "eager fp32": seeded(arch).cuda(),
        "eager fp16 channels_last": half_input(half),
        "torch.compile fp16 channels_last": half_input(torch.compile(half, dynamic=False)),
    }


def aoti_variant(arch: str, max_batch: int, workdir: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """An AOTInductor package (fp16 + channels_last, dynamic batch 1..max_batch), compiled and loaded."""
    half = seeded(arch).cuda().half().to(memory_format=torch.channels_last)
    example = torch.randn(2, 3, 224, 224, device="cuda").half().to(memory_format=torch.channels_last)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        program = torch.export.export(half, (example,), dynamic_shapes={"x": {0: batch}})
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(workdir / f"{arch}.pt2"))
    return half_input(torch._inductor.aoti_load_package(package))


def measure(
    arch: str, variants: dict[str, Callable[..., torch.Tensor]], batches: list[int], seconds: float
) -> list[dict[str, Any]]:
    """images/s per variant and batch, with softmax max abs diff and top-1 agreement vs eager fp32."""
    rows: list[dict[str, Any]] = []
    torch.manual_seed(1)
    probe = torch.randn(max(batches), 3, 224, 224, device="cuda")
    with torch.inference_mode():
        reference = torch.softmax(seeded(arch).cuda()(probe), 1)
        for name, fn in variants.items():
            probs = torch.softmax(fn(probe), 1)
            diff = float((probs - reference).abs().max())
            agree = float((probs.argmax(1) == reference.argmax(1)).float().mean())
            for batch in batches:
                x = torch.randn(batch, 3, 224, 224, device="cuda")
                per_call = gpu_time(lambda fn=fn, x=x: fn(x), seconds)
                rows.append(
                    {
                        "model": arch,
                        "variant": name,
                        "batch": batch,
                        "img_per_s": batch / per_call,
                        "ms_per_batch": per_call * 1000,
                        "max_abs_softmax_diff": diff,
                        "top1_agreement": agree,
                    }
                )
                logger.info("%s %s batch %d: %.0f img/s", arch, name, batch, batch / per_call)
    return rows


def aoti_rows_in_child(arch: str, batches: list[int], seconds: float) -> list[dict[str, Any]]:
    """The AOTInductor rows, measured in a child process so a crash of the package loader is reported."""
    command = [sys.executable, __file__, "--aoti-only", arch, "--batches", ",".join(map(str, batches))]
    child = subprocess.run([*command, "--seconds", str(seconds)], capture_output=True, text=True, check=False)
    if child.returncode != 0:
        why = f"exit status {child.returncode}" + (" (segmentation fault)" if child.returncode == -11 else "")
        logger.warning("AOTInductor %s failed in its child process: %s", arch, why)
        failed = dict.fromkeys(("batch", "img_per_s", "ms_per_batch", "max_abs_softmax_diff", "top1_agreement"), "-")
        return [{"model": arch, "variant": f"AOTInductor: FAILED, {why}", **failed}]
    return json.loads(child.stdout.strip().splitlines()[-1])


def decode_table(photos: dict[str, bytes], config: ClassifierConfig, seconds: float) -> list[dict[str, Any]]:
    from torchvision.io import decode_jpeg

    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for size, data in photos.items():
        cpu = _cpu_time(lambda data=data: decode_image(data, config.limits), seconds)
        batch = [torch.frombuffer(bytearray(data), dtype=torch.uint8)] * 8
        gpu = gpu_time(lambda batch=batch: decode_jpeg(batch, device="cuda"), seconds) / len(batch)
        rows.append(
            {
                "image": size,
                "jpeg_bytes": len(data),
                "cpu_pillow_ms": cpu * 1000,
                "gpu_nvjpeg_ms_per_image_batch8": gpu * 1000,
                "speedup": cpu / gpu,
            }
        )
        logger.info("decode %s: CPU %.1f ms, nvJPEG %.2f ms per image", size, cpu * 1000, gpu * 1000)
    torch.set_num_threads(threads)
    return rows


def _cpu_time(fn: Callable[[], Any], seconds: float) -> float:
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def served_table(photos: dict[str, bytes], config: ClassifierConfig, repeats: int) -> list[dict[str, Any]]:
    """Stage times of the kit's classifier service with the model on the GPU, batches of 8 requests."""
    service = ClassifierService(config, seeded("resnet18").cuda(), [str(i) for i in range(1000)], torch.device("cuda"))
    rows: list[dict[str, Any]] = []
    for size, data in photos.items():
        requests = [{"body": data}] * 8
        service.handle(requests)
        outcomes = [service.handle(requests) for _ in range(repeats)]
        assert all(o.good == 8 for o in outcomes)
        rows.append(
            {
                "image": size,
                "batch": 8,
                "preprocess_ms": statistics.median(o.times.preprocess_ms for o in outcomes),
                "inference_ms": statistics.median(o.times.inference_ms for o in outcomes),
                "postprocess_ms": statistics.median(o.times.postprocess_ms for o in outcomes),
            }
        )
        logger.info("served path %s: %s", size, rows[-1])
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# GPU measurements ({results['device']}, torch {results['torch']}, CPU threads {results['threads']})",
        "",
    ]
    lines += ["## Models in process (images/s; softmax max abs diff and top-1 agreement vs eager fp32)", ""]
    lines += _table(
        results["models"],
        ["model", "variant", "batch", "img_per_s", "ms_per_batch", "max_abs_softmax_diff", "top1_agreement"],
    )
    lines += ["", "## JPEG decode: the kit's Pillow decode (1 CPU thread) vs nvJPEG (a list of 8 on the GPU)", ""]
    lines += _table(
        results["decode"], ["image", "jpeg_bytes", "cpu_pillow_ms", "gpu_nvjpeg_ms_per_image_batch8", "speedup"]
    )
    lines += ["", "## The kit's served path, model on the GPU (ms per batch of 8 requests)", ""]
    lines += _table(results["served"], ["image", "batch", "preprocess_ms", "inference_ms", "postprocess_ms"])
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
        return str(value)

    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/gpu"))
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per point")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--aoti-only", metavar="ARCH", help=argparse.SUPPRESS)  # the child of aoti_rows_in_child
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not torch.cuda.is_available():
        sys.stderr.write("error: no CUDA device: run this on a machine with a GPU\n")
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    if args.aoti_only:
        with tempfile.TemporaryDirectory() as workdir:
            variant = aoti_variant(args.aoti_only, max(batches), Path(workdir))
            rows = measure(args.aoti_only, {"AOTInductor fp16 channels_last": variant}, batches, args.seconds)
        sys.stdout.write(json.dumps(rows) + "\n")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    config = ClassifierConfig(task="classification", model=ModelSource(architecture="resnet18"))
    photos = {size: jpeg_bytes(detailed_photo(w, h)) for size, (w, h) in SIZES.items()}
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "models": [],
    }
    for arch in ("resnet18", "mobilenet_v3_small"):
        results["models"] += measure(arch, model_variants(arch), batches, args.seconds)
        results["models"] += aoti_rows_in_child(arch, batches, args.seconds)
    results["decode"] = decode_table(photos, config, args.seconds)
    results["served"] = served_table(photos, config, repeats=10)
    (args.out / "gpu_results.json").write_text(json.dumps(results, indent=1))
    (args.out / "gpu_results.md").write_text(markdown(results))
    sys.stdout.write(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
