"""CNF encoding of a folded binarised MLP (`bnn_fold.FoldedBNN`): inference and inversion as SAT.

Variables: input variable i is true iff pixel i is +1; every hidden neuron has a variable true iff
it outputs +1 (a literal, possibly negated or constant); label variable z_y, when true, forces the network's argmax to be y.

Hidden neuron with weights w and input literals l_i = x_i (w_i = +1) or ~x_i (w_i = -1): the
agreement count is c = sum_i l_i and the neuron fires iff lo <= c <= hi, where the folded interval
touches an end (lo = 0 or hi = n), i.e. iff c >= t or iff c < t. Two encodings:
- "totalizer" (default): an exact counter literal ge[t] <=> c >= t built from two k-bounded PySAT
  totalizers (upward on l, upward on ~l, tied together); the neuron *is* ge[t] or ~ge[t]. Unit
  propagation from a fixed input fixes every neuron, and all auxiliaries are functions of the input.
- "cardenc": a fresh variable h with h -> (c in [lo, hi]) and ~h -> (c not in [lo, hi]), each a
  PySAT CardEnc `sum of literals <= bound` half-reified by adding the guard literal (~h, resp. h)
  to every clause: for any encoding F with auxiliaries a, exists a. (g or F) == g or (exists a. F).
  Per (n, bound) the arc-consistent encoding with the fewest clauses (then variables) is used.
  Smaller in places, but the guards block propagation: the solver has to guess neurons.

Output layer: each class's agreement count c_j in exact unary, ge[j][k] <=> c_j >= k, from two
PySAT totalizers (one on the literals, one on their negations, tied together). The logit of class
j is the folded table scores[j][c_j]; y is the argmax (torch's rule: the first maximal index) iff
scores[y][c_y] > scores[j][c_j] for j < y and >= for j > y. For each pair (y, j) and each value u
of c_y, the allowed values of c_j form an interval (the table is monotone), so the pairwise
comparison is n + 1 pairs of clauses "z_y and c_y = u -> c_j in [lo(u), hi(u)]".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from pysat.card import CardEnc, EncType, ITotalizer

from tldr_fast.attacks.bnn_fold import FoldedBNN, HiddenLayer, OutputLayer

# Encodings on which unit propagation enforces the constraint fully (arc consistency); the modulo and
# k-product totalizers are smaller but are not, and fixed-input inference then needs search.
ENCODINGS = ("seqcounter", "sortnetwrk", "cardnetwrk", "totalizer")


@dataclass
class LayerSize:
    """Variables and clauses one layer added, and how many constraints used each CardEnc encoding."""

    name: str
    neurons: int
    variables: int
    clauses: int
    encodings: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "layer": self.name,
            "neurons": self.neurons,
            "variables": self.variables,
            "clauses": self.clauses,
            "encodings": dict(self.encodings),
        }


@dataclass
class BnnFormula:
    """The CNF of a network: clauses over variables 1..num_vars, and the variables that matter outside."""

    clauses: list[list[int]]
    num_vars: int
    input_vars: list[int]
    label_vars: list[int]
    layers: list[LayerSize]

    @property
    def num_classes(self) -> int:
        return len(self.label_vars)

    def label_units(self, label: int) -> list[list[int]]:
        """Unit clauses fixing the output to `label` (the other label variables false, so they add no freedom)."""
        return [[z if y == label else -z] for y, z in enumerate(self.label_vars)]

    def input_literals(self, pixels: np.ndarray) -> list[int]:
        """Literals fixing the input variables to pixels (num_inputs,) in {-1, +1}."""
        return [v if p > 0 else -v for v, p in zip(self.input_vars, pixels)]

    def pixel_count_clauses(
        self, min_on: int | None = None, max_on: int | None = None
    ) -> tuple[list[list[int]], int]:
        """(clauses, new num_vars) requiring min_on <= #(+1 pixels) <= max_on; auxiliaries start after num_vars."""
        n = len(self.input_vars)
        clauses: list[list[int]] = []
        top = self.num_vars
        if max_on is not None:
            part, top, _ = atmost(self.input_vars, max_on, top)
            clauses += part
        if min_on is not None:
            part, top, _ = atmost([-v for v in self.input_vars], n - min_on, top)
            clauses += part
        return clauses, top

    def sizes(self) -> dict:
        return {
            "variables": self.num_vars,
            "clauses": len(self.clauses),
            "layers": [layer.to_dict() for layer in self.layers],
        }


@functools.cache
def _best_encoding(n: int, bound: int) -> str:
    """The CardEnc encoding of sum(n literals) <= bound with the fewest clauses, then variables."""

    def size(name: str) -> tuple[int, int]:
        cnf = CardEnc.atmost(
            list(range(1, n + 1)), bound=bound, top_id=n, encoding=getattr(EncType, name)
        )
        return len(cnf.clauses), cnf.nv - n

    return min(ENCODINGS, key=size)


def atmost(
    lits: list[int], bound: int, top: int, guard: int | None = None
) -> tuple[list[list[int]], int, str]:
    """(clauses, new top variable, encoding name) for sum(lits) <= bound, each clause or'ed with `guard`.

    With a guard g the clauses say g or (sum <= bound). Trivial bounds need no encoding.
    """
    tail = [] if guard is None else [guard]
    n = len(lits)
    if bound >= n:
        return [], top, "trivial"
    if bound < 0:
        return [list(tail)], top, "trivial"
    if bound == 0:
        return [[-lit, *tail] for lit in lits], top, "units"
    if bound == n - 1:
        return [[-lit for lit in lits] + tail], top, "clause"
    name = _best_encoding(n, bound)
    cnf = CardEnc.atmost(lits, bound=bound, top_id=top, encoding=getattr(EncType, name))
    return [clause + tail for clause in cnf.clauses], max(top, cnf.nv), name


def _literals(input_vars: list[int], weights: np.ndarray) -> list[int]:
    """Agreement literals: x_i where w_i = +1, ~x_i where w_i = -1."""
    return [v if w > 0 else -v for v, w in zip(input_vars, weights.tolist())]


def _constant_literal(lo: int, hi: int, n: int, true_lit: int) -> int | None:
    """The literal of a neuron whose firing set [lo, hi] of agreement counts is empty or all of [0, n]."""
    if lo > hi:
        return -true_lit
    if lo == 0 and hi == n:
        return true_lit
    return None


def _encode_hidden_cardenc(
    layer: HiddenLayer, inputs: list[int], top: int, size: LayerSize, true_lit: int
):
    """Each neuron a fresh variable h with h -> (c in [lo, hi]) and ~h -> (c not in [lo, hi]), half-reified CardEnc."""
    clauses: list[list[int]] = []
    outputs = []
    n = len(inputs)
    for weights, lo, hi in zip(layer.weights, layer.lo.tolist(), layer.hi.tolist()):
        constant = _constant_literal(lo, hi, n, true_lit)
        if constant is not None:
            outputs.append(constant)
            continue
        top += 1
        h = top
        outputs.append(h)
        lits = _literals(inputs, weights)
        negated = [-lit for lit in lits]
        if hi == n:  # fires iff c >= lo: h -> #(~l) <= n - lo ; ~h -> #l <= lo - 1
            parts = [(negated, n - lo, -h), (lits, lo - 1, h)]
        else:  # lo == 0, fires iff c <= hi: h -> #l <= hi ; ~h -> #(~l) <= n - hi - 1
            parts = [(lits, hi, -h), (negated, n - hi - 1, h)]
        for part_lits, bound, guard in parts:
            part, top, name = atmost(part_lits, bound, top, guard)
            clauses += part
            size.encodings[name] = size.encodings.get(name, 0) + 1
    return clauses, outputs, top


def _encode_hidden_totalizer(
    layer: HiddenLayer, inputs: list[int], top: int, size: LayerSize, true_lit: int
):
    """Each neuron the literal ge[t] (fires iff c >= t) or ~ge[t] (fires iff c < t) of an exact counter."""
    clauses: list[list[int]] = []
    outputs = []
    n = len(inputs)
    for weights, lo, hi in zip(layer.weights, layer.lo.tolist(), layer.hi.tolist()):
        constant = _constant_literal(lo, hi, n, true_lit)
        if constant is not None:
            outputs.append(constant)
            continue
        t = lo if hi == n else hi + 1
        part, ge, top = _counter(_literals(inputs, weights), top, t, t)
        clauses += part
        outputs.append(ge[t] if hi == n else -ge[t])
        size.encodings["totalizer"] = size.encodings.get("totalizer", 0) + 2
    return clauses, outputs, top


def _counter(
    lits: list[int], top: int, k_lo: int, k_hi: int
) -> tuple[list[list[int]], dict[int, int], int]:
    """(clauses, ge, top) with ge[k] <=> sum(lits) >= k for k_lo <= k <= k_hi (1 <= k_lo <= k_hi <= n).

    An upward totalizer gives sum >= k -> ge[k]; one on the negated literals gives
    #(~l) >= n - k + 1 -> d[n - k + 1], and the clauses ge[k] -> ~d[n - k + 1] close the other
    direction. Unit propagation from fixed inputs then fixes every ge[k].
    """
    n = len(lits)
    with ITotalizer(lits=lits, ubound=k_hi, top_id=top) as up:  # sum >= k -> up.rhs[k - 1]
        clauses = [list(c) for c in up.cnf.clauses]
        ge = {k: up.rhs[k - 1] for k in range(k_lo, k_hi + 1)}
        top = up.top_id
    with ITotalizer(lits=[-lit for lit in lits], ubound=n - k_lo + 1, top_id=top) as down:
        clauses += [list(c) for c in down.cnf.clauses]
        clauses += [[-ge[k], -down.rhs[n - k]] for k in range(k_lo, k_hi + 1)]
        top = down.top_id
    return clauses, ge, top


def _encode_output(
    layer: OutputLayer, inputs: list[int], top: int
) -> tuple[list[list[int]], list[int], int]:
    clauses: list[list[int]] = []
    n = len(inputs)
    counters = []
    for weights in layer.weights:
        part, ge, top = _counter(_literals(inputs, weights), top, 1, n)
        clauses += part
        counters.append(ge)
    label_vars = list(range(top + 1, top + 1 + len(counters)))
    top += len(counters)
    scores = layer.scores
    for y, z in enumerate(label_vars):
        for j in range(len(counters)):
            if j == y:
                continue
            for u in range(n + 1):
                # y must beat j strictly when j comes first (argmax takes the first maximal index).
                allowed = scores[j] < scores[y, u] if j < y else scores[j] <= scores[y, u]
                premise = [-z]
                if u >= 1:
                    premise.append(-counters[y][u])
                if u < n:
                    premise.append(counters[y][u + 1])
                on = np.flatnonzero(allowed)
                if len(on) == 0:
                    clauses.append(premise)
                    continue
                lo, hi = int(on[0]), int(on[-1])
                if lo > 0:
                    clauses.append([*premise, counters[j][lo]])
                if hi < n:
                    clauses.append([*premise, -counters[j][hi + 1]])
    return clauses, label_vars, top


HIDDEN_ENCODINGS = {"totalizer": _encode_hidden_totalizer, "cardenc": _encode_hidden_cardenc}


def encode_folded(folded: FoldedBNN, hidden_encoding: str = "totalizer") -> BnnFormula:
    """The CNF of a folded network, with variables and clauses reported per layer.

    hidden_encoding "totalizer" (default): each neuron an exact counter output, so fixed inputs
    determine every neuron by unit propagation and the auxiliaries are functions of the input (a
    sampler's near-uniform solutions are then near-uniform inputs). "cardenc": the half-reified
    CardEnc constraints, smallest encoding per bound; auxiliaries are not determined by the input.
    """
    if hidden_encoding not in HIDDEN_ENCODINGS:
        raise ValueError(
            f"hidden_encoding must be one of {sorted(HIDDEN_ENCODINGS)}, got {hidden_encoding!r}"
        )
    encode_hidden = HIDDEN_ENCODINGS[hidden_encoding]
    inputs = list(range(1, folded.num_inputs + 1))
    true_lit = folded.num_inputs + 1
    top = true_lit
    clauses: list[list[int]] = [[true_lit]]
    layers = [LayerSize("input", folded.num_inputs, true_lit, 1)]
    current = inputs
    for i, layer in enumerate(folded.hidden, start=1):
        size = LayerSize(f"hidden {i}", len(layer.weights), 0, 0)
        start_top = top
        part, current, top = encode_hidden(layer, current, top, size, true_lit)
        size.variables, size.clauses = top - start_top, len(part)
        clauses += part
        layers.append(size)
    start_top = top
    part, label_vars, top = _encode_output(folded.output, current, top)
    layers.append(
        LayerSize(
            "output + argmax",
            len(label_vars),
            top - start_top,
            len(part),
            {"totalizer": 2 * len(label_vars)},
        )
    )
    clauses += part
    return BnnFormula(
        clauses=clauses, num_vars=top, input_vars=inputs, label_vars=label_vars, layers=layers
    )
