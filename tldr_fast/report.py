"""Pictures of a scored run and a self-contained HTML report (PNG images embedded as base64).

- `class_grid`: rows = classes, columns = samples ordered by generator (the paper's figures 3-5).
- `matches_grid`: per class, the reconstructions with the highest matched SSIM, each followed by
  the training image the Hungarian matching paired it with.
- `ssim_histogram`: matched SSIM of every reconstruction, with the threshold marked.
`write_report(run_dir, metrics, ...)` writes matches.png and report.html (the engine already wrote
grid.png, which is left alone; the report embeds its own class grid).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tldr_fast.validation import check_images

BLANK = 255  # empty cells and padding are white
PAD = 2


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """One (C, H, W) image in [0, 1] (C = 1 or 3) as a PIL image, enlarged `scale` times (nearest)."""
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    pil = Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def tile(cells: list[list[torch.Tensor | None]], scale: int = 2) -> Image.Image:
    """Rows of (C, H, W) images (None = blank) on a white canvas with PAD pixels between cells."""
    first = next(c for row in cells for c in row if c is not None)
    c, h, w = first.shape
    h, w = h * scale, w * scale
    ncol = max(len(row) for row in cells)
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(mode, (ncol * (w + PAD) + PAD, len(cells) * (h + PAD) + PAD), BLANK if mode == "L" else (BLANK,) * 3)
    for r, row in enumerate(cells):
        for k, img in enumerate(row):
            if img is not None:
                canvas.paste(to_pil(img, scale), (PAD + k * (w + PAD), PAD + r * (h + PAD)))
    return canvas


def class_grid(images: torch.Tensor, labels: torch.Tensor, generator_index: torch.Tensor | None = None,
               per_class: int = 10, scale: int = 2) -> Image.Image:
    """Rows = classes present, columns = up to per_class samples, ordered by generator then by position."""
    check_images(images, "images")
    gen = generator_index if generator_index is not None else torch.zeros_like(labels)
    rows = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.argsort(gen[idx], stable=True)][:per_class]
        rows.append([images[i] for i in idx])
    return tile(rows, scale)


def matches_grid(recon: torch.Tensor, labels: torch.Tensor, matched_index, matched_ssim, train: torch.Tensor,
                 per_class: int = 5, scale: int = 2) -> Image.Image:
    """Per class row: (reconstruction, its matched training image) pairs, best matched SSIM first."""
    score = np.array([-1.0 if s is None else s for s in matched_ssim])
    rows = []
    for c in torch.unique(labels).tolist():
        idx = np.flatnonzero(labels.numpy() == c)
        idx = idx[np.argsort(-score[idx], kind="stable")][:per_class]
        row: list[torch.Tensor | None] = []
        for i in idx:
            row += [recon[i], train[matched_index[i]] if matched_index[i] >= 0 else None]
        rows.append(row)
    return tile(rows, scale)


def ssim_histogram(values, threshold: float, bins: int = 25, size: tuple[int, int] = (420, 180)) -> Image.Image:
    """Bar chart of SSIM values on [-0.2, 1] (SSIM can be negative), threshold as a red line."""
    lo, hi = -0.2, 1.0
    vals = np.clip(np.array([v for v in values if v is not None], dtype=float), lo, hi)
    counts, _ = np.histogram(vals, bins=bins, range=(lo, hi))
    width, height = size
    margin = 20
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    plot_w, plot_h = width - 2 * margin, height - 2 * margin
    top = max(int(counts.max()), 1) if len(counts) else 1
    bar = plot_w / bins
    for k, n in enumerate(counts):
        x0 = margin + k * bar
        draw.rectangle([x0, margin + plot_h * (1 - n / top), x0 + bar - 1, margin + plot_h], fill=(70, 110, 170))
    x_thr = margin + plot_w * (threshold - lo) / (hi - lo)
    draw.line([x_thr, margin, x_thr, margin + plot_h], fill=(200, 30, 30), width=2)
    draw.line([margin, margin + plot_h, margin + plot_w, margin + plot_h], fill="black")
    for tick in (lo, 0.0, threshold, 1.0):
        x = margin + plot_w * (tick - lo) / (hi - lo)
        draw.text((x - 8, margin + plot_h + 4), f"{tick:g}", fill="black")
    draw.text((margin, 4), f"matched SSIM, n = {len(vals)}, max bin {top}", fill="black")
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_report(run_dir, metrics: dict, recon: torch.Tensor, recon_labels: torch.Tensor,
                 generator_index: torch.Tensor | None, train: torch.Tensor,
                 class_names: tuple[str, ...] | None = None) -> Path:
    """Write matches.png and the self-contained report.html into run_dir; return the HTML path."""
    from tldr_fast.serialization import atomic_write

    run_dir = Path(run_dir)
    authors = metrics["authors"]
    pictures = {
        "grid": png_bytes(class_grid(recon, recon_labels, generator_index)),
        "matches": png_bytes(matches_grid(recon, recon_labels, authors["matched_index"], authors["matched_ssim"], train)),
        "histogram": png_bytes(ssim_histogram(authors["matched_ssim"], metrics["threshold"])),
    }
    atomic_write(run_dir / "matches.png", lambda tmp: tmp.write_bytes(pictures["matches"]))
    page = render_html(metrics, pictures, class_names)
    return atomic_write(run_dir / "report.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))


def summary_rows(metrics: dict) -> list[tuple[str, str]]:
    """(statistic, value) pairs: the headline numbers, shared by the HTML report and the CLI table."""
    a, nn, fid = metrics["authors"], metrics["nearest_neighbour"], metrics["fidelity"]
    rows = [
        ("reconstructions / training images", f"{metrics['num_reconstructions']} / {metrics['num_train']}"),
        (f"authors: reconstructed (matched SSIM >= {a['threshold']:g})", f"{a['reconstructed']} ({a['percent_reconstructed']:.1f}%)"),
        ("authors: mean matched SSIM", f"{a['mean_matched_ssim']:.4f}"),
        ("authors: mean per-class max SSIM", f"{a['mean_class_max_ssim']:.4f}"),
        (f"nearest neighbour: training images with SSIM > {nn['threshold']:g}", f"{nn['count_above']} ({100 * nn['fraction_above']:.2f}%)"),
        ("nearest neighbour: mean best SSIM per training image", f"{nn['mean_best_ssim']:.4f}"),
    ]
    gap = metrics.get("leakage_gap")
    if gap:
        g = gap["mean_best_ssim"]
        rows.append((
            f"leakage gap: mean best SSIM, train - held-out ({100 * gap['confidence']:.0f}% CI)",
            f"{g['train']:.4f} - {g['heldout']:.4f} = {g['difference']:+.4f} [{g['ci'][0]:+.4f}, {g['ci'][1]:+.4f}]",
        ))
        p = gap["percent_reconstructed"]
        rows.append(("leakage gap: authors' % reconstructed, train - held-out",
                     f"{p['train']:.1f} - {p['heldout']:.1f} = {p['difference']:+.1f}"))
        rows.append(("training-like (CI above 0)", "yes" if gap["training_like"] else "no"))
    if fid.get("evaluator_accuracy") is not None:
        rows.append(("fidelity: evaluator accuracy", f"{fid['evaluator_accuracy']:.4f}"))
    if fid.get("target_mean_confidence") is not None:
        rows.append(("fidelity: target mean confidence", f"{fid['target_mean_confidence']:.4f}"))
    if fid.get("within_class_diversity") is not None:
        rows.append(("fidelity: within-class mean pairwise SSIM", f"{fid['within_class_diversity']:.4f}"))
    return rows


def render_html(metrics: dict, pictures: dict[str, bytes], class_names: tuple[str, ...] | None = None) -> str:
    def img(name: str) -> str:
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(pictures[name]).decode()}">'

    def table(header: list[str], rows) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    def name(c) -> str:
        return class_names[int(c)] if class_names and int(c) < len(class_names) else str(c)

    run = metrics.get("run", {})
    per_class = metrics["authors"]["per_class"]
    diversity = metrics["fidelity"].get("per_class_diversity", {})
    class_rows = [
        (name(c), p["num_reconstructions"], p["reconstructed"], f"{p['mean_matched_ssim']:.4f}", f"{p['max_ssim']:.4f}",
         f"{diversity[c]:.4f}" if c in diversity else "")
        for c, p in per_class.items()
    ]
    best_rows = [(b["reference_index"], name(b["label"]), b["recon_index"], f"{b['ssim']:.4f}")
                 for b in metrics["nearest_neighbour"]["best"]]
    title = f"tldr-fast evaluation: {run.get('run_dir', '')}"
    context = ", ".join(f"{k} {v}" for k, v in run.items() if k != "run_dir" and v is not None)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:left}} img{{image-rendering:pixelated}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{html.escape(context)}; held-out: {html.escape(str(metrics.get('heldout_source')))};
evaluator: {html.escape(str(metrics.get('evaluator', {}).get('source')))}.</p>
<h2>Summary</h2>{table(["statistic", "value"], summary_rows(metrics))}
<h2>Reconstructions (rows = classes, columns = generators / samples)</h2>{img("grid")}
<h2>Best matches (reconstruction, then its Hungarian-matched training image)</h2>{img("matches")}
<h2>Matched SSIM</h2>{img("histogram")}
<h2>Per class</h2>{table(["class", "reconstructions", "reconstructed", "mean matched SSIM", "max SSIM", "within-class SSIM"], class_rows)}
<h2>Nearest-neighbour protocol: the {len(best_rows)} best training images</h2>
{table(["training index", "class", "best reconstruction", "SSIM"], best_rows)}
</body></html>
"""
