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
    a = tf.train_classifier(MLP(1, 10, 28), x, y, epochs=3, seed=5, test=(xt, yt), progress=False, device="cpu")
    torch.manual_seed(1)
    b = tf.train_classifier(MLP(1, 10, 28), x, y, epochs=3, seed=5, progress=False, device="cpu")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert a.train_report.test_accuracy > 0.6
    assert not a.training
    assert len(a.train_report.epoch_losses) == 3


def test_train_rejects_mismatched_inputs():
    model = MLP(1, 10, 28)
    with pytest.raises(ValueError, match="expects"):
        tf.train_classifier(model, torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64), progress=False)
    with pytest.raises(ValueError, match="4 labels but there are 5 images"):
        tf.train_classifier(model, torch.rand(5, 1, 28, 28), torch.zeros(4, dtype=torch.int64), progress=False)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        tf.train_classifier(model, torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.int64), epochs=0, progress=False)


def test_cli_train_writes_model(tmp_path):
    out = tmp_path / "m.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "tldr_fast", "train", "--dataset", "mnist-bundled", "--subset", "100",
         "--arch", "mlp", "--epochs", "1", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and out.exists()
    model = tf.load(out)
    assert model.metadata["dataset"] == "mnist-bundled" and 0 <= model.metadata["test_accuracy"] <= 1


def test_cli_bad_input_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tldr_fast", "train", "--subset", "1001", "--out", str(tmp_path / "m.safetensors")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "not divisible" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "tldr_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout
