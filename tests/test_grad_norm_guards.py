"""The guards that keep per_sample_grad_norm from being silently wrong, and the refusals by name.

- a layer whose batch is not on dim 0 (time-major, including T = B, T = 1 and B = 1), or merged
  with time, is split on its real batch dimension or sent to the vmap fallback;
- a parameter used without calling its module is served by the enclosing call or the fallback;
- models with hooks, an Opacus GradSampleModule, RNNs, EmbeddingBag, train-mode running statistics;
- NaN/Inf input gives NaN norms; labels outside [0, num_classes) are refused; in every backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grad_norm_cases import assert_matches_loop, norms_and_input_grad
from torch import nn

from tldr_fast.grad_norm import BACKENDS, explain_grad_norm, per_sample_grad_norm

FAST = ("auto", "ghost", "vmap")
GHOST_REFUSAL = r"backend='ghost' cannot handle this model: "


def _double(model: nn.Module) -> nn.Module:
    return model.double().eval()


def _data(batch, *shape, classes=3):
    return (
        torch.rand(batch, *shape, dtype=torch.float64, requires_grad=True),
        torch.randint(0, classes, (batch,)),
    )


class TimeMajorLinear(nn.Module):
    """A Linear fed (T, N, D), as inside a batch_first=False sequence model."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x (N, T, 4)
        return self.head(torch.tanh(self.fc(x.transpose(0, 1))).mean(0))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("batch, length", [(3, 3), (3, 1), (1, 4), (2, 5)])
def test_time_major_layer_is_split_on_its_batch_dimension(batch, length, backend):
    model = _double(TimeMajorLinear())
    x, y = _data(batch, length, 4)
    assert_matches_loop(model, x, y, backend)
    assert {r.module: r.served_by for r in explain_grad_norm(model, x)}[
        "model.fc"
    ] == "rule tldr_fast.grad_norm.linear.linear_rule"


class MergedRows(nn.Module):
    """A Linear fed (N T, D) rows that merge batch and time."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x (N, 3, 4)
        return self.head(torch.tanh(self.fc(x.reshape(-1, 4))).reshape(x.shape[0], 6))


@pytest.mark.parametrize("batch", [1, 3])
def test_merged_batch_auto_falls_back_ghost_refuses(batch):
    model = _double(MergedRows())
    x, y = _data(batch, 3, 4)
    assert_matches_loop(model, x, y, "auto")
    with pytest.raises(
        ValueError,
        match=GHOST_REFUSAL + r"parameter fc\.weight cannot be split per sample: "
        r"model\.fc merges the batch with other dimensions",
    ):
        per_sample_grad_norm(model, x, y, backend="ghost")
    assert explain_grad_norm(model, x)[0].served_by.startswith(
        "the whole-model vmap backend: parameter fc.weight"
    )


class UsesWeightWithoutCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)))


@pytest.mark.parametrize("params", [None, ["fc.weight"]])
def test_parameter_used_without_calling_its_module(params):
    model = _double(UsesWeightWithoutCall())
    x, y = _data(3, 4)
    assert_matches_loop(model, x, y, "auto", params=params)
    with pytest.raises(
        ValueError,
        match=GHOST_REFUSAL + r"parameter fc\.weight cannot be split per sample: "
        r"model\.fc is never called",
    ):
        per_sample_grad_norm(model, x, y, backend="ghost", params=params)


class Attention(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x (N, T, 4)
        h = x if self.batch_first else x.transpose(0, 1)
        out, _ = self.attn(h, h, h)
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_out_proj_is_served_by_the_attention_call(batch_first, backend):
    model = _double(Attention(batch_first))
    x, y = _data(3, 3, 4)  # T = B
    assert_matches_loop(model, x, y, backend)
    routes = {r.module: r for r in explain_grad_norm(model, x)}
    assert set(routes["model.attn"].params) == {
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
    }
    assert routes["model.attn"].served_by.startswith("vmap of this module alone")


@pytest.mark.parametrize("backend", FAST)
def test_weight_norm_parametrisation(backend):
    model = _double(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    nn.utils.parametrizations.weight_norm(model[0])
    x, y = _data(3, 4)
    assert_matches_loop(model, x, y, backend)


class PositionTable(nn.Module):
    """An Embedding called on arange(T): its output is shared by all samples."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x (N, 3, 4)
        return self.head((x + self.pos(torch.arange(3))).tanh().mean(1))


def test_unbatched_output_auto_falls_back_ghost_refuses():
    model = _double(PositionTable())
    x, y = _data(2, 3, 4)
    assert_matches_loop(model, x, y, "auto")
    with pytest.raises(
        ValueError,
        match=GHOST_REFUSAL + r"parameter pos\.weight cannot be split per sample: "
        r"model\.pos returns a tensor without a batch dimension",
    ):
        per_sample_grad_norm(model, x, y, backend="ghost")


def _mlp():
    return _double(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))


@pytest.mark.parametrize("backend", FAST)
def test_forward_hook_changing_an_output_is_honoured(backend):
    model = _mlp()
    model[0].register_forward_hook(lambda module, args, output: 2 * output)
    x, y = _data(3, 4)
    assert_matches_loop(model, x, y, backend)
    served = {r.module: r.served_by for r in explain_grad_norm(model, x)}
    assert (
        served["model.0"]
        == "vmap of this module alone: it carries forward hooks, which may change its output"
    )


@pytest.mark.parametrize(
    "register, kind",
    [
        ("register_full_backward_hook", "a full backward hook"),
        ("register_full_backward_pre_hook", "a full backward pre-hook"),
    ],
)
def test_backward_hooks_refused_by_name_loop_works(register, kind):
    model = _mlp()
    getattr(model[2], register)(lambda *args: None)
    x, y = _data(3, 4)
    for backend in FAST:
        with pytest.raises(
            ValueError,
            match=rf"model\.2 \(Linear\) has {kind} .*backend='{backend}'.* remove it "
            r"while measuring \(handle\.remove\(\)\) or use backend='loop'",
        ):
            per_sample_grad_norm(model, x, y, backend=backend)
    norms, _ = norms_and_input_grad(model, x, y, backend="loop")
    model[2]._backward_hooks.clear()
    model[2]._backward_pre_hooks.clear()
    assert torch.allclose(norms, per_sample_grad_norm(model, x, y, backend="vmap"), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opacus_grad_sample_module_is_unwrapped(backend):
    opacus = pytest.importorskip("opacus")
    model = _mlp()
    x, y = _data(3, 4)
    expected = per_sample_grad_norm(model, x, y, backend="loop")
    expected_subset = per_sample_grad_norm(model, x, y, backend="loop", params=["2.weight"])
    wrapped = opacus.GradSampleModule(model)
    hooks_before = [(dict(m._forward_hooks), dict(m._backward_hooks)) for m in model.modules()]
    assert torch.allclose(
        per_sample_grad_norm(wrapped, x, y, backend=backend), expected, rtol=1e-12
    )
    subset = per_sample_grad_norm(wrapped, x, y, backend=backend, params=["_module.2.weight"])
    assert torch.allclose(subset, expected_subset, rtol=1e-12)
    assert [
        (dict(m._forward_hooks), dict(m._backward_hooks)) for m in model.modules()
    ] == hooks_before
    wrapped.train()(
        x
    ).sum().backward()  # Opacus's own hooks still work afterwards (it captures in train mode)
    assert model[0].weight.grad_sample.shape == (3, 5, 4)


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 3, batch_first=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_layers_refused_by_name_loop_works(cell):
    model = _double(Recurrent(cell))
    x, y = _data(3, 2, 4)
    for backend in FAST:
        with pytest.raises(
            ValueError,
            match=rf"model\.rnn \({cell.__name__}\) cannot run under torch\.func\.vmap; "
            r"use backend='loop'",
        ):
            per_sample_grad_norm(model, x, y, backend=backend)
    norms, dx = norms_and_input_grad(model, x, y, backend="loop")
    assert torch.isfinite(norms).all() and torch.isfinite(dx).all()
    # a frozen recurrent layer in front of the measured head is fine for ghost
    assert_matches_loop(model, x, y, "ghost", params=["head.weight", "head.bias"])


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.bag((x.detach() * 9).long()) * x.mean(1, keepdim=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_bag_refused_by_name(backend):
    model = _double(Bag())
    x, y = _data(3, 5)
    with pytest.raises(
        ValueError,
        match=r"model\.bag \(EmbeddingBag\): torch has no double backward for "
        r"embedding_bag.*leave its weight out of params",
    ):
        per_sample_grad_norm(model, x, y, backend=backend)
    if backend == "loop":  # torch.func cannot run embedding_bag even when only the head is measured
        norms, dx = norms_and_input_grad(model, x, y, backend="loop", params=["head.weight"])
        assert torch.isfinite(norms).all() and torch.isfinite(dx).all()


def test_instance_norm_with_running_statistics_in_training_mode_refused():
    model = _double(
        nn.Sequential(
            nn.Unflatten(1, (2, 3)),
            nn.InstanceNorm1d(2, affine=True, track_running_stats=True),
            nn.Flatten(),
            nn.Linear(6, 3),
        )
    ).train()
    x, y = _data(3, 6)
    for backend in FAST:
        with pytest.raises(
            ValueError,
            match=r"model\.1 \(InstanceNorm1d\) is in training mode with "
            r"track_running_stats=True.*call model\.eval\(\).*backend='loop'",
        ):
            per_sample_grad_norm(model, x, y, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_gives_nan_norm_for_that_sample_only(bad, backend):
    model = _mlp()
    x, y = _data(3, 4)
    x = x.detach().clone()
    x[1, 2] = bad
    norms = per_sample_grad_norm(model, x, y, backend=backend)
    assert norms.shape == (3,) and torch.isnan(norms[1])
    assert torch.isfinite(norms[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", [3, -1, 100])
def test_labels_outside_the_classes_refused(label, backend):
    model = _mlp()
    x, _ = _data(3, 4)
    y = torch.tensor([0, label, 2])
    with pytest.raises(
        ValueError,
        match=rf"y must hold class labels in \[0, 3\) for the model's 3 logits, "
        rf"got {label}",
    ):
        per_sample_grad_norm(model, x, y, backend=backend)
