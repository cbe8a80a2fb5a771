"""Ghost rule for BatchNorm in eval mode (training mode is refused before any backend runs).

y = w x^ + b with x^ = (x - running_mean) / sqrt(running_var + eps), so per channel
grad w_i = sum_positions g x^ and grad b_i = sum_positions g.
"""

from __future__ import annotations

import torch
from torch import nn

from tldr_fast.grad_norm.registry import register_norm_rule


@register_norm_rule(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, applies=lambda m: not m.training
)
def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, names, a, g) -> torch.Tensor:
    batch, channels = a.shape[0], a.shape[1]
    g = g.reshape(batch, channels, -1)
    g_sum = g.sum(2)
    total = g_sum.pow(2).sum(1) if "bias" in names else 0
    if "weight" not in names:
        return total
    # sum_p g_p x^_p = (sum_p g_p a_p - running_mean sum_p g_p) / sqrt(running_var + eps): one pass
    # over the activations instead of normalising them first.
    weight = (
        (g * a.reshape(batch, channels, -1)).sum(2) - module.running_mean * g_sum
    ) * torch.rsqrt(module.running_var + module.eps)
    return total + weight.pow(2).sum(1)
