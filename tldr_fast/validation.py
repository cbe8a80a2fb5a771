"""Argument checks shared by the library: each error names the argument, the value and what was expected.

Checks here look only at shapes, dtypes and Python values, never at tensor contents, so they add
no host synchronisation and are safe inside torch.compile'd code. Content checks (finite values,
ranges) live in `check_finite` / `check_unit_range` and are meant for API boundaries only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_images(x, name: str, expected_shape: Sequence[int] | None = None) -> None:
    """x must be a floating (N, C, H, W) tensor; with expected_shape, (C, H, W) must match."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of images (N, C, H, W), got {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor of images in [0, 1], got dtype {x.dtype}"
        )
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if expected_shape is not None and tuple(x.shape[1:]) != tuple(expected_shape):
        raise ValueError(
            f"{name} has image shape {tuple(x.shape[1:])} (C, H, W) but the model expects "
            f"{tuple(expected_shape)}; full input shape was {tuple(x.shape)}"
        )


def check_labels(y, name: str, num_classes: int, batch: int | None = None) -> None:
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{name} must be an integer tensor of class labels, got {getattr(y, 'dtype', type(y))}"
        )
    if y.dim() != 1:
        raise ValueError(f"{name} must have shape (N,), got {tuple(y.shape)}")
    if batch is not None and y.shape[0] != batch:
        raise ValueError(f"{name} has {y.shape[0]} labels but there are {batch} images")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes - 1}], got values in [{int(y.min())}, {int(y.max())}]"
        )


def check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} non-finite values (NaN or Inf)")


def check_finite_tensors(named_tensors, what: str) -> None:
    """Every floating-point tensor of (name, tensor) pairs must be finite; the error names the first bad one."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                raise ValueError(
                    f"{what} {name} holds {bad} non-finite values (NaN or Inf) of {tensor.numel()}"
                )


def check_finite_module(module, what: str) -> None:
    """Every floating-point parameter and buffer of module must be finite: a NaN or Inf weight
    would turn every result into NaN; the error names the first bad tensor, as "WHAT's tensor NAME"."""
    check_finite_tensors(module.state_dict().items(), f"{what}'s tensor")


def check_in_range(value, name: str, low: float, high: float) -> float:
    """A finite number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def check_unit_range(x: torch.Tensor, name: str, tol: float = 1e-6) -> None:
    """Images must lie in [0, 1]; the error reports the observed min and max."""
    x = x.detach()
    check_finite(x, name)
    lo, hi = float(x.min()), float(x.max())
    if lo < -tol or hi > 1 + tol:
        raise ValueError(f"{name} must lie in [0, 1], observed min {lo:.4g} and max {hi:.4g}")


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_nonnegative(value, name: str) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or math.isnan(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)
