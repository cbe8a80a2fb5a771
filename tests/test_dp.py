"""DP-SGD accounting (the split-learning study's table), clipping and noise of the Opacus optimizer, DP training."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tldr_fast.attacks import dp
from tldr_fast.cli import main


@pytest.mark.parametrize("noise, published", [(0.7, 4.0), (0.5, 12.5), (0.3, 84.7)])
def test_classic_accountant_reproduces_paper_table(noise, published):
    # The split-learning study: compute_dp_sgd_privacy(n=13180, batch 32, noise, 20 epochs, delta 1e-5).
    steps = dp.dp_sgd_steps(13180, 32, 20)
    assert steps == 8238
    eps, _ = dp.epsilon_classic(32 / 13180, steps, noise, 1e-5)
    assert eps == pytest.approx(published, rel=0.02)


def test_modern_accountants_are_tighter_than_classic():
    spent = dp.dp_sgd_privacy(13180, 32, 20, 0.7, 1e-5)
    assert spent.epsilon_prv < spent.epsilon_rdp_improved < spent.epsilon_classic
    # PRV at this setting is about 2.8 (Opacus 1.6); it must stay a sensible, positive bound.
    assert 2.0 < spent.epsilon_prv < 3.5


def test_zero_noise_is_no_privacy():
    spent = dp.privacy_spent(0.01, 100, 0.0, 1e-5)
    assert (
        math.isinf(spent.epsilon_classic)
        and math.isinf(spent.epsilon_prv)
        and math.isinf(spent.epsilon_rdp_improved)
    )


@settings(max_examples=10, deadline=None)
@given(
    q=st.floats(1e-4, 0.5),
    steps=st.integers(1, 5000),
    sigma=st.floats(0.3, 5.0),
    delta=st.floats(1e-9, 1e-2),
)
def test_rdp_epsilons_ordered_and_monotone(q, steps, sigma, delta):
    classic, _ = dp.epsilon_classic(q, steps, sigma, delta)
    improved, _ = dp.epsilon_rdp_improved(q, steps, sigma, delta)
    assert math.isfinite(classic) and classic > 0
    assert improved <= classic + 1e-9
    assert (
        dp.epsilon_classic(q, steps, sigma * 1.5, delta)[0] <= classic + 1e-9
    )  # more noise, less epsilon
    assert (
        dp.epsilon_classic(q, steps + 100, sigma, delta)[0] >= classic - 1e-9
    )  # more steps, more epsilon


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 0.0}, "delta"),
        ({"batch_size": 20000}, "batch_size .* must not exceed"),
        ({"epochs": 0}, "epochs"),
        ({"n": 0}, "n must be"),
    ],
)
def test_accountant_bad_input(kwargs, match):
    args = {
        "n": 13180,
        "batch_size": 32,
        "epochs": 20,
        "noise_multiplier": 0.7,
        "delta": 1e-5,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        dp.dp_sgd_privacy(**args)


def test_sample_rate_and_steps_checked():
    with pytest.raises(ValueError, match="sample_rate"):
        dp.epsilon_classic(1.5, 10, 1.0, 1e-5)
    with pytest.raises(ValueError, match="steps"):
        dp.epsilon_prv(0.1, 0, 1.0, 1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"delta": 1.5}, "delta"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_training_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dp.DPTrainingConfig(**kwargs)


class TwoLayer(nn.Module):
    """Small model with several parameter tensors, so flat clipping spans layers."""

    num_classes = 3

    def __init__(self, d_in=20, hidden=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(d_in, hidden),
            nn.Tanh(),
            nn.GroupNorm(4, hidden),
            nn.Linear(hidden, 3),
        )

    def forward(self, x):
        return self.net(x)


def _per_sample_grads(model, x, y):
    """The oracle: one backward per sample, flattened over all parameters."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def _private_step(noise, clip, n=64, batch=16, seed=0):
    """One Opacus DP step on a fixed batch; returns (oracle per-sample grads, final grad, expected batch)."""
    torch.manual_seed(seed)
    model = TwoLayer().double()
    x = torch.randn(n, 1, 4, 5, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (n,))
    oracle = _per_sample_grads(model, x[:batch], y[:batch])
    config = dp.DPTrainingConfig(
        noise_multiplier=noise, max_grad_norm=clip, batch_size=batch, seed=seed
    )
    hooks, optimizer, _ = dp.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, config
    )
    try:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:batch]), y[:batch]).backward()
        per_sample = torch.cat([p.grad_sample.flatten(1) for p in model.parameters()], 1)
        optimizer.pre_step()  # clip, sum, add noise, divide by the expected batch size
        final = torch.cat([p.grad.flatten() for p in model.parameters()])
    finally:
        hooks.cleanup()
    return oracle, per_sample, final, optimizer.expected_batch_size


def test_dp_step_clips_every_per_sample_gradient():
    clip = 0.05
    oracle, per_sample, final, expected_batch = _private_step(noise=0.0, clip=clip)
    torch.testing.assert_close(
        per_sample, oracle, rtol=1e-9, atol=1e-12
    )  # Opacus' per-sample grads are right
    norms = oracle.norm(dim=1)
    assert bool((norms > clip).all()), "the test needs every sample to be clipped"
    clipped = oracle * (clip / norms).clamp(max=1).unsqueeze(1)
    assert float(clipped.norm(dim=1).max()) <= clip * (1 + 1e-9)
    # Opacus scales by C / (||g|| + 1e-6), so the sum matches to about 1e-6 relative per sample.
    torch.testing.assert_close(
        final * expected_batch, clipped.sum(0), rtol=1e-5, atol=1e-6 * clip * oracle.shape[0]
    )


def test_dp_step_leaves_small_gradients_unclipped():
    oracle, _, final, expected_batch = _private_step(noise=0.0, clip=1e6)
    torch.testing.assert_close(final * expected_batch, oracle.sum(0), rtol=1e-6, atol=1e-12)


def test_dp_step_adds_gaussian_noise_of_configured_scale():
    noise, clip = 1.3, 0.2
    oracle, _, final, expected_batch = _private_step(noise=noise, clip=clip)
    norms = oracle.norm(dim=1)
    clean = (oracle * (clip / norms).clamp(max=1).unsqueeze(1)).sum(0)
    added = final * expected_batch - clean
    assert not torch.isnan(added).any()
    n = added.numel()
    # std of a sample of n normals has relative standard error ~ 1/sqrt(2n); allow 5 of them.
    assert float(added.std()) == pytest.approx(noise * clip, rel=5 / math.sqrt(2 * n))
    assert abs(float(added.mean())) < 5 * noise * clip / math.sqrt(n)


def test_make_private_rejects_batchnorm_and_nonprivate():
    from tldr_fast.models import PaperCNN

    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    model = PaperCNN(1, 10, 8)
    with pytest.raises(ValueError, match="GroupNorm"):
        dp.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            x,
            y,
            dp.DPTrainingConfig(batch_size=4),
        )
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            x,
            y,
            dp.DPTrainingConfig(noise_multiplier=None, batch_size=4),
        )


def test_train_dp_rejects_batch_larger_than_dataset():
    x, y = torch.rand(8, 1, 4, 5), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="batch_size .*must not exceed"):
        dp.train_dp(TwoLayer(), x, y, dp.DPTrainingConfig(batch_size=9), progress=False)


def test_train_dp_retrains_a_model_it_left_in_eval_mode():
    x, y = torch.rand(16, 1, 4, 5), torch.randint(0, 3, (16,))
    model = TwoLayer()
    dp.train_dp(
        model,
        x,
        y,
        dp.DPTrainingConfig(noise_multiplier=None, epochs=1, batch_size=8),
        progress=False,
    )
    assert not model.training
    result = dp.train_dp(
        model,
        x,
        y,
        dp.DPTrainingConfig(noise_multiplier=1.0, epochs=1, batch_size=8),
        progress=False,
    )
    assert result.privacy is not None and not model.training


def test_papercnn_groupnorm_trains_privately_and_round_trips(tmp_path):
    from tldr_fast import serialization

    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 12, 12), torch.randint(0, 4, (64,))
    config = dp.DPTrainingConfig(noise_multiplier=1.0, epochs=2, batch_size=16, lr=1e-2, seed=3)

    def run():
        torch.manual_seed(0)
        return dp.train_dp(
            dp.PaperCNNGroupNorm(1, 4, 12), x, y, config, test=(x, y), progress=False
        )

    first, second = run(), run()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in first.model.modules())
    assert first.privacy.steps == 2 * 4 and first.privacy.sample_rate == pytest.approx(1 / 4)
    assert math.isfinite(first.privacy.epsilon_classic) and first.privacy.epsilon_prv > 0
    assert len(first.history) == 2 and 0 <= first.history[-1]["test_accuracy"] <= 1
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b), "seeded DP training must be reproducible"
    path = serialization.save(tmp_path / "m.safetensors", first.model)
    loaded = serialization.load(path)
    assert isinstance(loaded, dp.PaperCNNGroupNorm)
    torch.testing.assert_close(loaded(x), first.model.eval()(x))


def test_cli_dp_epsilon_prints_both_accountants(capsys):
    assert (
        main(
            [
                "dp-epsilon",
                "--n",
                "13180",
                "--batch-size",
                "32",
                "--epochs",
                "20",
                "--noise",
                "0.7",
                "--delta",
                "1e-5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "classic" in out and "4.02" in out and "PRV" in out


def test_cli_dp_epsilon_bad_input_exits_2(capsys):
    assert (
        main(["dp-epsilon", "--n", "100", "--batch-size", "200", "--epochs", "1", "--noise", "1"])
        == 2
    )
    assert "batch_size" in capsys.readouterr().err
    assert (
        main(["dp-epsilon", "--n", "100", "--batch-size", "10", "--epochs", "1", "--noise", "-1"])
        == 2
    )
    assert (
        main(
            [
                "dp-epsilon",
                "--n",
                "100",
                "--batch-size",
                "10",
                "--epochs",
                "1",
                "--noise",
                "1",
                "--delta",
                "1",
            ]
        )
        == 2
    )


def test_cli_dp_train_records_what_evaluate_needs_to_rebuild_the_training_subset(tmp_path, capsys):
    from tldr_fast import datasets, serialization

    out = tmp_path / "m.safetensors"
    args = [
        "dp-train",
        "--dataset",
        "mnist-bundled",
        "--subset",
        "100",
        "--seed",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "25",
        "--noise",
        "1.0",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert "epsilon" in capsys.readouterr().out
    model = serialization.load(out)
    assert isinstance(model, dp.PaperCNNGroupNorm)
    meta = model.metadata
    assert (meta["dataset"], meta["subset"], meta["seed"]) == ("mnist-bundled", 100, 2)
    assert meta["dp"]["noise_multiplier"] == 1.0 and meta["dp"]["privacy"]["steps"] == 4
    # `evaluate` rebuilds the training set from exactly these fields; the same call gives the same images.
    first = datasets.load_dataset("mnist-bundled", "train", subset=100, seed=2)
    again = datasets.load_dataset(
        meta["dataset"], "train", subset=meta["subset"], seed=meta["seed"]
    )
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
