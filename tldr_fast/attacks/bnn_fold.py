"""Fold a trained BinarizedMLP into integer form: per neuron the agreement counts at which it fires.

With inputs x and weights w in {-1, +1}^n, the pre-activation is w.x = 2c - n where
c = #{i : x_i = w_i} is the number of agreements, an integer in [0, n]. A hidden neuron outputs
sign(BN(2c - n)), a function of c alone; an output neuron's logit is BN(2c - n).

Rather than solving BN(2c - n) >= 0 for c by hand (float BN parameters, negative scales, and the
sign(0) = +1 tie make a hand-derived ceil/floor fragile), the network's own BatchNorm module is
evaluated, in eval mode and float32 as the forward pass runs it, on all n + 1 reachable
pre-activations. The table is therefore exact for the network as it computes: a neuron fires on a
set of counts that is an interval [lo, hi] (BN is monotone, so the set is {c >= t} for a positive
scale, {c <= t} for a negative one, all or nothing for a zero scale), and each logit is a monotone
sequence of n + 1 floats. Anything else (a non-monotone table, non-finite values) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tldr_fast.attacks.bnn_model import BinarizedMLP, BinaryLinear


@dataclass(frozen=True)
class HiddenLayer:
    """weights (m, n) in {-1, +1}; neuron j fires (+1) iff lo[j] <= agreements <= hi[j] (never if lo > hi)."""

    weights: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


@dataclass(frozen=True)
class OutputLayer:
    """weights (k, n) in {-1, +1}; scores[j, c] is logit j (float32) when class j has c agreements."""

    weights: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class FoldedBNN:
    num_inputs: int
    hidden: tuple[HiddenLayer, ...]
    output: OutputLayer

    @property
    def num_classes(self) -> int:
        return self.output.weights.shape[0]

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Labels of pixels (N, num_inputs) in {-1, +1} by integer arithmetic (argmax ties -> first index)."""
        h = np.asarray(pixels, dtype=np.int64)
        for layer in self.hidden:
            c = _agreements(h, layer.weights)
            h = np.where((layer.lo <= c) & (c <= layer.hi), 1, -1)
        c = _agreements(h, self.output.weights)
        return np.take_along_axis(self.output.scores.T, c, axis=0).argmax(axis=1)


def _agreements(h: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """#{i : h_i = w_i} per (sample, neuron) = (w.h + n) / 2."""
    return (h @ weights.T.astype(np.int64) + weights.shape[1]) // 2


def fold(model: nn.Module) -> FoldedBNN:
    """Integer form of a BinarizedMLP in eval mode; refuses, naming the layer, anything not binarised."""
    check_binarised(model)
    layers = list(zip(model.linears, model.norms))
    hidden = tuple(_fold_hidden(lin, bn, f"linears.{i}") for i, (lin, bn) in enumerate(layers[:-1]))
    last = len(layers) - 1
    output = _fold_output(*layers[-1], f"linears.{last}")
    return FoldedBNN(num_inputs=model.num_inputs, hidden=hidden, output=output)


def check_binarised(model: nn.Module) -> None:
    """Raise TypeError naming the first layer that is not a binary linear map or a 1-d BatchNorm."""
    if not isinstance(model, BinarizedMLP):
        for name, module in model.named_modules():
            if (
                name
                and any(True for _ in module.parameters(recurse=False))
                and not isinstance(module, (BinaryLinear, nn.BatchNorm1d))
            ):
                raise TypeError(
                    f"network is not binarised: layer '{name}' ({type(module).__name__}) has real-valued "
                    f"weights; the SAT encoding needs a BinarizedMLP (sign weights and activations)"
                )
        raise TypeError(f"network must be a BinarizedMLP, got {type(model).__name__}")
    for i, (linear, norm) in enumerate(zip(model.linears, model.norms)):
        if not isinstance(linear, BinaryLinear):
            raise TypeError(
                f"network is not binarised: layer 'linears.{i}' ({type(linear).__name__}) is not a BinaryLinear"
            )
        if not isinstance(norm, nn.BatchNorm1d) or not norm.track_running_stats:
            raise TypeError(
                f"layer 'norms.{i}' ({type(norm).__name__}) must be a BatchNorm1d with running statistics"
            )


@torch.no_grad()
def _bn_table(
    linear: BinaryLinear, norm: nn.BatchNorm1d, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(weights (m, n) int8, table (m, n + 1) float32): BN output of every neuron at every agreement count."""
    n, m = linear.in_features, linear.out_features
    weights = torch.where(linear.weight >= 0, 1, -1).to(torch.int8).cpu().numpy()
    pre = (
        (2 * torch.arange(n + 1, dtype=torch.float32) - n).view(-1, 1).expand(n + 1, m).contiguous()
    )
    was_training = norm.training
    norm.eval()
    try:
        table = norm(pre.to(norm.running_mean.device)).float().cpu().numpy().T
    finally:
        norm.train(was_training)
    if not np.isfinite(table).all():
        raise ValueError(
            f"layer '{name}': its BatchNorm gives non-finite outputs; cannot encode it"
        )
    return weights, np.ascontiguousarray(table)


def _fold_hidden(linear: BinaryLinear, norm: nn.BatchNorm1d, name: str) -> HiddenLayer:
    weights, table = _bn_table(linear, norm, name)
    fires = table >= 0  # sign(0) = +1
    n = weights.shape[1]
    lo = np.full(len(fires), n + 1, dtype=np.int64)
    hi = np.full(len(fires), -1, dtype=np.int64)
    for j, row in enumerate(fires):
        on = np.flatnonzero(row)
        if len(on) == 0:
            continue
        if on[-1] - on[0] + 1 != len(on) or (on[0] > 0 and on[-1] < n):
            raise ValueError(
                f"layer '{name}' neuron {j}: firing counts {on.tolist()} are not monotone"
            )
        lo[j], hi[j] = on[0], on[-1]
    return HiddenLayer(weights=weights, lo=lo, hi=hi)


def _fold_output(linear: BinaryLinear, norm: nn.BatchNorm1d, name: str) -> OutputLayer:
    weights, table = _bn_table(linear, norm, name)
    steps = np.diff(table, axis=1)
    monotone = (steps >= 0).all(axis=1) | (steps <= 0).all(axis=1)
    if not monotone.all():
        raise ValueError(
            f"layer '{name}' class {int(np.flatnonzero(~monotone)[0])}: logit is not monotone"
        )
    return OutputLayer(weights=weights, scores=table)
