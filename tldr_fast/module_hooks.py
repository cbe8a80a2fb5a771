"""Temporary forward hooks that torch.compile can trace.

`register_forward_hook` returns a RemovableHandle whose id comes from a class-level counter, which
torch.compile cannot trace (a graph break inside the compiled training step). Swapping a module's
hook dicts for extended copies, and restoring them afterwards, traces fine and leaves nothing
behind on the module. Blocks nest: each adds its hook under a key of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import contextmanager

from torch import nn

# hook(module, args, kwargs, output) -> None (keep the output) or a replacement output
ForwardHook = Callable[..., object]


@contextmanager
def temporary_forward_hooks(modules: Sequence[nn.Module], hook_for: Callable[[int], ForwardHook]):
    """Within the block, hook_for(i) runs (with kwargs) as the last forward hook of modules[i]."""
    saved = [(module, module._forward_hooks, module._forward_hooks_with_kwargs) for module in modules]
    for i, (module, hooks, with_kwargs) in enumerate(saved):
        # Negative keys never collide with torch's handle ids, nor with an enclosing block's key.
        key = min([0, *hooks]) - 1
        module._forward_hooks = OrderedDict([*hooks.items(), (key, hook_for(i))])
        module._forward_hooks_with_kwargs = OrderedDict([*with_kwargs.items(), (key, True)])
    try:
        yield
    finally:
        for module, hooks, with_kwargs in saved:
            module._forward_hooks, module._forward_hooks_with_kwargs = hooks, with_kwargs
