"""BNN inversion by SAT: the CNF agrees with the network's forward pass exactly, samples are correct and distinct."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from tldr_fast.attacks import bnn
from tldr_fast.attacks.bnn_fold import fold
from tldr_fast.attacks.bnn_model import BinarizedMLP, BinaryLinear, sign_activation
from tldr_fast.models import MLP

SAMPLERS = [
    "blocking",
    pytest.param(
        "cmsgen",
        marks=pytest.mark.skipif(not bnn.cmsgen_available(), reason="pycmsgen not installed"),
    ),
]


def random_bnn(
    grid: int, hidden: tuple[int, ...], classes: int, seed: int, tie_logits: bool = False
) -> BinarizedMLP:
    """A BNN with adversarial BatchNorms: negative and zero scales, and means on reachable pre-activations
    with zero bias, so BN output 0 (sign(0) = +1) and, with tie_logits, equal logits really occur."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = BinarizedMLP(image_size=grid, grid=grid, hidden=hidden, num_classes=classes)
    widths = (grid * grid, *hidden)
    with torch.no_grad():
        for n, norm in zip(widths, model.norms):
            k = norm.num_features
            counts = torch.randint(
                n // 4, n - n // 4 + 1, (k,), generator=gen
            )  # thresholds away from the extremes
            norm.running_mean.copy_((2 * counts - n).float())
            norm.running_var.uniform_(0.3, 3.0, generator=gen)
            norm.weight.copy_(torch.randn(k, generator=gen))
            norm.weight[::7] = 0.0
            norm.bias.copy_(torch.randn(k, generator=gen) * (torch.rand(k, generator=gen) < 0.3))
        last = model.norms[-1]  # logits on comparable scales, one of them decreasing in its count
        last.running_mean.zero_()
        last.weight.uniform_(0.5, 1.5, generator=gen)
        last.weight[-1] *= -1
        last.bias.uniform_(-1.0, 1.0, generator=gen)
        if tie_logits:  # every class the same logit function: equal counts give equal logits
            last.running_var.fill_(1.0 - last.eps)
            last.weight.fill_(1.0)
            last.bias.zero_()
    return model.eval()


def random_pixels(n: int, num_inputs: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    density = rng.uniform(
        0.1, 0.9, size=(n, 1)
    )  # vary the share of +1 pixels so every class shows up
    return np.where(rng.random((n, num_inputs)) < density, 1, -1).astype(np.int8)


def forward_labels(model: BinarizedMLP, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.forward_binary(torch.as_tensor(pixels, dtype=torch.float32)).argmax(1).numpy()


@pytest.mark.parametrize("seed", [1, 3, 4])
def test_folded_network_predicts_like_forward_pass(seed):
    model = random_bnn(5, (16, 9), 5, seed)
    pixels = random_pixels(1000, 25, seed)
    np.testing.assert_array_equal(fold(model).predict(pixels), forward_labels(model, pixels))


@pytest.mark.parametrize("hidden_encoding", ["totalizer", "cardenc"])
@pytest.mark.parametrize("seed,tie_logits", [(1, True), (3, True), (4, False)])
def test_fixed_input_is_sat_exactly_for_the_predicted_label(hidden_encoding, seed, tie_logits):
    """Both directions: SAT with z_y for the predicted y, UNSAT for every other label."""
    model = random_bnn(5, (12, 8), 4, seed, tie_logits=tie_logits)
    formula = bnn.encode(model, hidden_encoding)
    pixels = random_pixels(300, 25, seed)
    predicted = forward_labels(model, pixels)
    assert len(set(predicted.tolist())) >= 2
    if tie_logits:  # the tie rule (first index) must actually be exercised
        with torch.no_grad():
            logits = model.forward_binary(torch.as_tensor(pixels, dtype=torch.float32))
        assert int((logits == logits.max(1, keepdim=True).values).sum(1).gt(1).sum()) > 10
    assert bnn.sat_labels(formula, pixels) == [[int(y)] for y in predicted]


def test_sign_zero_and_constant_neurons_are_encoded():
    """BN output exactly 0 fires (+1); zero-scale neurons are constants."""
    model = random_bnn(4, (10,), 3, seed=5)
    folded = fold(model)
    layer = folded.hidden[0]
    n = 16
    constant = (layer.lo == 0) & (layer.hi == n)
    assert constant.any()  # the zero-scale neurons with bias 0 always fire
    with torch.no_grad():
        table = model.norms[0](
            (2 * torch.arange(n + 1.0) - n).view(-1, 1).expand(n + 1, 10).contiguous()
        )
    assert (table == 0).any()  # a neuron sits exactly on sign(0)
    pixels = random_pixels(200, n, 5)
    assert bnn.sat_labels(bnn.encode(model), pixels) == [
        [int(y)] for y in forward_labels(model, pixels)
    ]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inversions_are_classified_as_their_label_and_distinct(sampler):
    model = random_bnn(5, (12, 8), 4, seed=3)
    formula = bnn.encode(model)
    for label in range(4):
        result = bnn.invert(
            model, label, num_samples=25, sampler=sampler, seed=label, formula=formula
        )
        assert result.sampler == sampler
        if result.status == "unsat":
            continue
        assert (forward_labels(model, result.pixels) == label).all()
        assert len({row.tobytes() for row in result.pixels}) == len(result.pixels)
        assert result.status in ("sat", "exhausted") and not result.timed_out
        assert 0 < result.distinct_fraction <= 1


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_enumeration_finds_exactly_the_preimage(sampler):
    """On 3x3 inputs all 512 inputs can be checked: the samples are exactly the preimage of the label."""
    model = random_bnn(3, (6, 5), 3, seed=4)
    everything = np.array(list(itertools.product([-1, 1], repeat=9)), dtype=np.int8)
    predicted = forward_labels(model, everything)
    formula = bnn.encode(model)
    for label in range(3):
        result = bnn.invert(model, label, num_samples=1000, sampler=sampler, formula=formula)
        expected = {row.tobytes() for row in everything[predicted == label]}
        assert {row.tobytes() for row in result.pixels} == expected
        assert result.status == ("exhausted" if expected else "unsat")


def test_label_the_network_never_outputs_is_unsat():
    model = random_bnn(4, (8,), 3, seed=6)
    with torch.no_grad():
        model.norms[-1].weight[1] = 0.0
        model.norms[-1].bias[1] = -1e6  # logit 1 is always far below the others
    result = bnn.invert(model, 1, num_samples=5, sampler="blocking")
    assert result.status == "unsat" and len(result.pixels) == 0 and result.draws == 0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_timeout_returns_what_it_found_and_says_so(sampler):
    model = random_bnn(8, (40, 20), 10, seed=7)
    formula = bnn.encode(model)
    label = int(np.bincount(forward_labels(model, random_pixels(200, 64, 7))).argmax())
    result = bnn.invert(
        model, label, num_samples=100000, sampler=sampler, time_limit=0.5, formula=formula
    )
    assert result.timed_out and result.status == "timeout"
    assert result.seconds < 30
    assert (forward_labels(model, result.pixels) == label).all() if len(result.pixels) else True
    assert result.to_dict()["timed_out"] is True


def test_pixel_count_bounds_steer_the_samples():
    model = random_bnn(5, (12, 8), 3, seed=8)
    formula = bnn.encode(model)
    label = int(np.bincount(forward_labels(model, random_pixels(200, 25, 8))).argmax())
    low = bnn.invert(model, label, num_samples=10, sampler="blocking", max_on=8, formula=formula)
    high = bnn.invert(model, label, num_samples=10, sampler="blocking", min_on=17, formula=formula)
    for result in (low, high):
        assert result.status in ("sat", "exhausted", "unsat")
        assert (forward_labels(model, result.pixels) == label).all() if len(result.pixels) else True
    assert ((low.pixels > 0).sum(1) <= 8).all()
    assert ((high.pixels > 0).sum(1) >= 17).all()


def test_refuses_a_network_that_is_not_binarised():
    with pytest.raises(TypeError, match=r"'body\.1' \(Linear\)"):
        bnn.encode(MLP(1, 10, 28))
    model = random_bnn(3, (4, 4), 3, seed=0)
    model.linears[1] = nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"'linears\.1' \(Linear\) is not a BinaryLinear"):
        bnn.encode(model)
    model = random_bnn(3, (4,), 3, seed=0)
    model.norms[0] = nn.LayerNorm(4)
    with pytest.raises(TypeError, match=r"'norms\.0' \(LayerNorm\)"):
        bnn.encode(model)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"label": 3}, r"label must be an integer in \[0, 2\], got 3"),
        ({"label": -1}, r"label must be an integer in \[0, 2\], got -1"),
        ({"label": True}, r"label must be an integer"),
        ({"label": 0, "num_samples": 0}, r"num_samples must be an integer >= 1"),
        ({"label": 0, "sampler": "unigen"}, r"sampler must be one of"),
        ({"label": 0, "time_limit": 0}, r"time_limit must be a number of seconds > 0"),
        ({"label": 0, "max_on": 10}, r"max_on must be an integer in \[0, 9\], got 10"),
        ({"label": 0, "min_on": -1}, r"min_on must be an integer in \[0, 9\], got -1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    model = random_bnn(3, (4,), 3, seed=0)
    with pytest.raises(ValueError, match=match):
        bnn.invert(model, **kwargs)


def test_bad_pixels_and_encoding_are_refused():
    model = random_bnn(3, (4,), 3, seed=0)
    formula = bnn.encode(model)
    with pytest.raises(ValueError, match=r"pixels must have shape \(N, 9\)"):
        bnn.sat_labels(formula, np.ones((2, 8)))
    with pytest.raises(ValueError, match="only the values -1 and \\+1"):
        bnn.sat_labels(formula, np.zeros((2, 9)))
    with pytest.raises(ValueError, match="hidden_encoding must be one of"):
        bnn.encode(model, "bitwise")
    with pytest.raises(ValueError, match=r"pixels must have shape \(N, 9\)"):
        model.forward_binary(torch.ones(2, 10))


def test_straight_through_gradients():
    t = torch.tensor(
        [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True
    )
    out = sign_activation(t)
    assert out.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    out.sum().backward()
    assert t.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]  # hardtanh gradient
    layer = BinaryLinear(3, 2)
    x = torch.randn(4, 3, dtype=torch.float32)
    layer(x).sum().backward()  # identity straight-through: d/dW of sign(W) x is x
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(2, 3))


def test_formula_sizes_are_reported_per_layer():
    model = random_bnn(4, (10, 6), 3, seed=1)
    for encoding in ("totalizer", "cardenc"):
        sizes = bnn.encode(model, encoding).sizes()
        names = [layer["layer"] for layer in sizes["layers"]]
        assert names == ["input", "hidden 1", "hidden 2", "output + argmax"]
        assert sum(layer["clauses"] for layer in sizes["layers"]) == sizes["clauses"]
        assert sum(layer["variables"] for layer in sizes["layers"]) == sizes["variables"]
        json.dumps(sizes)


@pytest.mark.slow
def test_binarised_mnist_bnn_trains_and_inverts():
    """End to end on the bundled real digits: accuracy well above chance, samples of their label."""
    from tldr_fast.attacks.bnn_model import pool_images
    from tldr_fast.datasets import load
    from tldr_fast.training import train_classifier

    images, labels = load("mnist-bundled", split="train", subset=1000)
    test_images, test_labels = load("mnist-bundled", split="test")
    model = BinarizedMLP(image_size=6, grid=6, hidden=(24, 12))
    train_classifier(
        model,
        pool_images(images, 6),
        labels,
        epochs=4,
        batch_size=64,
        lr=2e-2,
        test=(pool_images(test_images, 6), test_labels),
        progress=False,
        device="cpu",
    )
    assert model.train_report.test_accuracy > 0.25  # chance is 0.1; 10x10 with 100-50 reaches ~0.86
    result = bnn.invert(model, 1, num_samples=5, sampler="blocking", time_limit=60)
    assert (forward_labels(model, result.pixels) == 1).all()


@pytest.mark.slow
def test_cli_writes_grids_and_report(tmp_path):
    from tldr_fast.cli import main

    code = main(
        [
            "attack",
            "bnn",
            "--out",
            str(tmp_path),
            "--size",
            "4",
            "--hidden",
            "8",
            "6",
            "--epochs",
            "1",
            "--samples",
            "3",
            "--labels",
            "0",
            "1",
            "--sampler",
            "blocking",
            "--time-limit",
            "20",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "bnn.json").read_text())
    assert [entry["label"] for entry in report["labels"]] == [0, 1]
    assert report["formula"]["layers"][1]["layer"] == "hidden 1"
    for entry in report["labels"]:
        assert (tmp_path / f"samples_label{entry['label']}.png").exists() == (entry["samples"] > 0)


def test_cli_refuses_bad_input(tmp_path, capsys):
    from tldr_fast.cli import main

    assert main(["attack", "bnn", "--out", str(tmp_path), "--samples", "0"]) == 2
    assert "--samples must be an integer >= 1" in capsys.readouterr().err


def test_garbage_class_experiment_reports_confidence_before_and_after():
    from tldr_fast.attacks.bnn_ood import garbage_class_experiment

    model = random_bnn(3, (6,), 3, seed=2)
    gen = torch.Generator().manual_seed(0)
    images, labels = (
        torch.rand(60, 1, 3, 3, generator=gen),
        torch.randint(0, 3, (60,), generator=gen),
    )
    test = (torch.rand(20, 1, 3, 3, generator=gen), torch.randint(0, 3, (20,), generator=gen))
    garbage = random_pixels(10, 9, 0)
    report = garbage_class_experiment(
        model,
        images,
        labels,
        test,
        garbage,
        {"noise": torch.rand(15, 1, 3, 3)},
        epochs=1,
        batch_size=16,
    )
    assert report["garbage_samples"] == 10
    for name in ("original", "with_garbage_class"):
        for key in ("in_distribution_test", "noise"):
            assert 0 <= report[name][key]["mean_top_real_confidence"] <= 1
            assert 0 <= report[name][key]["share_to_garbage"] <= 1
    assert report["original"]["noise"]["share_to_garbage"] == 0.0
    with pytest.raises(ValueError, match="garbage_pixels is empty"):
        garbage_class_experiment(model, images, labels, test, garbage[:0], {})
