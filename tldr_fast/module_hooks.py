"""Temporary module hooks that torch.compile can trace, and suspending hooks someone else registered.

`register_forward_hook` returns a RemovableHandle whose id comes from a class-level counter, which
torch.compile cannot trace (a graph break inside the compiled training step). Swapping a module's
hook dicts for extended copies, and restoring them afterwards, traces fine and leaves nothing
behind on the module. Blocks nest: each adds its hook under a key of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager

from torch import nn

# hook(module, args, kwargs, output) -> None (keep the output) or a replacement output
ForwardHook = Callable[..., object]
# pre_hook(module, args, kwargs) -> None (keep the inputs) or a replacement (args, kwargs)
ForwardPreHook = Callable[..., object]


@contextmanager
def _extended_hook_dicts(
    modules: Sequence[nn.Module],
    hook_for: Callable[[int], Callable],
    hooks_attr: str,
    kwargs_attr: str,
    first: bool,
):
    saved = [
        (module, getattr(module, hooks_attr), getattr(module, kwargs_attr)) for module in modules
    ]
    for i, (module, hooks, with_kwargs) in enumerate(saved):
        # Negative keys never collide with torch's handle ids, nor with an enclosing block's key.
        key = min([0, *hooks]) - 1
        added = [(key, hook_for(i))]
        setattr(
            module,
            hooks_attr,
            OrderedDict([*added, *hooks.items()] if first else [*hooks.items(), *added]),
        )
        setattr(module, kwargs_attr, OrderedDict([*with_kwargs.items(), (key, True)]))
    try:
        yield
    finally:
        for module, hooks, with_kwargs in saved:
            setattr(module, hooks_attr, hooks)
            setattr(module, kwargs_attr, with_kwargs)


def temporary_forward_hooks(
    modules: Sequence[nn.Module], hook_for: Callable[[int], ForwardHook], first: bool = False
):
    """Within the block, hook_for(i) runs (with kwargs) as the last forward hook of modules[i], or
    as the first with first=True."""
    return _extended_hook_dicts(
        modules, hook_for, "_forward_hooks", "_forward_hooks_with_kwargs", first
    )


def temporary_forward_pre_hooks(
    modules: Sequence[nn.Module], hook_for: Callable[[int], ForwardPreHook]
):
    """Within the block, hook_for(i) runs (with kwargs) as the last forward pre-hook of modules[i]."""
    return _extended_hook_dicts(
        modules, hook_for, "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", False
    )


@contextmanager
def hooks_suspended(handles: Iterable):
    """Within the block, the hooks behind these RemovableHandles do not run; afterwards every hook
    dict they live in is restored as it was (same hooks, same order)."""
    dicts = []
    for handle in handles:
        refs = [handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ())]
        for ref in refs:
            hooks = ref()
            if hooks is not None and handle.id in hooks:
                dicts.append((hooks, OrderedDict(hooks)))
                del hooks[handle.id]
    try:
        yield
    finally:
        for hooks, copy in reversed(dicts):
            hooks.clear()
            hooks.update(copy)
