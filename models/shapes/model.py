"""ShapesNet: a small single-stage, anchor-free detector of circles, squares and triangles.

The kit's own design (no code from any YOLO project): a strided CNN to 1/32 of the input, a top-down
path back to stride 8, and at every stride-8 cell a class heatmap (sigmoid) and the distances from the
cell's centre to the box's four sides. The forward pass answers the YOLOv8 layout ``[N, 4+C, A]``:
cx, cy, w, h in input pixels, then C class scores, for every cell A (row-major), so the kit serves it
through ``handler.output: yolo`` like any exported YOLO model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

STRIDE = 8
MAX_LOG_DISTANCE = 6.0  # exp(6) * 8 px: far beyond any box the model sees


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapesNet(nn.Module):
    """About 0.3 M parameters; input N x 3 x S x S in [0, 1], S a multiple of 32."""

    def __init__(self, num_classes: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.stride = STRIDE
        self.max_log_distance = MAX_LOG_DISTANCE
        self.stem = nn.Sequential(conv(3, w // 2, 2), conv(w // 2, w, 2), conv(w, w))  # stride 4
        self.c3 = nn.Sequential(conv(w, 2 * w, 2), conv(2 * w, 2 * w))  # stride 8
        self.c4 = nn.Sequential(conv(2 * w, 3 * w, 2), conv(3 * w, 3 * w))  # stride 16
        self.c5 = nn.Sequential(conv(3 * w, 4 * w, 2), conv(4 * w, 4 * w))  # stride 32
        self.lat5 = nn.Conv2d(4 * w, 3 * w, 1)
        self.lat4 = nn.Conv2d(3 * w, 2 * w, 1)
        self.head = nn.Sequential(conv(2 * w, 2 * w), conv(2 * w, 2 * w))
        self.cls = nn.Conv2d(2 * w, num_classes, 1)
        self.box = nn.Conv2d(2 * w, 4, 1)
        nn.init.constant_(self.cls.bias, -4.6)  # start near p = 0.01: most cells hold nothing

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (N x C x H x W) and log side distances in strides (N x 4 x H x W) at stride 8."""
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p4 = c4 + F.interpolate(self.lat5(c5), scale_factor=2.0, mode="nearest")  # S is a multiple of 32
        p3 = c3 + F.interpolate(self.lat4(p4), scale_factor=2.0, mode="nearest")
        h = self.head(p3)
        return self.cls(h), self.box(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, distances = self.features(x)
        return self.decode(logits, distances)

    def decode(self, logits: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """The YOLOv8 layout [N, 4+C, A]: cx, cy, w, h in input pixels, then the class scores."""
        height, width = logits.shape[-2], logits.shape[-1]
        ys = (torch.arange(height, device=logits.device, dtype=torch.float32) + 0.5) * self.stride
        xs = (torch.arange(width, device=logits.device, dtype=torch.float32) + 0.5) * self.stride
        gx = (xs.unsqueeze(0) + ys.unsqueeze(1) * 0).reshape(-1)  # row-major cell centres, as ONNX exports them
        gy = (ys.unsqueeze(1) + xs.unsqueeze(0) * 0).reshape(-1)
        d = self.side_distances(distances)
        left, top, right, bottom = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
        boxes = torch.stack([gx + (right - left) / 2, gy + (bottom - top) / 2, left + right, top + bottom], dim=1)
        return torch.cat([boxes, torch.sigmoid(logits.flatten(2))], dim=1)

    def side_distances(self, distances: torch.Tensor) -> torch.Tensor:
        """Left, top, right, bottom distances in pixels (N x 4 x A) from the head's log distances."""
        return torch.exp(distances.flatten(2).clamp(max=self.max_log_distance)) * self.stride
