"""per_sample_grad_norm: every backend against the `loop` oracle in float64, values and d/dx."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from relative_error import rel_rms
from torch import nn

from tldr_fast.grad_norm import (
    BACKENDS,
    batch_mean_gradient,
    conv,
    explain_grad_norm,
    per_sample_grad_norm,
    per_sample_grad_norm_and_forward,
)
from tldr_fast.grad_norm.conv import (
    patch_gram_from_input,
    per_sample_conv_weight_gradients,
    unfolded_patches,
)
from tldr_fast.grad_norm.frozen import conv_input_gradient, eval_batch_norm, probed_output
from tldr_fast.grad_norm.outer import summed_outer_squared_norm
from tldr_fast.models import MLP, PaperCNN
from tldr_fast.module_hooks import temporary_forward_hooks

FAST_BACKENDS = [b for b in BACKENDS if b != "loop"]


def frozen_eval(model: nn.Module) -> nn.Module:
    """float64, eval, requires_grad=False, with BatchNorm statistics and affine terms made non-trivial."""
    model = model.double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
    model.requires_grad_(False)
    return model


class ResidualGroupNorm(nn.Module):
    """conv -> GroupNorm -> residual add -> pool -> linear: GroupNorm exercises the vmap fallback."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.body = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.norm(self.stem(x)))
        h = h + torch.tanh(self.body(h))
        return self.head(h.mean((2, 3)))


class ConvVariety(nn.Module):
    """Strided, padded, dilated and grouped convolutions (and a bias-free one)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3)
        self.c = nn.Conv2d(6, 4, (2, 3), stride=(1, 2), groups=2, bias=False)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.sin(self.a(x))
        h = torch.sin(self.b(h))
        h = torch.sin(self.c(h))
        return self.head(h.flatten(2).mean(2))


class SequenceLayers(nn.Module):
    """Conv2d taking the Gram route, Conv1d, BatchNorm2d/1d on 4-D/3-D inputs, Linear on a sequence."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)  # 9 positions: P (m + n) < m n, Gram route
        self.bn = nn.BatchNorm2d(16)
        self.conv1d = nn.Conv1d(16, 6, 3, stride=2, padding=1)
        self.bn1d = nn.BatchNorm1d(6)
        self.seq = nn.Linear(6, 64)  # 5 positions: Gram route
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x))).flatten(2)
        h = torch.tanh(self.bn1d(self.conv1d(h))).transpose(1, 2)
        return self.head(torch.tanh(self.seq(h)).mean(1))


def small_paper_cnn():
    return PaperCNN(1, 10, 12, channels=(4, 6, 8), hidden=16)


def small_mlp():
    return MLP(1, 10, 8, hidden=(12, 10))


MODELS = {
    "paper_cnn": (small_paper_cnn, (1, 12, 12), 10),
    "mlp": (small_mlp, (1, 8, 8), 10),
    "residual_groupnorm": (ResidualGroupNorm, (2, 6, 6), 3),
    "conv_variety": (ConvVariety, (4, 9, 9), 5),
    "sequence_layers": (SequenceLayers, (8, 3, 3), 4),
}


def make(name: str, batch: int, seed: int = 0):
    factory, shape, classes = MODELS[name]
    torch.manual_seed(seed)
    model = frozen_eval(factory())
    x = torch.rand(batch, *shape, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, classes, (batch,))
    return model, x, y


def norms_and_input_grad(model, x, y, **kwargs):
    norms = per_sample_grad_norm(model, x, y, **kwargs)
    (dx,) = torch.autograd.grad(norms.sum(), x)
    return norms, dx


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch", [1, 2, 17])
def test_matches_loop(name, batch, backend):
    model, x, y = make(name, batch, seed=batch)
    norms, dx = norms_and_input_grad(model, x, y, backend=backend)
    ref, ref_dx = norms_and_input_grad(model, x, y, backend="loop")
    assert norms.shape == (batch,)
    assert rel_rms(norms, ref) < 1e-10
    assert rel_rms(dx, ref_dx) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_subset_by_name_and_tensor(backend):
    model, x, y = make("paper_cnn", 5)
    last = ["classifier.weight", "classifier.bias"]
    by_name = per_sample_grad_norm(model, x, y, params=last, backend=backend)
    by_tensor = per_sample_grad_norm(
        model, x, y, backend=backend, params=[model.classifier.weight, "classifier.bias"]
    )
    logits, feat = model.forward_with_features(x)
    g = torch.softmax(logits, 1) - nn.functional.one_hot(y, 10)
    # Linear layer: ||g a^T||^2 + ||g||^2 = ||g||^2 (||a||^2 + 1).
    expected = (g.pow(2).sum(1) * (feat.pow(2).sum(1) + 1)).sqrt()
    assert rel_rms(by_name, expected) < 1e-12
    assert rel_rms(by_tensor, expected) < 1e-12


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "name, params",
    [
        ("paper_cnn", ["conv.1.0.weight", "conv.0.1.bias", "fc.2.weight"]),
        ("residual_groupnorm", ["norm.weight", "body.weight"]),
        ("sequence_layers", ["seq.weight", "conv1d.bias", "bn.weight"]),
    ],
)
def test_parameter_subset_across_layers(name, params, backend):
    model, x, y = make(name, 5)
    got, dx = norms_and_input_grad(model, x, y, params=params, backend=backend)
    ref, ref_dx = norms_and_input_grad(model, x, y, params=params, backend="loop")
    assert rel_rms(got, ref) < 1e-10 and rel_rms(dx, ref_dx) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_mode_is_norm_of_mean_gradient(backend):
    model, x, y = make("paper_cnn", 6)
    value = per_sample_grad_norm(model, x, y, backend=backend, mode="batch")
    assert value.shape == ()
    params = [p.detach().requires_grad_() for p in model.parameters()]
    loss = nn.functional.cross_entropy(
        torch.func.functional_call(
            model, dict(zip(dict(model.named_parameters()), params, strict=True)), (x,)
        ),
        y,
    )
    expected = torch.cat(
        [g.flatten() for g in torch.autograd.grad(loss, params, create_graph=True)]
    ).norm()
    assert rel_rms(value, expected) < 1e-12
    (dx,) = torch.autograd.grad(value, x)
    (ref_dx,) = torch.autograd.grad(expected, x)
    assert rel_rms(dx, ref_dx) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_mean_gradient_is_the_mean_loss_gradient_with_its_graph(backend):
    model, x, y = make("paper_cnn", 5)
    got = batch_mean_gradient(model, x, y, backend=backend)
    params = [p.detach().requires_grad_() for p in model.parameters()]
    loss = nn.functional.cross_entropy(
        torch.func.functional_call(
            model, dict(zip(dict(model.named_parameters()), params, strict=True)), (x,)
        ),
        y,
    )
    expected = torch.autograd.grad(loss, params, create_graph=True)
    assert len(got) == len(expected)
    assert all(rel_rms(g, e) < 1e-12 for g, e in zip(got, expected, strict=True))
    probe = [torch.randn_like(e) for e in expected]
    (dx,) = torch.autograd.grad(sum((p * g).sum() for p, g in zip(probe, got, strict=True)), x)
    (ref_dx,) = torch.autograd.grad(
        sum((p * e).sum() for p, e in zip(probe, expected, strict=True)), x
    )
    assert rel_rms(dx, ref_dx) < 1e-10
    with pytest.raises(ValueError, match="y must be a tensor with one entry per sample of x"):
        batch_mean_gradient(model, x, y[:3])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_chunk_size_gives_same_result(backend):
    model, x, y = make("conv_variety", 7)
    whole, dx = norms_and_input_grad(model, x, y, backend=backend)
    chunked, chunked_dx = norms_and_input_grad(model, x, y, backend=backend, chunk_size=3)
    assert rel_rms(chunked, whole) < 1e-12
    assert rel_rms(chunked_dx, dx) < 1e-12
    batch = per_sample_grad_norm(model, x, y, backend=backend, mode="batch")
    assert (
        rel_rms(
            per_sample_grad_norm(model, x, y, backend=backend, mode="batch", chunk_size=2), batch
        )
        < 1e-12
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_leaves_model_untouched(backend):
    model, x, y = make("paper_cnn", 3)
    model.requires_grad_(True)  # trainable parameters must not receive .grad either
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms_and_input_grad(model, x, y, backend=backend)
    assert all(p.grad is None for p in model.parameters())
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_inside_torch_func_grad_and_vmap(backend):
    """The engine differentiates through the norms with torch.func.grad and vmaps over K generators."""
    model, x, y = make("paper_cnn", 4)
    x = x.detach()

    def objective(scale, x):
        return per_sample_grad_norm(model, x * scale, y, backend=backend).mean()

    scales = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    got = torch.func.vmap(torch.func.grad(objective), in_dims=(0, None))(scales, x)
    for scale, g in zip(scales, got, strict=True):
        s = scale.clone().requires_grad_()
        (expected,) = torch.autograd.grad(
            per_sample_grad_norm(model, x * s, y, backend="loop").mean(), s
        )
        assert rel_rms(g, expected) < 1e-9


@pytest.mark.parametrize("positions, m, n", [(3, 5, 7), (40, 5, 7)])
def test_summed_outer_squared_norm_both_routes(positions, m, n):
    g = torch.randn(4, m, positions, dtype=torch.float64)
    a = torch.randn(4, n, positions, dtype=torch.float64)
    expected = torch.einsum("bmp,bnp->bmn", g, a).pow(2).sum((1, 2))
    assert rel_rms(summed_outer_squared_norm(g, a), expected) < 1e-12


@pytest.mark.parametrize(
    "kernel, dilation, padding, stride",
    [
        ((3, 3), (1, 1), (1, 1), (1, 1)),
        ((2, 3), (2, 1), (2, 0), (1, 2)),
        ((3, 2), (2, 2), (1, 2), (2, 3)),
        ((1, 1), (1, 1), (0, 0), (1, 1)),
    ],
)
def test_unfolded_patches_equal_f_unfold(kernel, dilation, padding, stride):
    a = torch.randn(3, 4, 9, 10, dtype=torch.float64)
    expected = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    assert torch.equal(unfolded_patches(a, kernel, dilation, padding, stride), expected)


# kernel, dilation, padding, stride, groups
CONV_GEOMETRIES = [
    ((3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((2, 3), (2, 1), (2, 0), (1, 2), 2),
    ((3, 2), (2, 2), (1, 2), (2, 3), 1),
    ((1, 1), (1, 1), (0, 0), (1, 1), 2),
]


def conv_operands(kernel, dilation, padding, stride, groups, batch=2):
    """a (batch, 4, 5, 4) and an output gradient g of a 4 -> 6 channel convolution's output shape."""
    a = torch.randn(batch, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4 // groups, *kernel, dtype=torch.float64)
    out = F.conv2d(a, weight, None, stride, padding, dilation, groups)
    return a, torch.randn_like(out).requires_grad_(), weight


@pytest.mark.parametrize("kernel, dilation, padding, stride, groups", CONV_GEOMETRIES)
def test_per_sample_conv_weight_gradients_are_torch_funcs_with_derivatives(
    kernel, dilation, padding, stride, groups
):
    a, g, weight = conv_operands(kernel, dilation, padding, stride, groups)

    def weight_gradient(a_i, g_i):
        return torch.func.grad(
            lambda w: (
                F.conv2d(a_i[None], w, None, stride, padding, dilation, groups) * g_i[None]
            ).sum()
        )(weight)

    expected = torch.func.vmap(weight_gradient)(a, g)  # (B, C_out, C_in/groups, kh, kw)
    got = per_sample_conv_weight_gradients(a, g, kernel, dilation, padding, stride, groups)
    assert rel_rms(got, expected.reshape(got.shape)) < 1e-12

    def fast(a, g):
        return per_sample_conv_weight_gradients(a, g, kernel, dilation, padding, stride, groups)

    # first and second derivatives (the backward is two convolutions, themselves differentiable)
    assert torch.autograd.gradcheck(fast, (a, g))
    assert torch.autograd.gradgradcheck(fast, (a, g))


@pytest.mark.parametrize("kernel, dilation, padding, stride, groups", CONV_GEOMETRIES)
def test_patch_gram_from_input_is_the_patches_gram_with_derivatives(
    kernel, dilation, padding, stride, groups
):
    a, _, _ = conv_operands(kernel, dilation, padding, stride, groups)
    patches = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    expected = patches.transpose(1, 2) @ patches

    def fast(a):
        return patch_gram_from_input(a, kernel, dilation, padding, stride)

    assert rel_rms(fast(a), expected) < 1e-12
    assert torch.autograd.gradcheck(fast, (a,))
    assert torch.autograd.gradgradcheck(fast, (a,))


def test_conv_routes_for_the_paper_cnn():
    """PaperCNN on 28 x 28 (channels 1 -> 32 -> 64 -> 128, 3 x 3 kernels, positions 784, 196, 49)."""
    shapes = [(784, 32, 1), (196, 64, 32), (49, 128, 64)]
    on_cpu = [conv._conv_route(p, p, m, c, 9, cpu_eager=True) for p, m, c in shapes]
    elsewhere = [conv._conv_route(p, p, m, c, 9, cpu_eager=False) for p, m, c in shapes]
    assert on_cpu == ["materialise", "materialise", "input_gram"]
    assert elsewhere == ["materialise", "materialise", "patch_gram"]


@pytest.mark.parametrize("route", ["materialise", "patch_gram", "input_gram"])
@pytest.mark.parametrize("name", ["paper_cnn", "conv_variety", "sequence_layers"])
def test_every_conv_route_matches_loop(name, route, monkeypatch):
    monkeypatch.setattr(conv, "_conv_route", lambda *args, **kwargs: route)
    model, x, y = make(name, 3)
    norms, dx = norms_and_input_grad(model, x, y, backend="ghost")
    expected_norms, expected_dx = norms_and_input_grad(model, x, y, backend="loop")
    assert rel_rms(norms, expected_norms) < 1e-10
    assert rel_rms(dx, expected_dx) < 1e-10


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1),  # 9 -> 5 rounds down
        nn.Conv2d(6, 4, (2, 3), stride=(1, 2), padding=(0, 2), dilation=2, groups=2),
        nn.Conv1d(4, 6, 3, stride=2, padding=1),
        # one input channel: the CPU's fold route (tldr_fast.transposed_conv)
        nn.Conv2d(1, 6, 3, padding=1),
        nn.Conv2d(1, 4, (3, 2), stride=2, padding=1, dilation=(1, 2)),
    ],
)
def test_conv_input_gradient_is_autograds(conv):
    conv = conv.double()
    a = torch.randn(
        2,
        conv.in_channels,
        *(9, 10)[: len(conv.kernel_size)],
        dtype=torch.float64,
        requires_grad=True,
    )
    y = conv(a)
    grad = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, a, grad)
    assert rel_rms(conv_input_gradient(conv, grad, a.shape), expected) < 1e-12


def test_eval_batch_norm_is_the_module():
    model, x, _ = make("sequence_layers", 5)
    for bn, a in (
        (model.bn, torch.randn(5, 16, 3, 3, dtype=torch.float64)),
        (model.bn1d, torch.randn(5, 6, 2, dtype=torch.float64)),
    ):
        assert rel_rms(eval_batch_norm(bn, a), bn(a)) < 1e-14


def test_cheaper_routes_only_for_frozen_conv_and_eval_batch_norm():
    model, _, _ = make("sequence_layers", 1)
    assert all(
        probed_output(m) is not None for m in (model.conv, model.conv1d, model.bn, model.bn1d)
    )
    assert probed_output(model.seq) is None
    model.conv.weight.requires_grad_(True)  # d/dtheta must stay autograd's
    assert probed_output(model.conv) is None
    assert probed_output(model.bn.train()) is None


@pytest.mark.parametrize(
    "name, route",
    [
        ("paper_cnn", None),
        ("conv_variety", None),
        ("sequence_layers", None),
        ("conv_variety", "materialise"),
        ("conv_variety", "input_gram"),
    ],
)
def test_cheaper_routes_under_torch_func_grad_and_vmap_match_loop(name, route, monkeypatch):
    """The autograd Functions (frozen convolutions; on CPUs the per-sample weight gradients and the
    tap sums) differentiated by torch.func.grad, vmapped over scales (the engine's K generators)."""
    if route is not None:
        monkeypatch.setattr(conv, "_conv_route", lambda *args, **kwargs: route)
    model, x, y = make(name, 3)
    x = x.detach()

    def objective(scale):
        return per_sample_grad_norm(model, x * scale, y, backend="ghost").pow(2).sum()

    scales = torch.tensor([0.7, 1.3], dtype=torch.float64)
    got = torch.func.vmap(torch.func.grad(objective))(scales)
    for scale, g in zip(scales, got, strict=True):
        s = scale.clone().requires_grad_()
        (expected,) = torch.autograd.grad(
            per_sample_grad_norm(model, x * s, y, backend="loop").pow(2).sum(), s
        )
        assert rel_rms(g, expected) < 1e-9


def test_auto_serves_every_layer_of_the_test_models_by_a_rule():
    for name in MODELS:
        model, x, _ = make(name, 2)
        routes = explain_grad_norm(model, x)
        assert sorted(n for r in routes for n in r.params) == sorted(dict(model.named_parameters()))
        assert all(r.served_by.startswith("rule tldr_fast.grad_norm.") for r in routes), routes
    model, x, _ = make("residual_groupnorm", 2)
    routes = explain_grad_norm(model, x, params=("head.weight", "stem.bias"))
    assert sorted((r.module, r.params) for r in routes) == [
        ("model.head", ("head.weight",)),
        ("model.stem", ("stem.bias",)),
    ]


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_module_called_twice_ghost_refuses_auto_falls_back():
    model = frozen_eval(CalledTwice())
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (3,))
    with pytest.raises(
        ValueError, match=r"model\.shared runs more than once per forward; use backend='vmap'"
    ):
        per_sample_grad_norm(model, x, y, backend="ghost")
    got, dx = norms_and_input_grad(model, x, y, backend="auto")
    ref, ref_dx = norms_and_input_grad(model, x, y, backend="loop")
    assert rel_rms(got, ref) < 1e-10 and rel_rms(dx, ref_dx) < 1e-9


def test_tied_weights_ghost_refuses_auto_falls_back():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    model[2].weight = model[0].weight
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (3,))
    assert explain_grad_norm(model, x)[0].served_by.startswith(
        "the whole-model vmap backend: parameter 0.weight is shared"
    )
    with pytest.raises(ValueError, match="parameter 0.weight is shared as 0.weight, 2.weight"):
        per_sample_grad_norm(model, x, y, backend="ghost")
    got, dx = norms_and_input_grad(model, x, y, backend="auto")
    ref, ref_dx = norms_and_input_grad(model, x, y, backend="loop")
    assert rel_rms(got, ref) < 1e-10 and rel_rms(dx, ref_dx) < 1e-9


def test_zero_gradient_gives_zero_norm_and_finite_derivative():
    model = nn.Linear(3, 2, bias=False).double()
    model.weight.data.zero_()
    x = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    loss = lambda logits, y: (logits * 0).sum(1)
    norms = per_sample_grad_norm(model, x, torch.zeros(2, 1), loss=loss)
    (dx,) = torch.autograd.grad(norms.sum(), x)
    assert torch.equal(norms, torch.zeros(2, dtype=torch.float64))
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_custom_loss_callable(backend):
    model, x, y = make("mlp", 4)
    target = torch.softmax(torch.randn(4, 10, dtype=torch.float64), 1)
    soft_ce = lambda logits, t: -(t * torch.log_softmax(logits, 1)).sum(1)
    got = per_sample_grad_norm(model, x, target, loss=soft_ce, backend=backend)
    ref = per_sample_grad_norm(model, x, target, loss=soft_ce, backend="loop")
    assert rel_rms(got, ref) < 1e-10


@pytest.mark.compile
def test_torch_compile_equals_eager():
    model, x, y = make("paper_cnn", 3)
    fn = lambda x: per_sample_grad_norm(model, x, y)
    eager = fn(x)
    compiled = torch.compile(fn)(x)
    assert rel_rms(compiled, eager) < 1e-10
    (dx,) = torch.autograd.grad(compiled.sum(), x)
    (ref_dx,) = torch.autograd.grad(eager.sum(), x)
    assert rel_rms(dx, ref_dx) < 1e-9


# ---- bad input -------------------------------------------------------------------------------


def test_refuses_training_mode_batchnorm_and_names_it():
    model, x, y = make("paper_cnn", 2)
    model.train()
    with pytest.raises(ValueError, match=r"model\.conv\.0\.1 \(BatchNorm2d\) is in training mode"):
        per_sample_grad_norm(model, x, y)


def test_refuses_batchnorm_without_running_stats():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"model\.1 \(BatchNorm1d\) has track_running_stats=False"):
        per_sample_grad_norm(model, torch.rand(2, 3), torch.zeros(2, dtype=torch.long))


def test_refuses_batch_mismatch():
    model, x, y = make("mlp", 3)
    with pytest.raises(ValueError, match="one entry per sample of x"):
        per_sample_grad_norm(model, x, y[:2])


def test_refuses_labels_of_wrong_type():
    model, x, y = make("mlp", 3)
    with pytest.raises(TypeError, match="integer class labels"):
        per_sample_grad_norm(model, x, y.double())


def test_refuses_empty_batch_and_non_tensor_input():
    model, x, y = make("mlp", 3)
    with pytest.raises(ValueError, match="at least one sample"):
        per_sample_grad_norm(model, x[:0], y[:0])
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        per_sample_grad_norm(model, x.long(), y)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        per_sample_grad_norm(lambda t: t, x, y)


def test_refuses_foreign_parameters():
    model, x, y = make("mlp", 3)
    with pytest.raises(ValueError, match=r"params\[0\] = 'nope.weight' is not a parameter name"):
        per_sample_grad_norm(model, x, y, params=["nope.weight"])
    with pytest.raises(
        ValueError, match=r"params\[1\] \(a tensor of shape \(3, 3\)\) is not a parameter"
    ):
        per_sample_grad_norm(
            model, x, y, params=["classifier.bias", nn.Parameter(torch.ones(3, 3))]
        )
    with pytest.raises(ValueError, match="non-empty list"):
        per_sample_grad_norm(model, x, y, params=[])
    with pytest.raises(TypeError, match=r"params\[0\] must be a parameter name or tensor"):
        per_sample_grad_norm(model, x, y, params=[3])
    with pytest.raises(ValueError, match="has no parameters"):
        per_sample_grad_norm(nn.Flatten(), x, y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "fast"}, "backend must be one of"),
        ({"loss": "mse"}, "loss must be one of"),
        ({"mode": "mean"}, "mode must be one of"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
    ],
)
def test_refuses_unknown_options(kwargs, message):
    model, x, y = make("mlp", 2)
    with pytest.raises(ValueError, match=message):
        per_sample_grad_norm(model, x, y, **kwargs)


def _forward_with_hooked_input(model, module):
    """forward(x) -> (logits, {"hooked": module's input}) reading the activation through a hook."""

    def forward(x):
        seen = {}

        def keep(mod, args, kwargs, output):
            seen["hooked"] = args[0]

        with temporary_forward_hooks([module], lambda i: keep):
            logits = model(x)
        return logits, seen

    return forward


@pytest.mark.parametrize(
    "backend,chunk_size",
    [("auto", None), ("ghost", None), ("ghost", 2), ("vmap", None), ("loop", None)],
)
@pytest.mark.parametrize("name", ["paper_cnn", "residual_groupnorm"])
def test_norm_and_forward_equal_separate_calls(name, backend, chunk_size):
    """The shared pass gives the same norms, logits and hooked activations, and the same d/dx of
    any function of them, as per_sample_grad_norm and a plain forward (float64)."""
    model, x, y = make(name, 5, seed=11)
    inner = next(m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)))
    forward = _forward_with_hooked_input(model, inner)
    weights = torch.randn(5, dtype=torch.float64)

    def combined(norms, logits, hooked):
        return (weights * norms).sum() + logits.logsumexp(1).sum() + hooked.pow(2).mean()

    norms, (logits, extras) = per_sample_grad_norm_and_forward(
        model, x, y, forward, backend=backend, chunk_size=chunk_size
    )
    (dx,) = torch.autograd.grad(combined(norms, logits, extras["hooked"]), x)
    ref_norms = per_sample_grad_norm(model, x, y, backend="loop")
    ref_logits, ref_extras = forward(x)
    (ref_dx,) = torch.autograd.grad(combined(ref_norms, ref_logits, ref_extras["hooked"]), x)
    assert rel_rms(norms, ref_norms) < 1e-10
    assert (
        rel_rms(logits, ref_logits) < 1e-12
        and rel_rms(extras["hooked"], ref_extras["hooked"]) < 1e-12
    )
    assert rel_rms(dx, ref_dx) < 1e-9
    assert all(not m._forward_hooks for m in model.modules())


def test_norm_and_forward_module_called_twice():
    model = frozen_eval(CalledTwice())
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (3,))
    forward = lambda v: (model(v), ())  # noqa: E731
    with pytest.raises(
        ValueError, match=r"model\.shared runs more than once per forward; use backend='vmap'"
    ):
        per_sample_grad_norm_and_forward(model, x, y, forward, backend="ghost")
    norms, (logits, _) = per_sample_grad_norm_and_forward(model, x, y, forward, backend="auto")
    assert rel_rms(norms, per_sample_grad_norm(model, x, y, backend="loop")) < 1e-10
    assert rel_rms(logits, model(x)) < 1e-12


def test_norm_and_forward_refuses_a_forward_that_is_not_callable():
    model, x, y = make("mlp", 2)
    with pytest.raises(
        TypeError, match="forward must be a callable x -> \\(logits, extras\\), got Tensor"
    ):
        per_sample_grad_norm_and_forward(model, x, y, x)
