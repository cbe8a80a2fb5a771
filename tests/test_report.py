"""Pictures and the self-contained HTML report."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tldr_fast.evaluate import reconstruction_scores
from tldr_fast.report import (
    PAD,
    class_grid,
    matches_grid,
    ssim_histogram,
    summary_rows,
    tile,
    to_pil,
    write_report,
)


def constant(value: float, c: int = 1, size: int = 8) -> torch.Tensor:
    return torch.full((c, size, size), value)


def test_to_pil_grey_and_rgb_values_and_scale():
    grey = to_pil(torch.stack([torch.zeros(4, 4), torch.ones(4, 4)])[:1])
    assert grey.mode == "L" and np.asarray(grey).max() == 0
    rgb = to_pil(torch.stack([torch.ones(4, 5), torch.zeros(4, 5), torch.full((4, 5), 0.5)]), scale=3)
    assert rgb.mode == "RGB" and rgb.size == (15, 12)
    assert tuple(np.asarray(rgb)[0, 0]) == (255, 0, 128)


def test_tile_places_cells_with_padding_and_blanks():
    img = tile([[constant(0.0), None], [constant(0.0)]], scale=1)
    assert img.size == (2 * (8 + PAD) + PAD, 2 * (8 + PAD) + PAD)
    arr = np.asarray(img)
    assert arr[PAD, PAD] == 0  # first cell, black
    assert arr[PAD, PAD + 8 + PAD] == 255  # None: blank
    assert arr[0, 0] == 255  # padding


def test_class_grid_rows_are_classes_and_columns_follow_generators():
    # Pixel value encodes the generator, so the column order is visible in the picture.
    gens = torch.tensor([2, 0, 1, 1, 0, 2])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    images = torch.stack([constant(g / 4) for g in gens.tolist()])
    arr = np.asarray(class_grid(images, labels, gens, scale=1))
    assert arr.shape == (2 * (8 + PAD) + PAD, 3 * (8 + PAD) + PAD)
    first_row = [arr[PAD, PAD + k * (8 + PAD)] for k in range(3)]
    assert first_row == [0, 64, 128]  # generators 0, 1, 2
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        class_grid(images[0], labels)


def test_matches_grid_pairs_each_reconstruction_with_its_match_best_first():
    recon = torch.stack([constant(0.2), constant(0.4), constant(0.6)])
    train = torch.stack([constant(1.0), constant(0.8)])
    labels = torch.tensor([0, 0, 0])
    arr = np.asarray(matches_grid(recon, labels, [1, 0, -1], [0.3, 0.9, None], train, scale=1))
    cells = [arr[PAD, PAD + k * (8 + PAD)] for k in range(6)]
    # recon 1 (SSIM 0.9) with train 0, then recon 0 with train 1, then recon 2 unmatched (blank).
    assert cells == [102, 255, 51, 204, 153, 255]


def test_histogram_draws_counts_and_ignores_unmatched():
    img = ssim_histogram([0.1, 0.5, 0.5, None, 1.0], threshold=0.4, size=(300, 120))
    assert img.size == (300, 120)
    assert (np.asarray(img) == (200, 30, 30)).all(-1).any()  # the threshold line
    assert ssim_histogram([], threshold=0.4).size == (420, 180)


@pytest.fixture(scope="module")
def scored():
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(8, 1, 9, 9, generator=gen)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    heldout = torch.rand(8, 1, 9, 9, generator=gen)
    metrics = reconstruction_scores(train[:6], labels[:6], train, labels, heldout, labels, num_bootstrap=50)
    metrics["run"] = {"run_dir": "runs/<demo>", "dataset": "toy"}
    return metrics, train, labels


def test_summary_rows_cover_the_headline_numbers(scored):
    metrics, *_ = scored
    rows = dict(summary_rows(metrics))
    assert rows["reconstructions / training images"] == "6 / 8"
    assert rows["authors: reconstructed (matched SSIM >= 0.4)"] == "6 (100.0%)"
    assert rows["training-like (CI above 0)"] == "yes"
    assert any(k.startswith("leakage gap: mean best SSIM") for k in rows)
    no_gap = {k: v for k, v in metrics.items() if k != "leakage_gap"}
    assert not any(k.startswith("leakage gap") for k in dict(summary_rows(no_gap)))


def test_report_is_self_contained_and_escaped(scored, tmp_path):
    metrics, train, labels = scored
    path = write_report(tmp_path, metrics, train[:6], labels[:6], None, train, class_names=("<zero>", "one"))
    page = path.read_text()
    assert "http" not in page.replace("<!DOCTYPE html>", "")  # nothing fetched from elsewhere
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert "&lt;zero&gt;" in page and "<zero>" not in page and "runs/&lt;demo&gt;" in page
    assert Image.open(tmp_path / "matches.png").size == Image.open(io.BytesIO(base64.b64decode(images[1]))).size
    assert not (tmp_path / "grid.png").exists()  # the engine's grid.png is not the report's to write

