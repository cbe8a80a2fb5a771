"""LeNet-5 (LeCun et al. 1998), the MNIST model of the Data-from-Model paper.

Conv5x5 6 (padding 2) -> ReLU -> MaxPool2 -> Conv5x5 16 -> ReLU -> MaxPool2 -> FC 120 -> ReLU
-> FC 84 -> ReLU (the penultimate features) -> FC num_classes. Images in [0, 1] are normalised
inside the module, as for every classifier here.
"""

from __future__ import annotations

import torch
from torch import nn

from tldr_fast.models.classifiers import ImageClassifier


class LeNet(ImageClassifier):
    """LeNet-5 for any H x W >= 12 (28 x 28 gives the classic 16 x 5 x 5 feature map)."""

    arch = "LeNet"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 28,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__(in_channels, num_classes, image_size, mean, std)
        h, w = self.image_size
        if min(h, w) < 12:
            raise ValueError(f"LeNet needs images of at least 12 x 12, got image_size {(h, w)}")
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        map_h, map_w = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * map_h * map_w, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(84, num_classes)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))
