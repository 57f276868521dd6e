"""Build the demo models into ``models/<name>/`` (``make models``). Nothing is downloaded."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import demo_models
import shapes
import shapes_eval

logger = logging.getLogger("make_models")
DEMOS = ("digits", "resnet18", "mobilenet_v3_small", "fasterrcnn", "shapes", "timm_convnext", "hf_vit")
MIN_DIGITS_ACCURACY = 0.95


def build(name: str, root: Path) -> None:
    """Build one demo model's weights and labels next to its committed model-config.yaml."""
    model_dir = root / name
    if name == "digits":
        accuracy = demo_models.train_digits(model_dir)
        logger.info("digits: held-out accuracy %.2f %%", accuracy * 100)
        if accuracy < MIN_DIGITS_ACCURACY:
            raise SystemExit(f"digits accuracy {accuracy:.3f} is under {MIN_DIGITS_ACCURACY}")
    elif name == "resnet18":
        demo_models.make_classifier("resnet18", model_dir)
    elif name == "mobilenet_v3_small":
        demo_models.make_classifier("mobilenet_v3_small", model_dir, torchscript=True)
    elif name == "timm_convnext":
        demo_models.make_timm_classifier(model_dir)
    elif name == "hf_vit":
        demo_models.make_hf_classifier(model_dir)
    elif name == "fasterrcnn":
        demo_models.make_detector(model_dir)
    elif name == "shapes":
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
    logger.info("%s: wrote %s", name, model_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(DEMOS), help=f"models to build (default: {' '.join(DEMOS)})")
    parser.add_argument("--root", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in args.names:
        if name not in DEMOS:
            parser.error(f"unknown demo model {name!r}; known: {', '.join(DEMOS)}")
        build(name, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
