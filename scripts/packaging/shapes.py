"""The shapes detector: the scenes the kit generates, and its training.

A scene is a random-colour background with noise and a few lines, and 1 to 6 filled shapes (circle,
axis-aligned square, upward triangle) of sides 20 to 120 px in colours that stand out, overlapping at
most a little (a tenth of the smaller box), on an image of sides 320 to 800 px. Every scene comes from
its own seed, so the training scenes and the held-out ones never meet. ``models/shapes/model.py`` holds
the network; ``shapes_eval.py`` measures it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss

from servekit.yolo import letterbox

logger = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle")
SIDE_RANGE = (320, 800)
OBJECT_RANGE = (20, 120)
MAX_OBJECTS = 6
MAX_OVERLAP = 0.1  # of the smaller shape's box: a shape is never hidden under a bigger one
MIN_CONTRAST = 120.0  # RGB distance between a shape's colour and the background's
HELD_OUT_SEED = 1_000_000  # held-out scenes use seeds from here; training scenes from 0
INPUT_SIZE = 320
MIN_MAP50 = 0.90
HELD_OUT_COUNT = 200


@dataclass(frozen=True)
class Scene:
    """An RGB image (H x W x 3 uint8) and its shapes: boxes x1, y1, x2, y2 in pixels, class indices, and
    the pixel mask (H x W uint8: 0 background, 1 + the class index of the shape drawn last there)."""

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    mask: np.ndarray


def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """The share of the smaller of two boxes that the other one covers."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    while True:
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - background) >= MIN_CONTRAST:
            return (int(colour[0]), int(colour[1]), int(colour[2]))


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, Image.Image]:
    colour = rng.integers(0, 256, 3)
    amplitude = int(rng.integers(4, 24))
    noise = rng.integers(-amplitude, amplitude + 1, size=(height, width, 3), dtype=np.int16)
    pixels = np.clip(noise + colour.astype(np.int16), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        ends = [
            int(v)
            for v in (rng.integers(0, width), rng.integers(0, height), rng.integers(0, width), rng.integers(0, height))
        ]
        draw.line(ends, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    return colour, image


def _draw(draw: ImageDraw.ImageDraw, kind: int, box: Sequence[int], colour: int | tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    if CLASSES[kind] == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif CLASSES[kind] == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    else:
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour)


def make_scene(seed: int) -> Scene:
    """The scene of one seed (the same seed gives the same scene everywhere)."""
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, 2))
    background, image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    mask = Image.new("L", (width, height), 0)
    draw_mask = ImageDraw.Draw(mask)
    boxes: list[list[int]] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _attempt in range(50):
            side = int(rng.integers(OBJECT_RANGE[0], OBJECT_RANGE[1] + 1))
            x1, y1 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            box = [x1, y1, x1 + side, y1 + side]
            if all(overlap(box, other) <= MAX_OVERLAP for other in boxes):
                kind = int(rng.integers(0, len(CLASSES)))
                _draw(draw, kind, box, _colour(rng, background))
                _draw(draw_mask, kind, box, kind + 1)
                boxes.append(box)
                classes.append(kind)
                break
    return Scene(
        np.asarray(image),
        np.array(boxes, dtype=np.float32).reshape(-1, 4),
        np.array(classes, dtype=np.int64),
        np.asarray(mask),
    )


def held_out(count: int) -> list[Scene]:
    """The held-out scenes the evaluation and the tests use."""
    return [make_scene(HELD_OUT_SEED + i) for i in range(count)]


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- training


def load_network_module(model_dir: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("shapes_model", model_dir / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Pool:
    """Letterboxed training images and their stride-8 targets."""

    images: torch.Tensor  # P x 3 x S x S uint8
    heatmaps: torch.Tensor  # P x C x G x G float
    distances: torch.Tensor  # P x 4 x G x G log distances in strides
    positive: torch.Tensor  # P x G x G bool: cells that regress a box


def targets(boxes: np.ndarray, classes: np.ndarray, size: int, stride: int) -> tuple[torch.Tensor, ...]:
    """Gaussian class heatmaps at the box centres, and box distances at cells near each centre."""
    grid = size // stride
    heat = torch.zeros(len(CLASSES), grid, grid)
    dist = torch.zeros(4, grid, grid)
    positive = torch.zeros(grid, grid, dtype=torch.bool)
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * stride
    for (x1, y1, x2, y2), kind in zip(boxes.tolist(), classes.tolist()):
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        sigma = max(0.5, (x2 - x1) / stride / 6)
        gx, gy = cx / stride - 0.5, cy / stride - 0.5
        xs = torch.arange(grid, dtype=torch.float32)
        g = torch.exp(-((xs[None, :] - gx) ** 2 + (xs[:, None] - gy) ** 2) / (2 * sigma**2))
        heat[kind] = torch.maximum(heat[kind], g)
        ix, iy = min(grid - 1, int(cx // stride)), min(grid - 1, int(cy // stride))
        heat[kind, iy, ix] = 1.0
        for j in range(max(0, iy - 1), min(grid, iy + 2)):
            for i in range(max(0, ix - 1), min(grid, ix + 2)):
                px, py = float(centres[i]), float(centres[j])
                if (x1 < px < x2 and y1 < py < y2) or (i, j) == (ix, iy):
                    sides = torch.tensor([px - x1, py - y1, x2 - px, y2 - py]).clamp(min=1.0)
                    dist[:, j, i] = torch.log(sides / stride)
                    positive[j, i] = True
    return heat, dist, positive


def make_pool(seeds: Sequence[int], size: int, stride: int) -> Pool:
    images, heats, dists, positives = [], [], [], []
    for seed in seeds:
        scene = make_scene(seed)
        pixels, geometry = letterbox(torch.from_numpy(scene.image.copy()).permute(2, 0, 1), size)
        boxes = scene.boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2] * geometry.scale_x + geometry.left
        boxes[:, 1::2] = boxes[:, 1::2] * geometry.scale_y + geometry.top
        heat, dist, positive = targets(boxes, scene.classes, size, stride)
        images.append(pixels)
        heats.append(heat)
        dists.append(dist)
        positives.append(positive)
    return Pool(torch.stack(images), torch.stack(heats), torch.stack(dists), torch.stack(positives))


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of centres."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    centre = heat.eq(1.0)
    pos = -((1 - p) ** 2) * torch.log(p) * centre
    neg = -((1 - heat) ** 4) * p**2 * torch.log(1 - p) * ~centre
    return (pos.sum() + neg.sum()) / centre.sum().clamp(min=1)


def box_loss(module: ModuleType, pred: torch.Tensor, dist: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """GIoU between predicted and true boxes, plus L1 on log distances, over the positive cells."""
    mask = positive.flatten(1)  # N x A
    if not mask.any():
        return pred.sum() * 0
    p = pred.flatten(2).permute(0, 2, 1)[mask]  # M x 4 log distances
    t = dist.flatten(2).permute(0, 2, 1)[mask]

    def as_box(d: torch.Tensor) -> torch.Tensor:
        s = torch.exp(d.clamp(max=module.MAX_LOG_DISTANCE))
        return torch.stack([-s[:, 0], -s[:, 1], s[:, 2], s[:, 3]], dim=1)

    return generalized_box_iou_loss(as_box(p), as_box(t), reduction="mean") + F.l1_loss(p, t)


def augment(pool: Pool, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A batch with random horizontal flips and colour-channel orders (shapes and boxes unchanged)."""
    images = pool.images[index].float().div_(255)
    heat, dist, positive = pool.heatmaps[index], pool.distances[index].clone(), pool.positive[index]
    flip = torch.rand(len(index), generator=generator) < 0.5
    images[flip] = images[flip].flip(-1)
    heat = torch.where(flip[:, None, None, None], heat.flip(-1), heat)
    flipped = dist.flip(-1)[:, [2, 1, 0, 3]]
    dist = torch.where(flip[:, None, None, None], flipped, dist)
    positive = torch.where(flip[:, None, None], positive.flip(-1), positive)
    order = torch.randperm(3, generator=generator)
    return images[:, order], heat, dist, positive


def train(model_dir: Path, *, pool_size: int = 2000, steps: int = 600, batch: int = 16, seed: int = 0) -> float:
    """Train ShapesNet; save its state_dict in ``model_dir/model.pt``; return the seconds it took."""
    module = load_network_module(model_dir)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    pool = make_pool(range(pool_size), INPUT_SIZE, module.STRIDE)
    logger.info("shapes: %d training scenes generated in %.0f s", pool_size, time.perf_counter() - start)
    model = module.ShapesNet(num_classes=len(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        index = torch.randint(0, pool_size, (batch,), generator=generator)
        images, heat, dist, positive = augment(pool, index, generator)
        logits, distances = model.features(images)
        loss = focal_loss(logits, heat) + box_loss(module, distances, dist, positive)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("shapes: step %d/%d loss %.3f (%.0f s)", step, steps, loss.item(), time.perf_counter() - start)
    save_trained(model, model_dir, CLASSES)
    return time.perf_counter() - start


def save_trained(model: torch.nn.Module, model_dir: Path, classes: Sequence[str]) -> None:
    """A trained network's state_dict (``model.pt``, read through the folder's ``model.py``) and its class names
    (``labels.json``): never TorchScript, deprecated upstream since torch 2.11."""
    model.eval()
    torch.save(model.state_dict(), model_dir / "model.pt")
    (model_dir / "labels.json").write_text(json.dumps(list(classes)) + "\n", encoding="utf-8")
