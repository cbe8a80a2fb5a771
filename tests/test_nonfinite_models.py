"""Every attack refuses a model with a NaN or Inf weight at its start, naming the tensor, instead of
returning NaN results after the work."""

from __future__ import annotations

import pytest
import torch

from tldr_fast.attacks import bnn, dfm, kkt, split
from tldr_fast.attacks.bnn_model import BinarizedMLP
from tldr_fast.models import PaperCNN


def poisoned(model: torch.nn.Module, value: float = float("nan")) -> torch.nn.Module:
    name, tensor = next((n, t) for n, t in model.state_dict().items() if t.is_floating_point())
    tensor.view(-1)[0] = value
    model.poisoned_name = name
    return model


def run_kkt(model):
    kkt.attack(model, 4, kkt.KKTConfig(steps=1), progress=False)


def run_dfm(model):
    images = torch.rand(4, 1, 8, 8)
    dfm.run_chain(model, images, lambda: PaperCNN(1, 10, 8), images, torch.arange(4), cycles=1)


def run_split(target):
    split.reconstruct_inputs(target, split.InversionDecoder(target), torch.rand(2, 1, 28, 28))


ATTACKS = {
    "kkt": (lambda: kkt.KKTMLP(1, 10, 8, hidden=(16,)), run_kkt, "model"),
    "dfm": (lambda: PaperCNN(1, 10, 8), run_dfm, "origin"),
    "split": (lambda: split.MnistSplitNet(1, 10, 28), run_split, "target"),
    "bnn": (lambda: BinarizedMLP(image_size=6, grid=6, hidden=(8,)), bnn.encode, "model"),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_an_attack_refuses_a_model_with_a_non_finite_weight_naming_it(attack, value):
    build, run, role = ATTACKS[attack]
    torch.manual_seed(0)
    model = poisoned(build(), value)
    expected = f"{role}'s tensor {model.poisoned_name} holds 1 non-finite values"
    with pytest.raises(ValueError, match=expected):
        run(model)
