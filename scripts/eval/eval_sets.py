"""The demo models' held-out labeled splits, on disk in the layouts users hold (``make eval-data``).

- ``digits/test/<digit>/<n>.png``: scikit-learn's digits held out from training, an ImageFolder tree;
- ``letters/test/<letter>/<n>.jpg``: held-out letters (other seeds than training), an ImageFolder tree of JPEGs;
- ``letters/train/<letter>/<n>.jpg``: letters from the training seeds, the images a user holds for ``make prune``,
  ``make distill`` and ``make qat`` (never scored);
- ``shapes/val/annotations.json`` + ``images/<n>.jpg``: held-out shapes scenes as a COCO instances file
  (polygon-free boxes, the way a labeling tool exports boxes);
- ``shapes_seg/val/images/<n>.jpg`` + ``masks/<n>.png``: the same scenes with palette index masks (VOC style:
  0 background, 1..3 the shapes, the palette only colours them).

Nothing here but ``letters/train`` is seen in training: the digits split is the one ``make models`` holds out,
the scenes use the held-out seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import letters

logger = logging.getLogger("eval_sets")
TRAIN_PER_CLASS = 60
PALETTE = (0, 0, 0, 31, 119, 180, 214, 39, 40, 44, 160, 44)  # background, circle, square, triangle


def write_digits(out: Path) -> int:
    import demo_models

    images, labels = demo_models.digit_images("test")
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(demo_models.encode(image, "PNG"))
    return len(images)


def write_shapes_coco(out: Path, count: int) -> int:
    from shapes import CLASSES, encode_jpeg, held_out
    from shapes_eval import coco_ground_truth

    scenes = held_out(count)
    truth = coco_ground_truth(scenes)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for entry, scene in zip(truth["images"], scenes):
        entry["file_name"] = f"{entry['id']:04d}.jpg"
        (out / "images" / entry["file_name"]).write_bytes(encode_jpeg(scene.image))
    truth["categories"] = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    (out / "annotations.json").write_text(json.dumps(truth) + "\n", encoding="utf-8")
    return len(scenes)


def write_shapes_masks(out: Path, count: int) -> int:
    from shapes import encode_jpeg, held_out

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    scenes = held_out(count)
    for i, scene in enumerate(scenes):
        (out / "images" / f"{i:04d}.jpg").write_bytes(encode_jpeg(scene.image))
        mask = Image.fromarray(np.asarray(scene.mask, dtype=np.uint8), mode="P")
        mask.putpalette(PALETTE)
        mask.save(out / "masks" / f"{i:04d}.png")
    return len(scenes)


def write_all(out: Path, count: int) -> dict[str, Path]:
    """Every demo split under ``out``; returns each model's DATA path."""
    import shutil

    paths = {
        "digits": out / "digits" / "test",
        "letters": out / "letters" / "test",
        "letters_train": out / "letters" / "train",
        "shapes": out / "shapes" / "val",
        "shapes_seg": out / "shapes_seg" / "val",
    }
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    written = {
        "digits": write_digits(paths["digits"]),
        "letters": letters.write_held_out(paths["letters"]),
        "letters_train": letters.write_held_out(paths["letters_train"], TRAIN_PER_CLASS, first_seed=0),
        "shapes": write_shapes_coco(paths["shapes"], count),
        "shapes_seg": write_shapes_masks(paths["shapes_seg"], count),
    }
    for name, path in paths.items():
        logger.info("%s: %d images -> %s", name, written[name], path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/data"))
    parser.add_argument("--scenes", type=int, default=200, help="held-out shapes scenes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    write_all(args.out, args.scenes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
