"""A leakage study: a declared sweep of targets x attacks, each cell scored by `evaluate_run`.

A spec (JSON, or TOML read with tomllib) declares the grid and the budgets:

    {"dataset": "mnist", "train_sizes": [100, 500], "archs": ["kkt-mlp"],
     "methods": ["inversion", "tldr", "kkt"], "seeds": [0, 1],
     "budgets": {"train_epochs": 15, "kkt_train_steps": 2000, "kkt_hidden": [256],
                 "inversion_steps": 100, "tldr_steps": 100, "kkt_steps": 500, "generators": 3,
                 "batch_size": 100},
     "bootstrap": 1000}

An optional "exclude" (a list of objects over the cell fields method, arch, train_size, seed and
noise_multiplier, each value one item or a list of items) leaves out every cell that matches all
of an object's fields, so one spec can declare an uneven grid, e.g. {"arch": "cnn", "seed": [1, 2]}
runs the CNN at seed 0 only.

The DP axis: "noise_multipliers" (default [0]) lists the noise multipliers sigma of the targets'
training, 0 meaning the ordinary (non-private) recipe. A sigma > 0 trains the kkt-mlp target by
the KKT recipe as DP-GD (`training.train_kkt_recipe` with a noise multiplier: sample rate 1,
per-sample clipping to budgets["dp_clip"], Gaussian noise of std sigma * dp_clip on the sum) and
records the (epsilon, budgets["dp_delta"]) of `attacks.dp.rdp_privacy` for its steps; only kkt-mlp
can be so trained (mlp and cnn have BatchNorm, which mixes the per-sample gradients DP needs).

archs: "mlp" and "cnn" are trained by `tldr-fast train` (mini-batch Adam), "kkt-mlp" by the KKT
recipe. methods: "inversion", "tldr" (the paper's nine terms), "tldr+prior" (plus the BatchNorm
feature-statistics prior, eta_bn = 3; it needs BatchNorm, so the grid leaves out tldr+prior on
kkt-mlp), "tldr+kkt" (plus the KKT residual term, eta_kkt = 1 with the training-set size as
kkt_train_size) and "kkt". Every method
returns as many images as the KKT attack's default, twice the training-set size (the generator
methods: ceil(2 n / (K C)) per class per generator), because the best-match statistics grow
with the number of reconstructions. seed selects the training subset, the target's
initialisation and the attack's randomness.

Layout under the run root: targets/ARCH-nSIZE-sSEED[-dpSIGMA].safetensors and
cells/METHOD-ARCH-nSIZE-sSEED[-dpSIGMA]/ (a run directory with metrics.json, then row.json; the
-dp suffix only for sigma > 0, so non-private names are those of older run roots). A cell with
row.json is finished and skipped when the study runs again; a target file that exists is reused.
Every file is written atomically, so an interrupted study resumes at the first unfinished cell.
The results directory gets leakage-study.json ({"spec", "schema", "rows"}, one row per cell with
the fields of ROW_FIELDS), leakage-study.md and leakage-study.png; with DP-trained targets the
markdown gains the DP table and leakage-study-dp.png plots the strongest method's gap against
epsilon.
"""

from __future__ import annotations

import json
import math
import time
from itertools import product
from pathlib import Path

ARCHS = ("mlp", "cnn", "kkt-mlp")
METHODS = ("inversion", "tldr", "tldr+prior", "tldr+kkt", "kkt")
DEFAULT_BUDGETS = {
    "train_epochs": 15,
    "kkt_train_steps": 5000,
    "kkt_hidden": [1000],
    "inversion_steps": 500,
    "tldr_steps": 500,
    "kkt_steps": 1500,
    "generators": 3,
    "batch_size": 100,
    "dp_clip": 1.0,
    "dp_delta": 1e-5,
}
ROW_FIELDS = (
    "method",
    "arch",
    "train_size",
    "seed",
    "test_accuracy",
    "percent_reconstructed_train",
    "percent_reconstructed_heldout",
    "nn_count_train",
    "nn_count_heldout",
    "mean_best_ssim_train",
    "mean_best_ssim_heldout",
    "gap",
    "gap_ci",
    "evaluator_accuracy",
    "num_reconstructions",
    "wall_seconds",
    "noise_multiplier",
    "epsilon",
)
# Rows written before the DP axis existed lack its fields: they are non-private.
NON_PRIVATE_FIELDS = {"noise_multiplier": 0.0, "epsilon": None}
PRIOR_ETA_BN = 3.0
# The KKT residual is relative (1 with no multipliers, 0 at a KKT point): weighted like the
# paper's unit-weight terms.
KKT_TERM_ETA = 1.0
# (method, arch) pairs left out of every grid: the prior has no BatchNorm statistics to match.
WITHOUT_BATCHNORM = {("tldr+prior", "kkt-mlp")}


# ------------------------------------------------------------------------------ the spec


def read_spec(path: str | Path) -> dict:
    """Parse and validate a spec file (.json, or .toml); return it with the budgets completed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study spec {path} does not exist")
    if path.suffix == ".toml":
        import tomllib

        raw = tomllib.loads(path.read_text())
    else:
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"study spec {path} is not valid JSON: {err}") from err
    return check_spec(raw)


def check_spec(raw: dict) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"a study spec must be a JSON object, got {type(raw).__name__}")
    known = {
        "dataset",
        "train_sizes",
        "archs",
        "methods",
        "seeds",
        "budgets",
        "bootstrap",
        "exclude",
        "noise_multipliers",
    }
    unknown = set(raw) - known
    if unknown:
        raise ValueError(
            f"study spec has unknown keys {sorted(unknown)}; expected some of {sorted(known)}"
        )
    spec = {"dataset": raw.get("dataset", "mnist"), "bootstrap": raw.get("bootstrap", 1000)}
    for key, choices in (
        ("train_sizes", None),
        ("archs", ARCHS),
        ("methods", METHODS),
        ("seeds", None),
    ):
        value = raw.get(key)
        if not isinstance(value, list) or not value:
            raise ValueError(f"study spec {key!r} must be a non-empty list, got {value!r}")
        for item in value:
            if choices is not None and item not in choices:
                raise ValueError(
                    f"study spec {key!r} has {item!r}; expected one of {list(choices)}"
                )
            if choices is None and (
                isinstance(item, bool)
                or not isinstance(item, int)
                or item < (1 if key == "train_sizes" else 0)
            ):
                raise ValueError(
                    f"study spec {key!r} must hold integers >= {1 if key == 'train_sizes' else 0}, got {item!r}"
                )
        spec[key] = list(value)
    budgets = raw.get("budgets", {})
    if not isinstance(budgets, dict) or set(budgets) - set(DEFAULT_BUDGETS):
        raise ValueError(
            f"study spec 'budgets' must be an object with keys among {sorted(DEFAULT_BUDGETS)}, got {budgets!r}"
        )
    spec["budgets"] = {**DEFAULT_BUDGETS, **budgets}
    _check_dp(raw, spec)
    if (
        isinstance(spec["bootstrap"], bool)
        or not isinstance(spec["bootstrap"], int)
        or spec["bootstrap"] < 1
    ):
        raise ValueError(
            f"study spec 'bootstrap' must be an integer >= 1, got {spec['bootstrap']!r}"
        )
    if "exclude" in raw:
        spec["exclude"] = _check_exclude(raw["exclude"], spec)
    return spec


def _check_dp(raw: dict, spec: dict) -> None:
    """Validate the DP keys of `raw` into `spec`: noise_multipliers, dp_clip and dp_delta."""
    sigmas = raw.get("noise_multipliers", [0])
    if (
        not isinstance(sigmas, list)
        or not sigmas
        or not all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v < math.inf
            for v in sigmas
        )
    ):
        raise ValueError(
            f"study spec 'noise_multipliers' must be a non-empty list of numbers >= 0 (0: non-private), got {sigmas!r}"
        )
    if any(sigmas) and spec["archs"] != ["kkt-mlp"]:
        raise ValueError(
            f"study spec 'noise_multipliers' {sigmas} > 0 need archs ['kkt-mlp'], got {spec['archs']}: "
            "mlp and cnn have BatchNorm, which DP-SGD cannot train"
        )
    spec["noise_multipliers"] = [float(v) for v in sigmas]
    clip, delta = spec["budgets"]["dp_clip"], spec["budgets"]["dp_delta"]
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf:
        raise ValueError(f"study spec budget 'dp_clip' must be a number > 0, got {clip!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"study spec budget 'dp_delta' must be a number in (0, 1), got {delta!r}")


CELL_FIELDS = ("method", "arch", "train_size", "seed", "noise_multiplier")


def _check_exclude(exclude, spec: dict) -> list[dict]:
    """The rules of `exclude`; a value outside the grid's own (a typo, most likely) is an error."""
    if not isinstance(exclude, list) or not all(
        isinstance(rule, dict) and rule and set(rule) <= set(CELL_FIELDS) for rule in exclude
    ):
        raise ValueError(
            f"study spec 'exclude' must be a list of non-empty objects with keys among "
            f"{list(CELL_FIELDS)}, got {exclude!r}"
        )
    grid = dict(zip(CELL_FIELDS, ("methods", "archs", "train_sizes", "seeds", "noise_multipliers")))
    for rule in exclude:
        for key, value in rule.items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bool) or item not in spec[grid[key]]:
                    raise ValueError(
                        f"study spec 'exclude' rule {rule} has {key} {item!r}, which is not in "
                        f"the spec's {grid[key]} {spec[grid[key]]}"
                    )
    return [dict(rule) for rule in exclude]


def _excluded(cell: dict, spec: dict) -> bool:
    """Whether some rule of spec["exclude"] matches every one of its fields in `cell`."""
    return any(
        all(
            cell[key] in (value if isinstance(value, list) else [value])
            for key, value in rule.items()
        )
        for rule in spec.get("exclude", [])
    )


def cells(spec: dict) -> list[dict]:
    """The grid in run order: per (train size, seed, noise multiplier, arch) target, every method
    that applies to it."""
    grid = (
        dict(zip(CELL_FIELDS, (m, a, n, s, sigma), strict=True))
        for n, s, sigma, a, m in product(
            spec["train_sizes"],
            spec["seeds"],
            spec.get("noise_multipliers", [0.0]),
            spec["archs"],
            spec["methods"],
        )
    )
    return [
        cell
        for cell in grid
        if (cell["method"], cell["arch"]) not in WITHOUT_BATCHNORM and not _excluded(cell, spec)
    ]


def cell_name(cell: dict) -> str:
    return f"{cell['method']}-{target_name(cell)}"


def target_name(cell: dict) -> str:
    """ARCH-nSIZE-sSEED, with -dpSIGMA for a DP-trained target (non-private names are unchanged)."""
    sigma = cell.get("noise_multiplier", 0)
    dp = f"-dp{sigma:g}" if sigma else ""
    return f"{cell['arch']}-n{cell['train_size']}-s{cell['seed']}{dp}"


def complete_row(row: dict) -> dict:
    """`row` with the fields added since it was written (NON_PRIVATE_FIELDS), in ROW_FIELDS order."""
    row = {**NON_PRIVATE_FIELDS, **row}
    return {key: row[key] for key in ROW_FIELDS}


def read_results(path: str | Path) -> dict:
    """A leakage-study.json, its rows completed by `complete_row` (older files load alike)."""
    payload = json.loads(Path(path).read_text())
    return {
        **payload,
        "schema": list(ROW_FIELDS),
        "rows": [complete_row(r) for r in payload["rows"]],
    }


# ------------------------------------------------------------------------------ running


def run_study(
    spec: dict,
    root: str | Path,
    results: str | Path | None = None,
    data_root=None,
    device=None,
    progress: bool = False,
    log=print,
    finished_only: bool = False,
) -> list[dict]:
    """Run every unfinished cell of `spec` under `root`, then write the study files to `results`
    (default root). With finished_only nothing runs: the files hold the cells finished so far."""
    from tldr_fast.serialization import write_json_atomic

    root = Path(root)
    rows = []
    for cell in cells(spec):
        done = root / "cells" / cell_name(cell) / "row.json"
        if done.is_file():
            log(f"{cell_name(cell)}: finished earlier, skipped")
        elif finished_only:
            log(f"{cell_name(cell)}: not run")
            continue
        else:
            row = run_cell(spec, cell, root, data_root=data_root, device=device, progress=progress)
            write_json_atomic(done, row)
            log(
                f"{cell_name(cell)}: gap {row['gap']:+.4f} [{row['gap_ci'][0]:+.4f}, {row['gap_ci'][1]:+.4f}], "
                f"NN count {row['nn_count_train']} (held-out {row['nn_count_heldout']}), {row['wall_seconds']:.0f} s"
            )
        rows.append(complete_row(json.loads(done.read_text())))
    write_results(spec, rows, Path(results) if results is not None else root)
    return rows


def run_cell(
    spec: dict, cell: dict, root: Path, data_root=None, device=None, progress: bool = False
) -> dict:
    """Train (or reuse) the cell's target, run its attack into the cell directory, evaluate, return the row."""
    from tldr_fast import serialization
    from tldr_fast.evaluate import evaluate_run

    start = time.perf_counter()
    model_path = ensure_target(
        spec, cell, root, data_root=data_root, device=device, progress=progress
    )
    target = serialization.load(model_path)
    run_dir = root / "cells" / cell_name(cell)
    attack_cell(spec, cell, target, model_path, run_dir, device=device, progress=progress)
    evaluator = ensure_evaluator(spec, cell, root, data_root=data_root, device=device)
    metrics = evaluate_run(
        run_dir,
        train_data=spec["dataset"],
        subset=cell["train_size"],
        seed=cell["seed"],
        evaluator=str(evaluator),
        device=device,
        data_root=data_root,
        num_bootstrap=spec["bootstrap"],
    )
    return study_row(
        cell,
        metrics,
        target.metadata.get("test_accuracy"),
        time.perf_counter() - start,
        epsilon=(target.metadata.get("privacy") or {}).get("epsilon"),
    )


def ensure_target(
    spec: dict, cell: dict, root: Path, data_root=None, device=None, progress: bool = False
) -> Path:
    """The cell's target model file, trained once per (arch, train size, seed) and reused by every method."""
    from tldr_fast.cli.train import train_and_save, train_kkt_and_save

    path = root / "targets" / f"{target_name(cell)}.safetensors"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    b = spec["budgets"]
    if cell["arch"] == "kkt-mlp":
        sigma = cell.get("noise_multiplier", 0)
        train_kkt_and_save(
            spec["dataset"],
            cell["train_size"],
            str(path),
            seed=cell["seed"],
            hidden=b["kkt_hidden"],
            steps=b["kkt_train_steps"],
            data_root=data_root,
            device=device,
            progress=progress,
            noise_multiplier=sigma or None,
            max_grad_norm=b["dp_clip"],
            delta=b["dp_delta"],
        )
    else:
        train_and_save(
            spec["dataset"],
            cell["train_size"],
            cell["arch"],
            b["train_epochs"],
            str(path),
            seed=cell["seed"],
            data_root=data_root,
            device=device,
            progress=progress,
        )
    return path


def ensure_evaluator(spec: dict, cell: dict, root: Path, data_root=None, device=None) -> Path:
    """evaluate_run's default evaluator (an MLP on training images outside the target's subset),
    trained once per (train size, seed) and shared by every architecture and method."""
    from tldr_fast import datasets, serialization
    from tldr_fast.evaluate import resolve_evaluator

    path = root / "targets" / f"evaluator-n{cell['train_size']}-s{cell['seed']}.safetensors"
    if not path.is_file():
        train = datasets.load_dataset(
            spec["dataset"], "train", root=data_root, subset=cell["train_size"], seed=cell["seed"]
        )
        model, info = resolve_evaluator(
            None, train, spec["dataset"], cell["train_size"], data_root, cell["seed"], device, False
        )
        serialization.save(path, model.cpu(), metadata={"evaluator": info})
    return path


def attack_cell(
    spec: dict,
    cell: dict,
    target,
    model_path: Path,
    run_dir: Path,
    device=None,
    progress: bool = False,
):
    """Run the cell's method against `target`, writing the run directory."""
    from tldr_fast import api
    from tldr_fast.attacks import kkt
    from tldr_fast.config import InversionConfig, ReconstructionConfig

    b, n, seed = spec["budgets"], cell["train_size"], cell["seed"]
    meta = {"model": str(model_path.resolve()), "dataset": spec["dataset"], "subset": n}
    if cell["method"] == "kkt":
        config = kkt.KKTConfig(steps=b["kkt_steps"], seed=seed)
        return kkt.attack(
            target,
            n,
            config,
            device=device,
            progress=progress,
            run_dir=run_dir,
            model_path=meta["model"],
            dataset=meta["dataset"],
            subset=n,
        )
    k = b["generators"]
    samples = math.ceil(2 * n / (k * target.num_classes))
    if cell["method"] == "inversion":
        config = InversionConfig.preset(
            "paper",
            steps=b["inversion_steps"],
            num_generators=k,
            seed=seed,
            batch_size=b["batch_size"],
        )
        entry = api.invert
    else:
        extra = {
            "tldr": {},
            "tldr+prior": {"eta_bn": PRIOR_ETA_BN},
            "tldr+kkt": {"eta_kkt": KKT_TERM_ETA, "kkt_train_size": n},
        }[cell["method"]]
        config = ReconstructionConfig.preset(
            "paper",
            steps=b["tldr_steps"],
            num_generators=k,
            seed=seed,
            batch_size=b["batch_size"],
            **extra,
        )
        entry = api.reconstruct
    return entry(
        target,
        target.num_classes,
        target.input_shape,
        config,
        run_dir=run_dir,
        progress=progress,
        samples_per_class=samples,
        **meta,
    )


def study_row(
    cell: dict, metrics: dict, test_accuracy, seconds: float, epsilon: float | None = None
) -> dict:
    """One row of leakage-study.json from a cell's metrics (fields: ROW_FIELDS); epsilon is the
    target's privacy loss at budgets["dp_delta"], None for a non-private target."""
    gap = metrics["leakage_gap"]
    row = {
        **cell,
        "test_accuracy": test_accuracy,
        "percent_reconstructed_train": gap["percent_reconstructed"]["train"],
        "percent_reconstructed_heldout": gap["percent_reconstructed"]["heldout"],
        "nn_count_train": metrics["nearest_neighbour"]["count_above"],
        "nn_count_heldout": metrics["heldout"]["nearest_neighbour"]["count_above"],
        "mean_best_ssim_train": gap["mean_best_ssim"]["train"],
        "mean_best_ssim_heldout": gap["mean_best_ssim"]["heldout"],
        "gap": gap["mean_best_ssim"]["difference"],
        "gap_ci": list(gap["mean_best_ssim"]["ci"]),
        "evaluator_accuracy": metrics["fidelity"].get("evaluator_accuracy"),
        "num_reconstructions": metrics["num_reconstructions"],
        "wall_seconds": seconds,
        "noise_multiplier": float(cell.get("noise_multiplier", 0)),
        "epsilon": epsilon,
    }
    return {key: row[key] for key in ROW_FIELDS}


# ------------------------------------------------------------------------------ the study files


def write_results(spec: dict, rows: list[dict], results: Path) -> None:
    """leakage-study.json, leakage-study.md and leakage-study.png in `results`; with DP-trained
    targets among the rows also leakage-study-dp.png, and the markdown gains the DP table."""
    from tldr_fast.serialization import atomic_write, write_json_atomic

    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        results / "leakage-study.json", {"spec": spec, "schema": list(ROW_FIELDS), "rows": rows}
    )
    private = any(r["noise_multiplier"] for r in rows)
    text = markdown_table(rows) + ("\n" + dp_table(rows) if private else "")
    atomic_write(results / "leakage-study.md", lambda tmp: tmp.write_text(text))
    figures = {"leakage-study.png": plot(rows)}
    if private:
        figures["leakage-study-dp.png"] = plot_dp(rows, spec["budgets"]["dp_delta"])
    for name, figure in figures.items():
        atomic_write(
            results / name, lambda tmp, fig=figure: fig.savefig(tmp, format="png", dpi=120)
        )


def markdown_table(rows: list[dict]) -> str:
    header = [
        "method",
        "arch",
        "n",
        "seed",
        "test acc",
        "% rec. train",
        "% rec. held-out",
        "NN > 0.4 train",
        "NN > 0.4 held-out",
        "best SSIM train",
        "best SSIM held-out",
        "gap [95% CI]",
        "evaluator acc",
        "s",
    ]
    private = any(r["noise_multiplier"] for r in rows)
    if private:
        header[4:4] = ["sigma", "epsilon"]
    body = []
    for r in rows:
        cells_ = [
            r["method"],
            r["arch"],
            r["train_size"],
            r["seed"],
            _fmt(r["test_accuracy"], ".3f"),
            _fmt(r["percent_reconstructed_train"], ".1f"),
            _fmt(r["percent_reconstructed_heldout"], ".1f"),
            r["nn_count_train"],
            r["nn_count_heldout"],
            _fmt(r["mean_best_ssim_train"], ".3f"),
            _fmt(r["mean_best_ssim_heldout"], ".3f"),
            gap_with_interval(r),
            _fmt(r["evaluator_accuracy"], ".2f"),
            f"{r['wall_seconds']:.0f}",
        ]
        if private:
            cells_[4:4] = [f"{r['noise_multiplier']:g}", _fmt(r["epsilon"], ".3g")]
        body.append(cells_)
    return _markdown(header, body)


def gap_with_interval(row: dict) -> str:
    """A row's gap and its 95% interval as one text: "+0.066 [+0.049, +0.082]"."""
    lo, hi = row["gap_ci"]
    return f"{row['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in cells_) + " |" for cells_ in rows]
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def strongest_method(rows: list[dict]) -> str:
    """The method with the largest mean gap over the non-private rows (over all rows if none)."""
    pool = [r for r in rows if not r["noise_multiplier"]] or rows
    gaps: dict[str, list[float]] = {}
    for r in pool:
        gaps.setdefault(r["method"], []).append(r["gap"])
    return max(sorted(gaps), key=lambda m: sum(gaps[m]) / len(gaps[m]))


def _dp_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(method, arch, train size, noise multiplier) -> its rows, in that order, seeds ascending."""
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(
        rows, key=lambda r: (r["method"], r["arch"], r["train_size"], r["noise_multiplier"])
    ):
        groups.setdefault(
            (r["method"], r["arch"], r["train_size"], r["noise_multiplier"]), []
        ).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in groups.items()}


def dp_table(rows: list[dict]) -> str:
    """One line per (method, arch, train size, noise multiplier): epsilon (every seed trains for
    the same steps, so they share it), mean test accuracy, every seed's gap with its 95% CI, the
    mean gap, and the nearest-neighbour counts summed over seeds."""
    header = [
        "method",
        "arch",
        "n",
        "sigma",
        "epsilon",
        "seeds",
        "test acc (mean)",
        "gap per seed [95% CI]",
        "mean gap",
        "NN > 0.4 train / held-out",
    ]
    body = []
    for (method, arch, n, sigma), mine in _dp_groups(rows).items():
        accuracies = [r["test_accuracy"] for r in mine if r["test_accuracy"] is not None]
        cells_ = [
            method,
            arch,
            n,
            f"{sigma:g}" if sigma else "0 (non-private)",
            _fmt(mine[0]["epsilon"], ".3g") if sigma else "inf",
            ", ".join(str(r["seed"]) for r in mine),
            _fmt(sum(accuracies) / len(accuracies) if accuracies else None, ".3f"),
            "; ".join(gap_with_interval(r) for r in mine),
            f"{sum(r['gap'] for r in mine) / len(mine):+.3f}",
            f"{sum(r['nn_count_train'] for r in mine)} / {sum(r['nn_count_heldout'] for r in mine)}",
        ]
        body.append(cells_)
    return _markdown(header, body)


def plot(rows: list[dict]):
    """Left: gap (mean best SSIM, train minus held-out) vs training-set size with 95% CI bars, one
    series per method and architecture, seeds side by side; right: NN count > 0.4 on the same axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = sorted({(r["method"], r["arch"]) for r in rows})
    for i, (method, arch) in enumerate(series):
        mine = sorted(
            (r for r in rows if (r["method"], r["arch"]) == (method, arch)),
            key=lambda r: (r["train_size"], r["seed"]),
        )
        # Spread the points of one size over a few percent of it, so seeds and series do not overlap.
        xs = [
            r["train_size"] * (1 + 0.04 * (i - (len(series) - 1) / 2) + 0.01 * r["seed"])
            for r in mine
        ]
        ys = [r["gap"] for r in mine]
        err = [[r["gap"] - r["gap_ci"][0] for r in mine], [r["gap_ci"][1] - r["gap"] for r in mine]]
        left.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=f"{method} ({arch})")
        right.plot(xs, [r["nn_count_train"] for r in mine], "o", label=f"{method} ({arch})")
    left.axhline(0, color="grey", lw=0.8)
    sizes = sorted({r["train_size"] for r in rows})
    for ax, ylabel in (
        (left, "gap: mean best SSIM, train - held-out"),
        (right, "training images with best SSIM > 0.4"),
    ):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training-set size")
        ax.set_ylabel(ylabel)
    left.set_title("leakage gap (95% bootstrap CI)")
    right.set_title("nearest-neighbour count")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_dp(rows: list[dict], delta: float):
    """The strongest method's gap (95% CI bars, one point per seed) against the targets' epsilon,
    one series per (arch, train size), the non-private targets at the right end (epsilon = inf);
    right: the targets' test accuracy on the same axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    method = strongest_method(rows)
    mine = [r for r in rows if r["method"] == method]
    finite = [r["epsilon"] for r in mine if r["noise_multiplier"] and r["epsilon"] is not None]
    # Where the non-private targets sit: a decade right of the largest finite epsilon.
    at_inf = 10 * max(finite) if finite else 1.0
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = sorted({(r["arch"], r["train_size"]) for r in mine})
    for arch, n in series:
        points = sorted(
            (r for r in mine if (r["arch"], r["train_size"]) == (arch, n)),
            key=lambda r: (r["noise_multiplier"], r["seed"]),
        )
        # Spread seeds over a few percent of epsilon (a log axis), so their bars do not overlap.
        xs = [
            (r["epsilon"] if r["noise_multiplier"] else at_inf) * 1.06 ** r["seed"] for r in points
        ]
        ys = [r["gap"] for r in points]
        err = [
            [r["gap"] - r["gap_ci"][0] for r in points],
            [r["gap_ci"][1] - r["gap"] for r in points],
        ]
        left.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=f"{arch}, n = {n}")
        right.plot(xs, [r["test_accuracy"] for r in points], "o", label=f"{arch}, n = {n}")
    left.axhline(0, color="grey", lw=0.8)
    ticks = sorted({r["epsilon"] for r in mine if r["noise_multiplier"]}) + [at_inf]
    for ax, ylabel in (
        (left, "gap: mean best SSIM, train - held-out"),
        (right, "target's test accuracy"),
    ):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{e:.3g}" for e in ticks[:-1]] + ["inf\n(non-private)"])
        ax.minorticks_off()
        ax.set_xlabel(f"epsilon (delta = {delta:g})")
        ax.set_ylabel(ylabel)
    left.set_title(f"{method}: leakage gap against epsilon (95% bootstrap CI)")
    right.set_title("utility")
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig
