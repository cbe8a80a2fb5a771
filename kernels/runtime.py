"""What every kernel module shares: whether Triton can launch here, and how an op is registered.

Triton launches on CUDA tensors, and on CPU tensors only in its interpreter, which is active when
TRITON_INTERPRET=1 was set before this package was imported (Triton decides per kernel at
definition time). Which implementation a loss uses is decided by `tldr_fast.losses.resolve_impl`,
not here: this package holds the ops only.
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def _probe():
        pass

    TRITON_AVAILABLE = True
    INTERPRETED = isinstance(_probe, InterpretedFunction)
except ImportError:  # pragma: no cover - triton is a Linux dependency
    TRITON_AVAILABLE = False
    INTERPRETED = False

# Input dtypes of every kernel; accumulation is fp32 for both.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)

# tl.dot precision for fp32 operands: three TF32 passes on GPU keep fp32 accuracy on tensor cores.
DOT_PRECISION = "ieee" if INTERPRETED else "tf32x3"


def device_unsupported(tensor: torch.Tensor) -> str | None:
    """None when the kernels can launch on this tensor's device, else one line saying why not."""
    if TRITON_AVAILABLE and (tensor.is_cuda or (INTERPRETED and tensor.device.type == "cpu")):
        return None
    return (
        f"impl='triton' needs a CUDA tensor or the Triton interpreter (set TRITON_INTERPRET=1 before "
        f"importing tldr_fast.kernels); got a {tensor.device.type} tensor with the interpreter "
        f"{'on' if INTERPRETED else 'off'} and triton {'installed' if TRITON_AVAILABLE else 'missing'}"
    )


def fold_vmapped(batch_size: int, in_dims, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Move each vmapped dim to the front (expanding unbatched tensors) and merge it into dim 0.

    The kernels treat dim 0 as independent problems, so a vmap over K becomes one launch over K*B
    problems instead of K launches. Every tensor must have a leading problem dim already.
    """
    folded = []
    for tensor, dim in zip(tensors, in_dims, strict=True):
        tensor = tensor.expand(batch_size, *tensor.shape) if dim is None else tensor.movedim(dim, 0)
        folded.append(tensor.reshape(batch_size * tensor.shape[1], *tensor.shape[2:]))
    return folded


def unfold(batch_size: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inverse of fold_vmapped for outputs: split dim 0 back into (vmapped, problems)."""
    return tuple(t.reshape(batch_size, t.shape[0] // batch_size, *t.shape[1:]) for t in tensors)


def vmap_by_folding(op, info, in_dims, *args):
    """The vmap rule of a kernel op whose tensor arguments and outputs all lead with a problem dim:
    fold the vmapped dim into it, call the op once, split it out again (out_dims 0)."""
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    folded = fold_vmapped(
        info.batch_size, [in_dims[i] for i in positions], *(args[i] for i in positions)
    )
    args = list(args)
    for i, tensor in zip(positions, folded, strict=True):
        args[i] = tensor
    out = op(*args)
    if isinstance(out, torch.Tensor):
        return unfold(info.batch_size, out)[0], 0
    out = unfold(info.batch_size, *out)
    return out, (0,) * len(out)


def traced_input(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as an autograd.Function input that torch.compile keeps a Function: Dynamo (torch
    2.13) inlines the forward of a Function applied to a torch.func.grad argument itself, and the
    op then meets the wrapped tensor and fails; a view of it is an intermediate, traced as a
    Function with its backward. Free (a view) and harmless eagerly."""
    return tensor.view_as(tensor)


def refuse_double_backward(loss: str):
    raise NotImplementedError(f"double backward through the Triton {loss} loss; use impl='torch'")


def kernel_op(name: str, fake):
    """Register a launcher as the custom op tldr_fast::NAME with its fake (shape) function and the
    folding vmap rule. An opaque op is one node of a torch.compile graph that calls the launcher at
    run time (so the interpreter works under compile too, and a CUDA graph captures the launches);
    its vmap rule is what lets the autograd Functions around it use generate_vmap_rule. Autograd
    stays in those Functions: torch.func.grad accepts an autograd.Function with setup_context, not
    an op's registered autograd formula."""

    def register(launcher):
        op = torch.library.custom_op(f"tldr_fast::{name}", launcher, mutates_args=())
        op.register_fake(fake)
        op.register_vmap(lambda info, in_dims, *args: vmap_by_folding(op, info, in_dims, *args))
        return op

    return register
