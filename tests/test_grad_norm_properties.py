"""Hypothesis property suite: every backend equals the one-sample loop in float64 (values, shape and
d(sum of norms)/dx) over layer families, layouts (batch-first and time-major, with the sequence
length drawn independently of the batch, so T = B and T = 1 occur) and convolution geometries. A
mismatch fails; only a refusal by name would pass, and none is expected for these families.

The default run is small (CI on two cores); `-m slow` runs the larger sweep.
"""

from __future__ import annotations

import pytest
from grad_norm_cases import FAMILIES, TIME_MAJOR_FAMILIES, Spec, assert_matches_loop, family_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BACKENDS = ("auto", "ghost", "vmap")


@st.composite
def specs(draw):
    family = draw(st.sampled_from(FAMILIES))
    return Spec(
        family=family,
        batch=draw(st.integers(1, 4)),
        length=draw(st.integers(1, 4)),
        width=draw(st.integers(1, 3)),
        time_major=family in TIME_MAJOR_FAMILIES and draw(st.booleans()),
        kernel=draw(st.integers(1, 3)),
        stride=draw(st.integers(1, 3)),
        padding=draw(st.integers(0, 2)),
        dilation=draw(st.integers(1, 2)),
        grouped=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _check(spec: Spec, backend: str) -> None:
    model, x, y = family_model(spec)
    assert_matches_loop(model, x, y, backend)


_COMMON = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, **_COMMON)
@given(spec=specs())
def test_every_family_and_layout_matches_loop(spec, backend):
    _check(spec, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=250, **_COMMON)
@given(spec=specs())
def test_every_family_and_layout_matches_loop_sweep(spec, backend):
    _check(spec, backend)
