"""Choice between the Triton kernels and the plain-torch references, shared by every kernel module.

`impl="auto"` picks Triton for CUDA tensors and torch otherwise; `impl="triton"` on CPU tensors
needs the Triton interpreter, which is only active when TRITON_INTERPRET=1 was set before this
package was imported (Triton decides per kernel at definition time).
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

IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, tensor: torch.Tensor, supported_dtypes: tuple[torch.dtype, ...]) -> str:
    """Return "triton" or "torch" for this tensor; raise a clear error for an impossible request."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    runnable = TRITON_AVAILABLE and (tensor.is_cuda or (INTERPRETED and tensor.device.type == "cpu"))
    if impl == "auto":
        # Under torch.compile, "auto" takes the torch path: Inductor fuses it into its own kernels,
        # and Dynamo (torch 2.13) cannot trace a custom autograd.Function inside nested torch.func
        # transforms (grad of vmap, as in the engine's step). A trace-time constant, not a sync.
        if torch.compiler.is_compiling():
            return "torch"
        return "triton" if tensor.is_cuda and runnable and tensor.dtype in supported_dtypes else "torch"
    if not runnable:
        raise RuntimeError(
            f"impl='triton' needs a CUDA tensor or the Triton interpreter (set TRITON_INTERPRET=1 before "
            f"importing tldr_fast.kernels); got a {tensor.device.type} tensor with the interpreter "
            f"{'on' if INTERPRETED else 'off'} and triton {'installed' if TRITON_AVAILABLE else 'missing'}"
        )
    if tensor.dtype not in supported_dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported_dtypes)
        raise TypeError(f"impl='triton' supports dtypes {names}; got {tensor.dtype}")
    return "triton"


# tl.dot precision for fp32 operands: three TF32 passes on GPU keep fp32 accuracy on tensor cores.
DOT_PRECISION = "ieee" if INTERPRETED else "tf32x3"


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
    folded = fold_vmapped(info.batch_size, [in_dims[i] for i in positions], *(args[i] for i in positions))
    args = list(args)
    for i, tensor in zip(positions, folded, strict=True):
        args[i] = tensor
    out = op(*args)
    if isinstance(out, torch.Tensor):
        return unfold(info.batch_size, out)[0], 0
    out = unfold(info.batch_size, *out)
    return out, (0,) * len(out)


def refuse_double_backward(loss: str):
    raise NotImplementedError(f"double backward through the Triton {loss} loss; use impl='torch'")


def kernel_op(name: str, fake):
    """Register a launcher as the custom op tldr_fast::NAME with its fake (shape) function and the
    folding vmap rule. Opaque ops keep torch.compile away from the launch itself (so the
    interpreter works under compile too), and their vmap rule is what lets the autograd Functions
    around them use generate_vmap_rule, the form torch.compile accepts under vmap."""

    def register(launcher):
        op = torch.library.custom_op(f"tldr_fast::{name}", launcher, mutates_args=())
        op.register_fake(fake)
        op.register_vmap(lambda info, in_dims, *args: vmap_by_folding(op, info, in_dims, *args))
        return op

    return register
