"""Timing, memory and reporting helpers shared by every benchmark suite.

A suite is a module in `bench/` with `add_arguments(parser)` (optional) and
`run(args) -> list[dict]`; each dict is one row (name, variant, shape, median seconds, ...).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    repeats: int

    @classmethod
    def of(cls, times: list[float]) -> Timing:
        return cls(statistics.median(times), min(times), len(times))

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "min_s": self.min_s, "repeats": self.repeats}


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], device) -> float:
    """Wall time of one fn() call (CUDA events on a GPU)."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_fn(
    fn: Callable[[], object],
    device="cpu",
    warmup: int = 2,
    repeats: int = 7,
    max_seconds: float = 20.0,
) -> Timing:
    """Median wall time of fn() after warm-up; stops early once max_seconds have been spent."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    for _ in range(repeats):
        times.append(_seconds(fn, device))
        if sum(times) > max_seconds and len(times) >= 3:
            break
    return Timing.of(times)


def interleaved_times(
    fns: list[Callable[[], object]],
    device="cpu",
    warmup: int = 2,
    repeats: int = 7,
    max_seconds: float = 60.0,
) -> list[list[float]]:
    """Per function, its wall times over rounds in which every function runs once, back to back,
    in an order rotated by one each round (round r starts with fns[r % n]), so that a machine whose
    speed drifts from round to round slows every function of a round alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for k in range(len(fns)):
            i = (r + k) % len(fns)
            times[i].append(_seconds(fns[i], device))
        if sum(map(sum, times)) > max_seconds and r >= 2:
            break
    return times


def median_ratio(times: list[float], reference_times: list[float]) -> float:
    """Median over rounds of time / reference time (the two from the same interleaved rounds)."""
    return statistics.median(t / t_ref for t, t_ref in zip(times, reference_times, strict=True))


def paired_ratio(
    fn: Callable[[], object],
    reference: Callable[[], object],
    device="cpu",
    warmup: int = 2,
    repeats: int = 7,
    max_seconds: float = 60.0,
) -> tuple[float, Timing, Timing]:
    """(median over rounds of time(fn) / time(reference), fn's timing, reference's timing), the
    two timed back to back in every round, alternating which goes first (`interleaved_times`)."""
    reference_times, times = interleaved_times(
        [reference, fn], device, warmup, repeats, max_seconds
    )
    return median_ratio(times, reference_times), Timing.of(times), Timing.of(reference_times)


def cpu_seconds(fn, warmup: int = 1, repeats: int = 5) -> float:
    """Median CPU time of fn() in this process (one thread: CPU time = compute time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object], device="cpu") -> int:
    """Peak extra memory of one call: CUDA allocator peak on GPU, tracemalloc-free RSS estimate on CPU.

    On CPU torch allocations bypass tracemalloc, so we use the CPU allocator's profiler when present
    and otherwise report the peak from torch.profiler's memory accounting.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Running sum of allocation events in time order gives the peak live bytes during fn.
    events = sorted(
        (e for e in prof.events() if getattr(e, "cpu_memory_usage", 0) != 0),
        key=lambda e: e.time_range.start,
    )
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 free now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        # Other processes' load when the run started: on a shared CPU it says how far the
        # timings measure contention rather than the code.
        "load_average_1min": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(columns)
    ]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
