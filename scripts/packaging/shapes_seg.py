"""The shapes segmenter: trained on the pixel masks of the shapes scenes, measured by mean IoU through the kit.

The scenes are ``shapes.py``'s (training seeds from 0, held-out ones from ``HELD_OUT_SEED``); every scene is
squashed to 320 x 320 by the kit's own resize, as the served model sees it. ``models/shapes_seg/model.py``
holds the network. The mean IoU is the standard one: per class, intersections over unions summed over all
held-out scenes, at each scene's own size, averaged over the background and the three shapes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from eval_metrics import answer_label_map
from servekit.transforms import resize_image
from shapes import (
    CLASSES,
    HELD_OUT_COUNT,
    Scene,
    encode_jpeg,
    held_out,
    load_network_module,
    make_scene,
    save_trained,
)

logger = logging.getLogger(__name__)

SEG_CLASSES = ("background", *CLASSES)
INPUT = (320, 320)
MEAN, STD = 0.5, 0.25  # as models/shapes_seg/model-config.yaml says
MIN_MIOU = 0.85


def squashed(scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """The scene as the served model sees it (uint8 3 x 320 x 320, the kit's resize) and its mask (nearest)."""
    pixels = resize_image(torch.from_numpy(scene.image.copy()).permute(2, 0, 1), list(INPUT), "bilinear")
    mask = torch.from_numpy(scene.mask.copy())[None, None].float()
    return pixels, F.interpolate(mask, size=INPUT, mode="nearest-exact")[0, 0].to(torch.uint8)


def make_pool(seeds: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [squashed(make_scene(seed)) for seed in seeds]
    return torch.stack([p for p, _ in pairs]), torch.stack([m for _, m in pairs])


CLASS_WEIGHTS = (0.5, 2.0, 2.0, 2.0)  # the shapes cover about 5 % of a scene


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - the soft Dice score of the shape classes (keeps the small shapes from drowning in background)."""
    probs = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


CROP = 256  # training sees random 256 x 256 windows of the 320 x 320 scenes (the network is fully convolutional)


def train(model_dir: Path, *, pool_size: int = 1500, steps: int = 1400, batch: int = 16, seed: int = 0) -> float:
    """Train ShapesSegNet; save its state_dict in ``model_dir/model.pt``; return the seconds it took."""
    module = load_network_module(model_dir)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    images, masks = make_pool(range(pool_size))
    logger.info("shapes_seg: %d training scenes generated in %.0f s", pool_size, time.perf_counter() - start)
    model = module.ShapesSegNet(num_classes=len(SEG_CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    weights = torch.tensor(CLASS_WEIGHTS)
    model.train()
    for step in range(steps):
        index = torch.randint(0, pool_size, (batch,), generator=generator)
        top, left = (int(v) for v in torch.randint(0, INPUT[0] - CROP + 1, (2,), generator=generator))
        x = images[index, :, top : top + CROP, left : left + CROP].float().div_(255).sub_(MEAN).div_(STD)
        y = masks[index, top : top + CROP, left : left + CROP].long()
        flip = torch.rand(batch, generator=generator) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        x = x[:, torch.randperm(3, generator=generator)]  # colours never name a shape
        logits = model(x)  # at the input's resolution, as served: the loss sees every boundary pixel
        loss = F.cross_entropy(logits, y, weight=weights) + dice_loss(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            logger.info("shapes_seg: step %d/%d loss %.3f (%.0f s)", step, steps, loss.item(), elapsed)
    save_trained(model, model_dir, SEG_CLASSES)
    return time.perf_counter() - start


def mean_iou(scenes: Sequence[Scene], answers: Sequence[dict[str, Any]]) -> tuple[float, list[float]]:
    """The mean over classes of intersection / union summed over every scene, and each class's IoU."""
    inter = np.zeros(len(SEG_CLASSES))
    union = np.zeros(len(SEG_CLASSES))
    for scene, answer in zip(scenes, answers):
        got = answer_label_map(answer)
        for index in range(len(SEG_CLASSES)):
            truth, found = scene.mask == index, got == index
            inter[index] += np.logical_and(truth, found).sum()
            union[index] += np.logical_or(truth, found).sum()
    ious = [float(i / u) if u else 1.0 for i, u in zip(inter, union)]
    return float(np.mean(ious)), ious


def held_out_jpegs(count: int = HELD_OUT_COUNT) -> tuple[list[Scene], list[bytes]]:
    """The held-out scenes and the JPEGs every path (in process, TorchServe, Triton) is sent."""
    scenes = held_out(count)
    return scenes, [encode_jpeg(scene.image) for scene in scenes]


def answers_in_process(model_dir: Path, jpegs: Sequence[bytes]) -> list[Any]:
    """The kit's answers (its segmenter service, in process, batches of 8 JPEGs)."""
    from servekit.config import read_model_config
    from servekit.service import build_service

    service = build_service(read_model_config(model_dir), model_dir, torch.device("cpu"), max_batch=8)
    answers: list[Any] = []
    for start in range(0, len(jpegs), 8):
        answers += service.handle([{"body": data} for data in jpegs[start : start + 8]]).answers
    bad = [a for a in answers if isinstance(a, BaseException)]
    if bad:
        raise SystemExit(f"shapes_seg: {len(bad)} scenes failed: {bad[0]}")
    return answers


def evaluate(model_dir: Path, count: int = HELD_OUT_COUNT) -> tuple[float, list[float]]:
    """Mean IoU of the kit's answers in process on the held-out scenes."""
    scenes, jpegs = held_out_jpegs(count)
    return mean_iou(scenes, answers_in_process(model_dir, jpegs))


COLOURS = ("#1f77b4", "#d62728", "#2ca02c")  # circle, square, triangle


def draw_answer(image: np.ndarray, answer: dict[str, Any]) -> torch.Tensor:
    """The scene with the answer's shape masks drawn over it (``draw_segmentation_masks``), 3 x H x W uint8."""
    from torchvision.utils import draw_segmentation_masks

    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)
    found = answer_label_map(answer)
    shown = [i for i in range(1, len(SEG_CLASSES)) if (found == i).any()]
    if not shown:
        return pixels
    masks = torch.from_numpy(np.stack([found == i for i in shown]))
    return draw_segmentation_masks(pixels, masks, alpha=0.6, colors=[COLOURS[i - 1] for i in shown])
