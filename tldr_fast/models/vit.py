"""A small Vision Transformer (Dosovitskiy et al. 2021) for low-resolution images.

Patch embedding (a Conv with kernel = stride = patch_size), a learned class token and learned
position embeddings; `depth` pre-norm encoder blocks x + Attn(LN(x)), x + MLP(LN(x)) with
multi-head self-attention softmax(q k^T / sqrt(d_head)) v written out from nn.Linear projections
(so each projection is a Linear on (B, T, D) tokens) and a GELU MLP; a final LayerNorm of the class
token (the penultimate features, `dim`) and a Linear head. No dropout. Images in [0, 1] are
normalised inside the module, as for every classifier here.
"""

from __future__ import annotations

import torch
from torch import nn

from tldr_fast.models.classifiers import ImageClassifier
from tldr_fast.validation import check_positive_int


class PatchEmbedding(nn.Module):
    """(B, C, H, W) -> (B, 1 + H W / p^2, dim) tokens: class token first, position embeddings added."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, num_patches: int):
        super().__init__()
        self.projection = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, 1 + num_patches, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.projection(x).flatten(2).transpose(1, 2)
        return torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], 1) + self.position


class SelfAttention(nn.Module):
    """Multi-head self-attention over (B, T, dim) tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(ImageClassifier):
    """Vision Transformer; the defaults (32 x 32 RGB, 4 x 4 patches, dim 64, depth 4) are small."""

    arch = "ViT"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 128,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__(in_channels, num_classes, image_size, mean, std)
        for name, value in (
            ("patch_size", patch_size),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
            ("mlp_dim", mlp_dim),
        ):
            check_positive_int(value, name)
        h, w = self.image_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide image_size {(h, w)}")
        if dim % heads:
            raise ValueError(f"heads {heads} must divide dim {dim}")
        self.patch_size, self.dim, self.depth, self.heads, self.mlp_dim = (
            patch_size,
            dim,
            depth,
            heads,
            mlp_dim,
        )
        self.embedding = PatchEmbedding(
            in_channels, dim, patch_size, (h // patch_size) * (w // patch_size)
        )
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def extra_config(self) -> dict:
        return {
            "patch_size": self.patch_size,
            "dim": self.dim,
            "depth": self.depth,
            "heads": self.heads,
            "mlp_dim": self.mlp_dim,
        }

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embedding(x))[:, 0])
