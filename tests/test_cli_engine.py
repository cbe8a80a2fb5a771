"""`tldr-fast invert`, `reconstruct` and `demo`: the run directory they write, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import tldr_fast as tf
from tldr_fast.cli import main
from tldr_fast.models import PaperCNN

TINY = [
    "--steps",
    "2",
    "--batch-size",
    "10",
    "--generators",
    "2",
    "--samples-per-class",
    "2",
    "--no-progress",
    "--set",
    "latent_dim=8",
    "--set",
    "generator_width=4",
]


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    tf.save(
        path,
        PaperCNN(1, 10, 14, channels=(4, 8), hidden=16).eval(),
        metadata={"dataset": "mnist-bundled"},
    )
    return path


def test_reconstruct_writes_the_run_directory(model_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "reconstruct",
                "--model",
                str(model_file),
                "--out",
                str(out),
                "--checkpoint-every",
                "1",
                "--keep-checkpoints",
                *TINY,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "grid.png" in printed and str(out.resolve()) in printed

    with safe_open(str(out / "images.safetensors"), framework="pt") as fh:
        assert fh.metadata()["format"] == "tldr-fast/run-images"
        images, labels, index = (fh.get_tensor(k) for k in ("images", "labels", "generator_index"))
    assert images.shape == (40, 1, 14, 14) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert labels.dtype == torch.int64 and index.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [4] * 10 and torch.bincount(index).tolist() == [
        20,
        20,
    ]

    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "reconstruction" and config["num_classes"] == 10
    assert config["image_shape"] == [1, 14, 14] and config["seed"] == 0
    assert config["model"] == str(model_file.resolve()) and config["dataset"] == "mnist-bundled"
    assert (
        config["subset"] is None
        and config["config"]["steps"] == 2
        and config["config"]["latent_dim"] == 8
    )
    assert (
        config["train_seconds"] > 0 and config["compile_seconds"] is None
    )  # eager: no compile time

    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == 2 and set(history["terms"]) >= {"kl", "ce", "grad", "total"}

    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (
        10 * 16 + 2,
        4 * 16 + 2,
    )  # rows = classes, columns = 2 generators x 2 samples
    assert (out / "generators.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000001.safetensors",
        "step-00000002.safetensors",
    ]

    result = tf.load(out)
    assert torch.equal(result.images, images) and len(result.generators) == 2
    assert result.train_seconds == config["train_seconds"] and result.compile_seconds is None


def test_invert_and_resume(model_file, tmp_path):
    out = tmp_path / "inv"
    assert (
        main(
            [
                "invert",
                "--model",
                str(model_file),
                "--out",
                str(out),
                "--checkpoint-every",
                "1",
                "--keep-checkpoints",
                *TINY,
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["kind"] == "inversion"
    args = ["invert", "--model", str(model_file), "--out", str(out), "--resume", *TINY]
    assert main([*args, "--steps", "3"]) == 0
    assert json.loads((out / "history.json").read_text())["steps"] == 3


def test_resume_with_other_settings_is_refused(model_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "invert",
                "--model",
                str(model_file),
                "--out",
                str(out),
                "--checkpoint-every",
                "1",
                "--keep-checkpoints",
                *TINY,
            ]
        )
        == 0
    )
    code = main(
        ["invert", "--model", str(model_file), "--out", str(out), "--resume", *TINY, "--lr", "0.01"]
    )
    assert code == 2
    assert "config differs in lr: 0.003 -> 0.01" in capsys.readouterr().err


def test_chunked_run_equals_the_whole_batch_run_and_resumes_with_another_chunk(
    model_file, tmp_path
):
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    assert main(["reconstruct", "--model", str(model_file), "--out", str(whole), *TINY]) == 0
    args = ["reconstruct", "--model", str(model_file), "--out", str(chunked), *TINY]
    assert (
        main(
            [*args, "--checkpoint-every", "1", "--keep-checkpoints", "--classifier-chunk-size", "4"]
        )
        == 0
    )
    assert json.loads((chunked / "config.json").read_text())["config"]["classifier_chunk_size"] == 4
    torch.testing.assert_close(tf.load(chunked).images, tf.load(whole).images, rtol=1e-4, atol=1e-4)
    # The chunk size changes memory, not the trajectory: a run may resume with another.
    assert main([*args, "--resume", "--steps", "3", "--classifier-chunk-size", "3"]) == 0
    assert json.loads((chunked / "history.json").read_text())["steps"] == 3


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "eta4=1"], "--set expects FIELD=VALUE"),
        (["--set", "gamma=-1"], "weight gamma must be a finite number >= 0"),
        (["--generators", "0"], "num_generators (K) must be an integer >= 1"),
    ],
)
def test_bad_settings_are_one_line_errors(model_file, tmp_path, capsys, extra, message):
    code = main(
        ["reconstruct", "--model", str(model_file), "--out", str(tmp_path / "r"), *TINY, *extra]
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_model_file(tmp_path, capsys):
    assert (
        main(
            [
                "reconstruct",
                "--model",
                str(tmp_path / "none.safetensors"),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--epochs", "1", "--no-evaluate", *TINY])
    assert code == 0
    assert (out / "grid.png").is_file() and (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["subset"] == 1000 and config["config"]["eta_bn"] == 3.0  # the demo's prior is on
    assert "pictures:" in capsys.readouterr().out
