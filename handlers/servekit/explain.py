"""Explanations that fit in a response: where in the image the evidence for one class lies.

TorchServe's stock handlers answer ``/explanations`` with Captum Integrated Gradients as a nested list the
shape of the input (3 x 224 x 224 floats, about 3.4 MB per image) and take every image's target from the
first request of the batch. Here each image names its own target (``target``: a class index or label
name; else its top-1), and the answer is a coarse grid of saliency in [0, 1], two decimals, with the box
of the image as sent that the grid covers (a classifier sees only its center crop), the target, its score
and the method: 2-4 KB per image.

Methods (``handler.explain.method``):

- ``gradcam``: Grad-CAM on the last convolution (or ``layer``) of an eager torch network: one forward and
  one backward pass for the whole batch.
- ``occlusion``: model-agnostic (ONNX, OpenVINO, AOTInductor, TorchScript, ViTs): each cell of a coarse
  grid, at most ``budget`` cells, is filled with the image's mean colour, and the drop of the target's
  probability (a segmenter's: its score) is the cell's saliency; the occluded copies run in batches.
- ``integrated_gradients``: Captum's, ``steps`` steps from the mean image, absolute attributions summed
  over channels (what TorchServe's stock handlers compute, pooled to the grid).
- ``auto``: Grad-CAM when the network is an eager torch module with convolutions, occlusion otherwise.

Pure functions of a network, a normalized batch and targets; no server here.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from servekit.errors import BadInput, ConfigError

Scores = Callable[[torch.Tensor], torch.Tensor]  # a normalized batch -> [N, C] scores (logits or probabilities)
MIN_CONVS = 2  # a ViT's one patch-embedding conv is no CNN: auto explains it by occlusion


@dataclass(frozen=True)
class Explained:
    """One image's explanation: a [rows, cols] saliency grid in [0, 1] for ``target``."""

    method: str
    target: int
    score: float
    grid: torch.Tensor


def choose_method(method: str, network: Any) -> str:
    """The method ``auto`` stands for on ``network``; a gradient method on a network without gradients
    is a config error."""
    eager = isinstance(network, torch.nn.Module) and not isinstance(network, torch.jit.ScriptModule)
    cnn = eager and sum(isinstance(m, torch.nn.Conv2d) for m in network.modules()) >= MIN_CONVS
    if method == "auto":
        return "gradcam" if cnn else "occlusion"
    if method == "gradcam" and not cnn:
        raise ConfigError("handler.explain.method gradcam needs an eager torch network with convolutions")
    if method == "integrated_gradients" and not isinstance(network, torch.nn.Module):
        raise ConfigError("handler.explain.method integrated_gradients needs a torch network (not a graph)")
    return method


def last_conv_name(network: torch.nn.Module) -> str:
    """The name of the network's last ``Conv2d`` in module order ('' when it has none)."""
    names = [name for name, module in network.named_modules() if isinstance(module, torch.nn.Conv2d)]
    return names[-1] if names else ""


def resolve_target(asked: Any, labels: Sequence[str], classes: int) -> int | None:
    """The class a request asked to explain: an index, or a label name; None for its top-1.

    Raises:
        BadInput: an index out of range, an unknown label, or another type.
    """
    if asked is None or asked == "":
        return None
    if isinstance(asked, (bytes, bytearray)):
        asked = bytes(asked).decode("utf-8", "replace")
    if isinstance(asked, str) and asked.strip().lstrip("-").isdigit():
        asked = int(asked.strip())
    if isinstance(asked, bool) or not isinstance(asked, (int, str)):
        raise BadInput(f"'target' must be a class index or a label name, got {type(asked).__name__}")
    if isinstance(asked, int):
        if not 0 <= asked < classes:
            raise BadInput(f"'target' {asked} is out of range: the model has {classes} classes (0-{classes - 1})")
        return asked
    if asked in labels:
        return list(labels).index(asked)
    raise BadInput(f"'target' {asked[:64]!r} is not a label of this model")


def explain_batch(
    network: Any,
    scores: Scores,
    batch: torch.Tensor,
    targets: Sequence[int | None],
    *,
    method: str,
    grid: tuple[int, int],
    budget: int = 64,
    steps: int = 16,
    layer: str = "",
    chunk: int = 16,
    probabilities: bool = True,
    base: torch.Tensor | None = None,
) -> list[Explained]:
    """Explain each image of a normalized ``batch`` for its target (None: its top-1 under ``scores``).

    ``network`` is what gradients flow through (Grad-CAM hooks its layer); ``scores`` maps a batch to
    per-class scores (a classifier's logits, or a segmenter's logits averaged over the image). ``chunk``
    bounds the forward batches of occlusion; ``probabilities`` False makes occlusion measure the drop of the
    score itself rather than of its softmax (a segmenter's). ``base`` is ``scores(batch)`` when the caller
    has it already (one forward pass fewer).
    """
    if base is None:
        with torch.no_grad():
            base = scores(batch)
    raw = base.float()
    probs = raw.softmax(-1)
    chosen = [int(probs[i].argmax()) if t is None else int(t) for i, t in enumerate(targets)]
    if method == "gradcam":
        maps = gradcam(network, scores, batch, chosen, layer or last_conv_name(network))
    elif method == "integrated_gradients":
        maps = integrated_gradients(scores, batch, chosen, steps)
    else:
        unoccluded = probs if probabilities else raw
        maps = occlusion(scores, batch, chosen, unoccluded, budget=budget, chunk=chunk, probabilities=probabilities)
    cells = [to_grid(m, grid) for m in maps]
    return [Explained(method, t, float(probs[i, t]), c) for i, (t, c) in enumerate(zip(chosen, cells))]


def gradcam(
    network: torch.nn.Module, scores: Scores, batch: torch.Tensor, targets: Sequence[int], layer: str
) -> list[torch.Tensor]:
    """Grad-CAM maps [h', w'] at the layer's resolution: ReLU of the activations weighted by the spatial
    mean of the target's gradient."""
    module = dict(network.named_modules()).get(layer)
    if module is None:
        raise ConfigError(f"handler.explain.layer {layer!r} is not a module of this network")
    saved: dict[str, torch.Tensor] = {}

    def keep(_: Any, __: Any, output: Any) -> None:
        saved["a"] = output

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            out = scores(batch.detach().requires_grad_(True))
            picked = out[torch.arange(len(targets)), torch.tensor(targets)]
            # gradients of the targets with respect to the layer only (no parameter's .grad is touched)
            (grad,) = torch.autograd.grad(picked.sum(), saved["a"])
    finally:
        handle.remove()
    activation = saved["a"].detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return list(F.relu((weights * activation).sum(1)).detach().float())


def integrated_gradients(scores: Scores, batch: torch.Tensor, targets: Sequence[int], steps: int) -> list[torch.Tensor]:
    """Captum's Integrated Gradients from the mean image (zero after normalization): |attribution| summed
    over channels, at the input's resolution."""
    from captum.attr import IntegratedGradients

    with torch.enable_grad():
        attributions = IntegratedGradients(scores).attribute(
            batch.detach(), target=list(targets), n_steps=steps, internal_batch_size=max(1, len(targets)) * steps
        )
    return list(attributions.detach().abs().sum(1).float())


def occlusion_cells(height: int, width: int, budget: int) -> tuple[int, int]:
    """The occlusion grid's (rows, cols): as many cells as ``budget`` allows, square-ish in the input's aspect."""
    rows = max(1, int(math.sqrt(budget * height / width)))
    cols = max(1, min(budget // rows, round(rows * width / height) or 1))
    return rows, cols


def occlusion(
    scores: Scores,
    batch: torch.Tensor,
    targets: Sequence[int],
    base: torch.Tensor,
    *,
    budget: int,
    chunk: int,
    probabilities: bool = True,
) -> list[torch.Tensor]:
    """The drop of each target's score when one cell is filled with the image's mean colour, per cell: its
    probability (softmax of a classifier's logits), or the score itself (a segmenter's mean class logit,
    which other classes' logits do not move). ``base`` is the unoccluded batch's, measured the same way."""

    def score(x: torch.Tensor) -> torch.Tensor:
        out = scores(x).float()
        return out.softmax(-1) if probabilities else out

    n, _, height, width = batch.shape
    rows, cols = occlusion_cells(height, width, budget)
    ys = [round(i * height / rows) for i in range(rows + 1)]
    xs = [round(j * width / cols) for j in range(cols + 1)]
    maps = [torch.zeros(rows, cols) for _ in range(n)]
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    index = torch.tensor(targets)
    with torch.no_grad():
        for image in range(n):
            fill = batch[image].mean(dim=(1, 2), keepdim=True)  # neutral for this image, not a gray patch
            for start in range(0, len(cells), chunk):
                part = cells[start : start + chunk]
                copies = batch[image : image + 1].repeat(len(part), 1, 1, 1)
                for k, (r, c) in enumerate(part):
                    copies[k, :, ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = fill
                after = score(copies)[:, index[image]]
                for k, (r, c) in enumerate(part):
                    maps[image][r, c] = base[image, index[image]] - after[k]
    return [m.clamp(min=0) for m in maps]


def to_grid(saliency: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A [rows, cols] grid of ``saliency`` (any [h, w]) in [0, 1]: area-averaged (or bilinear when the
    map is coarser than the grid), divided by its maximum, two decimals."""
    mode = "area" if saliency.shape[0] >= grid[0] and saliency.shape[1] >= grid[1] else "bilinear"
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    cells = F.interpolate(saliency[None, None].float(), size=grid, mode=mode, **kwargs)[0, 0].clamp(min=0)
    peak = float(cells.max())
    return (cells / peak if peak > 0 else cells).mul(100).round().div(100)


def grid_shape(height: int, width: int, cells: int) -> tuple[int, int]:
    """A grid of ``cells`` along the longer side of a ``height`` x ``width`` input, the other in proportion."""
    if height >= width:
        return cells, max(1, round(cells * width / height))
    return max(1, round(cells * height / width)), cells


def heatmap_png(grid: torch.Tensor, side: int = 96) -> str:
    """A small base64 PNG of the grid (a red-to-yellow ramp over black), ``side`` pixels on its longer side."""
    from PIL import Image

    rows, cols = grid.shape
    scale = side / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    value = F.interpolate(grid[None, None].float(), size=size[::-1], mode="bilinear", align_corners=False)[0, 0]
    value = value.clamp(0, 1)
    rgb = torch.stack([value.mul(2).clamp(max=1), value.mul(2).sub(1).clamp(min=0), torch.zeros_like(value)])
    pixels = rgb.mul(255).round().byte().permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def explanation_json(
    explained: Explained,
    labels: Sequence[str],
    box: tuple[int, int, int, int],
    *,
    png: bool = False,
    layer: str = "",
) -> dict[str, Any]:
    """The answer of one explained image: the target, its score, the grid and the box of the image as sent
    the grid covers ([x0, y0, x1, y1]; row 0 is the top)."""
    target = explained.target
    body: dict[str, Any] = {
        "method": explained.method,
        "target": {
            "index": target,
            "label": labels[target] if target < len(labels) else str(target),
            "score": round(explained.score, 4),
        },
        "grid": explained.grid.tolist(),
        "box": list(box),
    }
    if layer:
        body["layer"] = layer
    if png:
        body["png"] = heatmap_png(explained.grid)
    return {"explanation": body}
