"""Diversity and TV + pixel losses: naive N x N torch, identity torch (eager and compiled), Triton.

`python -m bench kernels [--quick] [--json out.json]`. Every row is one (loss, variant, shape,
pass) with the median time and the peak extra memory; on a GPU also the bytes the pass must move,
the achieved GB/s, the percentage of the device-to-device copy bandwidth measured in the same run,
and the percentage of the floor max(bytes / copy bandwidth, flops / measured matmul rate).
Passes: "fwd" (losses only) and "fwd_bwd" (losses and dL/dx); for TV + pixel also "fused" (the
weighted loss with its gradient written in the same pass as the loss, `weighted_tv_pixel`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.common import is_oom, peak_memory_bytes, time_fn
from tldr_fast import losses
from tldr_fast.kernels import diversity as kdiv

FULL_NS = (1024, 4096, 16384, 65536, 262144)
FULL_DS = (64, 256, 1024)
FULL_TV_BATCHES = (1024, 16384, 65536)
# --quick: the target shapes only (CPU: N=32768, D=256; GPU: N=65536, D=256 and a batch of
# 65536 MNIST-size images), the TV batch kept small on CPU.
QUICK_N = {"cpu": 32768, "cuda": 65536}
QUICK_TV_BATCH = {"cpu": 1024, "cuda": 65536}
# The naive route holds one N x N fp32 matrix forward, about three with its gradient: skip beyond.
NAIVE_BYTES_LIMIT = {"cuda": 24 << 30, "cpu": 5 << 30}


def add_arguments(parser) -> None:
    parser.add_argument("--kernels-n", type=int, nargs="+", default=None, help="feature counts N")
    parser.add_argument("--kernels-d", type=int, nargs="+", default=None, help="feature dims D")
    parser.add_argument("--kernels-dtype", default="float32", choices=["float32", "bfloat16"])


def naive_diversity(feat: torch.Tensor, normalized: bool = True):
    """The textbook N x N formulation: every pairwise cosine and Gram entry materialised."""
    n = feat.shape[0]
    fn = F.normalize(feat.float(), dim=1, eps=kdiv.EPS)
    scores = fn @ fn.T
    cos = (scores.sum() - scores.trace()) / (n * (n - 1))
    gram = scores if normalized else feat.float() @ feat.float().T
    # ||G - I||_F^2 expanded on the N x N matrix, so that no second N x N temporary is needed.
    ortho = (torch.linalg.vector_norm(gram).square() - 2 * gram.trace() + n) / n**2
    return cos, ortho


def identity_diversity(feat: torch.Tensor):
    return losses.diversity_losses(feat, impl="torch")


def triton_diversity(feat: torch.Tensor):
    return losses.diversity_losses(feat, impl="triton")


def _fwd(fn, x):
    def run():
        with torch.no_grad():
            return fn(x)

    return run


def _fwd_bwd(fn, x):
    leaf = x.detach().requires_grad_()

    def run():
        out = fn(leaf)
        return torch.autograd.grad(sum(out), leaf)

    return run


def _graphed(run):
    """run() captured once as a CUDA graph (after a warm-up on a side stream); returns the replay.

    Shows the kernels without launch overhead, as the engine's graph-replayed step runs them, and
    checks that they can be captured at all (no host synchronisation inside)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def _graph_runs(device: str, runs):
    """((variant, pass), run) pairs, plus a "triton_graph" variant of each Triton run on CUDA,
    whose run is a factory that captures the graph (see _measure)."""
    for (name, pass_name), run in runs:
        yield (name, pass_name), run
        if device == "cuda" and name == "triton":
            yield (name + "_graph", pass_name), lambda run=run: _graphed(run)


def measure_copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    numel = (1 << 28) if device == "cuda" else (1 << 24)
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=3, repeats=20)
    return 2 * src.numel() * 4 / t.median_s


def measure_matmul_rate(device: str) -> float:
    """FLOP/s of a large fp32 matmul with TF32 tensor cores allowed (the fastest fp32-input rate)."""
    size = 8192 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        t = time_fn(lambda: a @ a, device=device, warmup=2, repeats=10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * size**3 / t.median_s


def _measure(
    row: dict,
    run,
    device: str,
    quick: bool,
    traffic_bytes: int,
    flops: int,
    rates,
    once: bool = False,
) -> dict:
    """Time and peak memory of run(); once=True (seconds-long CPU runs) times a single call."""
    if row["variant"].endswith("_graph"):
        try:
            run = run()  # the factory captures the graph
        except Exception as err:  # a failed capture is a result: something in the op syncs the host
            row["skipped"] = f"CUDA graph capture failed: {type(err).__name__}: {str(err)[:120]}"
            return row
    try:
        if (
            once
        ):  # one profiled call gives both numbers (profiler overhead is small next to seconds)
            start = time.perf_counter()
            row["peak_mem_mb"] = peak_memory_bytes(run, device=device) / 2**20
            elapsed = time.perf_counter() - start
            row.update(median_s=elapsed, min_s=elapsed, repeats=1)
        else:
            timing = time_fn(
                run,
                device=device,
                warmup=1 if quick else 3,
                repeats=3 if quick else 15,
                max_seconds=10.0 if quick else 30.0,
            )
            row.update(median_s=timing.median_s, min_s=timing.min_s, repeats=timing.repeats)
            row["peak_mem_mb"] = peak_memory_bytes(run, device=device) / 2**20
    except Exception as err:  # an OOM is a result (the naive route at large N), anything else a bug
        if not is_oom(err):
            raise
        row["skipped"] = "out of memory"
        return row
    if row["variant"].endswith(
        "_graph"
    ):  # replays allocate nothing: memory lives in the graph pool
        row["peak_mem_mb"] = None
    if device == "cpu" and "compiled" in row["variant"]:
        # torch.profiler does not see inductor's CPU buffers: the number would read as ~0.
        row["peak_mem_mb"] = None
        row["note"] = "CPU peak memory of compiled code not measurable with torch.profiler"
    if device == "cuda":
        copy_bw, mm_rate = rates
        floor = max(traffic_bytes / copy_bw, flops / mm_rate)
        row.update(
            bytes=traffic_bytes,
            gb_s=traffic_bytes / row["median_s"] / 1e9,
            pct_copy_bw=100 * traffic_bytes / row["median_s"] / copy_bw,
            floor_s=floor,
            pct_of_floor=100 * floor / row["median_s"],
        )
    return row


def diversity_rows(args, rates) -> list[dict]:
    device = args.device
    dtype = getattr(torch, args.kernels_dtype)
    quick = args.quick
    ns = args.kernels_n or ((QUICK_N[device],) if quick else FULL_NS)
    ds = args.kernels_d or ((256,) if quick else FULL_DS)
    variants = {
        "naive": naive_diversity,
        "identity": identity_diversity,
        "identity_compiled": torch.compile(identity_diversity),
    }
    if device == "cuda":
        variants["triton"] = triton_diversity
        # Compiling fuses the few small torch ops around the kernels (loss assembly, partial sums).
        variants["triton_compiled"] = torch.compile(triton_diversity)
    rows = []
    for n in ns:
        for d in ds:
            feat = (torch.randn(n, d, device=device).abs() + 0.1).to(dtype)
            feat_bytes = feat.numel() * feat.element_size()
            inner = min(n, d)
            runs = [
                ((name, pass_name), make(fn, feat))
                for name, fn in variants.items()
                for pass_name, make in (("fwd", _fwd), ("fwd_bwd", _fwd_bwd))
            ]
            for (name, pass_name), run in _graph_runs(device, runs):
                row = {
                    "loss": "diversity",
                    "variant": name,
                    "pass": pass_name,
                    "N": n,
                    "D": d,
                    "dtype": args.kernels_dtype,
                    "feature_mb": feat_bytes / 2**20,
                }
                naive_bytes = (1 if pass_name == "fwd" else 3) * n * n * 4
                if name == "naive" and naive_bytes > NAIVE_BYTES_LIMIT[device]:
                    row["skipped"] = f"N x N matrices need {naive_bytes / 2**30:.0f} GiB"
                    rows.append(row)
                    continue
                # On CPU the naive backward at large N takes minutes: quick mode leaves it out.
                if (
                    quick
                    and device == "cpu"
                    and name == "naive"
                    and pass_name == "fwd_bwd"
                    and n > 4096
                ):
                    row["skipped"] = "quick mode"
                    rows.append(row)
                    continue
                traffic = feat_bytes * (1 if pass_name == "fwd" else 3)
                flops = 2 * n * d * inner * (1 if pass_name == "fwd" else 2)
                once = device == "cpu" and name == "naive" and n > 4096
                rows.append(_measure(row, run, device, quick, traffic, flops, rates, once))
                if row.get("peak_mem_mb") is not None:
                    row["peak_mem_x_features"] = row["peak_mem_mb"] / row["feature_mb"]
    return rows


def _tv_fused(x):
    def run():
        return losses.weighted_tv_pixel(x, 0.5, 2.0, impl="triton")

    return run


def tv_rows(args, rates) -> list[dict]:
    device = args.device
    dtype = getattr(torch, args.kernels_dtype)
    batches = (QUICK_TV_BATCH[device],) if args.quick else FULL_TV_BATCHES
    shapes = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}
    variants = {
        "torch": lambda x: losses.tv_pixel(x, impl="torch"),
        "torch_compiled": torch.compile(lambda x: losses.tv_pixel(x, impl="torch")),
    }
    if device == "cuda":
        variants["triton"] = lambda x: losses.tv_pixel(x, impl="triton")
        variants["triton_compiled"] = torch.compile(lambda x: losses.tv_pixel(x, impl="triton"))
    rows = []
    for b in batches:
        for image, chw in shapes.items():
            if args.quick and image != "mnist":
                continue
            x = (torch.rand(b, *chw, device=device) * 1.4 - 0.2).to(dtype)
            x_bytes = x.numel() * x.element_size()
            runs = [
                ((name, pass_name), make(fn, x))
                for name, fn in variants.items()
                for pass_name, make in (("fwd", _fwd), ("fwd_bwd", _fwd_bwd))
            ]
            if device == "cuda":
                runs.append((("triton", "fused"), _tv_fused(x)))
            for (name, pass_name), run in _graph_runs(device, runs):
                row = {
                    "loss": "tv_pixel",
                    "variant": name,
                    "pass": pass_name,
                    "N": b,
                    "image": image,
                    "dtype": args.kernels_dtype,
                    "feature_mb": x_bytes / 2**20,
                }
                # fwd reads x; fwd_bwd reads x twice and writes dL/dx; fused reads once, writes once.
                traffic = x_bytes * {"fwd": 1, "fwd_bwd": 3, "fused": 2}[pass_name]
                rows.append(_measure(row, run, device, args.quick, traffic, 0, rates))
    return rows


def run(args) -> list[dict]:
    device = args.device
    rates = None
    header = {"loss": "device", "variant": device}
    if device == "cuda":
        rates = (measure_copy_bandwidth(device), measure_matmul_rate(device))
        header.update(copy_gb_s=rates[0] / 1e9, matmul_tflops=rates[1] / 1e12)
    else:
        header.update(
            copy_gb_s=measure_copy_bandwidth(device) / 1e9, threads=torch.get_num_threads()
        )
    rows = [header]
    rows += diversity_rows(args, rates)
    rows += tv_rows(args, rates)
    rows += speedups(rows)
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    """Ratios measured side by side: naive / identity (the CPU target) and best torch / Triton."""
    timed = {
        (r.get("loss"), r.get("variant"), r.get("pass"), r.get("N"), r.get("D"), r.get("image")): r
        for r in rows
        if "median_s" in r
    }
    out = []
    for (loss, variant, pass_name, n, d, image), row in timed.items():
        if variant not in ("identity", "triton", "triton_compiled", "triton_graph"):
            continue
        ratio = {
            "loss": loss,
            "variant": f"speedup:{variant}",
            "pass": pass_name,
            "N": n,
            "D": d,
            "image": image,
        }
        naive = timed.get((loss, "naive", pass_name, n, d, image))
        if variant == "identity" and naive:
            ratio["naive_over_identity"] = naive["median_s"] / row["median_s"]
        if variant.startswith("triton"):
            torch_names = (
                ("identity", "identity_compiled")
                if loss == "diversity"
                else ("torch", "torch_compiled")
            )
            # The fused TV pass (loss and gradient) competes with torch's forward + backward.
            torch_pass = "fwd_bwd" if pass_name == "fused" else pass_name
            best = min(
                (
                    timed[(loss, t, torch_pass, n, d, image)]["median_s"]
                    for t in torch_names
                    if (loss, t, torch_pass, n, d, image) in timed
                ),
                default=None,
            )
            if best:
                ratio["best_torch_over_triton"] = best / row["median_s"]
        if len(ratio) > 6:
            out.append(ratio)
    return out
