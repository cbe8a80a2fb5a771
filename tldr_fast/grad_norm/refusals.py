"""Models whose per-sample gradient norms some backend cannot form, refused by name before any
backend runs, each with what to do instead.

- Backward hooks (full, legacy, or pre-hooks) run through an autograd.Function without
  setup_context, which torch.func (the ghost and vmap backends) cannot run; plain autograd can.
- RNN / GRU / LSTM have no torch.func.vmap support (the fused kernels' batching rules are missing).
- EmbeddingBag has no double backward in torch (`_embedding_bag_backward`), so d/dx of a norm that
  includes its weight's gradient cannot be formed by any backend.
- InstanceNorm with track_running_stats in training mode updates its running statistics in the
  forward, an in-place side effect the vectorised backends cannot carry.
"""

from __future__ import annotations

from torch import nn

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _where(path: str) -> str:
    return f"model.{path}" if path else "model"


def _hook_kind(module: nn.Module) -> str | None:
    if module._backward_pre_hooks:
        return "a full backward pre-hook (register_full_backward_pre_hook)"
    if module._backward_hooks:
        if module._is_full_backward_hook:
            return "a full backward hook (register_full_backward_hook)"
        return "a backward hook (register_backward_hook)"
    return None


def check_backend_limits(model: nn.Module, names: tuple[str, ...], backend: str) -> None:
    """Raise ValueError naming the first module that `backend` cannot handle (see module docstring)."""
    chosen_owners = {name.rpartition(".")[0] for name in names}
    for path, module in model.named_modules():
        where = f"{_where(path)} ({type(module).__name__})"
        if isinstance(module, nn.EmbeddingBag) and path in chosen_owners:
            raise ValueError(
                f"{where}: torch has no double backward for embedding_bag, so d/dx of a gradient norm "
                "that includes its weight cannot be formed by any backend; leave its weight out of "
                "params, or use nn.Embedding followed by a sum or mean over each bag"
            )
        if backend == "loop":
            continue
        kind = _hook_kind(module)
        if kind is not None:
            raise ValueError(
                f"{where} has {kind}, which torch.func (backend={backend!r}) cannot run; remove it while "
                "measuring (handle.remove()) or use backend='loop'"
            )
        if isinstance(module, _INSTANCE_NORMS) and module.track_running_stats and module.training:
            raise ValueError(
                f"{where} is in training mode with track_running_stats=True, so its forward updates the "
                f"running statistics in place, which backend={backend!r} cannot do per sample; call "
                "model.eval() (it then normalises with the running statistics) or use backend='loop'"
            )


def vmap_limit(root: nn.Module, root_path: str = "") -> str | None:
    """Why torch.func.vmap cannot run root (an RNN inside it), or None."""
    for path, module in root.named_modules():
        if isinstance(module, nn.RNNBase):
            full = ".".join(p for p in (root_path, path) if p)
            return (
                f"{_where(full)} ({type(module).__name__}) cannot run under torch.func.vmap; "
                "use backend='loop'"
            )
    return None
