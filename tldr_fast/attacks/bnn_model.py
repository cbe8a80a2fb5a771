"""A binarised MLP (BNN): binary weights, sign activations, BatchNorm, on binarised downsampled images.

Images in [0, 1] (N, 1, H, W) are average-pooled to grid x grid and thresholded to pixels in
{-1, +1}. Each hidden block is x -> sign(BN(sign(W) x)); the output block is logits = BN(sign(W) h).
sign(t) = +1 for t >= 0 and -1 otherwise (sign(0) = +1), for weights and activations alike; this
convention is what the SAT encoding (`bnn_fold`, `bnn_cnf`) reproduces exactly.

Training uses straight-through estimators: sign of a weight passes the gradient unchanged (the
real-valued latent weight keeps learning), sign of an activation passes it where |t| <= 1
(the hardtanh gradient, Courbariaux et al. 2016).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tldr_fast.models.classifiers import ImageClassifier
from tldr_fast.serialization import register_architecture
from tldr_fast.validation import check_positive_int


def sign(t: torch.Tensor) -> torch.Tensor:
    """+1 where t >= 0, -1 elsewhere, in t's dtype (no straight-through gradient)."""
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


class _SignSTE(torch.autograd.Function):
    """Forward: exact sign(t). Backward: grad * 1[|t| <= 1] if saturating, else grad unchanged."""

    @staticmethod
    def forward(t: torch.Tensor, saturate: bool) -> torch.Tensor:
        return sign(t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        t, saturate = inputs
        ctx.saturate = saturate
        if saturate:
            ctx.save_for_backward(t)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.saturate:
            return grad, None
        (t,) = ctx.saved_tensors
        return grad * (t.abs() <= 1).to(grad.dtype), None


def sign_activation(t: torch.Tensor) -> torch.Tensor:
    """sign(t) with the hardtanh straight-through gradient."""
    return _SignSTE.apply(t, True)


class BinaryLinear(nn.Module):
    """y = sign(W) x without bias (the following BatchNorm supplies the offset)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1.0, 1.0))

    def binary_weight(self) -> torch.Tensor:
        """sign(W) in {-1, +1}, with the identity straight-through gradient to the latent W."""
        return _SignSTE.apply(self.weight, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.binary_weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@register_architecture
class BinarizedMLP(ImageClassifier):
    """Binarised MLP over a grid x grid binarised view of the image.

    features(x) is the last hidden layer's {-1, +1} activations; head(h) = BN(sign(W) h) the logits.
    """

    arch = "BinarizedMLP"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 28,
        grid: int = 10,
        hidden: tuple[int, ...] = (100, 50),
        pixel_threshold: float = 0.3,
    ):
        super().__init__(in_channels, num_classes, image_size)
        if in_channels != 1:
            raise ValueError(f"in_channels must be 1 (binarised grey images), got {in_channels}")
        self.grid = check_positive_int(grid, "grid")
        if not hidden:
            raise ValueError("hidden must name at least one hidden layer width, got ()")
        self.hidden = tuple(check_positive_int(int(h), "hidden width") for h in hidden)
        if not 0.0 < float(pixel_threshold) < 1.0:
            raise ValueError(f"pixel_threshold must lie in (0, 1), got {pixel_threshold!r}")
        self.pixel_threshold = float(pixel_threshold)
        widths = (self.grid * self.grid, *self.hidden, self.num_classes)
        self.linears = nn.ModuleList(BinaryLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:])

    @property
    def num_inputs(self) -> int:
        return self.grid * self.grid

    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "grid": self.grid,
            "hidden": list(self.hidden),
            "pixel_threshold": self.pixel_threshold,
        }

    def binarize_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 1, H, W) in [0, 1] -> pixels (N, grid*grid) in {-1, +1}: +1 where the pooled mean > threshold."""
        self._check_input(x)
        pooled = F.adaptive_avg_pool2d(x, self.grid).flatten(1)
        return torch.where(pooled > self.pixel_threshold, 1.0, -1.0).to(x.dtype)

    def binary_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (N, grid*grid) in {-1, +1} -> last hidden activations in {-1, +1}."""
        h = pixels
        for linear, norm in zip(self.linears[:-1], self.norms[:-1]):
            h = sign_activation(norm(linear(h)))
        return h

    def forward_binary(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of already binarised pixels (N, grid*grid) in {-1, +1}: the function the CNF encodes."""
        if pixels.dim() != 2 or pixels.shape[1] != self.num_inputs:
            raise ValueError(
                f"pixels must have shape (N, {self.num_inputs}), got {tuple(pixels.shape)}"
            )
        return self.head(self.binary_features(pixels))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.binary_features(self.binarize_images(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.norms[-1](self.linears[-1](features))

    def pixels_to_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """{-1, +1} pixels (N, grid*grid) -> images (N, 1, grid, grid) in {0, 1} that binarise back to them.

        Only for a model whose image_size is (grid, grid) (pooling is then the identity); feed such a
        model images pooled to grid x grid beforehand, e.g. with `pool_images`.
        """
        if self.image_size != (self.grid, self.grid):
            raise ValueError(
                f"pixels_to_images needs image_size == (grid, grid) = {(self.grid, self.grid)}, "
                f"got image_size {self.image_size}"
            )
        return (pixels > 0).to(torch.float32).view(-1, 1, self.grid, self.grid)


def pool_images(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] -> (N, C, grid, grid) cell means, the view a BinarizedMLP thresholds."""
    return F.adaptive_avg_pool2d(images, check_positive_int(grid, "grid"))
