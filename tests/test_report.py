"""Pictures and the self-contained HTML report: its pictures, its wording and its structure."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tldr_fast import report
from tldr_fast.evaluate import reconstruction_scores
from tldr_fast.report import (
    BAR,
    GRIDLINE,
    PAD,
    THRESHOLD_LINE,
    class_grid,
    histogram_counts,
    leakage_verdict,
    log_scale,
    loss_curve,
    matches_grid,
    nice_ticks,
    ranked_by_class,
    render_html,
    ssim_histogram,
    summary_rows,
    tile,
    to_pil,
    write_report,
)


def constant(value: float, c: int = 1, size: int = 8) -> torch.Tensor:
    return torch.full((c, size, size), value)


def has_colour(img: Image.Image, colour) -> bool:
    return bool((np.asarray(img.convert("RGB")) == colour).all(-1).any())


# ------------------------------------------------------------------------------ pictures


def test_to_pil_grey_and_rgb_values_and_scale():
    grey = to_pil(torch.stack([torch.zeros(4, 4), torch.ones(4, 4)])[:1])
    assert grey.mode == "L" and np.asarray(grey).max() == 0
    rgb = to_pil(
        torch.stack([torch.ones(4, 5), torch.zeros(4, 5), torch.full((4, 5), 0.5)]), scale=3
    )
    assert rgb.mode == "RGB" and rgb.size == (15, 12)
    assert tuple(np.asarray(rgb)[0, 0]) == (255, 0, 128)


def test_tile_places_cells_with_padding_and_blanks():
    img = tile([[constant(0.0), None], [constant(0.0)]], scale=1)
    assert img.size == (2 * (8 + PAD) + PAD, 2 * (8 + PAD) + PAD)
    arr = np.asarray(img)
    assert arr[PAD, PAD] == 0  # first cell, black
    assert arr[PAD, PAD + 8 + PAD] == 255  # None: blank
    assert arr[0, 0] == 255  # padding


def test_class_grid_rows_are_the_given_classes_in_order_with_blank_rows_and_a_column_cap():
    labels = torch.tensor([2, 0, 2, 2])
    images = torch.stack([constant(v) for v in (0.0, 0.25, 0.5, 0.75)])
    arr = np.asarray(class_grid(images, labels, classes=[0, 1, 2], per_class=2, scale=1))
    assert arr.shape == (3 * (8 + PAD) + PAD, 2 * (8 + PAD) + PAD)
    cell = [[arr[PAD + r * (8 + PAD), PAD + k * (8 + PAD)] for k in range(2)] for r in range(3)]
    assert cell == [
        [64, 255],
        [255, 255],
        [0, 128],
    ]  # class 1 has no images: a blank row; class 2 capped at 2
    assert (
        np.asarray(class_grid(images, labels, scale=1)).shape[0] == 2 * (8 + PAD) + PAD
    )  # classes present
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


def test_ranked_by_class_orders_best_first_with_unmatched_last_and_a_cap():
    labels = torch.tensor([1, 0, 1, 1, 0])
    ranked = ranked_by_class(labels, [0.1, None, None, 0.7, -0.5])
    assert {c: v.tolist() for c, v in ranked.items()} == {0: [4, 1], 1: [3, 0, 2]}
    assert ranked_by_class(labels, [0.1, None, None, 0.7, -0.5], per_class=1)[1].tolist() == [3]


def test_histogram_counts_share_bins_and_clip_into_the_end_bins():
    counts = histogram_counts([-0.9, -0.2, 0.05, 0.45, 0.45, None, 1.0, 2.0], bins=12)
    assert counts.tolist() == [2, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 2]
    assert histogram_counts([]).sum() == 0


def test_histogram_draws_bars_and_the_threshold_on_a_fixed_count_axis():
    img = ssim_histogram([0.1, 0.5, 0.5, None, 1.0], threshold=0.4, size=(300, 160))
    assert img.size == (300, 160) and has_colour(img, THRESHOLD_LINE) and has_colour(img, BAR)
    bar_rows = lambda im: np.flatnonzero((np.asarray(im) == BAR).all(-1).any(1))  # noqa: E731
    tall = ssim_histogram([0.5, 0.5], threshold=0.4, size=(300, 160))
    short = ssim_histogram([0.5, 0.5], threshold=0.4, y_max=4, size=(300, 160))
    assert bar_rows(short)[0] > bar_rows(tall)[0]  # the same count is drawn lower on a taller axis
    assert bar_rows(short)[-1] == bar_rows(tall)[-1]  # bars stand on the same baseline
    assert not has_colour(ssim_histogram([], threshold=0.4), BAR)
    assert has_colour(
        ssim_histogram([0.5] * 1000 + [0.1], threshold=0.4, size=(300, 160)), BAR
    )  # 1 of 1000: >= 1 px


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 10, 5).tolist() == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(0.013, 0.087, 4).tolist() == pytest.approx([0.02, 0.04, 0.06, 0.08])
    ticks = nice_ticks(-3.3, 1234.0, 4)
    assert ticks[0] >= -3.3 and ticks[-1] <= 1234.0 and len(ticks) >= 3


def test_loss_curve_log_scale_only_where_it_helps():
    assert log_scale([100.0, 10.0, 1.0, 0.5])
    assert not log_scale([3.0, 2.0, 1.0])  # spans less than LOG_SPAN
    assert not log_scale([10.0, 0.0, -1.0])  # not positive
    assert not log_scale([])
    for values in (
        [100.0, 1.0, 0.01],
        [0.5, -0.2, 0.1],
        [2.0],
        [],
        [1.0, 1.0, 1.0],
        [1.0, float("nan"), 0.5],
    ):
        img = loss_curve("term", values, size=(300, 160))
        assert img.size == (300, 160)
        assert has_colour(img, BAR) == bool(values)


# ------------------------------------------------------------------------------ wording


def gap_metrics(lo: float, hi: float) -> dict:
    return {
        "leakage_gap": {
            "confidence": 0.95,
            "mean_best_ssim": {"difference": (lo + hi) / 2, "ci": [lo, hi]},
        }
    }


def test_leakage_verdict_states_the_interval_and_what_one_run_supports():
    above = leakage_verdict(gap_metrics(0.002, 0.014))
    assert above.startswith("gap +0.0080 [+0.0020, +0.0140] (95% bootstrap interval) lies above 0")
    assert "closer to the training images than to held-out ones" in above
    assert "one seed" in above and "repeat over seeds before calling it leakage" in above
    includes = leakage_verdict(gap_metrics(-0.0004, 0.015))
    assert "[-0.0004, +0.0150]" in includes and "the interval includes 0" in includes
    assert "no evidence of training-data leakage in this run" in includes
    below = leakage_verdict(gap_metrics(-0.02, -0.01))
    assert "lies below 0" in below and "no evidence of training-data leakage" in below
    missing = leakage_verdict({})
    assert missing.startswith("no held-out control") and "no leakage verdict" in missing
    for text in (above, includes, below, missing):
        assert "training-like" not in text and "yes" not in text.split()


# ------------------------------------------------------------------------------ the report

NUM_CLASSES, PER_CLASS_PER_GENERATOR, NUM_GENERATORS = 3, 3, 3


@pytest.fixture(scope="module")
def run():
    """A K=3 run: generator 0 copies training images, generator 1 is noise, generator 2 is blank."""
    gen = torch.Generator().manual_seed(0)
    train_labels = torch.arange(10 * NUM_CLASSES) % NUM_CLASSES
    train = torch.rand(len(train_labels), 1, 9, 9, generator=gen)
    heldout = torch.rand(len(train_labels), 1, 9, 9, generator=gen)
    labels = (
        torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS_PER_GENERATOR).repeat(NUM_GENERATORS)
    )
    per_gen = len(labels) // NUM_GENERATORS
    generator_index = torch.arange(NUM_GENERATORS).repeat_interleave(per_gen)
    copies = torch.cat(
        [train[train_labels == c][:PER_CLASS_PER_GENERATOR] for c in range(NUM_CLASSES)]
    )
    recon = torch.cat(
        [copies, torch.rand(per_gen, 1, 9, 9, generator=gen), torch.zeros(per_gen, 1, 9, 9)]
    )
    metrics = reconstruction_scores(
        recon, labels, train, train_labels, heldout, train_labels, num_bootstrap=50
    )
    metrics["run"] = {"run_dir": "runs/<demo>", "dataset": "toy"}
    metrics["heldout_source"] = "given"
    return metrics, recon, labels, generator_index, train


class Page(HTMLParser):
    """The report's structure: per section, its images' alt texts, its figures, tables and text."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.current: dict | None = None
        self.in_caption = self.in_cell = False
        self.img_sources: list[str] = []
        self.pictures: dict[str, str] = {}  # alt -> src
        self.tags: set[str] = set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.current = self.sections.setdefault(
                attrs["id"], {"img": [], "figure": [], "caption": [], "cells": [], "text": ""}
            )
        elif self.current is None:
            return
        elif tag == "img":
            self.current["img"].append(attrs["alt"])
            self.img_sources.append(attrs["src"])
            self.pictures[attrs["alt"]] = attrs["src"]
        elif tag == "figure":
            self.current["figure"].append(attrs.get("class", ""))
        elif tag == "figcaption":
            self.in_caption = True
            self.current["caption"].append("")
        elif tag == "td":
            self.in_cell = True
            self.current["cells"].append("")

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None
        elif tag == "figcaption":
            self.in_caption = False
        elif tag == "td":
            self.in_cell = False

    def handle_data(self, data):
        if self.current is None:
            return
        self.current["text"] += data
        if self.in_caption:
            self.current["caption"][-1] += data
        if self.in_cell:
            self.current["cells"][-1] += data


def decode(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def write_run_files(run_dir, history=True, config=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    if history:
        (run_dir / "history.json").write_text(
            json.dumps(
                {
                    "steps": 4,
                    "terms": {
                        "total": [100.0, 10.0, 1.0, 0.5],
                        "ce": [2.0, 1.5, 1.2, 1.1],
                        "cosine": [0.1, -0.2, 0.0, 0.05],
                    },
                }
            )
        )
    if config:
        (run_dir / "config.json").write_text(
            json.dumps(
                {
                    "kind": "reconstruct",
                    "config": {"lr": 0.001, "eta_bn": 3.0, "steps": 4},
                    "model": None,
                    "seed": 0,
                }
            )
        )


def test_report_shows_every_generator_pair_histogram_curve_and_setting(run, tmp_path):
    metrics, recon, labels, generator_index, train = run
    write_run_files(tmp_path)
    page = Page(write_report(tmp_path, metrics, recon, labels, generator_index, train).read_text())
    s = page.sections
    assert list(s) == [
        "summary",
        "verdict",
        "histograms",
        "generators",
        "curves",
        "pairs",
        "per-class",
        "nearest",
        "config",
        "definitions",
    ]
    # One grid per generator; the blank generator 2 is there, and its grid holds only black cells and padding.
    assert s["generators"]["img"] == [f"generator {k}" for k in range(NUM_GENERATORS)]
    grids = [decode(page.pictures[f"generator {k}"]) for k in range(NUM_GENERATORS)]
    assert set(np.unique(np.asarray(grids[2])).tolist()) == {0, 255}
    assert grids[2].size == grids[0].size  # rows = the same classes in every grid
    assert "generator 2: 9 images, 0 reconstructed" in s["generators"]["text"]
    # Every reconstruction with its matched training image and its SSIM, per class best first.
    assert len(s["pairs"]["figure"]) == len(recon) and len(s["pairs"]["img"]) == len(recon)
    captions = [float(c) for c in s["pairs"]["caption"]]
    expected = [
        metrics["authors"]["matched_ssim"][i]
        for idx in ranked_by_class(labels, metrics["authors"]["matched_ssim"]).values()
        for i in idx
    ]
    assert captions == pytest.approx(expected, abs=5e-4)
    assert (
        sum("reconstructed" in f.split() for f in s["pairs"]["figure"])
        == metrics["authors"]["reconstructed"]
    )
    assert (
        f"{len(recon)} of {len(recon)} reconstructions shown, {len(recon)} have a partner"
        in s["pairs"]["text"]
    )
    # Training and held-out best-SSIM histograms side by side (same size), and the matched-SSIM one.
    assert s["histograms"]["img"] == ["training best SSIM", "held-out best SSIM", "matched SSIM"]
    hist = [decode(page.pictures[alt]) for alt in ("training best SSIM", "held-out best SSIM")]
    assert hist[0].size == hist[1].size
    # Rows that are mostly gridline: the count axis' ticks (text antialiasing adds stray pixels).
    gridlines = [
        np.flatnonzero((np.asarray(h) == GRIDLINE).all(-1).sum(1) > 50).tolist() for h in hist
    ]
    assert gridlines[0] and gridlines[0] == gridlines[1]  # the same count axis ...
    tallest = [
        histogram_counts(m["nearest_neighbour"]["best_ssim"]).max()
        for m in (metrics, metrics["heldout"])
    ]
    assert tallest[0] != tallest[1]  # ... although their tallest bins differ
    assert s["curves"]["img"] == ["loss curve: total", "loss curve: ce", "loss curve: cosine"]
    cells = s["config"]["cells"]
    settings = dict(zip(cells[::2], cells[1::2], strict=True))
    assert settings == {
        "kind": "reconstruct",
        "config.lr": "0.001",
        "config.eta_bn": "3.0",
        "config.steps": "4",
        "model": "null",
        "seed": "0",
    }
    verdict = s["verdict"]["text"]
    assert (
        "lies above 0" in verdict and "repeat over seeds before calling it leakage" in verdict
    )  # copies leak
    assert "training-like" not in "".join(sec["text"] for sec in s.values())
    for term in (
        "SSIM",
        "matched SSIM (authors' protocol)",
        "leakage gap",
        "bootstrap interval",
        "loss terms",
    ):
        assert term in s["definitions"]["text"]


def test_report_caps_pairs_per_class_and_says_so(run, tmp_path, monkeypatch):
    metrics, recon, labels, generator_index, train = run
    monkeypatch.setattr(report, "PAIRS_PER_CLASS", 4)
    page = Page(write_report(tmp_path, metrics, recon, labels, generator_index, train).read_text())
    pairs = page.sections["pairs"]
    assert len(pairs["figure"]) == 4 * NUM_CLASSES
    assert (
        "the best 4 of 9 reconstructions" in pairs["text"]
        and "at most 4 per class" in pairs["text"]
    )


def test_report_renders_without_heldout_history_or_config(run, tmp_path):
    metrics, recon, labels, generator_index, train = run
    bare = {
        k: v for k, v in metrics.items() if k not in ("leakage_gap", "heldout", "heldout_source")
    }
    page = Page(write_report(tmp_path, bare, recon, labels, None, train).read_text())
    s = page.sections
    assert s["generators"]["img"] == ["generator 0"]  # no generator index: one generator
    assert s["histograms"]["img"] == ["training best SSIM", "matched SSIM"]
    assert "held-out histogram is missing" in s["histograms"]["text"]
    assert s["verdict"]["text"].strip().startswith("Leakage verdictno held-out control")
    assert (
        "history.json" in s["curves"]["text"]
        and "missing" in s["curves"]["text"]
        and not s["curves"]["img"]
    )
    assert "No config.json" in s["config"]["text"]


def test_verdict_wording_for_an_interval_including_0(run):
    gap = run[0]["leakage_gap"]
    metrics = {
        **run[0],
        "leakage_gap": {**gap, "mean_best_ssim": {**gap["mean_best_ssim"], "ci": [-0.0001, 0.012]}},
    }
    text = Page(render_html(metrics, sections=[])).sections["verdict"]["text"]
    assert (
        "[-0.0001, +0.0120]" in text
        and "the interval includes 0" in text
        and "lies above" not in text
    )


def test_report_is_self_contained_and_escaped(run, tmp_path):
    metrics, recon, labels, generator_index, train = run
    write_run_files(tmp_path)
    path = write_report(
        tmp_path,
        metrics,
        recon,
        labels,
        generator_index,
        train,
        class_names=("<zero>", "one", "two"),
    )
    text = path.read_text()
    page = Page(text)
    assert "http" not in text.replace("<!DOCTYPE html>", "")  # nothing fetched from elsewhere
    assert not page.tags & {"script", "link", "iframe"}
    assert page.img_sources and all(
        src.startswith("data:image/png;base64,") for src in page.img_sources
    )
    for src in page.img_sources:
        decode(src).verify()
    assert "&lt;zero&gt;" in text and "<zero>" not in text and "runs/&lt;demo&gt;" in text
    assert Image.open(tmp_path / "matches.png").size[0] > 0
    assert not (
        tmp_path / "grid.png"
    ).exists()  # the engine's grid.png is not the report's to write


def test_summary_rows_cover_the_headline_numbers_and_the_verdict(run):
    metrics = run[0]
    rows = dict(summary_rows(metrics))
    assert rows["reconstructions / training images"] == "27 / 30"
    assert rows["leakage verdict"] == leakage_verdict(metrics)
    assert any(k.startswith("leakage gap: mean best SSIM") for k in rows)
    no_gap = dict(summary_rows({k: v for k, v in metrics.items() if k != "leakage_gap"}))
    assert not any(k.startswith("leakage gap") for k in no_gap)
    assert no_gap["leakage verdict"].startswith("no held-out control")


def test_the_report_guide_states_the_current_caps():
    guide = (Path(__file__).parents[1] / "docs" / "report.md").read_text()
    assert f"At most {report.PAIRS_PER_CLASS} pairs per class" in guide
    assert f"the first {report.GRID_COLUMNS} when there are more" in guide
    assert (
        f"same {report.HIST_BINS} bins over [{report.HIST_RANGE[0]:g}, {report.HIST_RANGE[1]:g}]"
        in guide
    )
    assert f"span more than a factor of {report.LOG_SPAN:g}" in guide
