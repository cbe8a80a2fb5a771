"""The floor model: FLOPs against a hand count for PaperCNN and against FlopCounterMode, bytes of
known tensors, the affine fit, and the floor as the larger of the compute and memory times."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench import floors
from tldr_fast.models import PaperCNN


def paper_cnn_forward_flops(channels=(32, 64, 128), hidden=256, classes=10, size=28) -> int:
    """2 x multiply-adds per image of PaperCNN's forward: 3x3 'same' convolutions, each followed by
    a 2x2 max-pool, then Linear(C h w -> hidden) and Linear(hidden -> classes)."""
    total, c_in = 0, 1
    for c_out in channels:
        total += 2 * c_in * c_out * 9 * size * size
        size, c_in = size // 2, c_out
    return total + 2 * c_in * size * size * hidden + 2 * hidden * classes


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PaperCNN(1, 10, 28).eval().requires_grad_(False)


def test_paper_cnn_forward_flops_match_the_hand_count_and_flop_counter_mode(model):
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        counted = floors.count(lambda: model(x)).flops
        with FlopCounterMode(display=False) as reference:
            model(x)
    assert paper_cnn_forward_flops() == 15_497_216
    assert counted == 3 * paper_cnn_forward_flops() == reference.get_total_flops()


def test_forward_and_backward_to_the_input_cost_two_forwards_for_a_frozen_model(model):
    """Frozen weights: the backward computes input gradients only, one product per forward product."""
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    cost = floors.count(
        lambda: torch.autograd.grad(F.cross_entropy(model(x), torch.tensor([1, 2])), x)
    )
    assert cost.flops == 2 * 2 * paper_cnn_forward_flops()


def test_bytes_count_each_distinct_storage_once():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    assert floors.count(lambda: a @ b) == floors.Cost(2 * 5 * 7 * 3, 4 * (5 * 7 + 7 * 3 + 5 * 3))
    x = torch.randn(64)
    # views share x's storage; (x * 2) and its + 1 are two new tensors
    assert floors.count(lambda: x.view(8, 8).t() * 2 + 1).bytes == 3 * x.nbytes
    assert floors.count(lambda: x.add_(1).mul_(2)).bytes == x.nbytes


def test_a_freed_buffer_reused_by_a_later_tensor_counts_again():
    x = torch.randn(1 << 12)

    def work():
        for _ in range(3):
            (x + 1).sum()

    # each x + 1 is a new storage (kept alive by the counter), each sum's 0-d result too
    assert floors.count(work).bytes == x.nbytes * 4 + 3 * 4


def test_cost_model_recovers_the_fixed_and_per_image_parts():
    weight = torch.randn(8, 8)

    def make(batch):
        x = torch.randn(batch, 8)
        return lambda: x @ weight

    model = floors.CostModel.fit(make, (3, 10))
    assert model.per_image == floors.Cost(2 * 8 * 8, 4 * (8 + 8))
    assert model.fixed == floors.Cost(0, 4 * 64)
    assert model.at(1000) == floors.count(make(1000))


def test_floor_is_the_larger_of_compute_and_memory_time():
    peaks = floors.Peaks(tf32_flop_s=1e12, bf16_flop_s=4e12, copy_bytes_s=1e9)
    assert peaks.floor_seconds(floors.Cost(2e12, 1e9)) == 2.0
    assert peaks.floor_seconds(floors.Cost(2e12, 1e9), "bf16") == 1.0
    assert peaks.floor_seconds(floors.Cost(0, 3e9)) == 3.0
    row = {}
    floors.set_against(row, floors.Cost(2e12, 1e9), 4.0, peaks, "x_")
    assert row == {"x_floor_s": 2.0, "x_pct_of_floor": 50.0, "x_pct_of_bf16_floor": 25.0}


def test_measured_peaks_are_positive_and_finite():
    peaks = floors.measure_peaks("cpu", tiny=True)
    for rate in (peaks.tf32_flop_s, peaks.bf16_flop_s, peaks.copy_bytes_s):
        assert math.isfinite(rate) and rate > 0


def test_step_pieces_are_counted_and_the_step_is_affine_in_the_batch(model):
    from bench.step import bench_classifier

    classifier = bench_classifier("cpu")
    counted = floors.Floors.count_on(classifier, "cpu", batches=(4, 8))
    rows = {r["piece"]: r for r in counted.rows(floors.Peaks(1e12, 2e12, 1e11))}
    assert set(rows) == {"step", *floors.PIECES}
    # the classifier pass (forward + backward to the images) is the hand count twice
    assert rows["classifier"]["flops_per_image"] == 2 * paper_cnn_forward_flops()
    assert (
        rows["adam"]["flops_per_image"]
        == rows["adam"]["bytes_per_image"]
        == 0
        < rows["adam"]["fixed_bytes"]
    )
    for piece in ("generator", "ghost_norms", "tv_pixel"):
        assert rows[piece]["bytes_per_image"] > 0
    # the step holds every piece's products: at least the generator, two classifier passes and the norms
    assert rows["step"]["flops_per_image"] >= (
        rows["generator"]["flops_per_image"]
        + rows["classifier"]["flops_per_image"]
        + rows["ghost_norms"]["flops_per_image"]
    )
    # below the feature dimension (256) every piece but the diversity terms is affine in the batch
    from bench.grad_norm import batch_for, grad_norm_step

    suite_call = grad_norm_step(classifier, *batch_for(classifier, 6, "cpu"), "ghost")
    assert counted.pieces["ghost_norms"].at(6).flops == floors.count(suite_call).flops


def test_unknown_piece_is_refused_naming_it():
    with pytest.raises(ValueError, match="piece must be one of .* got 'nope'"):
        floors.piece_work("nope", None)
