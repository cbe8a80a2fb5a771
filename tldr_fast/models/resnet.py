"""ResNet-18 for CIFAR-sized images (He et al. 2016, the CIFAR variant of Kuang Liu's pytorch-cifar).

Stem Conv3x3 (width) + BN + ReLU, no max-pool; four stages of two BasicBlocks with widths
width x (1, 2, 4, 8), the last three starting with a stride-2 block; global average pooling (the
penultimate features, 8 x width) and one Linear head. A BasicBlock is
relu(BN(Conv3x3(relu(BN(Conv3x3(x))))) + shortcut(x)), the shortcut a strided Conv1x1 + BN where
the shape changes, else the identity. Convolutions before a BatchNorm carry no bias. Images in
[0, 1] are normalised inside the module, as for every classifier here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tldr_fast.models.classifiers import ImageClassifier
from tldr_fast.validation import check_positive_int


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(ImageClassifier):
    """CIFAR-style ResNet-18; `width` 64 is the standard model, smaller widths make it cheap."""

    arch = "ResNet18"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 32,
        width: int = 64,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__(in_channels, num_classes, image_size, mean, std)
        self.width = check_positive_int(width, "width")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for i, c_out in enumerate(width * m for m in (1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1))
            )
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def extra_config(self) -> dict:
        return {"width": self.width}

    def body(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)
