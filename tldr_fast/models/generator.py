"""The conditioned generator of the TLDR paper (section 3.2).

    [z ; c] (B, L + N, 1, 1)
      -> ConvT to N x N -> BN -> LeakyReLU -> Dropout(p)          (stage 1: up to N x N,
      -> ConvT 3x3      -> BN -> LeakyReLU -> Dropout(p)            heavy dropout)
      -> concat the hot N x N matrix as one more channel           (matrix modes)
      -> ConvT stride 2 -> BN -> LeakyReLU, while the size can double   (stage 2)
      -> ConvT sized to land exactly on H x W -> output activation  -> image in [0, 1]

c is the conditioning vector (`vector` modes), a learned label embedding (`label`), or nothing
(`matrix`). Any N >= 2 and any image shape (C, H, W) work: the last transposed convolution's
kernel and padding are chosen per dimension so the output is exactly H x W.

BatchNorm uses batch statistics in training and at sampling time (track_running_stats=False): the
module keeps no running buffers, so K generators stack into one functional model without state
to thread through the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tldr_fast import conditioning as cond
from tldr_fast.transposed_conv import fold_route_is_faster, transposed_conv_by_fold

OUTPUT_ACTIVATIONS = ("sigmoid", "tanh", "clamp")


def _output_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "tanh":
        return (torch.tanh(x) + 1) / 2  # tanh rescaled to [0, 1]
    return x.clamp(0.0, 1.0)


def _fit_kernel(size: int, target: int) -> tuple[int, int]:
    """(kernel, padding) of a stride-1 ConvTranspose2d mapping `size` to `target`: size + k - 1 - 2p."""
    padding = max(0, math.ceil((size - target) / 2))
    return target - size + 1 + 2 * padding, padding


def _project_to_matrix(conv: nn.ConvTranspose2d, v: torch.Tensor) -> torch.Tensor:
    """conv applied to v (B, C_in) seen as 1 x 1 images, computed as the matrix product it is:
    out[b, o, i, j] = sum_c v[b, c] W[c, o, i, j] + bias[o].

    cuDNN runs this transposed convolution of a 1 x 1 input as an implicit GEMM that is 16x slower
    than the plain GEMM on an H100 at B = 8192 (15.4 vs 0.97 ms forward); on a CPU at B = 256 the
    GEMM takes 25 ms forward and backward against ATen's 102 ms."""
    weight = conv.weight
    out = (v @ weight.flatten(1)).view(v.shape[0], *weight.shape[1:])
    return out + conv.bias[:, None, None]


def _to_image_channels(conv: nn.ConvTranspose2d, h: torch.Tensor) -> torch.Tensor:
    """conv(h) for the generator's last transposed convolution (down to the image's few channels).

    On a CPU with one image channel by `transposed_conv_by_fold` (B = 256, 64 -> 1 channels,
    20 -> 28 pixels, under vmap: forward and backward 74-82 vs 146-159 ms). cuDNN's is kept on
    GPUs, and under torch.compile the module's own convolution is traced: Inductor's lowering of
    the fold route rounded differently enough to move the compiled step off the eager trajectory
    (tests/test_compiled_step.py), and its speed there was not measured."""
    if not fold_route_is_faster(h, conv.weight, conv.groups):
        return conv(h)
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    out_size = ((h.shape[-2] - 1) * sh - 2 * ph + kh, (h.shape[-1] - 1) * sw - 2 * pw + kw)
    out = transposed_conv_by_fold(h, conv.weight, out_size, conv.stride, conv.padding)
    return out + conv.bias.view(1, -1, 1, 1)


class UniformMaskDropout(nn.Dropout):
    """Inverted dropout, x * m with m = [u >= p] / (1 - p), u ~ U[0, 1) per element: nn.Dropout's
    distribution, on a CPU with the mask drawn by uniform_ instead of bernoulli_.

    Forward and backward under the engine's vmap, measured: CPU, 256 x 128 x 10 x 10 activations,
    39 ms against nn.Dropout's 87 ms (the CPU step spent 11% of its time in bernoulli_); H100,
    8192 x 128 x 10 x 10, 1.77 ms against 0.69 ms for nn.Dropout's fused kernel, which GPUs keep."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        # empty_like().uniform_() gives rand_like's numbers in eager; with rand_like itself the
        # Inductor-compiled CPU step drew other numbers than eager despite fallback_random.
        return x * dropout_mask(torch.empty_like(x).uniform_(), self.p)


def dropout_mask(u: torch.Tensor, p: float) -> torch.Tensor:
    """[u >= p] / (1 - p) in u's dtype: the inverted-dropout mask of uniforms u."""
    return (u >= p).to(u.dtype) * (1.0 / (1.0 - p))


def _block(c_in: int, c_out: int, conv: nn.Module, dropout: float) -> list[nn.Module]:
    layers = [conv, nn.BatchNorm2d(c_out, track_running_stats=False), nn.LeakyReLU(0.2)]
    if dropout > 0:
        layers.append(UniformMaskDropout(dropout))
    return layers


class Generator(nn.Module):
    """G(z, labels, vectors) -> images (B, C, H, W) in [0, 1]."""

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int],
        conditioning: str = "vector-matrix",
        latent_dim: int = 100,
        width: int = 64,
        dropout: float = 0.5,
        output_activation: str = "sigmoid",
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if len(tuple(image_shape)) != 3 or min(int(s) for s in image_shape) < 1:
            raise ValueError(
                f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)!r}"
            )
        if latent_dim < 1 or width < 1:
            raise ValueError(f"latent_dim and width must be >= 1, got {latent_dim} and {width}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}"
            )
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.conditioning = cond.check_mode(conditioning)
        self.latent_dim = int(latent_dim)
        self.width = int(width)
        self.dropout = float(dropout)
        self.output_activation = output_activation

        n = self.num_classes
        c_in = self.latent_dim + (n if self.conditioning != "matrix" else 0)
        if self.conditioning == "label":
            self.embedding = nn.Embedding(n, n)
        wide = 2 * self.width
        self.to_matrix_size = nn.Sequential(
            *_block(c_in, wide, nn.ConvTranspose2d(c_in, wide, n), self.dropout),
            *_block(wide, wide, nn.ConvTranspose2d(wide, wide, 3, padding=1), self.dropout),
        )
        channels, (h, w) = wide + int(cond.uses_matrix(self.conditioning)), (n, n)
        target_h, target_w = self.image_shape[1:]
        upsample: list[nn.Module] = []
        while 2 * h <= target_h or 2 * w <= target_w:
            sh, sw = (2 if 2 * h <= target_h else 1), (2 if 2 * w <= target_w else 1)
            out = max(self.width, channels // 2)
            # kernel 4 doubles a dimension (stride 2), kernel 3 keeps it (stride 1); padding 1.
            conv = nn.ConvTranspose2d(channels, out, (sh + 2, sw + 2), stride=(sh, sw), padding=1)
            upsample += _block(channels, out, conv, 0.0)
            channels, h, w = out, h * sh, w * sw
        (kh, ph), (kw, pw) = _fit_kernel(h, target_h), _fit_kernel(w, target_w)
        upsample.append(
            nn.ConvTranspose2d(channels, self.image_shape[0], (kh, kw), padding=(ph, pw))
        )
        self.to_image = nn.Sequential(*upsample)

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the module from a generators file."""
        return {
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "conditioning": self.conditioning,
            "latent_dim": self.latent_dim,
            "width": self.width,
            "dropout": self.dropout,
            "output_activation": self.output_activation,
        }

    def forward(
        self, z: torch.Tensor, labels: torch.Tensor, vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z (B, latent_dim), labels (B,) int64, vectors (B, N) for the vector modes."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        if labels.shape != z.shape[:1]:
            raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(labels.shape)}")
        parts = [z]
        if self.conditioning == "label":
            parts.append(self.embedding(labels))
        elif cond.uses_vector(self.conditioning):
            if vectors is None or vectors.shape != (z.shape[0], self.num_classes):
                got = None if vectors is None else tuple(vectors.shape)
                raise ValueError(
                    f"conditioning {self.conditioning!r} needs vectors of shape ({z.shape[0]}, {self.num_classes}), got {got}"
                )
            parts.append(vectors.to(z.dtype))
        h = self.to_matrix_size[1:](_project_to_matrix(self.to_matrix_size[0], torch.cat(parts, 1)))
        if cond.uses_matrix(self.conditioning):
            h = torch.cat([h, cond.hot_matrix(labels, self.num_classes, h.dtype)], 1)
        return _output_activation(
            self.output_activation, _to_image_channels(self.to_image[-1], self.to_image[:-1](h))
        )
