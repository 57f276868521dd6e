"""Build the demo models into ``models/<name>/`` (``make models``). Nothing is downloaded.

The four trained here (digits, letters, shapes, shapes_seg: minutes of training each) are committed with
``trained.json``: the sha256 of the sources that trained them (the folder's ``model.py``, the training script)
and of the files written. A fresh clone keeps them while those sources are unchanged (``kept ...``), instead of
training again; a changed source, a missing or altered file, or ``--retrain`` trains anew and rewrites it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import demo_models
import letters
import shapes
import shapes_eval
import shapes_seg

logger = logging.getLogger("make_models")
MIN_DIGITS_ACCURACY = 0.95
PACKAGING = Path(__file__).resolve().parent
# What trains each model (its folder's model.py is added): the Makefile names the same files as prerequisites
TRAINING_SOURCES = {
    "digits": ("demo_models.py",),
    "letters": ("letters.py",),
    "shapes": ("shapes.py",),
    "shapes_seg": ("shapes.py", "shapes_seg.py"),
}
TRAINED_FILES = ("model.pt", "labels.json")
RECORD = "trained.json"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sources_digest(name: str, model_dir: Path) -> str:
    """One sha256 over the files that train ``name``: its training scripts and its folder's ``model.py``."""
    paths: Sequence[Path] = [PACKAGING / source for source in TRAINING_SOURCES[name]]
    if (model_dir / "model.py").is_file():
        paths = [*paths, model_dir / "model.py"]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def kept(name: str, model_dir: Path) -> str | None:
    """The record's line when the committed weights were trained from today's sources and are intact."""
    try:
        record = json.loads((model_dir / RECORD).read_text(encoding="utf-8"))
        intact = all(file_digest(model_dir / f) == record["files"][f] for f in TRAINED_FILES)
    except (OSError, ValueError, KeyError):
        return None
    if not intact or record.get("sources") != sources_digest(name, model_dir):
        return None
    return str(record.get("summary", ""))


def record_training(name: str, model_dir: Path, summary: str) -> None:
    record = {
        "sources": sources_digest(name, model_dir),
        "files": {f: file_digest(model_dir / f) for f in TRAINED_FILES},
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "summary": summary,
    }
    (model_dir / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def build_shapes(model_dir: Path) -> str:
    seconds = shapes.train(model_dir)
    score = shapes_eval.evaluate(model_dir, shapes.HELD_OUT_COUNT)
    summary = f"trained in {seconds:.0f} s; mAP@0.5 {score:.3f} on {shapes.HELD_OUT_COUNT} held-out scenes"
    logger.info("shapes: %s (COCO evaluator, through the kit's handler code in process)", summary)
    if score < shapes.MIN_MAP50:
        raise SystemExit(f"shapes mAP@0.5 {score:.3f} is under {shapes.MIN_MAP50}")
    return summary


def build_shapes_seg(model_dir: Path) -> str:
    seconds = shapes_seg.train(model_dir)
    miou, ious = shapes_seg.evaluate(model_dir)
    each = ", ".join(f"{c} {v:.3f}" for c, v in zip(shapes_seg.SEG_CLASSES, ious))
    summary = f"trained in {seconds:.0f} s; mean IoU {miou:.3f} on {shapes.HELD_OUT_COUNT} held-out scenes ({each})"
    logger.info("shapes_seg: %s (through the kit's handler code in process)", summary)
    if miou < shapes_seg.MIN_MIOU:
        raise SystemExit(f"shapes_seg mean IoU {miou:.3f} is under {shapes_seg.MIN_MIOU}")
    return summary


def build_letters(model_dir: Path) -> str:
    seconds, accuracy = letters.train(model_dir)
    summary = f"trained in {seconds:.0f} s; held-out top-1 {accuracy * 100:.2f} %"
    logger.info("letters: %s (the network alone, in process)", summary)
    if accuracy < letters.MIN_ACCURACY:
        raise SystemExit(f"letters accuracy {accuracy:.3f} is under {letters.MIN_ACCURACY}")
    return summary


def build_digits(model_dir: Path) -> str:
    accuracy = demo_models.train_digits(model_dir)
    summary = f"held-out accuracy {accuracy * 100:.2f} %"
    logger.info("digits: %s", summary)
    if accuracy < MIN_DIGITS_ACCURACY:
        raise SystemExit(f"digits accuracy {accuracy:.3f} is under {MIN_DIGITS_ACCURACY}")
    return summary


BUILDERS: dict[str, Callable[[Path], object]] = {
    "digits": build_digits,
    "resnet18": lambda d: demo_models.make_classifier("resnet18", d),
    "mobilenet_v3_small": lambda d: demo_models.make_classifier("mobilenet_v3_small", d),
    "fasterrcnn": demo_models.make_detector,
    "lraspp": demo_models.make_segmenter,
    "shapes": build_shapes,
    "shapes_seg": build_shapes_seg,
    "letters": build_letters,
    "timm_convnext": demo_models.make_timm_classifier,
    "hf_vit": demo_models.make_hf_classifier,
    "hf_rtdetr": demo_models.make_hf_detector,
}
DEMOS = tuple(BUILDERS)


def build(name: str, root: Path, retrain: bool = False) -> None:
    """Build one demo model's weights and labels next to its committed model-config.yaml (a trained one is kept
    when its record says today's sources trained it)."""
    model_dir = root / name
    if name in TRAINING_SOURCES and not retrain:
        summary = kept(name, model_dir)
        if summary is not None:
            for file in TRAINED_FILES:
                os.utime(model_dir / file)  # newer than its sources, for make
            logger.info(
                "%s: kept the committed weights, trained from these sources (%s; --retrain trains anew)", name, summary
            )
            return
    summary = BUILDERS[name](model_dir)
    if name in TRAINING_SOURCES:
        record_training(name, model_dir, str(summary))
    logger.info("%s: wrote %s", name, model_dir)


def write_samples(out: Path) -> list[Path]:
    """Images to send the demo models (``make sample-images``): three photos scikit-image ships, a held-out
    digit and a held-out shapes scene."""
    out.mkdir(parents=True, exist_ok=True)
    photos = demo_models.sample_photos(("chelsea", "astronaut", "coffee"))
    files = {f"{name}.jpg": demo_models.encode(image, "JPEG", quality=90) for name, image in photos.items()}
    digits, _ = demo_models.digit_images("test")
    files["digit.png"] = demo_models.encode(digits[0], "PNG")
    files["scene.jpg"] = shapes.encode_jpeg(shapes.make_scene(shapes.HELD_OUT_SEED).image)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return [out / name for name in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(DEMOS), help=f"models to build (default: {' '.join(DEMOS)})")
    parser.add_argument("--root", type=Path, default=Path("models"))
    parser.add_argument("--samples", type=Path, default=None, help="write sample images here instead")
    parser.add_argument("--retrain", action="store_true", help="train digits, letters, shapes, shapes_seg anew")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.samples:
        logger.info("sample images: %s", " ".join(str(p) for p in write_samples(args.samples)))
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in args.names:
        if name not in DEMOS:
            parser.error(f"unknown demo model {name!r}; known: {', '.join(DEMOS)}")
        build(name, args.root, args.retrain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
