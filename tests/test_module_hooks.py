"""temporary_forward_hooks: hooks run inside the block, nest, and leave nothing behind."""

from __future__ import annotations

import torch
from torch import nn

from tldr_fast.module_hooks import temporary_forward_hooks


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
