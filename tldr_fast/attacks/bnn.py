"""Inference and inversion of a binarised MLP by SAT, and diverse sampling of its preimages.

`encode(model)` folds the network (`bnn_fold`) and builds its CNF (`bnn_cnf`). With the input fixed
the formula is satisfiable together with label variable z_y exactly when the network predicts y
(`sat_labels`); with the output fixed to y, its solutions restricted to the input variables are
exactly the inputs the network classifies as y (`invert`).

Samplers: "cmsgen" draws near-uniform solutions with CMSGen (`pycmsgen`, optional); a solution drawn
again is then blocked so the run ends. "blocking" (the fallback, PySAT's Glucose 4) starts from seeded
random phases on the input variables and blocks each input found, so samples are distinct by
construction but not uniform (consecutive ones tend to be close). Every sample is checked against the network's own forward
pass before it is returned.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from pysat.solvers import Solver

from tldr_fast.attacks.bnn_cnf import BnnFormula, encode_folded
from tldr_fast.attacks.bnn_fold import fold
from tldr_fast.attacks.bnn_model import BinarizedMLP
from tldr_fast.validation import check_finite_module, check_positive_int

SAMPLERS = ("auto", "cmsgen", "blocking")


@dataclass
class InversionResult:
    """Preimages of one label.

    status: "sat" (num_samples found), "exhausted" (every preimage found, fewer than asked),
    "unsat" (the network never outputs this label), "timeout" (time limit hit; pixels holds what was found).
    draws counts solver solutions, duplicates included, so distinct_fraction = len(pixels) / draws.
    """

    label: int
    pixels: np.ndarray
    status: str
    sampler: str
    draws: int
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.status == "timeout"

    @property
    def distinct_fraction(self) -> float:
        return len(self.pixels) / self.draws if self.draws else float("nan")

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "status": self.status,
            "timed_out": self.timed_out,
            "sampler": self.sampler,
            "samples": int(len(self.pixels)),
            "draws": self.draws,
            "distinct_fraction": self.distinct_fraction,
            "seconds": self.seconds,
            "samples_per_second": len(self.pixels) / self.seconds if self.seconds > 0 else None,
            "mean_on_pixels": float((self.pixels > 0).sum(1).mean()) if len(self.pixels) else None,
            "mean_pairwise_hamming": mean_pairwise_hamming(self.pixels),
        }


def cmsgen_available() -> bool:
    return importlib.util.find_spec("pycmsgen") is not None


def encode(model: BinarizedMLP, hidden_encoding: str = "totalizer") -> BnnFormula:
    """CNF of a trained BinarizedMLP (eval-mode semantics); refuses a non-binarised network naming the layer."""
    check_finite_module(model, "model")
    return encode_folded(fold(model), hidden_encoding)


def sat_labels(formula: BnnFormula, pixels: np.ndarray) -> list[list[int]]:
    """For each input (N, num_inputs) in {-1, +1}: the labels y for which the formula with z_y is satisfiable."""
    pixels = _check_pixels(pixels, len(formula.input_vars))
    with Solver(name="g4", bootstrap_with=formula.clauses) as solver:
        return [
            [
                y
                for y, z in enumerate(formula.label_vars)
                if solver.solve(assumptions=[*formula.input_literals(x), z])
            ]
            for x in pixels
        ]


def invert(
    model: BinarizedMLP,
    label: int,
    num_samples: int = 1,
    sampler: str = "auto",
    time_limit: float | None = None,
    seed: int = 0,
    min_on: int | None = None,
    max_on: int | None = None,
    formula: BnnFormula | None = None,
) -> InversionResult:
    """Up to num_samples distinct inputs (pixels in {-1, +1}) that `model` classifies as `label`.

    min_on / max_on bound the number of +1 pixels. time_limit (seconds) bounds the whole call; on
    expiry the samples found so far are returned with status "timeout" (CMSGen's own limit counts CPU
    seconds, so on a busy machine its wall time can run over). Pass `formula` (from
    `encode(model)`) to reuse one encoding across labels.
    """
    formula = encode(model) if formula is None else formula
    if (
        isinstance(label, bool)
        or not isinstance(label, (int, np.integer))
        or not 0 <= label < formula.num_classes
    ):
        raise ValueError(
            f"label must be an integer in [0, {formula.num_classes - 1}], got {label!r}"
        )
    check_positive_int(num_samples, "num_samples")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "cmsgen" and not cmsgen_available():
        raise ValueError(
            "sampler 'cmsgen' needs the optional package pycmsgen (pip install pycmsgen)"
        )
    if sampler == "auto":
        sampler = "cmsgen" if cmsgen_available() else "blocking"
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be a number of seconds > 0, got {time_limit!r}")
    n = len(formula.input_vars)
    for name, value in (("min_on", min_on), ("max_on", max_on)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n
        ):
            raise ValueError(f"{name} must be an integer in [0, {n}], got {value!r}")
    extra, num_vars = formula.pixel_count_clauses(min_on, max_on)
    clauses = formula.clauses + extra + formula.label_units(int(label))
    draw = _draw_cmsgen if sampler == "cmsgen" else _draw_blocking
    start = time.perf_counter()
    deadline = None if time_limit is None else start + time_limit
    found, draws, status = draw(clauses, num_vars, formula.input_vars, num_samples, seed, deadline)
    pixels = np.array(found, dtype=np.int8).reshape(len(found), n)
    _check_samples(model, pixels, int(label))
    return InversionResult(
        label=int(label),
        pixels=pixels,
        status=status,
        sampler=sampler,
        draws=draws,
        seconds=time.perf_counter() - start,
    )


def mean_pairwise_hamming(pixels: np.ndarray) -> float | None:
    """Mean Hamming distance over distinct pairs of rows (None for fewer than two rows)."""
    k = len(pixels)
    if k < 2:
        return None
    on = (np.asarray(pixels) > 0).astype(np.int64)
    agree = on @ on.T + (1 - on) @ (1 - on).T
    differ = on.shape[1] - agree
    return float(differ[np.triu_indices(k, 1)].mean())


def _status(found: int, wanted: int, sat: bool | None) -> str:
    if sat is None:
        return "timeout"
    if found >= wanted:
        return "sat"
    return "exhausted" if found else "unsat"


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.perf_counter()


def _draw_blocking(clauses, num_vars, input_vars, wanted, seed, deadline):
    """Distinct solutions by blocking clauses, from seeded random initial phases of the input variables.

    The phases are set once: re-randomising them before every call made each solve tens of times
    slower on a 10x10, 100-50 network (measured), while phase saving keeps later solutions near
    earlier ones, so blocking samples are distinct but correlated.
    """
    rng = np.random.default_rng(seed)
    found: list[list[int]] = []
    sat: bool | None = True
    with Solver(name="g4", bootstrap_with=clauses) as solver:
        signs = rng.integers(0, 2, len(input_vars)) * 2 - 1
        solver.set_phases([int(s) * v for s, v in zip(signs, input_vars)])
        while len(found) < wanted:
            left = _remaining(deadline)
            if left is not None and left <= 0:
                sat = None
                break
            sat = _solve_with_timeout(solver, left)
            if not sat:
                break
            model = solver.get_model()
            x = [1 if model[v - 1] > 0 else -1 for v in input_vars]
            found.append(x)
            solver.add_clause([-v if p > 0 else v for v, p in zip(input_vars, x)])
    return found, len(found), _status(len(found), wanted, sat)


def _solve_with_timeout(solver: Solver, seconds: float | None) -> bool | None:
    """solve() that returns None when `seconds` pass first."""
    if seconds is None:
        return solver.solve()
    timer = threading.Timer(seconds, solver.interrupt)
    timer.start()
    try:
        return solver.solve_limited(expect_interrupt=True)
    finally:
        timer.cancel()
        solver.clear_interrupt()


def _draw_cmsgen(clauses, num_vars, input_vars, wanted, seed, deadline):
    """Near-uniform CMSGen draws; a repeated input is blocked, so every draw after it is new."""
    import pycmsgen

    solver = pycmsgen.Solver(seed=int(seed))
    solver.add_clauses(clauses)
    seen: set[tuple[int, ...]] = set()
    found: list[list[int]] = []
    draws = 0
    sat: bool | None = True
    while len(found) < wanted:
        left = _remaining(deadline)
        if left is not None and left <= 0:
            sat = None
            break
        sat, solution = solver.solve(time_limit=left) if left is not None else solver.solve()
        if not sat:
            break
        draws += 1
        x = tuple(1 if solution[v] else -1 for v in input_vars)
        if x in seen:
            solver.add_clause([-v if p > 0 else v for v, p in zip(input_vars, x)])
            continue
        seen.add(x)
        found.append(list(x))
    return found, draws, _status(len(found), wanted, sat)


@torch.no_grad()
def _check_samples(model: BinarizedMLP, pixels: np.ndarray, label: int) -> None:
    """Every sample must be classified as `label` by the network itself; anything else is an encoder bug."""
    if not len(pixels):
        return
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        predicted = (
            model.forward_binary(torch.as_tensor(pixels, dtype=torch.float32, device=device))
            .argmax(1)
            .cpu()
        )
    finally:
        model.train(was_training)
    wrong = int((predicted != label).sum())
    if wrong:
        raise RuntimeError(
            f"{wrong} of {len(pixels)} SAT samples for label {label} are classified otherwise"
        )


def _check_pixels(pixels, num_inputs: int) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.shape[1] != num_inputs:
        raise ValueError(f"pixels must have shape (N, {num_inputs}), got {pixels.shape}")
    if not np.isin(pixels, (-1, 1)).all():
        raise ValueError("pixels must take only the values -1 and +1")
    return pixels
