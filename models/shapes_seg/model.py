"""ShapesSegNet: a small semantic segmenter of circles, squares and triangles (and the background).

The kit's own design: a strided CNN to 1/32 of the input, a top-down path back to stride 4, a class for
every stride-4 cell, upsampled bilinearly to the input. The forward pass answers class logits
``[N, 1 + C, H, W]`` at the input's resolution, as torchvision's and Hugging Face's segmenters do, so the
kit serves it through ``task: segmentation`` like any of them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapesSegNet(nn.Module):
    """About 0.4 M parameters; input N x 3 x H x W normalized, H and W multiples of 32."""

    def __init__(self, num_classes: int = 4, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(conv(3, w // 2, 2), conv(w // 2, w, 2), conv(w, w))  # stride 4
        self.c3 = nn.Sequential(conv(w, 2 * w, 2), conv(2 * w, 2 * w))  # stride 8
        self.c4 = nn.Sequential(conv(2 * w, 3 * w, 2), conv(3 * w, 3 * w))  # stride 16
        self.c5 = nn.Sequential(conv(3 * w, 4 * w, 2), conv(4 * w, 4 * w))  # stride 32
        self.lat5 = nn.Conv2d(4 * w, 3 * w, 1)
        self.lat4 = nn.Conv2d(3 * w, 2 * w, 1)
        self.lat3 = nn.Conv2d(2 * w, w, 1)
        self.head = nn.Sequential(conv(w, w), conv(w, w))
        self.classifier = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fixed scale factors, not sizes read from tensors: the graph exports to ONNX from TorchScript as is
        return F.interpolate(self.features(x), scale_factor=4.0, mode="bilinear", align_corners=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at stride 4."""
        c2 = self.stem(x)
        c3 = self.c3(c2)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p4 = c4 + F.interpolate(self.lat5(c5), scale_factor=2.0, mode="nearest")
        p3 = c3 + F.interpolate(self.lat4(p4), scale_factor=2.0, mode="nearest")
        p2 = c2 + F.interpolate(self.lat3(p3), scale_factor=2.0, mode="nearest")
        return self.classifier(self.head(p2))
