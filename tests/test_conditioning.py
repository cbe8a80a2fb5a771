"""Conditioning vectors and matrices: argmax, row/column structure, shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tldr_fast import conditioning as cond


@settings(max_examples=30, deadline=None)
@given(num_classes=st.integers(2, 20), batch=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_soft_vector_argmax_is_the_label(num_classes, batch, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    v = cond.soft_vectors(labels, num_classes, generator=g)
    assert v.shape == (batch, num_classes)
    assert torch.equal(v.argmax(1), labels)
    assert torch.allclose(v.sum(1), torch.ones(batch))
    assert (v > 0).all()


def test_soft_vectors_are_random_not_hot():
    labels = torch.zeros(200, dtype=torch.long)
    v = cond.soft_vectors(labels, 10)
    # The label's probability varies; it is neither constant nor one.
    assert float(v[:, 0].std()) > 0.02 and float(v[:, 0].max()) < 1.0
    # The other classes keep exchangeable noise: their mean probabilities are alike.
    others = v[:, 1:].mean(0)
    assert float(others.max() - others.min()) < 0.05


def test_hot_vectors():
    labels = torch.tensor([2, 0, 1])
    assert torch.equal(cond.hot_vectors(labels, 3), torch.eye(3)[[2, 0, 1]])


@pytest.mark.parametrize("num_classes", [2, 10, 13])
def test_hot_matrix_sets_exactly_the_row_and_column(num_classes):
    labels = torch.arange(num_classes)
    m = cond.hot_matrix(labels, num_classes)
    assert m.shape == (num_classes, 1, num_classes, num_classes)
    for y in range(num_classes):
        expected = torch.zeros(num_classes, num_classes)
        expected[y, :] = 1
        expected[:, y] = 1
        assert torch.equal(m[y, 0], expected)
        assert int(m[y].sum()) == 2 * num_classes - 1


def test_condition_vectors_kinds():
    labels = torch.tensor([1, 3])
    assert torch.equal(cond.condition_vectors(labels, 4, "hot"), cond.hot_vectors(labels, 4))
    soft = cond.condition_vectors(labels, 4, "soft", noise=torch.randn(2, 4))
    assert torch.equal(soft.argmax(1), labels)
    with pytest.raises(ValueError, match="need noise"):
        cond.condition_vectors(labels, 4, "soft")
    with pytest.raises(ValueError, match="vector kind"):
        cond.condition_vectors(labels, 4, "warm")


def test_modes():
    assert cond.uses_vector("vector-matrix") and cond.uses_matrix("vector-matrix")
    assert cond.uses_vector("vector") and not cond.uses_matrix("vector")
    assert cond.uses_matrix("matrix") and not cond.uses_vector("matrix")
    assert not cond.uses_vector("label") and not cond.uses_matrix("label")
    with pytest.raises(ValueError, match="conditioning must be one of"):
        cond.check_mode("embedding")


def test_balanced_labels():
    assert cond.balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_soft_vectors_under_vmap():
    noise = torch.randn(3, 5, 4)
    labels = torch.randint(0, 4, (3, 5))
    v = torch.func.vmap(cond.soft_vectors_from_noise)(noise, labels)
    assert torch.equal(v.argmax(-1), labels)
