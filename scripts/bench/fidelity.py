"""How closely a faster backend follows eager fp32 torch on a fixed image set.

For each backend: the largest absolute difference of class probabilities, the share of images whose
top-1 class agrees with eager fp32, and for the digits model the accuracy on its held-out split. Used by
``scripts/packaging/quantize_onnx.py``, ``make bench`` and the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import demo_models
from servekit.config import ClassifierConfig, read_model_config
from servekit.loading import load_model
from servekit.onnx_backend import load_onnx

CPU = torch.device("cpu")


def photo_crops(photos: dict[str, np.ndarray], count: int, seed: int) -> list[np.ndarray]:
    """``count`` seeded random crops (30-100 % of the short side), half of them mirrored."""
    rng = np.random.default_rng(seed)
    arrays = list(photos.values())
    crops = []
    for i in range(count):
        image = arrays[i % len(arrays)]
        height, width = image.shape[:2]
        side = int(min(height, width) * rng.uniform(0.3, 1.0))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = image[top : top + side, left : left + side]
        crops.append(np.ascontiguousarray(crop[:, ::-1] if i % 2 else crop))
    return crops


def evaluation_images(name: str, count: int = 200) -> tuple[list[np.ndarray], list[int] | None]:
    """The fixed image set of a model: the digits' held-out split, else photo crops (seed 2)."""
    if name == "digits":
        return demo_models.digit_images("test")
    return photo_crops(demo_models.sample_photos(), count, seed=2), None


def run_batched(model: Callable[[torch.Tensor], Any], inputs: torch.Tensor, batch: int = 16) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(chunk).float() for chunk in torch.split(inputs, batch)])


def summarize(reference: torch.Tensor, probs: torch.Tensor, labels: list[int] | None) -> dict[str, float]:
    """Max |probability difference| and top-1 agreement against ``reference`` (and accuracy, with labels)."""
    top1 = probs.argmax(-1)
    result = {
        "max_abs_probability": float((reference - probs).abs().max()),
        "top1_agreement": float((reference.argmax(-1) == top1).float().mean()),
    }
    if labels is not None:
        result["accuracy"] = float((top1 == torch.tensor(labels)).float().mean())
    return result


def compare_backends(name: str, models: Path, onnx_files: dict[str, Path], threads: int = 2) -> dict[str, dict]:
    """Fidelity of each ONNX file of classifier ``name`` against its eager fp32 ``.pt``."""
    config = read_model_config(models / name)
    assert isinstance(config, ClassifierConfig), f"{name} is not a classifier"
    images, labels = evaluation_images(name)
    inputs = demo_models.classifier_inputs(images, config)
    reference = run_batched(load_model(models / name, config.model, CPU), inputs).softmax(-1)
    report = {"torch": summarize(reference, reference, labels)}
    for backend, path in onnx_files.items():
        probs = run_batched(load_onnx(path, CPU, threads), inputs).softmax(-1)
        report[backend] = summarize(reference, probs, labels)
    return report


def compare_onnx(name: str, models: Path, fp32: Path, int8: Path) -> dict[str, float]:
    """The int8 graph against eager fp32, with the fp32 graph's figures beside it."""
    report = compare_backends(name, models, {"onnx": fp32, "int8": int8})
    flat = {f"int8_{k}": v for k, v in report["int8"].items()}
    flat.update({f"onnx_{k}": v for k, v in report["onnx"].items()})
    if "accuracy" in report["torch"]:
        flat["torch_accuracy"] = report["torch"]["accuracy"]
    return flat


UPSCALED_SIDE = 3840  # 4K


def upscaled_jpeg(image: np.ndarray, long_side: int = UPSCALED_SIDE) -> bytes:
    """An image scaled up (bicubic) so its long side is ``long_side`` (4K), as JPEG quality 90."""
    from PIL import Image

    height, width = image.shape[:2]
    scale = long_side / max(height, width)
    size = (round(width * scale), round(height * scale))
    big = Image.fromarray(image).resize(size, Image.BICUBIC)
    return demo_models.encode(np.asarray(big), "JPEG", quality=90)


def reduced_decode_fidelity(models: Path, digits: int = 450, scenes: int = 200) -> dict[str, dict[str, float]]:
    """The reduced-scale JPEG decode against the full decode, on 4K upscales of the held-out sets.

    digits: top-1 agreement and accuracy of each; shapes: mAP@0.5 of each; both: the mean and max
    absolute difference of the model inputs (uint8 levels) the two decodes give.
    """
    import dataclasses

    import shapes
    import shapes_eval
    from servekit.service import build_service

    report: dict[str, dict[str, float]] = {}
    images, labels = demo_models.digit_images("test")
    scene_list = shapes.held_out(scenes)
    sets = {
        "digits": ([upscaled_jpeg(im) for im in images[:digits]], labels[:digits]),
        "shapes": ([upscaled_jpeg(s.image) for s in scene_list], None),
    }
    for name, (payloads, truth) in sets.items():
        config = read_model_config(models / name)
        answers, inputs = {}, {}
        for mode in ("full", "reduced"):
            limits = dataclasses.replace(config.limits, reduced_jpeg=mode == "reduced")
            service = build_service(dataclasses.replace(config, limits=limits), models / name, CPU, max_batch=8)
            rows = [{"body": data} for data in payloads]
            answers[mode] = [a for i in range(0, len(rows), 8) for a in service.handle(rows[i : i + 8]).answers]
            inputs[mode] = torch.stack([_model_input(service.prepare(row)) for row in rows[:16]]).float()
        diff = (inputs["full"] - inputs["reduced"]).abs()
        entry = {"mean_abs_input_diff": float(diff.mean()), "max_abs_input_diff": float(diff.max())}
        if truth is not None:
            top1 = {mode: [a[0]["index"] for a in found] for mode, found in answers.items()}
            entry["top1_agreement"] = float(np.mean([a == b for a, b in zip(top1["full"], top1["reduced"])]))
            for mode, predicted in top1.items():
                entry[f"{mode}_accuracy"] = float(np.mean([p == t for p, t in zip(predicted, truth)]))
        else:
            scales = [UPSCALED_SIDE / max(s.image.shape[:2]) for s in scene_list]
            for mode, found in answers.items():
                entry[f"{mode}_map50"] = shapes_eval.map50(scene_list, found, scales)
        report[name] = entry
    return report


def _model_input(prepared: Any) -> torch.Tensor:
    """A service's prepared item as the uint8 tensor the model's batch is built from."""
    return prepared[0] if isinstance(prepared, tuple) else prepared


def main() -> int:
    """``make decode-fidelity``: the reduced-scale decode's report on the full held-out sets, as JSON."""
    import json
    import sys

    report = reduced_decode_fidelity(Path("models"))
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
