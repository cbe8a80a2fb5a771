"""Data from Model / Data to Model: virtual logits, l2-PGD, extraction, distillation, chains, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tldr_fast.attacks import dfm
from tldr_fast.attacks.pgd import l2_pgd, pgd_attack, project_l2, robust_accuracy
from tldr_fast.models import LeNet, PaperCNN


class TinyNet(nn.Module):
    """A 2-layer MLP on 1 x 8 x 8 images: fast enough for chains in a unit test."""

    input_shape = (1, 8, 8)
    num_classes = 4

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


def _toy_task(n: int = 400, seed: int = 0):
    """Four classes of 8 x 8 images: a bright quadrant on a dim noise floor."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, (n,), generator=g)
    images = 0.2 * torch.rand(n, 1, 8, 8, generator=g)
    for c in range(4):
        r, q = divmod(c, 2)
        images[labels == c, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 0.7
    return images.clamp(0, 1), labels


def _trained_tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    x, y = _toy_task(seed=seed)
    return dfm.fit(
        model,
        x,
        y,
        lambda m, a, b: nn.functional.cross_entropy(m(a), b),
        dfm.TrainConfig(epochs=20, batch_size=64, lr=3e-3),
    )


# --- virtual logits -------------------------------------------------------------------------


def test_virtual_logits_statistics_match_the_paper():
    k, n = 10, 200_000
    logits, top = dfm.virtual_logits(n, k, generator=torch.Generator().manual_seed(1))
    assert logits.shape == (n, k) and top.shape == (n,)
    assert torch.isfinite(logits).all()
    top_values = logits.gather(1, top[:, None]).squeeze(1)
    assert torch.equal(logits.argmax(1), top)
    assert abs(float(top_values.mean()) - 20.0) < 0.03
    assert abs(float(top_values.std()) - 2.0) < 0.03
    # The other logits, sorted per row, sit at the evenly spaced means -3, -2.25, ..., 3 (sd 1);
    # check the mean of each rank's population against the unsorted construction instead:
    mask = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top[:, None], False)
    rest = logits[mask].view(n, k - 1)
    assert abs(float(rest.mean())) < 0.01  # the spaced means are symmetric around 0
    spaced = torch.linspace(-3, 3, k - 1)
    expected_var = 1.0 + float(spaced.var(unbiased=False))  # within-mean sd 1 plus the spread
    assert abs(float(rest.var()) - expected_var) < 0.03
    # Uniform top class.
    counts = torch.bincount(top, minlength=k).double() / n
    assert float((counts - 1 / k).abs().max()) < 0.005


def test_virtual_logits_rest_means_are_spaced_and_randomly_ordered():
    k, n = 5, 100_000
    logits, top = dfm.virtual_logits(n, k, generator=torch.Generator().manual_seed(2))
    # Rows whose top class is 0: columns 1..4 hold the four spaced means in random order, so every
    # column has the mean of the spaced means (0) and the variance 1 + var(spaced).
    rows = logits[top == 0][:, 1:]
    spaced = torch.linspace(-3, 3, k - 1)
    for col in range(k - 1):
        assert abs(float(rows[:, col].mean())) < 0.05
        assert abs(float(rows[:, col].var()) - (1 + float(spaced.var(unbiased=False)))) < 0.1
    # The order is a permutation: the per-row sorted values, averaged, recover the spaced means
    # up to the order-statistics shift of sd-1 noise, which is small relative to the 2-unit gaps.
    sorted_means = rows.sort(dim=1).values.mean(0)
    assert torch.allclose(sorted_means, spaced, atol=0.35)
    # Within a row the values differ in order across rows: every column is the smallest sometimes.
    smallest = torch.bincount(rows.argmin(1), minlength=k - 1).double() / rows.shape[0]
    assert float((smallest - 1 / (k - 1)).abs().max()) < 0.02


def test_virtual_logits_are_seeded():
    a = dfm.virtual_logits(7, 3, generator=torch.Generator().manual_seed(5))
    b = dfm.virtual_logits(7, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("n, k", [(0, 10), (5, 1)])
def test_virtual_logits_bad_sizes(n, k):
    with pytest.raises(ValueError):
        dfm.virtual_logits(n, k)


# --- the l2 logit loss ----------------------------------------------------------------------


def test_logit_l2_loss_matches_float64_reference_and_gradient():
    z = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 10, dtype=torch.float64)
    loss = dfm.logit_l2_loss(z, t)
    reference = ((z - t) ** 2).sum(1).sqrt()
    assert torch.allclose(loss, reference)
    assert torch.autograd.gradcheck(lambda a: dfm.logit_l2_loss(a, t), (z,))
    assert float(dfm.logit_l2_loss(t, t).abs().max()) == 0.0


def test_logit_l2_loss_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        dfm.logit_l2_loss(torch.zeros(3, 10), torch.zeros(3, 9))


# --- l2-PGD ---------------------------------------------------------------------------------


def test_project_l2_keeps_inside_and_scales_outside():
    delta = torch.randn(8, 1, 5, 5, dtype=torch.float64)
    norms = delta.flatten(1).norm(dim=1)
    eps = float(norms.median())
    out = project_l2(delta, eps)
    out_norms = out.flatten(1).norm(dim=1)
    inside = norms <= eps
    assert torch.allclose(out[inside], delta[inside])
    assert torch.allclose(out_norms[~inside], torch.full_like(out_norms[~inside], eps))


@settings(max_examples=25, deadline=None)
@given(
    eps=st.floats(0.01, 30.0),
    step=st.floats(0.01, 10.0),
    steps=st.integers(1, 4),
    n=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_pgd_property_unit_range_and_ball(eps, step, steps, n, seed):
    g = torch.Generator().manual_seed(seed)
    model = TinyNet().eval()
    x = torch.rand(n, 1, 8, 8, generator=g)
    target = 5 * torch.randn(n, 4, generator=g)
    for maximize in (True, False):
        out = l2_pgd(
            model,
            x,
            lambda z: dfm.logit_l2_loss(z, target),
            epsilon=eps,
            steps=steps,
            step_size=step,
            maximize=maximize,
        )
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert float((out - x).flatten(1).norm(dim=1).max()) <= eps * (1 + 1e-5)


@pytest.mark.parametrize("eps", [0.3, 2.0, 50.0])
def test_pgd_stays_in_unit_range_and_l2_ball(eps):
    model = LeNet().eval()
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(10, (16,))
    adv = pgd_attack(model, x, y, epsilon=eps, steps=5)
    assert adv.shape == x.shape and torch.isfinite(adv).all()
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((adv - x).flatten(1).norm(dim=1).max()) <= eps * (1 + 1e-5)


def test_pgd_attack_lowers_accuracy_and_eps_zero_is_clean():
    model = _trained_tiny()
    x, y = _toy_task(200, seed=3)
    clean = robust_accuracy(model, x, y, epsilon=0.0)
    attacked = robust_accuracy(model, x, y, epsilon=3.0, steps=10)
    assert clean > 0.95
    assert attacked < clean - 0.3


def test_pgd_descends_when_not_maximising():
    model = LeNet().eval()
    x = torch.rand(8, 1, 28, 28)
    target = torch.zeros(8, 10)
    before = dfm.logit_l2_loss(model(x), target)
    after = dfm.logit_l2_loss(
        model(
            l2_pgd(
                model,
                x,
                lambda z: dfm.logit_l2_loss(z, target),
                epsilon=5.0,
                steps=10,
                maximize=False,
            )
        ),
        target,
    )
    assert bool((after <= before + 1e-5).all())


@pytest.mark.parametrize("eps", [0.0, -1.0, math.nan, math.inf])
def test_pgd_rejects_bad_epsilon(eps):
    model = LeNet().eval()
    with pytest.raises(ValueError, match="epsilon"):
        pgd_attack(model, torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), epsilon=eps)


def test_pgd_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        pgd_attack(
            LeNet().eval(),
            torch.rand(2, 1, 28, 28),
            torch.zeros(2, dtype=torch.long),
            epsilon=1.0,
            steps=0,
        )


def test_robust_accuracy_rejects_negative_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        robust_accuracy(
            LeNet().eval(), torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), epsilon=-0.5
        )


# --- extraction (DfM) -----------------------------------------------------------------------


def test_extraction_moves_logits_toward_virtual_targets():
    model = _trained_tiny()
    backgrounds = torch.rand(50, 1, 8, 8)
    config = dfm.ExtractionConfig(num_images=300, epsilon=4.0, steps=10, batch_size=150)
    data = dfm.extract(model, backgrounds, config, seed=4)
    assert data.images.shape == (300, 1, 8, 8) and data.logits.shape == (300, 4)
    assert float(data.images.min()) >= 0 and float(data.images.max()) <= 1
    # The same draws of backgrounds the extraction made, before PGD.
    gen = torch.Generator().manual_seed(4)
    picks = torch.randint(50, (300,), generator=gen)
    with torch.no_grad():
        start = dfm.logit_l2_loss(model(backgrounds[picks]), data.targets)
        end = dfm.logit_l2_loss(model(data.images), data.targets)
        assert torch.allclose(model(data.images), data.logits, atol=1e-5)
    # The tiny model's logits saturate below the top target of ~20 on [0, 1]^64, hence only 0.85.
    assert float(end.mean()) < 0.85 * float(start.mean())
    assert float((data.images - backgrounds[picks]).flatten(1).norm(dim=1).max()) <= 4.0 * (
        1 + 1e-5
    )
    # The model agrees with the virtual top class on most extracted images.
    assert float((data.logits.argmax(1) == data.targets.argmax(1)).float().mean()) > 0.8


def test_extraction_is_seeded():
    model = _trained_tiny()
    backgrounds = torch.rand(20, 1, 8, 8)
    config = dfm.ExtractionConfig(num_images=40, epsilon=2.0, steps=3, batch_size=16)
    a = dfm.extract(model, backgrounds, config, seed=1)
    b = dfm.extract(model, backgrounds, config, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.logits, b.logits)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -2.0}, "epsilon"),
        ({"num_images": 0}, "num_images"),
        ({"steps": 0}, "steps"),
        ({"step_size": 0.0}, "step_size"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_extraction_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dfm.ExtractionConfig(**kwargs)


def test_extraction_rejects_backgrounds_of_another_shape():
    with pytest.raises(ValueError, match="image shape"):
        dfm.extract(LeNet(), torch.rand(4, 1, 32, 32), dfm.ExtractionConfig(num_images=4))


# --- backgrounds ----------------------------------------------------------------------------


def test_backgrounds_of_another_shape_need_resize():
    images = torch.rand(3, 1, 105, 105)
    with pytest.raises(ValueError, match="resize"):
        dfm.prepare_backgrounds(images, (1, 28, 28))
    out = dfm.prepare_backgrounds(images, (1, 28, 28), resize=True)
    assert out.shape == (3, 1, 28, 28)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert dfm.prepare_backgrounds(out, (1, 28, 28)) is out


def test_backgrounds_change_channels_only_with_resize():
    colour = torch.rand(2, 3, 28, 28)
    with pytest.raises(ValueError, match="resize"):
        dfm.prepare_backgrounds(colour, (1, 28, 28))
    grey = dfm.prepare_backgrounds(colour, (1, 28, 28), resize=True)
    assert torch.allclose(grey, colour.mean(1, keepdim=True))
    assert dfm.prepare_backgrounds(grey, (3, 28, 28), resize=True).shape == (2, 3, 28, 28)


def test_noise_backgrounds_are_seeded_unit_range():
    a = dfm.noise_backgrounds(5, (1, 8, 8), seed=3)
    assert torch.equal(a, dfm.noise_backgrounds(5, (1, 8, 8), seed=3))
    assert float(a.min()) >= 0 and float(a.max()) <= 1


# --- distillation (DtM) ---------------------------------------------------------------------


def test_distillation_recovers_the_teacher_on_the_task():
    teacher = _trained_tiny()
    data = dfm.extract(
        teacher,
        torch.rand(100, 1, 8, 8),
        dfm.ExtractionConfig(num_images=1000, epsilon=4.0, steps=10, batch_size=500),
    )
    torch.manual_seed(1)
    student = dfm.distill(TinyNet(), data, dfm.TrainConfig(epochs=15, batch_size=64, lr=3e-3))
    x, y = _toy_task(300, seed=7)
    with torch.no_grad():
        final = float(dfm.logit_l2_loss(student(data.images), data.logits).mean())
    assert final < 0.5 * float(data.logits.norm(dim=1).mean())
    assert robust_accuracy(student, x, y, epsilon=0.0) > 0.9


def test_adversarial_training_makes_a_model_more_robust():
    x, y = _toy_task(400, seed=0)
    torch.manual_seed(0)
    robust = dfm.adversarial_train(
        TinyNet(),
        x,
        y,
        epsilon=2.0,
        steps=5,
        config=dfm.TrainConfig(epochs=20, batch_size=64, lr=3e-3),
    )
    standard = _trained_tiny()
    xt, yt = _toy_task(300, seed=9)
    assert robust_accuracy(robust, xt, yt, epsilon=0.0) > 0.9
    attacked = [robust_accuracy(m, xt, yt, epsilon=2.0, steps=10) for m in (robust, standard)]
    assert attacked[0] > attacked[1] + 0.2


# --- chains ---------------------------------------------------------------------------------


def test_chain_bookkeeping_on_a_tiny_model():
    origin = _trained_tiny()
    xt, yt = _toy_task(100, seed=11)
    result = dfm.run_chain(
        origin,
        torch.rand(30, 1, 8, 8),
        TinyNet,
        xt,
        yt,
        cycles=2,
        extraction=dfm.ExtractionConfig(num_images=200, epsilon=3.0, steps=3, batch_size=100),
        distillation=dfm.TrainConfig(epochs=2, batch_size=50),
        robustness_eps=(0.0, 1.0),
        robustness_size=40,
        robustness_steps=3,
        num_samples=4,
    )
    assert len(result.accuracy) == 3 and len(result.robustness) == 3 and len(result.models) == 3
    assert len(result.seconds) == 2 and len(result.samples) == 2
    assert result.models[0] is origin and result.models[1] is not origin
    assert result.accuracy[0] == robust_accuracy(origin, xt, yt, epsilon=0.0)
    for acc, rob in zip(result.accuracy, result.robustness):
        assert list(rob) == [0.0, 1.0] and rob[0.0] == acc and 0.0 <= rob[1.0] <= 1.0
    assert result.samples[0].shape[1:] == (1, 8, 8) and result.samples[0].shape[0] <= 4
    table = dfm.accuracy_table({"non-robust": result, "robust": result})
    assert table.splitlines()[2].startswith("| M0 |") and len(table.splitlines()) == 5
    rtable = dfm.robustness_table({"non-robust": result})
    assert "non-robust eps=1" in rtable and len(rtable.splitlines()) == 5
    assert result.to_dict()["robustness"][0].keys() == {"0.0", "1.0"}


def test_chain_rejects_zero_cycles():
    with pytest.raises(ValueError, match="cycles"):
        dfm.run_chain(_trained_tiny(), torch.rand(4, 1, 8, 8), TinyNet, *_toy_task(10), cycles=0)


def test_chain_rejects_bad_robustness_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        dfm.run_chain(
            _trained_tiny(),
            torch.rand(4, 1, 8, 8),
            TinyNet,
            *_toy_task(10),
            cycles=1,
            robustness_eps=(0.0, -1.0),
        )


# --- LeNet ----------------------------------------------------------------------------------


def test_lenet_shapes_config_and_features():
    model = LeNet()
    assert model.arch == "LeNet" and model.input_shape == (1, 28, 28)
    rebuilt = LeNet(**model.config())
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 28, 28)
    logits, feat = model.forward_with_features(x)
    assert logits.shape == (3, 10) and feat.shape == (3, 84)
    assert torch.equal(model.head(model.features(x)), model(x))
    assert torch.equal(rebuilt(x), model(x))
    assert LeNet(in_channels=3, image_size=32)(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_lenet_rejects_small_images_and_wrong_input():
    with pytest.raises(ValueError, match="12 x 12"):
        LeNet(image_size=8)
    with pytest.raises(ValueError, match="image shape"):
        LeNet()(torch.rand(2, 1, 32, 32))


def test_chain_works_with_papercnn_students():
    """Architectures with BatchNorm and dropout distil too (eval mode inside PGD)."""
    origin = PaperCNN(image_size=12, channels=(4, 8), hidden=16).eval()
    data = dfm.extract(
        origin,
        torch.rand(8, 1, 12, 12),
        dfm.ExtractionConfig(num_images=16, epsilon=1.0, steps=2, batch_size=8),
    )
    student = dfm.distill(
        PaperCNN(image_size=12, channels=(4, 8), hidden=16),
        data,
        dfm.TrainConfig(epochs=1, batch_size=8),
    )
    assert not student.training and torch.isfinite(student(data.images)).all()


# --- command line ---------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    from tldr_fast.cli import main

    return main(["attack", "dfm", *argv])


def test_cli_tiny_run_writes_tables_picture_and_models(shared_data, tmp_path):
    out = tmp_path / "run"
    code = _cli(
        "--dataset",
        "mnist",
        "--data-root",
        str(shared_data),
        "--subset",
        "200",
        "--extract",
        "100",
        "--cycles",
        "1",
        "--background",
        "noise",
        "--background-count",
        "50",
        "--eval-eps",
        "0",
        "1",
        "--eval-size",
        "20",
        "--eval-steps",
        "1",
        "--test-size",
        "200",
        "--origin-epochs",
        "1",
        "--distill-epochs",
        "1",
        "--robust-origin",
        "--adv-steps",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    )
    assert code == 0
    import json

    payload = json.loads((out / "dfm.json").read_text())
    assert set(payload["results"]) == {"non-robust", "robust"}
    assert len(payload["results"]["robust"]["accuracy"]) == 2
    assert "| M1 |" in (out / "dfm.md").read_text()
    assert (out / "dfm.png").stat().st_size > 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "non-robust-M0.safetensors",
        "non-robust-M1.safetensors",
        "robust-M0.safetensors",
        "robust-M1.safetensors",
    ]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--cycles", "0"], "cycles"),
        (["--epsilon", "0"], "epsilon"),
        (["--epsilon", "-1"], "epsilon"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, match, capsys):
    assert _cli("--dataset", "mnist-bundled", *argv) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_cli_omniglot_background_needs_resize(shared_data, capsys):
    code = _cli(
        "--dataset",
        "mnist",
        "--data-root",
        str(shared_data),
        "--background",
        "omniglot",
        "--background-split",
        "background_small1",
        "--cycles",
        "1",
    )
    assert code == 2
    assert "--resize-background" in capsys.readouterr().err
