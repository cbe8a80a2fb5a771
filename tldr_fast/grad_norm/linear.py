"""Ghost rule for nn.Linear on (B, in) and on sequences (B, T, ..., in).

2-D input: grad W_i = g_i a_i^T, so ||grad W_i||^2 = ||g_i||^2 ||a_i||^2, and ||grad b_i||^2 = ||g_i||^2.
Sequences (positions p): grad W_i = sum_p g_p a_p^T (see `outer`), grad b_i = sum_p g_p. The layout is
"features_last": a Linear fed time-major (T, N, in) is handed over with its batch moved to dim 0.
"""

from __future__ import annotations

import torch
from torch import nn

from tldr_fast.grad_norm.outer import summed_outer_squared_norm
from tldr_fast.grad_norm.registry import register_norm_rule


@register_norm_rule(nn.Linear, layout="features_last")
def linear_rule(module: nn.Linear, names, a, g) -> torch.Tensor:
    if a.dim() == 2:
        g_sq = g.pow(2).sum(1)
        weight = g_sq * a.pow(2).sum(1) if "weight" in names else 0
        return weight + (g_sq if "bias" in names else 0)
    a, g = a.flatten(1, -2), g.flatten(1, -2)  # (B, T, features)
    weight = (
        summed_outer_squared_norm(g.transpose(1, 2), a.transpose(1, 2)) if "weight" in names else 0
    )
    return weight + (g.sum(1).pow(2).sum(1) if "bias" in names else 0)
