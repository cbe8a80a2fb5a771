"""The closed-form ghost rules, one per layer family, and the open registry.

Every built-in rule serves its layer (explain_grad_norm says so) and equals the one-sample loop in
float64, values and d/dx, in every backend; each rule's own first and second derivatives pass
gradcheck/gradgradcheck on small shapes; a rule registered from outside the package is used.
"""

from __future__ import annotations

import pytest
import torch
from grad_norm_cases import Spec, assert_matches_loop, family_model
from torch import nn

from tldr_fast.grad_norm import (
    explain_grad_norm,
    per_sample_grad_norm,
    register_norm_rule,
    registered_types,
)
from tldr_fast.grad_norm.registry import rule_for

BACKENDS = ("auto", "ghost", "vmap")

# family -> the rule expected to serve the layer
RULES = {
    "linear": "linear.linear_rule",
    "linear_seq": "linear.linear_rule",
    "conv1d": "conv.conv_rule",
    "conv2d": "conv.conv_rule",
    "batch_norm": "batch_norm.batch_norm_rule",
    "group_norm": "normalization.affine_norm_rule",
    "layer_norm": "normalization.affine_norm_rule",
    "instance_norm": "normalization.affine_norm_rule",
    "instance_norm_running": "normalization.affine_norm_rule",
    "rms_norm": "normalization.affine_norm_rule",
    "embedding": "embedding.embedding_rule",
}
CASES = [Spec(f, 3, 3, 2, seed=i) for i, f in enumerate(RULES)] + [
    Spec("linear_seq", 3, 3, 2, time_major=True),
    Spec("linear_seq", 2, 2, 2, time_major=True),  # T = B
    Spec("layer_norm", 1, 4, 3, time_major=True),
    Spec("embedding", 3, 1, 2, time_major=True, seed=1),
    Spec("conv1d", 2, 4, 2, kernel=3, stride=2, padding=2, dilation=2, grouped=True),
    Spec("conv2d", 2, 3, 2, kernel=2, stride=3, padding=0, dilation=1, grouped=True),
    Spec("conv2d", 1, 4, 3, kernel=3, stride=1, padding=2, dilation=2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "spec", CASES, ids=lambda s: f"{s.family}-tm{int(s.time_major)}-b{s.batch}-t{s.length}"
)
def test_rule_serves_its_layer_and_matches_loop(spec, backend):
    model, x, y = family_model(spec)
    served = {r.module: r.served_by for r in explain_grad_norm(model, x, backend="ghost")}
    assert served["model.layer"] == f"rule tldr_fast.grad_norm.{RULES[spec.family]}"
    assert_matches_loop(model, x, y, backend)


@pytest.mark.parametrize("family", list(RULES))
def test_rule_first_and_second_derivatives(family):
    model, x, _ = family_model(Spec(family, 2, 2, 2, stride=2, seed=1))
    layer = model.layer
    seen = {}

    def keep(module, args, output):
        seen["a"], seen["out"] = args[0].detach(), output

    handle = layer.register_forward_hook(keep)
    model(x)
    handle.remove()
    a = seen["a"].requires_grad_(a_float := seen["a"].is_floating_point())
    g = torch.randn_like(seen["out"]).requires_grad_()
    names = tuple(n for n, _ in layer.named_parameters())
    rule = rule_for(layer).rule
    inputs = (a, g) if a_float else (g,)

    def squared(*t):
        return rule(layer, names, *t) if a_float else rule(layer, names, a, *t)

    assert torch.autograd.gradcheck(squared, inputs)
    assert torch.autograd.gradgradcheck(squared, inputs)


class Scale(nn.Module):
    """y = a * scale per feature: a layer type the package does not know."""

    def __init__(self, features):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(features, dtype=torch.float64))

    def forward(self, a):
        return a * self.scale


CALLS = []


@register_norm_rule(Scale, layout="features_last")
def scale_rule(module, names, a, g):
    CALLS.append(a.shape)
    return (a * g).flatten(1, -2).sum(1).pow(2).sum(1) if a.dim() > 2 else (a * g).pow(2).sum(1)


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5, dtype=torch.float64)
        self.scale = Scale(5)
        self.head = nn.Linear(5, 3, dtype=torch.float64)

    def forward(self, x):
        return self.head(torch.tanh(self.scale(torch.tanh(self.fc(x)))).mean(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_registered_outside_the_package_is_used(backend):
    assert Scale in registered_types()
    model = WithScale().eval()
    x = torch.rand(3, 2, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1])
    served = {r.module: r.served_by for r in explain_grad_norm(model, x)}
    assert served["model.scale"] == "rule test_norm_rules.scale_rule"
    CALLS.clear()
    assert_matches_loop(model, x, y, backend)
    assert bool(CALLS) == (backend != "vmap")  # ghost and auto ran the user's rule


class Doubling(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, dtype=torch.float64))

    def forward(self, a):
        return a * self.weight


@register_norm_rule(Doubling)
def wrong_shape_rule(module, names, a, g):
    return (a * g).sum()  # 0-d, not (B,)


def test_rule_with_wrong_result_shape_is_vmapped_by_auto_and_refused_by_ghost():
    model = nn.Sequential(Doubling(), nn.Tanh(), nn.Linear(4, 3, dtype=torch.float64))
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    assert_matches_loop(model, x, y, "auto")
    with pytest.raises(
        ValueError,
        match=r"rule test_norm_rules\.wrong_shape_rule for model\.0 returned \(\), "
        r"not \(3,\); use backend='vmap'",
    ):
        per_sample_grad_norm(model, x, y, backend="ghost")


def test_rule_applies_only_where_its_condition_holds():
    assert rule_for(nn.Conv1d(2, 2, 3, padding=1)) is not None
    assert rule_for(nn.Conv1d(2, 2, 3, padding="same")) is None
    assert rule_for(nn.Embedding(5, 2, max_norm=1.0)) is None
    assert rule_for(nn.BatchNorm1d(2).train()) is None
    assert rule_for(nn.Tanh()) is None


def test_register_norm_rule_refuses_bad_arguments():
    with pytest.raises(TypeError, match="takes nn.Module subclasses"):
        register_norm_rule()
    with pytest.raises(TypeError, match="takes nn.Module subclasses"):
        register_norm_rule(int)
    with pytest.raises(ValueError, match="layout must be one of"):
        register_norm_rule(Scale, layout="channels_last")
    with pytest.raises(TypeError, match="a norm rule must be callable"):
        register_norm_rule(Scale)(3)
