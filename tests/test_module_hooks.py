"""Temporary module hooks: they run inside the block, nest, and leave nothing behind; suspended hooks come back in order."""

from __future__ import annotations

import torch
from torch import nn

from tldr_fast.module_hooks import (
    hooks_suspended,
    temporary_forward_hooks,
    temporary_forward_pre_hooks,
)


def test_nested_blocks_both_run_in_order_and_are_removed():
    layer = nn.Linear(3, 3)
    user_hook = layer.register_forward_hook(lambda m, a, out: out * 2)
    calls = []

    def hook(tag, scale):
        def run(module, args, kwargs, output):
            calls.append(tag)
            return output * scale

        return run

    x = torch.randn(2, 3)
    with temporary_forward_hooks([layer], lambda i: hook("outer", 3)):
        with temporary_forward_hooks([layer], lambda i: hook("inner", 5)):
            nested = layer(x)
        outer_only = layer(x)
    plain = layer(x)
    assert calls == ["outer", "inner", "outer"]
    assert torch.allclose(nested, plain * 15) and torch.allclose(outer_only, plain * 3)
    assert list(layer._forward_hooks) == [user_hook.id] and not layer._forward_hooks_with_kwargs


def test_first_hook_runs_before_the_modules_own_and_pre_hooks_see_the_inputs():
    layer = nn.Linear(3, 3)
    order = []
    layer.register_forward_hook(lambda m, a, out: order.append("own"))

    def first(module, args, kwargs, output):
        order.append("first")

    def pre(module, args, kwargs):
        order.append(("pre", tuple(args[0].shape)))

    with (
        temporary_forward_hooks([layer], lambda i: first, first=True),
        temporary_forward_pre_hooks([layer], lambda i: pre),
    ):
        layer(torch.randn(2, 3))
    assert order == [("pre", (2, 3)), "first", "own"]
    assert not layer._forward_pre_hooks and not layer._forward_pre_hooks_with_kwargs
    assert len(layer._forward_hooks) == 1


def test_hooks_suspended_skips_exactly_those_hooks_and_restores_their_order():
    layer = nn.Linear(3, 3)
    calls = []
    a = layer.register_forward_hook(lambda m, args, out: calls.append("a"))
    b = layer.register_forward_hook(
        lambda m, args, out, *rest: calls.append("b"), with_kwargs=False
    )
    c = layer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append("c"), with_kwargs=True
    )
    before = list(layer._forward_hooks), dict(layer._forward_hooks_with_kwargs)
    x = torch.randn(2, 3)
    with hooks_suspended([a, c]):
        layer(x)
    assert calls == ["b"]
    assert (list(layer._forward_hooks), dict(layer._forward_hooks_with_kwargs)) == before
    layer(x)
    assert calls == ["b", "a", "b", "c"]
    b.remove()
