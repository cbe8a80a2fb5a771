import subprocess
import sys

import pytest
import torch

import tldr_fast as tf
from tldr_fast.models import MLP


def test_training_is_seeded_and_learns():
    x, y = tf.datasets.load("mnist-bundled", subset=200, seed=0)
    xt, yt = tf.datasets.load("mnist-bundled", split="test")
    torch.manual_seed(1)
    a = tf.train_classifier(
        MLP(1, 10, 28), x, y, epochs=3, seed=5, test=(xt, yt), progress=False, device="cpu"
    )
    torch.manual_seed(1)
    b = tf.train_classifier(MLP(1, 10, 28), x, y, epochs=3, seed=5, progress=False, device="cpu")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert a.train_report.test_accuracy > 0.6
    assert not a.training
    assert len(a.train_report.epoch_losses) == 3


def test_build_seeded_depends_on_the_seed_alone_and_restores_the_global_rng():
    torch.manual_seed(123)
    a = tf.training.build_seeded(lambda: MLP(1, 10, 28), seed=4)
    after_a = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(
        torch.rand(3), after_a
    )  # the caller's stream went on as if nothing was drawn
    torch.randn(1000)  # a different history before the second build
    b = tf.training.build_seeded(lambda: MLP(1, 10, 28), seed=4)
    c = tf.training.build_seeded(lambda: MLP(1, 10, 28), seed=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )


def test_train_rejects_mismatched_inputs():
    model = MLP(1, 10, 28)
    with pytest.raises(ValueError, match="expects"):
        tf.train_classifier(
            model, torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64), progress=False
        )
    with pytest.raises(ValueError, match="4 labels but there are 5 images"):
        tf.train_classifier(
            model, torch.rand(5, 1, 28, 28), torch.zeros(4, dtype=torch.int64), progress=False
        )
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        tf.train_classifier(
            model,
            torch.rand(4, 1, 28, 28),
            torch.zeros(4, dtype=torch.int64),
            epochs=0,
            progress=False,
        )


def test_cli_train_writes_model(tmp_path):
    out = tmp_path / "m.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tldr_fast",
            "train",
            "--dataset",
            "mnist-bundled",
            "--subset",
            "100",
            "--arch",
            "mlp",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and out.exists()
    model = tf.load(out)
    assert (
        model.metadata["dataset"] == "mnist-bundled" and 0 <= model.metadata["test_accuracy"] <= 1
    )
    again = tmp_path / "again.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, sys; torch.randn(7); from tldr_fast.cli import main; "
            f"sys.exit(main(['train', '--dataset', 'mnist-bundled', '--subset', '100', '--arch', 'mlp', '--epochs', '1', "
            f"'--out', {str(again)!r}, '--no-progress']))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # the same seed gives the same weights whatever the process drew before
    for pa, pb in zip(model.parameters(), tf.load(again).parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_cli_bad_input_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tldr_fast",
            "train",
            "--subset",
            "1001",
            "--out",
            str(tmp_path / "m.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "not divisible" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_lists_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "tldr_fast", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "train" in proc.stdout
