"""Squared Frobenius norms of sums of outer products, the core of the Linear-on-sequences and
convolution rules: ||sum_p g_p a_p^T||^2 per sample, either materialised (cost ~ P m n) or from
the Gram identity ||sum_p g_p a_p^T||^2 = sum_{p,q} (g_p . g_q)(a_p . a_q) (cost ~ P^2 (m + n)).
"""

from __future__ import annotations

import torch


def materialised_squared_norm(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # (a g^T) rather than (g a^T): the backward then hands a contiguous gradient to the (larger) a.
    return torch.bmm(a, g.transpose(1, 2)).pow(2).sum((1, 2))


def gram_squared_norm(g: torch.Tensor, a_gram: torch.Tensor) -> torch.Tensor:
    """sum_{p,q} (g_p . g_q) a_gram[p, q] for g (N, m, P) and a_gram (N, P, P)."""
    return (torch.bmm(g.transpose(1, 2), g) * a_gram).sum((1, 2))


def summed_outer_squared_norm(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """||sum_p g_p a_p^T||_F^2 for channel-major g (N, m, P) and a (N, n, P), by the cheaper route."""
    positions, m, n = g.shape[2], g.shape[1], a.shape[1]
    if positions * (m + n) < m * n:
        return gram_squared_norm(g, torch.bmm(a.transpose(1, 2), a))
    return materialised_squared_norm(g, a)
