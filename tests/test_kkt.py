"""KKT reconstruction: the objective against a per-sample float64 reference, the recipe, recovery, the run directory."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from relative_error import rel_rms
from torch.func import functional_call

from tldr_fast import datasets, serialization
from tldr_fast.attacks.kkt import (
    KKTMLP,
    KKTConfig,
    attack,
    candidate_labels,
    kkt_loss,
    lambdas_from,
    margins,
    unit_parameters,
)
from tldr_fast.cli import main
from tldr_fast.ssim import ssim_matrix
from tldr_fast.training import build_seeded, train_kkt_recipe


def _tiny(dtype=torch.float64, seed=0, classes=3, hidden=(7, 5)):
    model = build_seeded(lambda: KKTMLP(1, classes, 4, hidden=hidden), seed).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.rand(6, 1, 4, 4, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (6,), generator=gen)
    free = torch.randn(6, generator=gen, dtype=dtype)
    return model, x, y, free


def _reference_loss(model, x, y, free, lambda_min, prior_weight):
    """Per-sample gradients one by one, summed with the multipliers: the definition, in float64."""
    params = {k: v.detach().requires_grad_(True) for k, v in unit_parameters(model).items()}
    lam = lambda_min + torch.log1p(torch.exp(free))
    combination = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):
        logits = functional_call(model, params, (x[i : i + 1],))[0]
        others = torch.cat([logits[: y[i]], logits[y[i] + 1 :]])
        phi = logits[y[i]] - others.max()
        grads = torch.autograd.grad(phi, list(params.values()), create_graph=True)
        for (k, _), g in zip(params.items(), grads):
            combination[k] = combination[k] + lam[i] * g
    residual = sum(((params[k].detach() - combination[k]) ** 2).sum() for k in params)
    prior = (torch.clamp(x - 1, min=0) ** 2 + torch.clamp(-x, min=0) ** 2).sum()
    return residual + prior_weight * prior


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kkt_loss_and_gradient_match_float64_reference(dtype):
    model64, x64, y, free64 = _tiny()
    x64 = x64 * 1.4 - 0.2  # some pixels outside [0, 1], so the prior contributes
    x_ref, f_ref = x64.clone().requires_grad_(True), free64.clone().requires_grad_(True)
    ref = _reference_loss(model64, x_ref, y, f_ref, 0.05, 3.0)
    gx_ref, gf_ref = torch.autograd.grad(ref, (x_ref, f_ref))

    model = model64.to(dtype)
    x, f = x64.to(dtype).requires_grad_(True), free64.to(dtype).requires_grad_(True)
    params = unit_parameters(model)
    loss, residual, prior = kkt_loss(model, params, {}, x, y, f, 0.05, 3.0)
    gx, gf = torch.autograd.grad(loss, (x, f))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_rms(loss, ref) < tol
    assert rel_rms(gx, gx_ref) < tol
    assert rel_rms(gf, gf_ref) < tol
    assert float(prior.detach()) > 0


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), classes=st.integers(2, 5))
def test_kkt_gradient_property(seed, classes):
    model, x, y, free = _tiny(seed=seed, classes=classes, hidden=(6,))
    y = y % classes
    x_ref, f_ref = x.clone().requires_grad_(True), free.clone().requires_grad_(True)
    gx_ref, gf_ref = torch.autograd.grad(
        _reference_loss(model, x_ref, y, f_ref, 0.0, 1.0), (x_ref, f_ref)
    )
    xs, fs = x.clone().requires_grad_(True), free.clone().requires_grad_(True)
    gx, gf = torch.autograd.grad(
        kkt_loss(model, unit_parameters(model), {}, xs, y, fs, 0.0, 1.0)[0], (xs, fs)
    )
    # Floors: a candidate whose every ReLU is off has a structurally zero gradient.
    assert float((gx - gx_ref).norm()) <= 1e-10 * max(float(gx_ref.norm()), 1.0)
    assert float((gf - gf_ref).norm()) <= 1e-10 * max(float(gf_ref.norm()), 1.0)


def test_margin_is_own_logit_minus_best_other():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, -1.0], [1.0, 5.0, 5.0]])
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(margins(logits, labels), torch.tensor([1.0, 0.0, 0.0]))


def test_lambdas_respect_lower_bound_and_labels_are_balanced():
    lam = lambdas_from(torch.tensor([-50.0, 0.0, 50.0]), 0.1)
    assert float(lam.min()) >= 0.1 and torch.isfinite(lam).all()
    assert torch.bincount(candidate_labels(20, 10)).tolist() == [2] * 10


def test_homogeneous_target_satisfies_euler_identity():
    """<theta, grad phi> = L phi for the bias-free MLP: the identity the KKT characterisation rests on."""
    model, x, y, _ = _tiny(hidden=(7, 5))
    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
    phi = margins(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(phi.sum(), list(params.values()))
    inner = sum((p * g).sum() for p, g in zip(params.values(), grads))
    assert rel_rms(inner, 3 * phi.sum()) < 1e-12


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("lr_x", 0.0), ("lambda_min", -1.0), ("candidates", 1), ("lambda_init", 0.001)],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        KKTConfig(**{field: value})


def test_attack_needs_a_candidate_count():
    model, *_ = _tiny(dtype=torch.float32)
    with pytest.raises(ValueError, match="num_train"):
        attack(model, None, KKTConfig(steps=1), progress=False)


def _eight_digits():
    """One training digit for each of 8 classes and a disjoint held-out digit of each."""
    ds = datasets.load_dataset("mnist-bundled", "train")
    first = [int(torch.nonzero(ds.labels == c)[0]) for c in range(8)]
    later = [int(torch.nonzero(ds.labels == c)[50]) for c in range(8)]
    return ds.images[first], ds.labels[first], ds.images[later]


@pytest.mark.slow
def test_attack_recovers_most_of_eight_training_digits():
    x, y, held = _eight_digits()
    model = build_seeded(lambda: KKTMLP(1, 8, 28, hidden=(100,)), 0)
    train_kkt_recipe(model, x, y, steps=5000, target_loss=3e-5, device="cpu", progress=False)
    assert model.train_report.train_accuracy == 1.0
    result = attack(model, 8, KKTConfig(steps=1000, seed=0), device="cpu", progress=False)
    own = torch.stack(
        [ssim_matrix(result.images[result.labels == c], x[c : c + 1]).max() for c in range(8)]
    ).double()
    control = torch.stack(
        [ssim_matrix(result.images[result.labels == c], held[c : c + 1]).max() for c in range(8)]
    ).double()
    assert int((own >= 0.4).sum()) >= 4
    assert float(own.mean() - control.mean()) > 0.2


def test_cli_attack_writes_a_run_directory_evaluate_reads(tmp_path):
    x, y, _ = _eight_digits()
    model = build_seeded(lambda: KKTMLP(1, 10, 28, hidden=(16,)), 0)
    train_kkt_recipe(model, x, y, steps=50, device="cpu", progress=False)
    model_path = tmp_path / "model.safetensors"
    serialization.save(model_path, model, metadata={"dataset": "mnist-bundled", "subset": None})
    out = tmp_path / "run"
    code = main(
        [
            "attack",
            "kkt",
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--train-size",
            "10",
            "--steps",
            "3",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "kkt" and config["config"]["steps"] == 3
    images, _ = serialization.read_safetensors(out / "images.safetensors")
    assert (
        images["images"].shape == (20, 1, 28, 28)
        and torch.bincount(images["labels"]).tolist() == [2] * 10
    )
    assert float(images["images"].min()) >= 0 and float(images["images"].max()) <= 1
    assert isinstance(serialization.load(model_path), KKTMLP)
    loaded = serialization.load(out)
    assert torch.equal(loaded.images, images["images"]) and loaded.config == KKTConfig(steps=3)
    assert loaded.lambdas.shape == (20,) and float(loaded.lambdas.min()) >= loaded.config.lambda_min
    assert (
        loaded.model == str(model_path.resolve()) and len(loaded.history["kkt"]) == 2
    )  # steps 0 and 2


def test_cli_attack_without_train_size_is_a_usage_error(tmp_path, capsys):
    model = build_seeded(lambda: KKTMLP(1, 10, 28, hidden=(4,)), 0)
    model_path = tmp_path / "model.safetensors"
    serialization.save(model_path, model)
    code = main(
        [
            "attack",
            "kkt",
            "--model",
            str(model_path),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "--train-size" in capsys.readouterr().err


def test_kkt_recipe_reaches_zero_training_error_without_weight_decay():
    x, y, _ = _eight_digits()
    model = build_seeded(lambda: KKTMLP(1, 8, 28, hidden=(32,)), 1)
    train_kkt_recipe(model, x, y, steps=400, device="cpu", progress=False)
    losses = model.train_report.epoch_losses
    assert model.train_report.train_accuracy == 1.0 and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "name, value", [("lr", 0.0), ("init_scale", -1.0), ("target_loss", float("inf"))]
)
def test_kkt_recipe_rejects_bad_values(name, value):
    x, y, _ = _eight_digits()
    model = KKTMLP(1, 8, 28, hidden=(4,))
    with pytest.raises(ValueError, match=name):
        train_kkt_recipe(model, x, y, steps=1, progress=False, **{name: value})


def test_cli_train_recipe_kkt_writes_a_kkt_target(tmp_path, capsys):
    out = tmp_path / "kkt.safetensors"
    code = main(
        [
            "train",
            "--recipe",
            "kkt",
            "--dataset",
            "mnist-bundled",
            "--subset",
            "20",
            "--kkt-hidden",
            "8",
            "--kkt-steps",
            "5",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    model = serialization.load(out)
    assert isinstance(model, KKTMLP) and model.hidden == (8,)
    assert model.metadata["recipe"] == "kkt" and model.metadata["subset"] == 20
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert "test accuracy" in capsys.readouterr().out
