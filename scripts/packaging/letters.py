"""The letters task: a classifier of real size, trained here, with accuracy to lose (``make models``).

26 classes, the capital letters A to Z, each drawn as a 64 x 64 RGB image: Pillow's bundled font at a random
size, rotation and place, in a random colour on a random background, with clutter strokes and sensor-like
noise, so that O, Q, C and G or I, L, T, J really compete. torchvision's ``mobilenet_v3_small`` (2.5 M
parameters, hard-swish and depthwise convolutions, the kind int8 hurts first) is trained on it from scratch
in a few minutes on 2 CPU cores; its held-out split (other seeds) is written as an ImageFolder tree of JPEGs
by ``make eval-data``.
"""

from __future__ import annotations

import logging
import string
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

logger = logging.getLogger("letters")
CLASSES = tuple(string.ascii_uppercase)
SIZE = 64
HELD_OUT_SEED = 1_000_000  # held-out images use seeds from here; training images from 0
HELD_OUT_PER_CLASS = 30
MIN_ACCURACY = 0.85
ARCHITECTURE = "mobilenet_v3_small"
_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont:
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)  # type: ignore[assignment]
    return _FONTS[size]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def draw_letter(index: int, seed: int) -> np.ndarray:
    """Letter ``CLASSES[index]`` drawn from ``seed`` (64 x 64 x 3 uint8)."""
    rng = np.random.default_rng(seed)
    background = np.array(_colour(rng))
    ink = np.array(_colour(rng))
    while np.abs(ink - background).sum() < 240:  # legible, but not always black on white
        ink = np.array(_colour(rng))
    canvas = Image.new("RGB", (SIZE * 2, SIZE * 2), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):  # clutter strokes, some in the letter's colour
        colour = tuple(int(v) for v in (ink if rng.random() < 0.4 else _colour(rng)))
        points = [tuple(int(v) for v in rng.integers(0, SIZE * 2, 2)) for _ in range(2)]
        draw.line(points, fill=colour, width=int(rng.integers(1, 4)))
    size = int(rng.integers(60, 92))
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), CLASSES[index], font=font)
    x = SIZE - (left + right) / 2 + rng.uniform(-12, 12)
    y = SIZE - (top + bottom) / 2 + rng.uniform(-12, 12)
    draw.text((x, y), CLASSES[index], fill=tuple(int(v) for v in ink), font=font)
    angle = float(rng.uniform(-30, 30))
    canvas = canvas.rotate(angle, resample=Image.BILINEAR, fillcolor=tuple(int(v) for v in background))
    image = canvas.resize((SIZE, SIZE), Image.BILINEAR)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.2))))
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, rng.uniform(4, 16), (SIZE, SIZE, 3)).astype(np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def images(per_class: int, first_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every letter (N x 64 x 64 x 3 uint8) and their class indices."""
    pictures, labels = [], []
    for i in range(per_class):
        for index in range(len(CLASSES)):
            pictures.append(draw_letter(index, first_seed + i * len(CLASSES) + index))
            labels.append(index)
    return np.stack(pictures), np.array(labels, dtype=np.int64)


def held_out(per_class: int = HELD_OUT_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    return images(per_class, HELD_OUT_SEED)


def normalized(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def train(
    model_dir: Path, *, per_class: int = 300, epochs: int = 14, batch: int = 64, seed: int = 0
) -> tuple[float, float]:
    """Train ``mobilenet_v3_small`` on the letters; save its state_dict and labels. Returns (seconds, held-out
    top-1 in process on the network alone, the kit's preprocessing being the identity at 64 x 64)."""
    import json

    import torchvision

    from servekit.config import ClassifierConfig, read_model_config

    config = read_model_config(model_dir)
    assert isinstance(config, ClassifierConfig)
    start = time.perf_counter()
    pixels, labels = images(per_class, 0)
    logger.info("letters: %d training images generated in %.0f s", len(labels), time.perf_counter() - start)
    x, y = normalized(pixels, config.mean, config.std), torch.from_numpy(labels)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(ARCHITECTURE, weights=None, num_classes=len(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    steps = epochs * ((len(y) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=steps, pct_start=0.2)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(y), generator=generator).split(batch):
            inputs = x[idx]
            if torch.rand((), generator=generator) < 0.5:  # a shift of up to 4 pixels
                shift = int(torch.randint(-4, 5, (), generator=generator))
                inputs = torch.roll(inputs, shifts=(shift, -shift), dims=(2, 3))
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inputs), y[idx], label_smoothing=0.05)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        logger.info(
            "letters: epoch %d/%d loss %.3f (%.0f s)", epoch + 1, epochs, total / len(y), time.perf_counter() - start
        )
    model.eval()
    test_pixels, test_labels = held_out()
    with torch.inference_mode():
        predicted = torch.cat([model(b).argmax(1) for b in normalized(test_pixels, config.mean, config.std).split(256)])
    accuracy = float((predicted == torch.from_numpy(test_labels)).float().mean())
    torch.save(model.state_dict(), model_dir / "model.pt")
    (model_dir / "labels.json").write_text(json.dumps(list(CLASSES), indent=0) + "\n", encoding="utf-8")
    return time.perf_counter() - start, accuracy


def write_held_out(out: Path, per_class: int = HELD_OUT_PER_CLASS, first_seed: int = HELD_OUT_SEED) -> int:
    """The held-out letters (or, from ``first_seed`` 0, training-side ones) as an ImageFolder tree of JPEGs
    (``<out>/<letter>/<n>.jpg``)."""
    import demo_models

    pixels, labels = images(per_class, first_seed)
    for i, (image, label) in enumerate(zip(pixels, labels)):
        folder = out / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.jpg").write_bytes(demo_models.encode(image, "JPEG", quality=92))
    return len(labels)
