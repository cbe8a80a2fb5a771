"""Pictures of a scored run and a self-contained HTML report (PNG images embedded as base64).

`write_report(run_dir, metrics, ...)` writes matches.png and report.html (the engine already wrote
grid.png, which is left alone). The report reads RUN_DIR/config.json and RUN_DIR/history.json
itself and shows, section by section:

- the headline statistics and the leakage verdict (`leakage_verdict`: the gap, its interval, and
  what one run can and cannot support);
- histograms (`ssim_histogram`) of each training image's and each held-out image's best SSIM,
  side by side on the same bins and axes, and of each reconstruction's matched SSIM;
- every generator: one grid per generator (`class_grid`: rows = classes, columns = samples);
- one loss curve per term of history.json (`loss_curve`; log scale where the values span more
  than LOG_SPAN);
- every class's matched pairs, best first (reconstruction beside the training image the Hungarian
  matching paired it with, its SSIM printed under it), at most PAIRS_PER_CLASS per class;
- the per-class numbers, the nearest-neighbour table, config.json as a table, and short
  definitions of every statistic shown.

A run without a held-out control or without history.json still renders; the page says what is
missing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tldr_fast.validation import check_images

BLANK = 255  # empty cells and padding are white
PAD = 2
GRID_COLUMNS = 20  # samples per class and generator in a generator's grid
PAIRS_PER_CLASS = 30  # matched pairs shown per class, best first
HIST_RANGE = (-0.2, 1.0)  # SSIM can be negative; values below -0.2 land in the first bin
HIST_BINS = 24  # 0.05 wide
LOG_SPAN = 30.0  # a positive curve whose max / min exceeds this is drawn on a log scale
FONT_SIZE = 12
BAR = (70, 110, 170)
THRESHOLD_LINE = (200, 30, 30)
GRIDLINE = (225, 225, 225)


# ------------------------------------------------------------------------------ image grids


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """One (C, H, W) image in [0, 1] (C = 1 or 3) as a PIL image, enlarged `scale` times (nearest)."""
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    pil = (
        Image.fromarray(arr[0])
        if arr.shape[0] == 1
        else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    )
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def tile(cells: list[list[torch.Tensor | None]], scale: int = 2) -> Image.Image:
    """Rows of (C, H, W) images (None = blank) on a white canvas with PAD pixels between cells."""
    first = next(c for row in cells for c in row if c is not None)
    c, h, w = first.shape
    h, w = h * scale, w * scale
    ncol = max(len(row) for row in cells)
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(
        mode,
        (ncol * (w + PAD) + PAD, len(cells) * (h + PAD) + PAD),
        BLANK if mode == "L" else (BLANK,) * 3,
    )
    for r, row in enumerate(cells):
        for k, img in enumerate(row):
            if img is not None:
                canvas.paste(to_pil(img, scale), (PAD + k * (w + PAD), PAD + r * (h + PAD)))
    return canvas


def class_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[int] | None = None,
    per_class: int = GRID_COLUMNS,
    scale: int = 2,
) -> Image.Image:
    """One row per class of `classes` (default: those present), the first per_class images of each.

    A class without images is a blank row, so the grids of different generators line up.
    """
    check_images(images, "images")
    classes = torch.unique(labels).tolist() if classes is None else classes
    rows = [[images[i] for i in torch.nonzero(labels == c).flatten()[:per_class]] for c in classes]
    return tile(rows, scale)


def matches_grid(
    recon: torch.Tensor,
    labels: torch.Tensor,
    matched_index,
    matched_ssim,
    train: torch.Tensor,
    per_class: int = 5,
    scale: int = 2,
) -> Image.Image:
    """Per class row: (reconstruction, its matched training image) pairs, best matched SSIM first."""
    rows = []
    for idx in ranked_by_class(labels, matched_ssim, per_class).values():
        row: list[torch.Tensor | None] = []
        for i in idx:
            row += [recon[i], train[matched_index[i]] if matched_index[i] >= 0 else None]
        rows.append(row)
    return tile(rows, scale)


def ranked_by_class(
    labels: torch.Tensor, matched_ssim, per_class: int | None = None
) -> dict[int, np.ndarray]:
    """Per class present: its reconstructions' indices, highest matched SSIM first (unmatched last)."""
    score = np.array([-np.inf if s is None else s for s in matched_ssim])
    ranked = {}
    for c in torch.unique(labels).tolist():
        idx = np.flatnonzero(labels.numpy() == c)
        ranked[c] = idx[np.argsort(-score[idx], kind="stable")][:per_class]
    return ranked


# ------------------------------------------------------------------------------ charts


@dataclass(frozen=True)
class Axes:
    """A chart's canvas and the rectangle (left, top, right, bottom) that shows x_range x y_range."""

    image: Image.Image
    box: tuple[int, int, int, int]
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    @property
    def draw(self) -> ImageDraw.ImageDraw:
        return ImageDraw.Draw(self.image)

    def px(self, x: float, y: float) -> tuple[float, float]:
        (left, top, right, bottom), (x0, x1), (y0, y1) = self.box, self.x_range, self.y_range
        u, v = (x - x0) / (x1 - x0), (y - y0) / (y1 - y0)
        return left + (right - left) * u, bottom - (bottom - top) * v


def axes(
    size: tuple[int, int], title: str, x_range, y_range, x_ticks, y_ticks, x_label: str
) -> Axes:
    """White canvas with a title, left and bottom axes, and ticks given as (value, text) pairs."""
    font = ImageFont.load_default(size=FONT_SIZE)
    width, height = size
    image = Image.new("RGB", size, "white")
    ax = Axes(
        image,
        (56, 24, width - 14, height - 40),
        tuple(map(float, x_range)),
        tuple(map(float, y_range)),
    )
    draw = ax.draw
    left, top, right, bottom = ax.box
    draw.text((left, 4), title, fill="black", font=font)
    draw.line([left, top, left, bottom, right, bottom], fill="black")
    for value, text in x_ticks:
        x, _ = ax.px(value, y_range[0])
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x, bottom + 6), text, fill="black", font=font, anchor="ma")
    for value, text in y_ticks:
        _, y = ax.px(x_range[0], value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.line([left + 1, y, right, y], fill=GRIDLINE)
        draw.text((left - 6, y), text, fill="black", font=font, anchor="rm")
    draw.text(((left + right) / 2, height - 4), x_label, fill="black", font=font, anchor="md")
    return ax


def nice_ticks(lo: float, hi: float, count: int = 5) -> np.ndarray:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi], about `count` of them."""
    raw = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step


def histogram_counts(values, bins: int = HIST_BINS) -> np.ndarray:
    """Counts of the non-None values on HIST_RANGE's bins (values outside are clipped into the end bins)."""
    vals = np.clip(np.array([v for v in values if v is not None], dtype=float), *HIST_RANGE)
    return np.histogram(vals, bins=bins, range=HIST_RANGE)[0]


def ssim_histogram(
    values,
    threshold: float,
    title: str = "SSIM",
    y_max: int | None = None,
    bins: int = HIST_BINS,
    size: tuple[int, int] = (460, 240),
) -> Image.Image:
    """Bar chart of SSIM values on HIST_RANGE, the threshold as a red line; y_max fixes the count axis."""
    counts = histogram_counts(values, bins)
    top = max(int(y_max if y_max is not None else counts.max()), 1)
    x_ticks = [
        (t, f"{t:g}") for t in np.round(np.arange(HIST_RANGE[0], HIST_RANGE[1] + 1e-9, 0.2), 1)
    ]
    y_ticks = [(t, f"{t:g}") for t in nice_ticks(0, top, 4)]
    ax = axes(
        size, f"{title}, n = {int(counts.sum())}", HIST_RANGE, (0, top), x_ticks, y_ticks, "SSIM"
    )
    draw = ax.draw
    edges = np.linspace(*HIST_RANGE, bins + 1)
    for n, x0, x1 in zip(counts, edges[:-1], edges[1:], strict=True):
        if n:
            (a, b), (c, d) = ax.px(x0, n), ax.px(x1, 0)
            # At least 1 px high and wide, so that a single image among thousands still shows.
            draw.rectangle([a + 1, min(b, d - 1), max(c - 1, a + 1), d - 1], fill=BAR)
    x, top_px = ax.px(threshold, top)
    draw.line([x, top_px, x, ax.box[3]], fill=THRESHOLD_LINE, width=2)
    return ax.image


def log_scale(values) -> bool:
    """Whether a curve reads better on a log scale: all values positive and max / min above LOG_SPAN."""
    v = np.asarray(values, dtype=float)
    return bool(len(v)) and v.min() > 0 and v.max() / v.min() > LOG_SPAN


def loss_curve(name: str, values, size: tuple[int, int] = (390, 220)) -> Image.Image:
    """One history term against the step; log scale when all values are positive and span > LOG_SPAN."""
    all_values = np.asarray(values, dtype=float)
    finite = np.isfinite(all_values)
    v, steps = all_values[finite], np.arange(1, len(all_values) + 1)[finite]
    log_y = log_scale(v)
    y = np.log10(v) if log_y else v
    if log_y:
        lo, hi = math.floor(y.min()), math.ceil(y.max())
        y_ticks = [(t, f"{10.0**t:g}") for t in range(lo, hi + 1)]
    else:
        lo, hi = (float(y.min()), float(y.max())) if len(y) else (0.0, 1.0)
        margin = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05
        lo, hi = lo - margin, hi + margin
        y_ticks = [(t, f"{t:.3g}") for t in nice_ticks(lo, hi, 4)]
    x_hi = max(len(all_values), 2)
    x_ticks = [(t, f"{t:g}") for t in nice_ticks(1, x_hi, 4) if t >= 1] or [(1, "1")]
    last = f"last {v[-1]:.4g}" if len(v) else "no values"
    ax = axes(
        size,
        f"{name}: {last}{' (log scale)' if log_y else ''}",
        (1, x_hi),
        (lo, hi),
        x_ticks,
        y_ticks,
        "step",
    )
    points = [ax.px(s, t) for s, t in zip(steps, y, strict=True)]
    if len(points) > 1:
        ax.draw.line(points, fill=BAR, width=2)
    elif points:
        ((x, yy),) = points
        ax.draw.ellipse([x - 3, yy - 3, x + 3, yy + 3], fill=BAR)
    return ax.image


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ wording


def leakage_verdict(metrics: dict) -> str:
    """The mean-best-SSIM gap with its interval, and what this one run can and cannot support."""
    gap = metrics.get("leakage_gap")
    if not gap:
        return (
            "no held-out control: this run was evaluated without a held-out set, so there is no gap "
            "and no leakage verdict (SSIM to the training images alone cannot tell memorised images "
            "from images any classifier of this data would produce)"
        )
    g = gap["mean_best_ssim"]
    lo, hi = g["ci"]
    figures = f"gap {g['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}] ({100 * gap['confidence']:.0f}% bootstrap interval)"
    if lo > 0:
        return (
            f"{figures} lies above 0: this run's reconstructions are closer to the training images than "
            "to held-out ones. One run with one seed; the interval resamples images, not training runs: "
            "repeat over seeds before calling it leakage"
        )
    if hi < 0:
        return (
            f"{figures} lies below 0: the reconstructions are closer to held-out images than to the "
            "training images; no evidence of training-data leakage in this run (one run, one seed)"
        )
    return (
        f"{figures}: the interval includes 0; no evidence of training-data leakage in this run "
        f"(one run, one seed; a gap smaller than about {(hi - lo) / 2:.4f} would not show in it)"
    )


def summary_rows(metrics: dict) -> list[tuple[str, str]]:
    """(statistic, value) pairs: the headline numbers, shared by the HTML report and the CLI table."""
    a, nn, fid = metrics["authors"], metrics["nearest_neighbour"], metrics["fidelity"]
    rows = [
        (
            "reconstructions / training images",
            f"{metrics['num_reconstructions']} / {metrics['num_train']}",
        ),
        (
            f"authors: reconstructed (matched SSIM >= {a['threshold']:g})",
            f"{a['reconstructed']} ({a['percent_reconstructed']:.1f}%)",
        ),
        ("authors: mean matched SSIM", f"{a['mean_matched_ssim']:.4f}"),
        ("authors: mean per-class max SSIM", f"{a['mean_class_max_ssim']:.4f}"),
        (
            f"nearest neighbour: training images with SSIM > {nn['threshold']:g}",
            f"{nn['count_above']} ({100 * nn['fraction_above']:.2f}%)",
        ),
        ("nearest neighbour: mean best SSIM per training image", f"{nn['mean_best_ssim']:.4f}"),
    ]
    gap = metrics.get("leakage_gap")
    if gap:
        g = gap["mean_best_ssim"]
        rows.append(
            (
                f"leakage gap: mean best SSIM, train - held-out ({100 * gap['confidence']:.0f}% CI)",
                f"{g['train']:.4f} - {g['heldout']:.4f} = {g['difference']:+.4f} [{g['ci'][0]:+.4f}, {g['ci'][1]:+.4f}]",
            )
        )
        p = gap["percent_reconstructed"]
        rows.append(
            (
                "leakage gap: authors' % reconstructed, train - held-out",
                f"{p['train']:.1f} - {p['heldout']:.1f} = {p['difference']:+.1f}",
            )
        )
    rows.append(("leakage verdict", leakage_verdict(metrics)))
    if fid.get("evaluator_accuracy") is not None:
        rows.append(("fidelity: evaluator accuracy", f"{fid['evaluator_accuracy']:.4f}"))
    if fid.get("target_mean_confidence") is not None:
        rows.append(("fidelity: target mean confidence", f"{fid['target_mean_confidence']:.4f}"))
    if fid.get("within_class_diversity") is not None:
        rows.append(
            ("fidelity: within-class mean pairwise SSIM", f"{fid['within_class_diversity']:.4f}")
        )
    return rows


def definitions(threshold: float) -> list[tuple[str, str]]:
    """(statistic, one-sentence definition) for every statistic the report shows."""
    t = f"{threshold:g}"
    return [
        (
            "SSIM",
            "structural similarity of two images in [0, 1] (scikit-image's defaults: 7x7 windows, "
            "mean over windows and channels); 1 for identical images, about 0 for unrelated ones, "
            "negative for anti-correlated ones. Always between images of the same class.",
        ),
        (
            "matched SSIM (authors' protocol)",
            "per class, a one-to-one (Hungarian) matching of reconstructions "
            "to training images maximising the total SSIM; a reconstruction's "
            "matched SSIM is its SSIM to its partner (none when a class has more "
            "reconstructions than training images).",
        ),
        ("reconstructed", f"a reconstruction whose matched SSIM is >= {t}."),
        (
            "mean per-class max SSIM",
            "per class, the largest SSIM of any reconstruction to any training "
            "image, averaged over classes.",
        ),
        (
            "best SSIM of an image (nearest-neighbour protocol)",
            "for one training (or held-out) image, the "
            "highest SSIM of any reconstruction of its class.",
        ),
        (
            "training images with SSIM > threshold",
            f"how many training images have a best SSIM above {t}.",
        ),
        (
            "leakage gap",
            "mean best SSIM over the training images minus the same over an equally sized, "
            "class-balanced held-out set. If nothing leaked, both sets are alike to the "
            "reconstructions and the gap is about 0.",
        ),
        (
            "bootstrap interval",
            "percentile interval of the gap over class-stratified resamplings of the "
            "training and the held-out images; it covers image-sampling noise only, not "
            "the variation between training runs or seeds.",
        ),
        (
            "authors' % reconstructed, train - held-out",
            "the authors' protocol against the held-out set, "
            "with the training set subsampled per class to the "
            "held-out size; no interval.",
        ),
        (
            "evaluator accuracy",
            "share of reconstructions an independent classifier (trained on other "
            "images) labels as intended.",
        ),
        (
            "target mean confidence",
            "the attacked classifier's mean softmax probability of the intended label.",
        ),
        (
            "within-class mean pairwise SSIM",
            "mean SSIM over distinct pairs of reconstructions of a class, "
            "averaged over classes; lower is more diverse.",
        ),
        (
            "loss terms",
            "each objective term's value at every step, unweighted and averaged over the "
            "generators; 'total' is the weighted sum that was minimised.",
        ),
    ]


# ------------------------------------------------------------------------------ the report


def write_report(
    run_dir,
    metrics: dict,
    recon: torch.Tensor,
    recon_labels: torch.Tensor,
    generator_index: torch.Tensor | None,
    train: torch.Tensor,
    class_names: tuple[str, ...] | None = None,
) -> Path:
    """Write matches.png and the self-contained report.html into run_dir; return the HTML path.

    metrics is `evaluate.reconstruction_scores`' dict (plus "run", "heldout_source", "evaluator");
    config.json and history.json are read from run_dir when present.
    """
    from tldr_fast.serialization import atomic_write

    run_dir = Path(run_dir)
    authors = metrics["authors"]
    matches = png_bytes(
        matches_grid(recon, recon_labels, authors["matched_index"], authors["matched_ssim"], train)
    )
    atomic_write(run_dir / "matches.png", lambda tmp: tmp.write_bytes(matches))
    generators = generator_index if generator_index is not None else torch.zeros_like(recon_labels)
    page = render_html(
        metrics,
        sections=[
            _histograms_section(metrics),
            _generators_section(metrics, recon, recon_labels, generators, class_names),
            _curves_section(_read_json(run_dir / "history.json")),
            _pairs_section(metrics, recon, recon_labels, generators, train, class_names),
            _per_class_section(metrics, class_names),
            _nearest_section(metrics, class_names),
            _config_section(_read_json(run_dir / "config.json")),
            _definitions_section(metrics["threshold"]),
        ],
    )
    return atomic_write(run_dir / "report.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))


class Section(NamedTuple):
    """One part of the page: its anchor, its heading and its HTML."""

    id: str
    heading: str
    body: str


STYLE = """
body{font-family:sans-serif;max-width:1240px;margin:2em auto;padding:0 1em;color:#111}
table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}
img{image-rendering:pixelated} .charts img{image-rendering:auto}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} figure{margin:0}
figcaption{font-size:13px;margin-top:2px} .note{color:#8a4b00}
.pair{border:2px solid #ddd;padding:2px;text-align:center} .pair.reconstructed{border-color:#2a8a2a}
.pair figcaption{font-family:monospace} .pairs{gap:6px}
#verdict p{font-size:17px;background:#f4f4f4;padding:.6em;border-left:4px solid #555}
nav a{margin-right:1em} dt{font-weight:bold;margin-top:.5em} #summary td:first-child{white-space:nowrap}
"""


def render_html(metrics: dict, sections: list[Section]) -> str:
    """The page: title, context, contents, summary and verdict, then the given sections."""
    run = metrics.get("run", {})
    title = f"tldr-fast evaluation: {run.get('run_dir', '')}"
    context = ", ".join(f"{k} {v}" for k, v in run.items() if k != "run_dir" and v is not None)
    heldout = metrics.get("heldout_source") or "none (evaluated without a held-out control)"
    evaluator = metrics.get("evaluator", {}).get("source")
    sections = [
        Section("summary", "Summary", _table(["statistic", "value"], summary_rows(metrics))),
        Section("verdict", "Leakage verdict", f"<p>{_esc(leakage_verdict(metrics))}</p>"),
        *sections,
    ]
    contents = "".join(f'<a href="#{s.id}">{_esc(s.heading)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.id}"><h2>{_esc(s.heading)}</h2>{s.body}</section>' for s in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<style>{STYLE}</style></head>
<body><h1>{_esc(title)}</h1>
<p>{_esc(context)}; held-out: {_esc(heldout)}; evaluator: {_esc(evaluator)}.</p>
<nav>{contents}</nav>
{body}
</body></html>
"""


def _histograms_section(metrics: dict) -> Section:
    threshold = metrics["threshold"]
    train_best = metrics["nearest_neighbour"]["best_ssim"]
    held = metrics.get("heldout")
    held_best = held["nearest_neighbour"]["best_ssim"] if held else None
    top = max(int(histogram_counts(v).max(initial=0)) for v in (train_best, held_best or []))
    pictures = [
        _img(
            ssim_histogram(train_best, threshold, "training images' best SSIM", top),
            "training best SSIM",
        )
    ]
    if held_best is not None:
        held_picture = ssim_histogram(held_best, threshold, "held-out images' best SSIM", top)
        pictures.append(_img(held_picture, "held-out best SSIM"))
        note = ""
    else:
        note = '<p class="note">No held-out control in this run: the held-out histogram is missing.</p>'
    matched_picture = ssim_histogram(
        metrics["authors"]["matched_ssim"], threshold, "reconstructions' matched SSIM"
    )
    lo, hi = HIST_RANGE
    return Section(
        "histograms",
        "SSIM histograms",
        f"<p>Best SSIM of every training image and of every held-out image (nearest-neighbour "
        f"protocol), on the same {HIST_BINS} bins over [{lo:g}, {hi:g}] and the same count axis; the red "
        f"line is the threshold {threshold:g}. If nothing leaked the two look alike.</p>{note}"
        f'<div class="row charts">{"".join(pictures)}</div>'
        f"<p>Matched SSIM of every reconstruction (authors' protocol):</p>"
        f'<div class="row charts">{_img(matched_picture, "matched SSIM")}</div>',
    )


def _generators_section(metrics, recon, labels, generators, class_names) -> Section:
    classes = torch.unique(labels).tolist()
    matched = np.array([np.nan if s is None else s for s in metrics["authors"]["matched_ssim"]])
    threshold = metrics["threshold"]
    figures, most = [], 0
    for k in torch.unique(generators).tolist():
        mine = generators == k
        most = max(most, int(torch.bincount(labels[mine]).max()))
        grid = class_grid(recon[mine], labels[mine], classes, GRID_COLUMNS)
        s = matched[mine.numpy()]
        mean = f"{np.nanmean(s):.3f}" if np.isfinite(s).any() else "n/a"
        caption = (
            f"generator {k}: {int(mine.sum())} images, {int(np.sum(s >= threshold))} reconstructed, "
            f"mean matched SSIM {mean}"
        )
        figures.append(
            f'<figure class="generator">{_img(grid, f"generator {k}")}<figcaption>{_esc(caption)}</figcaption></figure>'
        )
    cap = f" (the first {GRID_COLUMNS} of each class)" if most > GRID_COLUMNS else ""
    rows = ", ".join(_class_name(c, class_names) for c in classes)
    return Section(
        "generators",
        "Every generator",
        f"<p>One grid per generator: rows = classes ({_esc(rows)}, top to bottom), columns = that "
        f"generator's samples{cap}. A generator that collapsed (blank or identical images) shows up as "
        f'its own grid.</p><div class="row">{"".join(figures)}</div>',
    )


def _curves_section(history: dict | None) -> Section:
    if history is None:
        body = (
            '<p class="note">No history.json in the run directory: the loss curves are missing.</p>'
        )
    else:
        terms = history.get("terms", {})
        pictures = [
            _img(loss_curve(name, values), f"loss curve: {name}") for name, values in terms.items()
        ]
        body = (
            f"<p>{history.get('steps', 0)} steps; one panel per term of history.json (unweighted value, "
            f"mean over generators; 'total' is the weighted sum), log scale where the values span "
            f'more than a factor {LOG_SPAN:g}.</p><div class="row charts">{"".join(pictures)}</div>'
        )
    return Section("curves", "Loss curves", body)


def _pairs_section(metrics, recon, labels, generators, train, class_names) -> Section:
    authors, threshold = metrics["authors"], metrics["threshold"]
    matched_ssim, matched_index = authors["matched_ssim"], authors["matched_index"]
    blocks, shown_total = [], 0
    for c, idx in ranked_by_class(labels, matched_ssim).items():
        shown = idx[:PAIRS_PER_CLASS]
        shown_total += len(shown)
        figures = []
        for i in shown:
            j, s = matched_index[i], matched_ssim[i]
            picture = tile([[recon[i], train[j] if j >= 0 else None]])
            where = f"reconstruction {i} (generator {int(generators[i])})"
            title = f"{where} and training image {j}" if j >= 0 else f"{where}, unmatched"
            good = " reconstructed" if s is not None and s >= threshold else ""
            text = f"{s:.3f}" if s is not None else "unmatched"
            figures.append(
                f'<figure class="pair{good}" title="{_esc(title)}">{_img(picture, title)}'
                f"<figcaption>{text}</figcaption></figure>"
            )
        count = (
            f"all {len(idx)}" if len(shown) == len(idx) else f"the best {len(shown)} of {len(idx)}"
        )
        blocks.append(
            f"<h3>class {_esc(_class_name(c, class_names))}: {count} reconstructions</h3>"
            f'<div class="row pairs">{"".join(figures)}</div>'
        )
    num_matched = sum(i >= 0 for i in matched_index)
    return Section(
        "pairs",
        "Matched pairs",
        f"<p>Each reconstruction (left) beside the training image the authors' Hungarian matching "
        f"paired it with (right), its SSIM under the pair; green frame: reconstructed (SSIM &gt;= "
        f"{threshold:g}). Per class, best first, at most {PAIRS_PER_CLASS} per class; {shown_total} of "
        f"{len(matched_index)} reconstructions shown, {num_matched} have a partner.</p>{''.join(blocks)}",
    )


def _per_class_section(metrics: dict, class_names) -> Section:
    diversity = metrics["fidelity"].get("per_class_diversity", {})
    rows = [
        (
            _class_name(c, class_names),
            p["num_reconstructions"],
            p["reconstructed"],
            f"{p['mean_matched_ssim']:.4f}",
            f"{p['max_ssim']:.4f}",
            f"{diversity[c]:.4f}" if c in diversity else "",
        )
        for c, p in metrics["authors"]["per_class"].items()
    ]
    header = [
        "class",
        "reconstructions",
        "reconstructed",
        "mean matched SSIM",
        "max SSIM",
        "within-class SSIM",
    ]
    return Section("per-class", "Per class", _table(header, rows))


def _nearest_section(metrics: dict, class_names) -> Section:
    best = metrics["nearest_neighbour"]["best"]
    rows = [
        (
            b["reference_index"],
            _class_name(b["label"], class_names),
            b["recon_index"],
            f"{b['ssim']:.4f}",
        )
        for b in best
    ]
    return Section(
        "nearest",
        f"Nearest-neighbour protocol: the {len(rows)} best training images",
        _table(["training index", "class", "best reconstruction", "SSIM"], rows),
    )


def _config_section(config: dict | None) -> Section:
    if config is None:
        body = '<p class="note">No config.json in the run directory: the run\'s settings are missing.</p>'
    else:
        rows = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in _flatten(config)]
        body = _table(["setting", "value"], rows)
    return Section("config", "Run configuration (config.json)", body)


def _definitions_section(threshold: float) -> Section:
    items = "".join(
        f"<dt>{_esc(term)}</dt><dd>{_esc(text)}</dd>" for term, text in definitions(threshold)
    )
    return Section("definitions", "Definitions", f"<dl>{items}</dl>")


def _flatten(d: dict, prefix: str = ""):
    """(dotted key, value) for every leaf of a nested dict, in order."""
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _class_name(c, class_names) -> str:
    return class_names[int(c)] if class_names and int(c) < len(class_names) else str(c)


def _esc(value) -> str:
    return html.escape(str(value))


def _img(picture: Image.Image, alt: str) -> str:
    data = base64.b64encode(png_bytes(picture)).decode()
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
