"""Layer families and layouts for the gradient-norm tests, and the comparison with the loop oracle.

`family_model(spec)` wraps one layer of a family in a model whose input x is float64 and whose
head is a Linear, feeding the layer batch-first or time-major; `assert_matches_loop` compares a
backend's norms, their shape and d(sum of norms)/dx with the one-sample autograd loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from relative_error import rel_rms
from torch import nn

from tldr_fast.grad_norm import per_sample_grad_norm

VALUE_TOL, GRAD_TOL = 1e-10, 1e-9
# d/dx entries below this (in float64, for O(1) inputs) count as structurally zero.
ABSOLUTE_FLOOR = 1e-13

FAMILIES = (
    "linear",
    "linear_seq",
    "conv1d",
    "conv2d",
    "conv_circular",
    "batch_norm",
    "group_norm",
    "layer_norm",
    "instance_norm",
    "instance_norm_running",
    "rms_norm",
    "embedding",
    "attention",
)
# families whose layer acts on trailing features, so it may be fed time-major (T, N, ...)
TIME_MAJOR_FAMILIES = ("linear_seq", "layer_norm", "rms_norm", "embedding", "attention")


@dataclass(frozen=True)
class Spec:
    family: str
    batch: int
    length: int  # sequence length / spatial size
    width: int  # features / channels
    time_major: bool = False
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    grouped: bool = False
    seed: int = 0


def _layer_and_sample_shape(spec: Spec):
    c, n = spec.width, spec.length
    f = spec.family
    if f == "linear":
        return nn.Linear(c, 3), (c,)
    if f == "linear_seq":
        return nn.Linear(c, 3), (n, c)
    if f in ("conv1d", "conv2d", "conv_circular"):
        groups = c if spec.grouped else 1
        kwargs = dict(
            stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=groups
        )
        reach = spec.dilation * (spec.kernel - 1) + 1
        size = n + reach
        if f == "conv2d":
            return nn.Conv2d(c, 2 * c, spec.kernel, **kwargs), (c, size, size + 1)
        if f == "conv_circular":
            return nn.Conv1d(
                c, 2 * c, spec.kernel, padding=spec.padding, padding_mode="circular"
            ), (c, size)
        return nn.Conv1d(c, 2 * c, spec.kernel, **kwargs), (c, size)
    if f == "batch_norm":
        return nn.BatchNorm2d(c), (c, n, n + 1)
    if f == "group_norm":
        return nn.GroupNorm(2, 2 * c), (2 * c, n + 1)
    if f == "layer_norm":
        return nn.LayerNorm(c), (n, c)
    if f in ("instance_norm", "instance_norm_running"):
        return nn.InstanceNorm1d(c, affine=True, track_running_stats=f.endswith("running")), (
            c,
            n + 1,
        )
    if f == "rms_norm":
        return nn.RMSNorm(c), (n, c)
    if f == "embedding":
        return nn.Embedding(5, c, padding_idx=spec.seed % 3 if spec.seed % 2 else None), (n,)
    if f == "attention":
        return nn.MultiheadAttention(2 * c, 2, batch_first=not spec.time_major), (n, 2 * c)
    raise ValueError(f"unknown family {f!r}")


class FamilyModel(nn.Module):
    """x -> layer (batch-first or time-major) -> tanh -> flatten -> Linear head (3 classes)."""

    def __init__(self, layer: nn.Module, sample_shape, time_major: bool):
        super().__init__()
        self.layer, self.time_major = layer, time_major
        with torch.no_grad():
            width = self._features(torch.rand(2, *sample_shape, dtype=torch.float64)).shape[1]
        self.head = nn.Linear(width, 3, dtype=torch.float64)

    def _features(self, x):
        h = (x.detach() * 5).long().clamp(0, 4) if isinstance(self.layer, nn.Embedding) else x
        if self.time_major:
            h = h.transpose(0, 1)
        out = (
            self.layer(h, h, h)[0]
            if isinstance(self.layer, nn.MultiheadAttention)
            else self.layer(h)
        )
        if self.time_major:
            out = out.transpose(0, 1)
        if isinstance(self.layer, nn.Embedding):
            out = out * x.unsqueeze(-1)  # indices carry no gradient; this makes d/dx non-trivial
        return torch.tanh(out).flatten(1)

    def forward(self, x):
        return self.head(self._features(x))


def family_model(spec: Spec):
    """(model in eval mode with non-trivial parameters and statistics, x (requires grad), y)."""
    torch.manual_seed(spec.seed)
    layer, sample_shape = _layer_and_sample_shape(spec)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for name, b in layer.named_buffers():
            if name == "running_mean":
                b.normal_(0, 0.3)
            elif name == "running_var":
                b.uniform_(0.5, 2.0)
    model = FamilyModel(layer, sample_shape, spec.time_major).eval()
    x = torch.rand(spec.batch, *sample_shape, dtype=torch.float64, requires_grad=True)
    return model, x, torch.randint(0, 3, (spec.batch,))


def norms_and_input_grad(model, x, y, **kwargs):
    norms = per_sample_grad_norm(model, x, y, **kwargs)
    (dx,) = torch.autograd.grad(norms.sum(), x, allow_unused=True, materialize_grads=True)
    return norms, dx


def assert_close(got, expected, tol: float, what: str) -> None:
    """Relative RMS below tol, or every entry within the absolute floor (structurally zero)."""
    close = rel_rms(got, expected) < tol or (got - expected).abs().max() < ABSOLUTE_FLOOR
    assert close, f"{what}: relative error {rel_rms(got, expected):.3g}"


def assert_matches_loop(model, x, y, backend: str, **kwargs) -> None:
    norms, dx = norms_and_input_grad(model, x, y, backend=backend, **kwargs)
    ref, ref_dx = norms_and_input_grad(model, x, y, backend="loop", **kwargs)
    assert norms.shape == (x.shape[0],), f"{backend}: shape {tuple(norms.shape)}"
    assert_close(norms, ref, VALUE_TOL, f"{backend} values")
    assert_close(dx, ref_dx, GRAD_TOL, f"{backend} d/dx")
