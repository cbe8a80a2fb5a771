"""Split-model inversion: targets, decoder shapes, disjoint data, the attack against its baseline, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tldr_fast.attacks import split
from tldr_fast.attacks.dp import DPTrainingConfig, train_dp
from tldr_fast.cli import main


@pytest.mark.parametrize(
    "target",
    [
        split.MnistSplitNet(),
        split.MnistSplitNet(image_size=(31, 29)),
        split.OmniglotSplitNet(),
        split.OmniglotSplitNet(norm="group", dropout=0.0, image_size=(110, 120)),
    ],
    ids=["mnist", "mnist-odd", "omniglot", "omniglot-group-odd"],
)
def test_decoder_output_shape_equals_input_shape(target):
    x = torch.rand(2, *target.input_shape)
    codes = target.intercept(x)
    assert tuple(codes.shape[1:]) == target.activation_shape
    out = split.InversionDecoder(target, width=8)(codes)
    assert out.shape == x.shape
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert target(x).shape == (2, target.num_classes)


def test_paper_activation_sizes():
    assert split.MnistSplitNet().activation_shape == (32, 4, 4)  # 512 values
    assert split.OmniglotSplitNet().activation_shape == (32, 1, 1)


def test_split_target_forward_is_server_of_intercept():
    target = split.MnistSplitNet().eval()
    x = torch.rand(3, 1, 28, 28)
    server = target.head(target.server_hidden(target.intercept(x)))
    torch.testing.assert_close(server, target(x))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: split.MnistSplitNet(norm="layer"), "norm"),
        (lambda: split.MnistSplitNet(dropout=1.0), "dropout"),
        (lambda: split.OmniglotSplitNet(image_size=60), "too small"),
        (lambda: split.MnistSplitNet(image_size=12), "too small"),
        (lambda: split.InversionDecoder(split.MnistSplitNet(), width=0), "width"),
    ],
)
def test_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_image_shape_is_named():
    with pytest.raises(ValueError, match="model expects"):
        split.MnistSplitNet().intercept(torch.rand(2, 1, 32, 32))


def test_batchnorm_omniglot_target_cannot_train_privately():
    target = split.OmniglotSplitNet(norm="batch")
    x, y = torch.rand(4, 1, 105, 105), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="GroupNorm"):
        train_dp(target, x, y, DPTrainingConfig(noise_multiplier=1.0, batch_size=2), progress=False)


def test_image_scores_and_bad_shapes():
    x = torch.rand(4, 1, 28, 28)
    same = split.image_scores(x, x)
    assert same["mse"] == 0 and same["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        split.image_scores(x, x[:2])


def test_comparison_png(tmp_path):
    path = split.save_comparison_png(
        tmp_path / "c.png", torch.rand(5, 1, 28, 28), torch.rand(5, 1, 28, 28), count=4, pad=2
    )
    with Image.open(path) as im:
        assert im.size == (4 * 28 + 5 * 2, 2 * 28 + 3 * 2)


def _digest(images: torch.Tensor) -> set[bytes]:
    return {bytes(img.mul(255).round().to(torch.uint8).numpy().tobytes()) for img in images}


def test_bundled_mnist_split_is_disjoint():
    data = split.split_data("mnist-bundled", n_target=500, n_aux=600, n_test=100, seed=1)
    assert (
        data.target_images.shape[0] == 500
        and data.aux_images.shape[0] == 600
        and data.test_images.shape[0] == 100
    )
    target, aux, test = (
        _digest(data.target_images),
        _digest(data.aux_images),
        _digest(data.test_images),
    )
    assert not target & aux and not target & test and not aux & test


def test_split_data_bad_input():
    with pytest.raises(ValueError, match="n_target"):
        split.split_data("mnist-bundled", n_target=3000)
    with pytest.raises(ValueError, match="dataset must be"):
        split.split_data("cifar10")


@pytest.mark.data
@pytest.mark.slow
def test_omniglot_split_is_disjoint_by_alphabet_and_drawing(shared_data):
    data = split.split_data("omniglot", root=shared_data)
    assert data.num_classes == 5 and data.target_images.shape[1:] == (1, 105, 105)
    # 14 of every 20 drawings for the target, the other 6 for the test; alphabets are balanced.
    assert data.target_images.shape[0] * 6 == data.test_images.shape[0] * 14
    assert set(data.target_labels.tolist()) == set(data.test_labels.tolist()) == set(range(5))
    # Other alphabets for the attacker (the small sets share Greek and Latin, which it must not
    # get: 1,000 identical files), other drawings for the test.
    assert "Greek" not in data.description.split("attacker")[1]
    target, aux, test = (
        _digest(data.target_images),
        _digest(data.aux_images),
        _digest(data.test_images),
    )
    assert not target & aux and not target & test and not aux & test


@pytest.mark.slow
def test_attack_on_nonprivate_target_beats_mean_image_baseline():
    torch.manual_seed(0)
    data = split.split_data("mnist-bundled", n_target=800, n_aux=1200, n_test=200, seed=0)
    target = split.MnistSplitNet()
    train_dp(
        target,
        data.target_images,
        data.target_labels,
        DPTrainingConfig(noise_multiplier=None, epochs=2, batch_size=64, lr=2e-3),
        progress=False,
    )
    decoder = split.train_decoder(
        target, data.aux_images, epochs=4, batch_size=50, width=32, progress=False
    )
    guesses = split.reconstruct_inputs(target, decoder, data.test_images)
    attack = split.image_scores(data.test_images, guesses)
    baseline = split.mean_image_baseline(data.aux_images, data.test_images)
    assert attack["mse"] < 0.7 * baseline["mse"], (attack, baseline)
    assert attack["ssim"] > baseline["ssim"] + 0.2, (attack, baseline)


def test_train_decoder_bad_input():
    target = split.MnistSplitNet()
    with pytest.raises(ValueError, match="batch_size"):
        split.train_decoder(target, torch.rand(4, 1, 28, 28), batch_size=8, progress=False)
    with pytest.raises(ValueError, match="model expects"):
        split.train_decoder(target, torch.rand(4, 1, 20, 20), batch_size=2, progress=False)


def test_cli_attack_split_writes_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "attack",
            "split",
            "--dataset",
            "mnist-bundled",
            "--noise",
            "1.0",
            "--n-target",
            "256",
            "--n-aux",
            "256",
            "--n-test",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--decoder-epochs",
            "2",
            "--decoder-width",
            "8",
            "--decoder-batch-size",
            "64",
            "--untrained",
            "--seed",
            "3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "results.json").read_text())
    rows = summary["rows"]
    assert [r["noise_multiplier"] for r in rows] == [None, 1.0, "inf"]
    assert rows[0]["epsilon_classic"] == "inf" and 0 < rows[1]["epsilon_classic"] < 1e3
    assert rows[1]["epsilon_prv"] <= rows[1]["epsilon_classic"]
    assert rows[2]["epsilon_classic"] == rows[2]["epsilon_prv"] == 0 and rows[2]["history"] == []
    for row in rows:
        assert (out / row["picture"]).is_file()
        assert 0 <= row["attack"]["ssim"] <= 1 and row["attack"]["mse"] >= 0
        assert len(row["decoder_history"]) == 2 and summary["config"]["decoder_batch_size"] == 64
    from tldr_fast import serialization

    assert isinstance(serialization.load(out / "target-sigma1.safetensors"), split.MnistSplitNet)
    # The untrained row is the seeded initialisation every trained row started from.
    torch.manual_seed(3)
    initial = split.build_target("mnist-bundled", 10, private=True)
    untrained = serialization.load(out / "target-untrained.safetensors")
    for a, b in zip(initial.parameters(), untrained.parameters(), strict=True):
        assert torch.equal(a, b)
    printed = capsys.readouterr().out
    assert "mean image" in printed and "untrained" in printed


def test_cli_attack_split_bad_input_exits_2(tmp_path, capsys):
    code = main(
        [
            "attack",
            "split",
            "--dataset",
            "mnist-bundled",
            "--noise",
            "-0.5",
            "--n-target",
            "64",
            "--n-aux",
            "64",
            "--n-test",
            "8",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "noise_multiplier" in capsys.readouterr().err
    code = main(
        [
            "attack",
            "split",
            "--dataset",
            "mnist-bundled",
            "--noise",
            "--no-nonprivate",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert "no rows" in capsys.readouterr().err


def test_t_interval_is_student_t_over_values():
    from scipy import stats

    one = split.t_interval([0.25])
    assert one["mean"] == 0.25 and one["half_width"] is one["low"] is one["high"] is None
    three = split.t_interval([1.0, 2.0, 3.0])  # sample sd 1
    half = stats.t.ppf(0.975, 2) / 3**0.5
    assert three["mean"] == pytest.approx(2.0) and three["half_width"] == pytest.approx(half)
    assert (three["low"], three["high"]) == pytest.approx((2.0 - half, 2.0 + half))
    with pytest.raises(ValueError, match="at least one"):
        split.t_interval([])


def _tiny_table(tmp_path, name: str, seeds) -> dict:
    config = split.SplitAttackConfig(
        dataset="mnist-bundled",
        noise_multipliers=(None, 1.0),
        n_target=128,
        n_aux=128,
        n_test=16,
        target_epochs=1,
        batch_size=32,
        decoder_epochs=1,
        decoder_batch_size=64,
        decoder_width=8,
        pictures=2,
        seeds=seeds,
    )
    return split.run_split_attack(config, tmp_path / name, progress=False)


def test_seeds_repeat_every_row_with_means_intervals_and_paired_differences(tmp_path):
    from scipy import stats

    summary = _tiny_table(tmp_path, "two", (0, 1))
    assert summary["seeds"] == [0, 1] and "Student t" in summary["interval"]
    nonprivate, private = summary["rows"]
    t = stats.t.ppf(0.975, 1)
    for row in summary["rows"]:
        assert [r["seed"] for r in row["per_seed"]] == [0, 1]
        for score in ("mse", "ssim"):
            values = [r["attack"][score] for r in row["per_seed"]]
            stat = row["seed_statistics"][score]
            assert stat["values"] == values and values[0] != values[1]
            assert stat["mean"] == pytest.approx(sum(values) / 2) == row["attack"][score]
            assert stat["half_width"] == pytest.approx(
                t * abs(values[0] - values[1]) / 2
            )  # s / sqrt(2) = |a-b| / 2
        assert "picture" not in row and all(
            (tmp_path / "two" / r["picture"]).is_file() for r in row["per_seed"]
        )
    assert "paired_vs_nonprivate" not in nonprivate
    paired = private["paired_vs_nonprivate"]
    assert paired["seeds"] == [0, 1]
    for score in ("mse", "ssim"):
        diffs = [
            p["attack"][score] - n["attack"][score]
            for p, n in zip(private["per_seed"], nonprivate["per_seed"])
        ]
        assert paired[score]["values"] == pytest.approx(diffs)
        assert paired[score]["mean"] == pytest.approx(sum(diffs) / 2)
    assert (
        json.loads((tmp_path / "two" / "results.json").read_text())["rows"][1]["per_seed"][1][
            "seed"
        ]
        == 1
    )

    # A seed reproduces its rows on its own, in the single-seed layout (row-level keys, plain file names).
    alone = _tiny_table(tmp_path, "one", (1,))
    for row, twin in zip(alone["rows"], summary["rows"], strict=True):
        assert row["per_seed"][0]["attack"] == twin["per_seed"][1]["attack"] == row["attack"]
        assert row["decoder_history"] == twin["per_seed"][1]["decoder_history"]
        assert row["seed_statistics"]["mse"]["half_width"] is None
    assert alone["rows"][1]["paired_vs_nonprivate"]["mse"]["half_width"] is None
    assert (tmp_path / "one" / alone["rows"][1]["picture"]).name == "recon-sigma1.png"


@pytest.mark.parametrize(
    "seeds, match",
    [((), "at least one"), ((0, -1), "seeds"), ((2, 0, 2), "must not repeat"), ((0, 1.5), "seeds")],
)
def test_bad_seeds_are_named(seeds, match):
    with pytest.raises(ValueError, match=match) as err:
        split.SplitAttackConfig(seeds=seeds)
    assert "seeds" in str(err.value)


def test_cli_bad_seeds_exit_2(tmp_path, capsys):
    args = [
        "attack",
        "split",
        "--dataset",
        "mnist-bundled",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
        "--seeds",
    ]
    assert main([*args, "1", "1"]) == 2
    assert "seeds" in capsys.readouterr().err
    assert main([*args, "-2"]) == 2
    assert "seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "--seeds" in capsys.readouterr().err


def test_cli_seeds_print_per_seed_scores_and_paired_differences(tmp_path, capsys):
    code = main(
        [
            "attack",
            "split",
            "--dataset",
            "mnist-bundled",
            "--noise",
            "1.0",
            "--n-target",
            "128",
            "--n-aux",
            "128",
            "--n-test",
            "16",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--decoder-epochs",
            "1",
            "--decoder-width",
            "8",
            "--seeds",
            "0",
            "1",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert (
        "seeds 0, 1; 95% Student t" in printed and "difference from the non-private row" in printed
    )
    summary = json.loads((tmp_path / "r" / "results.json").read_text())
    assert summary["config"]["seeds"] == [0, 1] and summary["config"]["seed"] == 0
    private = summary["rows"][1]
    assert f"{private['paired_vs_nonprivate']['mse']['mean']:+.4f}" in printed
    assert (tmp_path / "r" / "recon-sigma1-seed1.png").is_file()
