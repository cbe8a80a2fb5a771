"""The compiled training step: `torch.compile(fullgraph=True)` of the engine's pure step and, on
CUDA, one CUDA graph replayed per step.

The step (`engine.make_step`) is a pure function (params, AdamState) -> (params, AdamState,
report) that draws its noise inside, so it compiles into one graph: generator forward, classifier
passes, the gradient-norm term's double backward, the gradient with respect to the stacked
generator parameters and the Adam update. Random draws use the eager random ops
(`fallback_random`), so a compiled step consumes the global RNG exactly like the eager one: the
same seed gives the same noise, and compile on or off gives the same trajectory to float
tolerance.

On CUDA the compiled step is captured once as a CUDA graph whose inputs are static buffers (the
parameters and the Adam moments) that the graph overwrites in place with the updated values, so
a replay is one launch with no host synchronisation. The first call compiles (timed as
`compile_seconds`, separately from the steps that follow) and runs the step; the second captures
the graph from the first call's result and replays it.

Compiled code is cached on disk by TorchInductor (the directory `TORCHINDUCTOR_CACHE_DIR`, by
default a `torchinductor_<user>` folder in the system temporary directory), so a second process
compiling the same step skips code generation; Dynamo's tracing is not cached and is what remains.
"""

from __future__ import annotations

import time

import torch

# Eager random ops inside the compiled graph: the same draws from the same RNG as the eager step.
INDUCTOR_OPTIONS = {"fallback_random": True}
# Every problem shape (batch, image size, config constants) is a new specialisation of the same
# step code; past Dynamo's default limit of 8 per process a fullgraph compile fails
# (FailOnRecompileLimitHit), and benchmarks sweep batch sizes, tools call train() many times.
RECOMPILE_LIMIT = 64


class CompiledStep:
    """A drop-in replacement of the eager step, compiled on first call (CUDA: then graph-replayed).

    `compile_seconds` is None before the first call, then the wall time of that call (tracing,
    code generation, one step) plus, on CUDA, of the graph capture in the second call.
    cuda_graph: None captures on CUDA only. backend: torch.compile's ("aot_eager" traces the same
    single graph without generating code: the quick check that nothing breaks it).
    The parameters and state returned on CUDA are the graph's static buffers, overwritten by the
    next call: clone them to keep a step's values.
    """

    def __init__(self, step, cuda_graph: bool | None = None, backend: str = "inductor"):
        options = INDUCTOR_OPTIONS if backend == "inductor" else None
        self._compiled = torch.compile(
            step, fullgraph=True, dynamic=False, backend=backend, options=options
        )
        self._cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[dict, object, dict] | None = None  # params, AdamState, report
        self.compile_seconds: float | None = None

    def __call__(self, params: dict[str, torch.Tensor], state):
        device = next(iter(params.values())).device
        use_graph = device.type == "cuda" if self._cuda_graph is None else self._cuda_graph
        if use_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs parameters on a CUDA device, got {device}")
        if self.compile_seconds is None:
            return self._first_call(params, state, device, use_graph)
        if not use_graph:
            return self._run_compiled(params, state)
        if self._graph is None:
            return self._capture(params, state, device)
        return self._replay(params, state)

    def _first_call(self, params, state, device, use_graph):
        _synchronize(device)
        start = time.perf_counter()
        if use_graph:
            # Warm-up on a side stream, as CUDA graph capture requires for lazily initialised
            # libraries; the result is the real first step.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                out = self._run_compiled(params, state)
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            out = self._run_compiled(params, state)
        _synchronize(device)
        self.compile_seconds = time.perf_counter() - start
        return out

    def _run_compiled(self, params, state):
        with torch.compiler.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._compiled(params, state)

    def _capture(self, params, state, device):
        start = time.perf_counter()
        static_params = {k: v.clone() for k, v in params.items()}
        static_state = _clone_state(state)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            new_params, new_state, report = self._run_compiled(static_params, static_state)
            _copy_into(static_params, static_state, new_params, new_state)
        self._graph, self._static = graph, (static_params, static_state, report)
        _synchronize(device)
        self.compile_seconds += time.perf_counter() - start
        return self._replay(params, state)

    def _replay(self, params, state):
        static_params, static_state, report = self._static
        _copy_into(static_params, static_state, params, state, skip_identical=True)
        self._graph.replay()
        # The report buffers are overwritten by the next replay; callers keep several steps' reports.
        return dict(static_params), static_state, {k: v.clone() for k, v in report.items()}


def _clone_state(state):
    return type(state)(
        {k: v.clone() for k, v in state.m.items()},
        {k: v.clone() for k, v in state.v.items()},
        state.t.clone(),
    )


def _copy_into(static_params, static_state, params, state, skip_identical: bool = False) -> None:
    """Copy params and state into the static buffers (device-side copies, no host sync)."""
    pairs = [
        *((static_params[k], params[k]) for k in static_params),
        *((static_state.m[k], state.m[k]) for k in static_state.m),
        *((static_state.v[k], state.v[k]) for k in static_state.v),
        (static_state.t, state.t),
    ]
    for dst, src in pairs:
        if not (skip_identical and dst is src):
            dst.copy_(src)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
