"""Build the demo models into ``models/<name>/`` (``make models``). Nothing is downloaded."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import demo_models
import letters
import shapes
import shapes_eval
import shapes_seg

logger = logging.getLogger("make_models")
MIN_DIGITS_ACCURACY = 0.95


def build_shapes(model_dir: Path) -> None:
    seconds = shapes.train(model_dir)
    score = shapes_eval.evaluate(model_dir, shapes.HELD_OUT_COUNT)
    logger.info(
        "shapes: trained in %.0f s; mAP@0.5 on %d held-out scenes (COCO evaluator, through the kit's handler "
        "code in process): %.3f",
        seconds,
        shapes.HELD_OUT_COUNT,
        score,
    )
    if score < shapes.MIN_MAP50:
        raise SystemExit(f"shapes mAP@0.5 {score:.3f} is under {shapes.MIN_MAP50}")


def build_shapes_seg(model_dir: Path) -> None:
    seconds = shapes_seg.train(model_dir)
    miou, ious = shapes_seg.evaluate(model_dir)
    each = ", ".join(f"{c} {v:.3f}" for c, v in zip(shapes_seg.SEG_CLASSES, ious))
    logger.info(
        "shapes_seg: trained in %.0f s; mean IoU on %d held-out scenes (through the kit's handler code in "
        "process): %.3f (%s)",
        seconds,
        shapes.HELD_OUT_COUNT,
        miou,
        each,
    )
    if miou < shapes_seg.MIN_MIOU:
        raise SystemExit(f"shapes_seg mean IoU {miou:.3f} is under {shapes_seg.MIN_MIOU}")


def build_letters(model_dir: Path) -> None:
    seconds, accuracy = letters.train(model_dir)
    logger.info(
        "letters: trained in %.0f s; held-out top-1 %.2f %% (the network alone, in process)", seconds, accuracy * 100
    )
    if accuracy < letters.MIN_ACCURACY:
        raise SystemExit(f"letters accuracy {accuracy:.3f} is under {letters.MIN_ACCURACY}")


def build_digits(model_dir: Path) -> None:
    accuracy = demo_models.train_digits(model_dir)
    logger.info("digits: held-out accuracy %.2f %%", accuracy * 100)
    if accuracy < MIN_DIGITS_ACCURACY:
        raise SystemExit(f"digits accuracy {accuracy:.3f} is under {MIN_DIGITS_ACCURACY}")


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


def build(name: str, root: Path) -> None:
    """Build one demo model's weights and labels next to its committed model-config.yaml."""
    model_dir = root / name
    BUILDERS[name](model_dir)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.samples:
        logger.info("sample images: %s", " ".join(str(p) for p in write_samples(args.samples)))
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in args.names:
        if name not in DEMOS:
            parser.error(f"unknown demo model {name!r}; known: {', '.join(DEMOS)}")
        build(name, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
