"""Targets beyond the paper's CNN: a CIFAR-style ResNet-18 and a small ViT through the per-sample
gradient norm (ghost and vmap against the loop, float64), reconstruct and evaluate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from relative_error import rel_rms
from torch import nn

from tldr_fast import api, load, save
from tldr_fast.config import InversionConfig, ReconstructionConfig
from tldr_fast.evaluate import reconstruction_scores
from tldr_fast.grad_norm import per_sample_grad_norm
from tldr_fast.models import ResNet18, ViT

SHAPE = (3, 8, 8)
TINY = {
    "num_generators": 2,
    "batch_size": 6,
    "latent_dim": 4,
    "generator_width": 4,
    "steps": 2,
    "log_every": 1,
}


def resnet(dtype=torch.float64, seed: int = 0) -> ResNet18:
    """A narrow ResNet-18 with non-trivial BatchNorm statistics and affine parameters, eval mode."""
    torch.manual_seed(seed)
    model = ResNet18(3, 10, 8, width=2).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def vit(dtype=torch.float64, seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(3, 10, 8, patch_size=4, dim=8, depth=2, heads=2, mlp_dim=8).to(dtype).eval()


def batch(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(
        n, *SHAPE, dtype=torch.float64, generator=gen
    ).requires_grad_(), torch.randint(0, 10, (n,), generator=gen)


def norms_and_input_gradient(model, x, y, backend):
    norms = per_sample_grad_norm(model, x, y, backend=backend)
    (dx,) = torch.autograd.grad(norms.sum(), x)
    return norms, dx


def errors_against_the_loop(model, backend) -> tuple[float, float]:
    """Relative RMS errors of the backend's norms and of their d/dx against the loop's, 3 samples."""
    x, y = batch(3)
    norms, dx = norms_and_input_gradient(model, x, y, backend)
    ref_norms, ref_dx = norms_and_input_gradient(model, x, y, "loop")
    return rel_rms(norms, ref_norms), rel_rms(dx, ref_dx)


# -- the models ---------------------------------------------------------------------------------


def test_resnet18_structure():
    model = ResNet18()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, two 3x3 per block, three projection shortcuts
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)
    assert [c.stride for c in convs if c.kernel_size == (1, 1)] == [(2, 2)] * 3
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the CIFAR ResNet-18's count
    logits, feat = model.eval().forward_with_features(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and feat.shape == (2, 512)


def test_vit_structure():
    model = ViT()
    assert model.embedding.position.shape == (1, 1 + 64, 64)
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 2 * 4 + 1
    logits, feat = model.eval().forward_with_features(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and feat.shape == (2, 64)


def test_vit_attention_equals_torch_multi_head_attention():
    """The written-out attention is torch's multi-head attention with the same projections."""
    torch.manual_seed(0)
    attention = ViT(dim=8, heads=2).blocks[0].attention.double()
    reference = nn.MultiheadAttention(8, 2, batch_first=True).double()
    with torch.no_grad():
        reference.in_proj_weight.copy_(attention.qkv.weight)
        reference.in_proj_bias.copy_(attention.qkv.bias)
        reference.out_proj.weight.copy_(attention.proj.weight)
        reference.out_proj.bias.copy_(attention.proj.bias)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    assert rel_rms(attention(x), reference(x, x, x, need_weights=False)[0]) < 1e-12


@pytest.mark.parametrize(
    "model",
    [ResNet18(3, 10, 8, width=2), ViT(1, 4, (8, 12), patch_size=4, dim=8, heads=2)],
    ids=["resnet18", "vit"],
)
def test_model_files_round_trip(model, tmp_path):
    save(tmp_path / "m.safetensors", model)
    loaded = load(tmp_path / "m.safetensors")
    assert type(loaded) is type(model) and loaded.config() == model.config()
    x = torch.rand(2, *model.input_shape)
    assert rel_rms(loaded.eval()(x), model.eval()(x)) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 0}, "width must be an integer >= 1, got 0"),
    ],
)
def test_resnet_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNet18(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patch_size": 5}, r"patch_size 5 must divide image_size \(32, 32\)"),
        ({"dim": 10, "heads": 4}, "heads 4 must divide dim 10"),
        ({"depth": 0}, "depth must be an integer >= 1, got 0"),
    ],
)
def test_vit_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViT(**kwargs)


# -- per-sample gradient norms against the loop, float64 ----------------------------------------


@pytest.mark.parametrize("backend", ["ghost", "vmap"])
def test_resnet18_norms_and_input_gradient_equal_the_loop(backend):
    norm_error, dx_error = errors_against_the_loop(resnet(), backend)
    assert norm_error < 1e-12 and dx_error < 1e-10


def test_resnet18_is_served_by_closed_form_rules_only():
    """auto serves every ResNet parameter by a rule: each sits in a Conv2d, BatchNorm2d or Linear."""
    from tldr_fast.grad_norm import explain_grad_norm

    model = resnet()
    routes = explain_grad_norm(model, batch(2)[0])
    assert sorted(n for r in routes for n in r.params) == sorted(dict(model.named_parameters()))
    assert all(r.served_by.startswith("rule tldr_fast.grad_norm.") for r in routes), routes


@settings(max_examples=3, deadline=None)
@given(n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_resnet18_ghost_equals_the_loop_on_random_models(n, seed):
    model = resnet(seed=seed)
    x, y = batch(n, seed)
    assert (
        rel_rms(
            per_sample_grad_norm(model, x, y, backend="ghost"),
            per_sample_grad_norm(model, x, y, backend="loop"),
        )
        < 1e-12
    )


@pytest.mark.parametrize("backend", ["ghost", "vmap"])
def test_vit_norms_equal_the_loop(backend):
    assert errors_against_the_loop(vit(), backend)[0] < 1e-12


@pytest.mark.parametrize("backend", ["ghost", "vmap"])
def test_vit_input_gradient_equals_the_loop(backend):
    assert errors_against_the_loop(vit(), backend)[1] < 1e-10


def test_the_loop_is_the_right_reference_for_the_vit():
    """The loop's d/dx of the ViT's norms is the derivative: a central difference along a random
    direction agrees with it (so the test above compares against the derivative, not against another estimate)."""
    model = vit()
    x, y = batch(3)
    direction = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    _, dx = norms_and_input_gradient(model, x, y, "loop")
    h = 1e-5
    with torch.no_grad():
        plus = per_sample_grad_norm(model, x + h * direction, y, backend="loop").sum()
        minus = per_sample_grad_norm(model, x - h * direction, y, backend="loop").sum()
    assert float((dx * direction).sum()) == pytest.approx(float(plus - minus) / (2 * h), rel=1e-6)


# -- reconstruct and evaluate -------------------------------------------------------------------


def frozen_float32(model):
    return model.float().eval()


@pytest.mark.parametrize(
    "make, extra", [(resnet, {"eta_bn": 0.5}), (vit, {})], ids=["resnet18", "vit"]
)
def test_reconstruct_and_evaluate_smoke(make, extra):
    """Diversity terms on (and the feature-statistics prior on the ResNet); then every statistic of
    the evaluation against stand-in training and held-out images."""
    model = frozen_float32(make())
    cfg = ReconstructionConfig(**TINY, **extra)
    assert cfg.gamma > 0 and cfg.delta > 0
    result = api.reconstruct(model, 10, SHAPE, cfg, progress=False, samples_per_class=1)
    expected = {"kl", "ce", "cos", "ortho", "grad", "total"} | ({"bn"} if extra else set())
    assert expected <= set(result.history)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.history.values())
    gen = torch.Generator().manual_seed(0)
    train, held = torch.rand(20, *SHAPE, generator=gen), torch.rand(20, *SHAPE, generator=gen)
    labels = torch.arange(10).repeat(2)
    scores = reconstruction_scores(
        result.images, result.labels, train, labels, held, labels, target=model, num_bootstrap=20
    )
    assert 0 <= scores["fidelity"]["target_mean_confidence"] <= 1
    assert -1 <= scores["fidelity"]["target_feature_similarity"] <= 1
    assert set(scores) >= {"authors", "nearest_neighbour", "leakage_gap"}


def test_invert_smoke_on_the_vit():
    result = api.invert(
        frozen_float32(vit()),
        10,
        SHAPE,
        InversionConfig(**TINY),
        progress=False,
        samples_per_class=1,
    )
    assert {"kl", "cos", "ortho"} <= set(result.history)


# -- the benchmark's peers ----------------------------------------------------------------------


def test_bench_peer_norms_equal_ghost_or_say_why_not():
    """bench gradnorm --gn-targets: Opacus's norms on the ViT are ghost's; on the ResNet Opacus
    refuses BatchNorm and the row says so; a peer that is not installed is named."""
    import importlib.util

    from bench.grad_norm import target_norms

    model = vit(torch.float32)
    x, y = batch(4)
    x = x.detach().float()
    norms, differentiable = target_norms("opacus", model)
    assert not differentiable
    assert rel_rms(norms(x, y), per_sample_grad_norm(model, x, y, backend="ghost")) < 1e-5
    assert not any(m._forward_hooks for m in model.modules())  # Opacus hooked a copy
    reason, _ = target_norms("opacus", resnet(torch.float32))
    assert (
        reason.startswith("opacus refuses the model: NotImplementedError")
        and "BatchNorm2d" in reason
    )
    if importlib.util.find_spec("backpack") is None:
        assert target_norms("backpack", model) == ("backpack is not installed", False)


class TokenAttention(nn.Module):
    """Image rows as tokens -> one attention layer -> mean token -> logits; `attention` is either
    nn.MultiheadAttention called with need_weights=False (torch's fused scaled-dot-product path)
    or the ViT's written-out attention with the same weights."""

    def __init__(self, written_out: bool):
        super().__init__()
        c, h, w = SHAPE
        self.embed, self.head = nn.Linear(c * w, 8), nn.Linear(8, 10)
        self.written_out = written_out
        self.attention = (
            ViT(dim=8, heads=2).blocks[0].attention
            if written_out
            else nn.MultiheadAttention(8, 2, batch_first=True)
        )

    def forward(self, x):
        tokens = self.embed(x.permute(0, 2, 1, 3).flatten(2))
        if self.written_out:
            mixed = self.attention(tokens)
        else:
            mixed = self.attention(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(mixed.mean(1))


def token_attention_pair():
    torch.manual_seed(0)
    fused, written = TokenAttention(False).double(), TokenAttention(True).double()
    with torch.no_grad():
        for name in ("embed", "head"):
            getattr(written, name).load_state_dict(getattr(fused, name).state_dict())
        written.attention.qkv.weight.copy_(fused.attention.in_proj_weight)
        written.attention.qkv.bias.copy_(fused.attention.in_proj_bias)
        written.attention.proj.weight.copy_(fused.attention.out_proj.weight)
        written.attention.proj.bias.copy_(fused.attention.out_proj.bias)
    return fused.eval().requires_grad_(False), written.eval().requires_grad_(False)


@pytest.mark.parametrize("backend", ["auto", "ghost", "vmap", "loop"])
def test_fused_multi_head_attention_norms_and_input_gradient_equal_the_written_out_ones(backend):
    """nn.MultiheadAttention(need_weights=False) takes a fused attention kernel without a double
    backward; the norms build their graph with the math form, so d/dx works on every backend and
    equals that of the same attention written out (which never calls the fused kernel)."""
    fused, written = token_attention_pair()
    x, y = batch(4)
    norms, dx = norms_and_input_gradient(fused, x, y, backend)
    ref_norms, ref_dx = norms_and_input_gradient(written, x, y, "loop")
    assert not norms.isnan().any()
    assert rel_rms(norms, ref_norms) < 1e-10
    assert rel_rms(dx, ref_dx) < 1e-10
