"""Classifiers of the TLDR paper (section 3.1) and a small MLP.

Every classifier takes images in [0, 1] (N, C, H, W) and normalises them inside the module with
the dataset's mean and std, so generators, evaluators and attacks never have to know the
normalisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tldr_fast.validation import check_images


class Normalize(nn.Module):
    """x -> (x - mean) / std with per-channel constants stored as buffers."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class ImageClassifier(nn.Module):
    """Base class: input shape, validation, normalisation inside, features split from the head.

    A subclass builds `self.body` (normalised images -> penultimate features) and
    `self.classifier` (features -> logits), and lists its own constructor arguments in
    `extra_config()`.
    """

    arch: str = ""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int | tuple[int, int],
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.image_size = _pair(image_size)
        self.mean = tuple(float(m) for m in (mean or (0.5,) * in_channels))
        self.std = tuple(float(s) for s in (std or (0.5,) * in_channels))
        self.normalize = Normalize(self.mean, self.std)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.image_size)

    def extra_config(self) -> dict:
        """The subclass's own constructor arguments."""
        return {}

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the module from a model file."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            **self.extra_config(),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.body(self.normalize(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, penultimate features) from one forward pass."""
        feat = self.features(x)
        return self.head(feat), feat

    def _check_input(self, x: torch.Tensor) -> None:
        # Shape checks are static (no host sync), so they are safe under torch.compile.
        check_images(x, "x", expected_shape=self.input_shape)


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {(h, w)}")
    return h, w


class PaperCNN(ImageClassifier):
    """The TLDR paper's classifier.

    Three blocks [Conv3x3 (32, 64, 128), BN, LeakyReLU(0.2), MaxPool2, Dropout2d(0.25)], then
    FC 256 + BN1d + LeakyReLU(0.2) + Dropout(0.4) (the penultimate features), then FC num_classes.
    A block is skipped once the spatial size is 1, so any H x W >= 1 works.
    """

    arch = "PaperCNN"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 28,
        channels: tuple[int, ...] = (32, 64, 128),
        hidden: int = 256,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__(in_channels, num_classes, image_size, mean, std)
        self.channels = tuple(int(c) for c in channels)
        self.hidden = int(hidden)
        blocks = []
        c_in, (h, w) = in_channels, self.image_size
        for c_out in self.channels:
            layers = [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2),
            ]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            layers.append(nn.Dropout2d(0.25))
            blocks.append(nn.Sequential(*layers))
            c_in = c_out
        self.conv = nn.Sequential(*blocks)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * h * w, self.hidden),
            nn.BatchNorm1d(self.hidden),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.4),
        )
        self.classifier = nn.Linear(self.hidden, num_classes)

    def extra_config(self) -> dict:
        return {"channels": list(self.channels), "hidden": self.hidden}

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))


class MLP(ImageClassifier):
    """Flatten -> 512 -> 256 (penultimate) -> num_classes, each hidden layer BN + LeakyReLU + Dropout."""

    arch = "MLP"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 28,
        hidden: tuple[int, ...] = (512, 256),
        dropout: float = 0.2,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__(in_channels, num_classes, image_size, mean, std)
        self.hidden = tuple(int(h) for h in hidden)
        self.dropout = float(dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        d_in = in_channels * math.prod(self.image_size)
        for d_out in self.hidden:
            layers += [
                nn.Linear(d_in, d_out),
                nn.BatchNorm1d(d_out),
                nn.LeakyReLU(0.2),
                nn.Dropout(self.dropout),
            ]
            d_in = d_out
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(d_in, num_classes)

    def extra_config(self) -> dict:
        return {"hidden": list(self.hidden), "dropout": self.dropout}
