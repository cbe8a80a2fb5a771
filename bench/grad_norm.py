"""Per-sample gradient norms: cost of the value and d/dx of mean_i ||grad_theta CE_i|| for each backend.

R = time(per_sample_grad_norm(...).mean() and its gradient with respect to x)
    / time(plain cross-entropy forward + backward with respect to x),
for PaperCNN on 28x28 MNIST-shaped inputs with the classifier frozen and in eval mode (as in the
engine). R is the median over rounds of the ratio of one call to one baseline call timed back to
back at the same batch size (`bench.common.paired_ratio`), so a machine whose speed drifts
between rounds cancels out (before 2026-11-23 it was the ratio of two medians taken one after the
other). On CPU both wall time and process CPU time are
reported (CPU time is robust to other processes on a shared box; `cpu_R` uses it). The peak-memory
ratio compares the extra memory of one call with the baseline's. On CUDA, `--gn-max-batch` also
doubles the batch from the timed size until ghost and vmap run out of memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import cpu_seconds, is_oom, paired_ratio, peak_memory_bytes
from tldr_fast.grad_norm import per_sample_grad_norm
from tldr_fast.models import PaperCNN

BACKENDS = ("ghost", "vmap", "loop")


def add_arguments(parser) -> None:
    parser.add_argument("--gn-batch", type=int, default=None,
                        help="batch for ghost and vmap (default 256 on CPU, 4096 on CUDA, 32 with --quick)")
    parser.add_argument("--gn-loop-batch", type=int, default=None,
                        help="smaller batch for the loop backend (default 32 on CPU, 256 on CUDA, 8 with --quick)")
    parser.add_argument("--gn-backends", default=",".join(BACKENDS), help="comma-separated backends")
    parser.add_argument("--gn-threads", type=int, default=None, help="torch CPU threads (default: unchanged)")
    parser.add_argument("--gn-compile", action="store_true", help="also time the torch.compile'd baseline, ghost and vmap")
    parser.add_argument("--gn-max-batch", action="store_true",
                        help="double the batch until each backend runs out of memory (CUDA)")


def frozen_paper_cnn(device) -> PaperCNN:
    torch.manual_seed(0)
    model = PaperCNN(1, 10, 28).to(device).eval().requires_grad_(False)
    return model


def batch_for(model, batch: int, device):
    gen = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 1, 28, 28, generator=gen).to(device).requires_grad_()
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    return x, y


def baseline_step(model, x, y):
    """Plain cross-entropy forward and backward with respect to x (the unit of R)."""
    return lambda: torch.autograd.grad(F.cross_entropy(model(x), y), x)


def grad_norm_step(model, x, y, backend):
    return lambda: torch.autograd.grad(per_sample_grad_norm(model, x, y, backend=backend).mean(), x)


def compiled_steps(model, x, y, backends):
    """The compiled baseline and, per backend, the compiled value-and-d/dx call."""
    base = torch.compile(lambda x: torch.autograd.grad(F.cross_entropy(model(x), y), x))

    def compiled(backend):
        step = torch.compile(lambda x: torch.autograd.grad(
            per_sample_grad_norm(model, x, y, backend=backend).mean(), x))
        return lambda: step(x)

    return (lambda: base(x)), {backend: compiled(backend) for backend in backends}


def measure(name: str, step, baseline, batch: int, device, repeats: int) -> dict:
    ratio, t, base_t = paired_ratio(step, baseline, device=device, repeats=repeats)
    row = {"backend": name, "batch": batch, "median_s": t.median_s, "baseline_s": base_t.median_s,
           "R": ratio, "repeats": t.repeats}
    if torch.device(device).type == "cpu":
        base_cpu = cpu_seconds(baseline, repeats=repeats)
        cpu = cpu_seconds(step, repeats=min(repeats, t.repeats))
        row.update(cpu_s=cpu, baseline_cpu_s=base_cpu, cpu_R=cpu / base_cpu)
    base_mem, mem = peak_memory_bytes(baseline, device), peak_memory_bytes(step, device)
    row.update(peak_bytes=mem, baseline_peak_bytes=base_mem, mem_ratio=mem / max(base_mem, 1))
    return row


def largest_batch(model, backend: str, start: int, device, limit: int = 1 << 22) -> dict:
    """Double the batch from `start` until one value-and-d/dx call runs out of memory."""
    fits, batch = None, start
    while batch <= limit:
        try:
            x, y = batch_for(model, batch, device)
            grad_norm_step(model, x, y, backend)()
            torch.cuda.synchronize()
            fits, batch = batch, batch * 2
        except Exception as err:  # only OOM ends the search; anything else is a bug to surface
            if not is_oom(err):
                raise
            break
        finally:
            x = y = None
            torch.cuda.empty_cache()
    return {"backend": backend, "max_batch": fits, "first_oom_batch": batch if batch <= limit else None}


def run(args) -> list[dict]:
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    if args.gn_threads:
        torch.set_num_threads(args.gn_threads)
    batch = args.gn_batch or (32 if args.quick else 4096 if on_cuda else 256)
    loop_batch = args.gn_loop_batch or (8 if args.quick else 256 if on_cuda else 32)
    repeats = 3 if args.quick else 7
    model = frozen_paper_cnn(device)
    rows = []
    for backend in args.gn_backends.split(","):
        b = loop_batch if backend == "loop" else batch
        x, y = batch_for(model, b, device)
        rows.append(measure(backend, grad_norm_step(model, x, y, backend), baseline_step(model, x, y), b,
                            device, repeats))
    if args.gn_compile:
        x, y = batch_for(model, batch, device)
        base, steps = compiled_steps(model, x, y, [b for b in args.gn_backends.split(",") if b != "loop"])
        rows += [measure(f"{backend}+compile", step, base, batch, device, repeats) for backend, step in steps.items()]
    by_backend = {r["backend"]: r for r in rows}
    for suffix in ("", "+compile"):
        ghost, vmap = by_backend.get("ghost" + suffix), by_backend.get("vmap" + suffix)
        if ghost and vmap:
            for clock in ("R", "cpu_R"):
                if clock in ghost:
                    ghost[f"vmap_over_ghost_{clock}"] = vmap[clock] / ghost[clock]
    for r in rows:
        r.update(suite="gradnorm", model="PaperCNN", image="1x28x28", device=device,
                 threads=torch.get_num_threads())
    if args.gn_max_batch and on_cuda:
        # The loop's time grows linearly with the batch, so searching its memory limit is not practical.
        rows += [dict(largest_batch(model, b, batch, device), suite="gradnorm", model="PaperCNN")
                 for b in args.gn_backends.split(",") if b != "loop"]
    return rows
