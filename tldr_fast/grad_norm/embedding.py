"""Ghost rule for nn.Embedding (without max_norm, which renormalises the table in the forward, or
scale_grad_by_freq, whose gradient depends on the whole batch's counts).

For sample i with indices idx_p at positions p (any leading shape; the layout is "features_last"),
grad W_i = sum_p e_{idx_p} g_p^T over positions whose index is not padding_idx, so
||grad W_i||^2 = sum_{p,q} [idx_p = idx_q] (g_p . g_q), a masked Gram of the output gradient
(cost ~ P^2 D per sample, with no (vocabulary x D) table materialised).
"""

from __future__ import annotations

import torch
from torch import nn

from tldr_fast.grad_norm.registry import register_norm_rule


def _plain_lookup(module: nn.Embedding) -> bool:
    return module.max_norm is None and not module.scale_grad_by_freq


@register_norm_rule(nn.Embedding, applies=_plain_lookup, layout="features_last")
def embedding_rule(module: nn.Embedding, names, a, g) -> torch.Tensor:
    index = a.reshape(a.shape[0], -1)
    g = g.reshape(g.shape[0], index.shape[1], -1)
    same = index.unsqueeze(2) == index.unsqueeze(1)
    if module.padding_idx is not None:
        counted = index != module.padding_idx
        same = same & counted.unsqueeze(2) & counted.unsqueeze(1)
    return (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))
