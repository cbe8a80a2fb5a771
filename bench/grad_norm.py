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

`--gn-targets resnet18,vit` adds rows for a CIFAR-style ResNet-18 and a small ViT on 3x32x32
inputs: ghost, vmap and the peers that are installed (Opacus's GradSampleModule, BackPACK's
BatchL2Grad), each for the norms alone and for the norms with their d/dx, as R against the same
plain forward+backward. A method that cannot serve a model or a quantity gets a row with `skipped`
saying why; a peer's norms carry `rel_diff_vs_ghost`, their relative RMS difference from ghost's.
"""

from __future__ import annotations

import copy
import importlib.util

import torch
import torch.nn.functional as F

from bench.common import cpu_seconds, is_oom, paired_ratio, peak_memory_bytes
from tldr_fast.grad_norm import per_sample_grad_norm
from tldr_fast.models import PaperCNN, ResNet18, ViT

BACKENDS = ("ghost", "vmap", "loop")
# --gn-targets: model name -> a frozen model in eval mode, sized for a CPU run (3x32x32 inputs).
TARGETS = {
    "resnet18": lambda: ResNet18(3, 10, 32, width=8),
    "vit": lambda: ViT(3, 10, 32),
}
TARGET_METHODS = ("ghost", "vmap", "opacus", "backpack")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--gn-batch",
        type=int,
        default=None,
        help="batch for ghost and vmap (default 256 on CPU, 4096 on CUDA, 32 with --quick)",
    )
    parser.add_argument(
        "--gn-loop-batch",
        type=int,
        default=None,
        help="smaller batch for the loop backend (default 32 on CPU, 256 on CUDA, 8 with --quick)",
    )
    parser.add_argument(
        "--gn-backends", default=",".join(BACKENDS), help="comma-separated backends"
    )
    parser.add_argument(
        "--gn-threads", type=int, default=None, help="torch CPU threads (default: unchanged)"
    )
    parser.add_argument(
        "--gn-compile",
        action="store_true",
        help="also time the torch.compile'd baseline, ghost and vmap",
    )
    parser.add_argument(
        "--gn-max-batch",
        action="store_true",
        help="double the batch until each backend runs out of memory (CUDA)",
    )
    parser.add_argument(
        "--gn-targets",
        default="",
        help=f"comma-separated extra models among {sorted(TARGETS)}: ghost, vmap, Opacus and BackPACK rows",
    )
    parser.add_argument(
        "--gn-target-batch",
        type=int,
        default=None,
        help="batch of the --gn-targets rows (default 16 on CPU, 256 on CUDA, 4 with --quick)",
    )


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
        step = torch.compile(
            lambda x: torch.autograd.grad(
                per_sample_grad_norm(model, x, y, backend=backend).mean(), x
            )
        )
        return lambda: step(x)

    return (lambda: base(x)), {backend: compiled(backend) for backend in backends}


def measure(name: str, step, baseline, batch: int, device, repeats: int) -> dict:
    ratio, t, base_t = paired_ratio(step, baseline, device=device, repeats=repeats)
    row = {
        "backend": name,
        "batch": batch,
        "median_s": t.median_s,
        "baseline_s": base_t.median_s,
        "R": ratio,
        "repeats": t.repeats,
    }
    if torch.device(device).type == "cpu":
        base_cpu = cpu_seconds(baseline, repeats=repeats)
        cpu = cpu_seconds(step, repeats=min(repeats, t.repeats))
        row.update(cpu_s=cpu, baseline_cpu_s=base_cpu, cpu_R=cpu / base_cpu)
    base_mem, mem = peak_memory_bytes(baseline, device), peak_memory_bytes(step, device)
    row.update(peak_bytes=mem, baseline_peak_bytes=base_mem, mem_ratio=mem / max(base_mem, 1))
    return row


def target_batch(model, batch: int, device):
    gen = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, *model.input_shape, generator=gen).to(device).requires_grad_()
    return x, torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)


def opacus_norms(model):
    """x, y -> per-sample norms from Opacus's GradSampleModule on a trainable copy of the model.

    Opacus records activations only in training mode; the targets have no dropout and Opacus
    refuses BatchNorm, so the copy computes the same function as the eval-mode model."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(
        copy.deepcopy(model).train().requires_grad_(True), loss_reduction="sum"
    )
    params = [p for p in wrapped.parameters() if p.requires_grad]

    def norms(x, y):
        for p in params:
            p.grad, p.grad_sample = None, None
        F.cross_entropy(wrapped(x.detach()), y, reduction="sum").backward()
        return sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in params).sqrt()

    return norms


def backpack_norms(model):
    """x, y -> per-sample norms from BackPACK's BatchL2Grad on an extended copy of the model, with
    the graph to x kept (create_graph=True), so their d/dx is an ordinary backward."""
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    extended = extend(copy.deepcopy(model).requires_grad_(True), use_converter=True)
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    params = [p for p in extended.parameters() if p.requires_grad]

    def norms(x, y):
        for p in params:
            p.grad = None
        with backpack(BatchL2Grad()):
            loss_fn(extended(x), y).backward(create_graph=True)
        return sum(p.batch_l2 for p in params).sqrt()

    return norms


def target_norms(method: str, model):
    """(x, y -> norms (B,), whether d/dx of them is available), or a reason the method cannot serve."""
    if method in ("ghost", "vmap"):
        return (lambda x, y: per_sample_grad_norm(model, x, y, backend=method)), True
    if importlib.util.find_spec(method) is None:
        return f"{method} is not installed", False
    try:
        if method == "opacus":
            return opacus_norms(model), False
        return backpack_norms(model), True
    except Exception as err:  # the peer's own refusal (an unsupported layer) is the row's finding
        return (
            f"{method} refuses the model: {type(err).__name__}: {str(err).splitlines()[0][:160]}",
            False,
        )


def target_rows(name: str, args, batch: int, repeats: int) -> list[dict]:
    """Rows for one --gn-targets model: every method, norms alone and norms + d/dx."""
    torch.manual_seed(0)
    model = TARGETS[name]().to(args.device).eval().requires_grad_(False)
    x, y = target_batch(model, batch, args.device)
    baseline = baseline_step(model, x, y)
    reference = per_sample_grad_norm(model, x.detach(), y, backend="ghost")
    rows = []
    for method in TARGET_METHODS:
        norms, differentiable = target_norms(method, model)
        steps = {"norms": None, "norms+d/dx": None}
        if callable(norms):
            steps["norms"] = lambda norms=norms: norms(x.detach(), y)
            if differentiable:
                steps["norms+d/dx"] = lambda norms=norms: torch.autograd.grad(norms(x, y).mean(), x)
        for quantity, step in steps.items():
            row = {"backend": method, "quantity": quantity, "batch": batch}
            if step is None:
                row["skipped"] = (
                    norms if isinstance(norms, str) else f"{method}'s norms carry no graph to x"
                )
            else:
                row.update(measure(method, step, baseline, batch, args.device, repeats))
                row["quantity"] = quantity
                if method not in ("ghost", "vmap"):
                    diff = (norms(x.detach(), y).detach().double() - reference.double()).norm()
                    row["rel_diff_vs_ghost"] = float(diff / reference.double().norm())
            rows.append(
                dict(
                    row,
                    suite="gradnorm",
                    model=type(model).__name__,
                    image="x".join(map(str, model.input_shape)),
                    device=args.device,
                    threads=torch.get_num_threads(),
                )
            )
    return rows


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
    return {
        "backend": backend,
        "max_batch": fits,
        "first_oom_batch": batch if batch <= limit else None,
    }


def run(args) -> list[dict]:
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    if args.gn_threads:
        torch.set_num_threads(args.gn_threads)
    targets = [name for name in args.gn_targets.split(",") if name]
    unknown = [name for name in targets if name not in TARGETS]
    if unknown:
        raise ValueError(f"--gn-targets: {unknown[0]!r} is not one of {sorted(TARGETS)}")
    batch = args.gn_batch or (32 if args.quick else 4096 if on_cuda else 256)
    loop_batch = args.gn_loop_batch or (8 if args.quick else 256 if on_cuda else 32)
    repeats = 3 if args.quick else 7
    model = frozen_paper_cnn(device)
    rows = []
    for backend in args.gn_backends.split(","):
        b = loop_batch if backend == "loop" else batch
        x, y = batch_for(model, b, device)
        rows.append(
            measure(
                backend,
                grad_norm_step(model, x, y, backend),
                baseline_step(model, x, y),
                b,
                device,
                repeats,
            )
        )
    if args.gn_compile:
        x, y = batch_for(model, batch, device)
        base, steps = compiled_steps(
            model, x, y, [b for b in args.gn_backends.split(",") if b != "loop"]
        )
        rows += [
            measure(f"{backend}+compile", step, base, batch, device, repeats)
            for backend, step in steps.items()
        ]
    by_backend = {r["backend"]: r for r in rows}
    for suffix in ("", "+compile"):
        ghost, vmap = by_backend.get("ghost" + suffix), by_backend.get("vmap" + suffix)
        if ghost and vmap:
            for clock in ("R", "cpu_R"):
                if clock in ghost:
                    ghost[f"vmap_over_ghost_{clock}"] = vmap[clock] / ghost[clock]
    for r in rows:
        r.update(
            suite="gradnorm",
            model="PaperCNN",
            image="1x28x28",
            device=device,
            threads=torch.get_num_threads(),
        )
    if args.gn_max_batch and on_cuda:
        # The loop's time grows linearly with the batch, so searching its memory limit is not practical.
        rows += [
            dict(largest_batch(model, b, batch, device), suite="gradnorm", model="PaperCNN")
            for b in args.gn_backends.split(",")
            if b != "loop"
        ]
    target_batch_size = args.gn_target_batch or (4 if args.quick else 256 if on_cuda else 16)
    for name in targets:
        rows += target_rows(name, args, target_batch_size, repeats)
    return rows
