"""Pins a torch.func misbehaviour the gradient-norm backends work around, upstream-style: plain
torch only, minimal, float64.

Differentiating torch.func.vmap(torch.func.grad(<F.layer_norm(x, w), g> w.r.t. w)) with respect to x
by autograd gives a wrong d/dx (values exact); the same without vmap, or with the normalisation
written out, is exact. Instance norm (ATen's batch-norm kernel on per-sample statistics) shares it.
tldr_fast.grad_norm.normalization.decomposed_normalisations is the workaround. The day this test
fails, torch computes these correctly, and the workaround (and this test) can go.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from relative_error import rel_rms
from torch.func import grad, vmap

NORMS = {
    "layer_norm": lambda x, w: F.layer_norm(x, (x.shape[-1],), w),
    "instance_norm": lambda x, w: F.instance_norm(x, weight=w),
    "layer_norm_written_out": lambda x, w: (
        w
        * (x - x.mean(-1, keepdim=True))
        * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    ),
}


def _input_gradients(norm: str):
    """(d/dx through vmap(grad), d/dx through plain autograd) of sum_i ||dl_i/dw||^2."""
    torch.manual_seed(0)
    shape, w_size = ((3, 7), 7) if norm.startswith("layer") else ((3, 4, 5), 4)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(w_size, dtype=torch.float64)
    forward = NORMS[norm]

    def weight_grad(w, xi, gi):
        return grad(lambda w: (forward(xi[None], w) * gi[None]).sum())(w)

    (through_vmap,) = torch.autograd.grad(
        vmap(weight_grad, in_dims=(None, 0, 0))(w, x, g).pow(2).sum(), x
    )
    total = 0
    for i in range(shape[0]):
        leaf = w.clone().requires_grad_()
        (gw,) = torch.autograd.grad(
            (forward(x[i : i + 1], leaf) * g[i : i + 1]).sum(), leaf, create_graph=True
        )
        total = total + gw.pow(2).sum()
    (plain,) = torch.autograd.grad(total, x)
    return through_vmap, plain


@pytest.mark.parametrize("norm", ["layer_norm", "instance_norm"])
def test_fused_norm_weight_gradient_under_vmap_has_wrong_input_derivative(norm):
    through_vmap, plain = _input_gradients(norm)
    assert rel_rms(through_vmap, plain) > 1e-2, (
        f"torch.func now differentiates vmap(grad) through {norm} correctly: "
        "tldr_fast.grad_norm.normalization.decomposed_normalisations and this test can go"
    )


def test_written_out_norm_under_vmap_is_exact():
    through_vmap, plain = _input_gradients("layer_norm_written_out")
    assert rel_rms(through_vmap, plain) < 1e-12
