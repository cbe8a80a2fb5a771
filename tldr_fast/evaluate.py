"""How much training data came back: SSIM protocols, a held-out leakage gap and fidelity.

All comparisons are between images of the same class, in [0, 1], with SSIM equal to scikit-image's
defaults (`tldr_fast.ssim`). For every class c, S_c[i, j] = SSIM(reconstruction i, reference j).

- Authors' protocol (TLDR): Hungarian one-to-one matching on S_c (maximising total SSIM); a
  reconstruction is *reconstructed* when its matched SSIM >= threshold (0.4). Reports percent of
  reconstructions reconstructed, mean matched SSIM, and the mean over classes of max S_c.
- Nearest-neighbour protocol (Haim et al. 2022): every reference (training) image gets its best
  reconstruction, b_j = max_i S_c[i, j]; reports how many have b_j > threshold and the 10 best.
- Leakage gap: b_j does not depend on how many reference images there are, and under "nothing
  leaked" training and held-out images are exchangeable given the reconstructions, so the gap is
  mean_j b_j over training images minus the same over held-out images, with a class-stratified
  two-sample percentile bootstrap interval. The authors' statistics are also computed against the
  held-out set, with the training set subsampled per class to the held-out size (matching more
  candidates inflates matched SSIM), and their differences reported without an interval.
- Fidelity: accuracy of an independent evaluator on the reconstructions, the target's mean
  softmax probability of the intended label, and within-class diversity (mean SSIM over distinct
  pairs of reconstructions of a class; lower is more diverse) in pixels and in the target's
  features (mean cosine similarity over distinct pairs, the quantity the cosine diversity term
  lowers; `features=` chooses the feature layer as in `tldr_fast.features.with_features`).

`evaluate_run(run_dir)` applies all of it to a run directory and writes metrics.json and report.html.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tldr_fast.distributed import default_group
from tldr_fast.features import FeatureSpec, extract_features, offers_features
from tldr_fast.ssim import ssim_matrices
from tldr_fast.training import predict_logits
from tldr_fast.validation import (
    check_images,
    check_in_range,
    check_labels,
    check_positive_int,
    check_unit_range,
)

THRESHOLD = 0.4
TOP_MATCHES = 10
EVALUATOR_MAX_IMAGES = 10_000


@dataclass(frozen=True)
class ClassMatrices:
    """Per class: the SSIM matrix (reconstructions x reference images) and where its rows and columns come from."""

    ssim: dict[int, np.ndarray]
    recon_index: dict[int, np.ndarray]
    ref_index: dict[int, np.ndarray]
    num_recon: int
    num_ref: int


def class_ssim_matrices(
    recon: torch.Tensor,
    recon_labels: torch.Tensor,
    ref: torch.Tensor,
    ref_labels: torch.Tensor,
    num_classes: int | None = None,
    ref_name: str = "train",
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
    group: dist.ProcessGroup | None = None,
) -> ClassMatrices:
    """SSIM of every reconstruction against every reference image of its class (float64 on the CPU).

    impl "auto" decides per class matrix; "compiled" or "eager" forces one path (see ssim_matrix).
    group: a torch.distributed process group whose ranks share the blocks of the class matrices
    (`tldr_fast.ssim.ssim_matrices`; every rank passes the same inputs and gets all matrices,
    bit-identical to the single process's); None computes them all in this process.
    """
    classes = _check_inputs(recon, recon_labels, ref, ref_labels, num_classes, ref_name)
    rows = {c: torch.nonzero(recon_labels == c).flatten().numpy() for c in classes}
    cols = {c: torch.nonzero(ref_labels == c).flatten().numpy() for c in classes}
    pairs = [(recon[rows[c]], ref[cols[c]]) for c in classes]
    matrices = ssim_matrices(pairs, chunk_size, device, impl, group)
    return ClassMatrices(
        {c: s.double().cpu().numpy() for c, s in zip(classes, matrices, strict=True)},
        rows,
        cols,
        len(recon),
        len(ref),
    )


# ------------------------------------------------------------------------------ the protocols


def authors_protocol(
    recon,
    recon_labels,
    train,
    train_labels,
    threshold: float = THRESHOLD,
    *,
    num_classes=None,
    device=None,
    chunk_size=None,
) -> dict:
    """TLDR authors' protocol: per-class Hungarian matching, reconstructed if matched SSIM >= threshold."""
    cm = class_ssim_matrices(
        recon, recon_labels, train, train_labels, num_classes, "train", device, chunk_size
    )
    return authors_statistics(cm, threshold)


def nearest_neighbour_protocol(
    recon,
    recon_labels,
    train,
    train_labels,
    threshold: float = THRESHOLD,
    *,
    num_classes=None,
    device=None,
    chunk_size=None,
) -> dict:
    """Haim et al. 2022: each training image's best reconstruction; count SSIM > threshold; the 10 best."""
    cm = class_ssim_matrices(
        recon, recon_labels, train, train_labels, num_classes, "train", device, chunk_size
    )
    return nearest_neighbour_statistics(cm, threshold)


def leakage_gap(
    recon,
    recon_labels,
    train,
    train_labels,
    heldout,
    heldout_labels,
    threshold: float = THRESHOLD,
    *,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    num_classes=None,
    device=None,
    chunk_size=None,
) -> dict:
    """Training minus held-out statistics; see the module docstring for the interval."""
    num_classes = num_classes or _num_classes(recon_labels, train_labels, heldout_labels)
    cm_train = class_ssim_matrices(
        recon, recon_labels, train, train_labels, num_classes, "train", device, chunk_size
    )
    cm_held = class_ssim_matrices(
        recon, recon_labels, heldout, heldout_labels, num_classes, "heldout", device, chunk_size
    )
    return gap_statistics(cm_train, cm_held, threshold, num_bootstrap, confidence, seed)


def fidelity(
    recon,
    recon_labels,
    evaluator=None,
    target=None,
    *,
    num_classes=None,
    device=None,
    chunk_size=None,
    features: FeatureSpec = None,
    group: dist.ProcessGroup | None = None,
) -> dict:
    """Evaluator accuracy, target confidence in the intended label, within-class diversity (mean
    pairwise SSIM, and mean pairwise cosine similarity of the target's features).

    The classifiers run on their own device; `device` is where the SSIM matrices are computed
    (split over the ranks of `group` as in class_ssim_matrices).
    features: the target's feature layer (see `tldr_fast.features.with_features`); with the default
    None a target that offers no features gets no feature statistic.
    """
    check_images(recon, "recon")
    check_unit_range(recon, "recon")
    check_labels(
        recon_labels,
        "recon_labels",
        num_classes or _num_classes(recon_labels),
        batch=recon.shape[0],
    )
    out: dict = {}
    by_class = {int(c): recon[recon_labels == c] for c in torch.unique(recon_labels).tolist()}
    by_class = {c: x for c, x in by_class.items() if len(x) >= 2}
    matrices = ssim_matrices([(x, x) for x in by_class.values()], chunk_size, device, group=group)
    per_class = {}
    for c, s in zip(by_class, matrices, strict=True):
        s, n = s.double(), len(s)
        per_class[c] = float((s.sum() - s.diagonal().sum()) / (n * (n - 1)))
    out["within_class_diversity"] = float(np.mean(list(per_class.values()))) if per_class else None
    out["per_class_diversity"] = per_class
    if evaluator is not None:
        logits = predict_logits(evaluator, recon)  # on the model's own device; device= is for SSIM
        out["evaluator_accuracy"] = float((logits.argmax(1) == recon_labels).double().mean())
    if target is not None:
        logits = predict_logits(target, recon)
        probs = torch.softmax(logits.double(), dim=1)
        out["target_mean_confidence"] = float(probs.gather(1, recon_labels.view(-1, 1)).mean())
        out["target_accuracy"] = float((logits.argmax(1) == recon_labels).double().mean())
        out["target_feature_similarity"] = _feature_similarity(
            target, recon, recon_labels, features
        )
    return out


def _feature_similarity(target, recon, recon_labels, features: FeatureSpec) -> float | None:
    """Mean over classes with >= 2 reconstructions of the mean cosine similarity of the target's
    features over distinct pairs; None when there is no such class, or no features to read and
    none were asked for."""
    if features is None and not offers_features(target):
        return None
    feat = extract_features(target, recon, features).double()
    unit = feat / feat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    per_class = []
    for c in torch.unique(recon_labels).tolist():
        u = unit[recon_labels == c]
        if len(u) >= 2:
            gram = u @ u.T
            per_class.append(float((gram.sum() - gram.diagonal().sum()) / (len(u) * (len(u) - 1))))
    return float(np.mean(per_class)) if per_class else None


def reconstruction_scores(
    recon,
    recon_labels,
    train,
    train_labels,
    heldout=None,
    heldout_labels=None,
    *,
    threshold: float = THRESHOLD,
    target=None,
    evaluator=None,
    num_classes=None,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    device=None,
    chunk_size=None,
    features: FeatureSpec = None,
    group: dist.ProcessGroup | None = None,
) -> dict:
    """Every statistic of this module; the SSIM matrices are computed once and shared.

    group: a torch.distributed process group whose ranks share the SSIM matrices (see
    class_ssim_matrices); every rank passes the same arguments, computes the statistics from
    the same matrices and returns the same scores.
    """
    if (heldout is None) != (heldout_labels is None):
        raise ValueError("heldout and heldout_labels must be given together")
    label_sets = [recon_labels, train_labels] + (
        [heldout_labels] if heldout_labels is not None else []
    )
    num_classes = num_classes or _num_classes(*label_sets)
    cm_train = class_ssim_matrices(
        recon,
        recon_labels,
        train,
        train_labels,
        num_classes,
        "train",
        device,
        chunk_size,
        group=group,
    )
    scores = {
        "threshold": threshold,
        "num_reconstructions": len(recon),
        "num_train": len(train),
        "num_classes": num_classes,
        "authors": authors_statistics(cm_train, threshold),
        "nearest_neighbour": nearest_neighbour_statistics(cm_train, threshold),
    }
    if heldout is not None:
        cm_held = class_ssim_matrices(
            recon,
            recon_labels,
            heldout,
            heldout_labels,
            num_classes,
            "heldout",
            device,
            chunk_size,
            group=group,
        )
        scores["num_heldout"] = len(heldout)
        scores["heldout"] = {
            "authors": authors_statistics(cm_held, threshold),
            "nearest_neighbour": nearest_neighbour_statistics(cm_held, threshold),
        }
        scores["leakage_gap"] = gap_statistics(
            cm_train, cm_held, threshold, num_bootstrap, confidence, seed
        )
    scores["fidelity"] = fidelity(
        recon,
        recon_labels,
        evaluator,
        target,
        num_classes=num_classes,
        device=device,
        chunk_size=chunk_size,
        features=features,
        group=group,
    )
    return scores


# --------------------------------------------------------------- statistics from the matrices


def authors_statistics(cm: ClassMatrices, threshold: float = THRESHOLD) -> dict:
    """Hungarian matching per class; unmatched reconstructions (more than references) count as not reconstructed."""
    from scipy.optimize import linear_sum_assignment

    check_in_range(threshold, "threshold", 0.0, 1.0)

    matched_ssim = np.full(cm.num_recon, np.nan)
    matched_index = np.full(cm.num_recon, -1, dtype=np.int64)
    per_class = {}
    for c, s in cm.ssim.items():
        r, k = linear_sum_assignment(s, maximize=True)
        matched_ssim[cm.recon_index[c][r]] = s[r, k]
        matched_index[cm.recon_index[c][r]] = cm.ref_index[c][k]
        per_class[c] = {
            "num_reconstructions": int(s.shape[0]),
            "reconstructed": int((s[r, k] >= threshold).sum()),
            "mean_matched_ssim": float(s[r, k].mean()),
            "max_ssim": float(s.max()),
        }
    reconstructed = int(np.sum(matched_ssim >= threshold))  # NaN compares False
    return {
        "threshold": threshold,
        "reconstructed": reconstructed,
        "percent_reconstructed": 100.0 * reconstructed / max(cm.num_recon, 1),
        "mean_matched_ssim": float(np.nanmean(matched_ssim)),
        "mean_class_max_ssim": float(np.mean([p["max_ssim"] for p in per_class.values()])),
        "per_class": per_class,
        "matched_ssim": [None if np.isnan(v) else float(v) for v in matched_ssim],
        "matched_index": matched_index.tolist(),
    }


def nearest_neighbour_statistics(
    cm: ClassMatrices, threshold: float = THRESHOLD, top: int = TOP_MATCHES
) -> dict:
    """Each reference image's best reconstruction of its class; count and fraction with SSIM > threshold.

    best_ssim[j] is reference image j's best SSIM (every reference image has one: class_ssim_matrices
    refuses a class without reconstructions).
    """
    check_in_range(threshold, "threshold", 0.0, 1.0)
    best, best_recon, labels, ref_index = _best_per_reference(cm)
    count = int(np.sum(best > threshold))
    order = np.argsort(-best, kind="stable")[:top]
    by_index = np.zeros(cm.num_ref)
    by_index[ref_index] = best
    return {
        "threshold": threshold,
        "count_above": count,
        "fraction_above": count / max(cm.num_ref, 1),
        "mean_best_ssim": float(best.mean()),
        "best_ssim": by_index.tolist(),
        "best": [
            {
                "reference_index": int(ref_index[j]),
                "recon_index": int(best_recon[j]),
                "label": int(labels[j]),
                "ssim": float(best[j]),
            }
            for j in order
        ],
    }


def gap_statistics(
    cm_train: ClassMatrices,
    cm_heldout: ClassMatrices,
    threshold: float = THRESHOLD,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Training minus held-out: nearest-neighbour statistics with a bootstrap interval, authors' size-matched."""
    check_in_range(threshold, "threshold", 0.0, 1.0)
    check_positive_int(num_bootstrap, "num_bootstrap")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(seed)
    train_best, _, train_cls, _ = _best_per_reference(cm_train)
    held_best, _, held_cls, _ = _best_per_reference(cm_heldout)
    boot_t = _stratified_bootstrap(train_best, train_cls, threshold, num_bootstrap, rng)
    boot_h = _stratified_bootstrap(held_best, held_cls, threshold, num_bootstrap, rng)
    alpha = (1 - confidence) / 2
    gap: dict = {"confidence": confidence, "num_bootstrap": num_bootstrap}
    for key, fn in (
        ("mean_best_ssim", lambda b: b.mean()),
        ("fraction_above", lambda b: (b > threshold).mean()),
    ):
        t, h = float(fn(train_best)), float(fn(held_best))
        diff = boot_t[key] - boot_h[key]
        gap[key] = {
            "train": t,
            "heldout": h,
            "difference": t - h,
            "ci": [float(np.quantile(diff, alpha)), float(np.quantile(diff, 1 - alpha))],
        }
    gap["training_like"] = gap["mean_best_ssim"]["ci"][0] > 0
    matched_train = _subsample_columns(cm_train, cm_heldout, rng)
    a_t, a_h = (
        authors_statistics(matched_train, threshold),
        authors_statistics(cm_heldout, threshold),
    )
    for key in ("percent_reconstructed", "mean_matched_ssim", "mean_class_max_ssim"):
        gap[key] = {"train": a_t[key], "heldout": a_h[key], "difference": a_t[key] - a_h[key]}
    gap["train_subsampled"] = matched_train.num_ref != cm_train.num_ref
    return gap


def _best_per_reference(cm: ClassMatrices) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per reference image, grouped by class: best SSIM, that reconstruction's index, class, own index."""
    parts = [
        (s.max(0), cm.recon_index[c][s.argmax(0)], np.full(s.shape[1], c), cm.ref_index[c])
        for c, s in cm.ssim.items()
    ]
    return tuple(np.concatenate(column) for column in zip(*parts))


def _stratified_bootstrap(
    values: np.ndarray, classes: np.ndarray, threshold: float, n: int, rng
) -> dict:
    """Bootstrap replicates of the mean and of the fraction above threshold, resampling within each class."""
    total = np.zeros(n)
    above = np.zeros(n)
    for c in np.unique(classes):
        v = values[classes == c]
        draw = v[rng.integers(0, len(v), size=(n, len(v)))]
        total += draw.sum(1)
        above += (draw > threshold).sum(1)
    return {"mean_best_ssim": total / len(values), "fraction_above": above / len(values)}


def _subsample_columns(cm: ClassMatrices, like: ClassMatrices, rng) -> ClassMatrices:
    """cm with, per class, as many reference columns as `like` has (a seeded random subset)."""
    ssim, cols = {}, {}
    for c, s in cm.ssim.items():
        k = min(s.shape[1], like.ssim[c].shape[1])
        pick = (
            np.sort(rng.choice(s.shape[1], size=k, replace=False))
            if k < s.shape[1]
            else np.arange(k)
        )
        ssim[c], cols[c] = s[:, pick], cm.ref_index[c][pick]
    return ClassMatrices(
        ssim, cm.recon_index, cols, cm.num_recon, sum(len(v) for v in cols.values())
    )


# ------------------------------------------------------------------------------ input checks


def _num_classes(*label_sets: torch.Tensor) -> int:
    return max(
        (int(y.max()) + 1 for y in label_sets if isinstance(y, torch.Tensor) and y.numel()),
        default=1,
    )


def _check_inputs(recon, recon_labels, ref, ref_labels, num_classes, ref_name: str) -> list[int]:
    """Validate a (reconstructions, reference) pair; return the classes to compare."""
    check_images(recon, "recon")
    check_images(ref, ref_name)
    if not len(recon):
        raise ValueError("recon is empty: there are no reconstructions to evaluate")
    if recon.shape[1:] != ref.shape[1:]:
        raise ValueError(
            f"recon and {ref_name} must have the same image shape (C, H, W), got "
            f"{tuple(recon.shape[1:])} and {tuple(ref.shape[1:])}"
        )
    check_unit_range(recon, "recon")
    check_unit_range(ref, ref_name)
    k = num_classes or _num_classes(recon_labels, ref_labels)
    check_labels(recon_labels, "recon_labels", k, batch=recon.shape[0])
    check_labels(ref_labels, f"{ref_name}_labels", k, batch=ref.shape[0])
    n_recon = torch.bincount(recon_labels, minlength=k)
    n_ref = torch.bincount(ref_labels, minlength=k)
    for c in range(k):
        if n_recon[c] and not n_ref[c]:
            raise ValueError(
                f"class {c} has {int(n_recon[c])} reconstructions but {ref_name} has no images of it"
            )
        if n_ref[c] and not n_recon[c]:
            raise ValueError(
                f"class {c} has {int(n_ref[c])} {ref_name} images but no reconstructions; every class "
                f"present in {ref_name} needs reconstructions (drop the class from {ref_name} otherwise)"
            )
    return [c for c in range(k) if n_recon[c]]


# ----------------------------------------------------------------------------- run directories


def evaluate_run(
    run_dir,
    train_data: str | None = None,
    subset: int | None = None,
    heldout_data: str | tuple | None = "test",
    evaluator=None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    data_root=None,
    threshold: float = THRESHOLD,
    num_bootstrap: int = 1000,
    progress: bool = False,
    features: FeatureSpec = None,
) -> dict:
    """Score a run directory against its target's training data; write metrics.json and report.html.

    Defaults come from the target's model file header (dataset, subset, seed and data root it was
    trained with), then from RUN_DIR/config.json; `datasets.load_dataset(dataset, subset=..., seed=...)` rebuilds
    the same balanced subset. heldout_data: "test" (a balanced set from the test split, as large
    as the training set where the split allows), an (images, labels) pair, or None to skip the
    leakage gap. evaluator: a classifier module, a model-file path, False to skip, or None to train
    an MLP with seed + 1 on training-split images outside the target's subset (at most 10,000);
    when the target used the whole training split the MLP is trained on the test split instead.
    features: the target's feature layer for the feature similarity (default: the layer recorded
    in config.json by reconstruct/invert, else as `tldr_fast.features.with_features` chooses).

    Inside an initialised torch.distributed default process group of more than one process
    (torchrun) this is a collective: every rank calls it with the same arguments, the SSIM
    matrices are split over the ranks and all-gathered (class_ssim_matrices), every rank trains
    the same evaluator from the same seed on the same images and computes the same statistics
    from the same matrices, and rank 0 alone writes the files while the others wait.
    """
    from tldr_fast import datasets, report
    from tldr_fast.serialization import write_json_atomic
    from tldr_fast.training import default_device

    check_in_range(threshold, "threshold", 0.0, 1.0)  # before the SSIM matrices, not after
    check_positive_int(num_bootstrap, "num_bootstrap")
    start = time.perf_counter()
    group = default_group()
    writer = group is None or dist.get_rank(group) == 0
    run_dir = Path(run_dir)
    device = torch.device(device) if device is not None else default_device()
    recon, recon_labels, generator_index, config = _read_run(run_dir)
    target = _load_target(config)
    origin = {**config, **(getattr(target, "metadata", None) or {})}
    train_data = train_data or origin.get("dataset")
    if not train_data:
        raise ValueError(
            f"{run_dir}: no training dataset recorded in config.json or the model file; pass train_data"
        )
    subset = subset if subset is not None else origin.get("subset")
    seed = seed if seed is not None else int(origin.get("seed") or 0)
    data_root = data_root if data_root is not None else origin.get("data_root")
    train = datasets.load_dataset(train_data, "train", root=data_root, subset=subset, seed=seed)
    heldout, heldout_source = _heldout(heldout_data, train_data, len(train.labels), data_root, seed)
    evaluator, evaluator_info = resolve_evaluator(
        evaluator, train, train_data, subset, data_root, seed, device, progress and writer
    )
    scores = reconstruction_scores(
        recon,
        recon_labels,
        train.images,
        train.labels,
        *(heldout if heldout is not None else (None, None)),
        threshold=threshold,
        target=target,
        evaluator=evaluator,
        num_classes=train.num_classes,
        num_bootstrap=num_bootstrap,
        seed=seed,
        device=device,
        features=features if features is not None else config.get("features"),
        group=group,
    )
    metrics = {
        "run": {
            "run_dir": str(run_dir),
            "kind": config.get("kind"),
            "dataset": train_data,
            "subset": subset,
            "seed": seed,
            "model": config.get("model"),
            "image_shape": list(recon.shape[1:]),
        },
        "heldout_source": heldout_source,
        "evaluator": evaluator_info,
        **scores,
    }
    metrics["seconds"] = time.perf_counter() - start
    if writer:
        write_json_atomic(run_dir / "metrics.json", metrics)
        report.write_report(
            run_dir, metrics, recon, recon_labels, generator_index, train.images, train.class_names
        )
    if group is not None:
        dist.barrier(group)  # the files exist on every rank's return
    return metrics


def _read_run(run_dir: Path):
    from tldr_fast.serialization import read_safetensors

    images_file, config_file = run_dir / "images.safetensors", run_dir / "config.json"
    for f in (images_file, config_file):
        if not f.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory: {f.name} is missing")
    tensors, _ = read_safetensors(images_file)
    missing = {"images", "labels"} - set(tensors)
    if missing:
        raise ValueError(f"{images_file} lacks tensors {sorted(missing)}; found {sorted(tensors)}")
    config = json.loads(config_file.read_text())
    images, labels = tensors["images"].float(), tensors["labels"].long()
    generator_index = tensors.get("generator_index", torch.zeros_like(labels)).long()
    return images, labels, generator_index, config


def _load_target(config: dict):
    path = config.get("model")
    if not path:
        return None
    from tldr_fast.serialization import load

    return load(path)


def _heldout(heldout_data, name: str, size: int, data_root, seed: int):
    """(images, labels) or None, and a description of where they came from."""
    if heldout_data is None:
        return None, None
    if isinstance(heldout_data, tuple):
        return heldout_data, "given"
    if heldout_data != "test":
        raise ValueError(
            f"heldout_data must be 'test', an (images, labels) pair or None, got {heldout_data!r}"
        )
    from tldr_fast import datasets

    test = datasets.load_dataset(name, "test", root=data_root)
    per_class = min(
        size // test.num_classes, int(torch.bincount(test.labels, minlength=test.num_classes).min())
    )
    held = datasets.balanced_subset(test, per_class * test.num_classes, seed)
    return (held.images, held.labels), f"{name} test split, balanced, {len(held.labels)} images"


def resolve_evaluator(
    evaluator, train, name: str, subset, data_root, seed: int, device, progress: bool
):
    """(classifier or None, description) of evaluate_run's `evaluator` argument for the fidelity
    statistics: False -> none; a path -> the model file; a module -> itself; None -> an MLP trained
    with seed + 1 on the training split's images outside the target's subset (train: the target's
    training set, name its dataset), or on the test split when the target used the whole split."""
    if evaluator is False:
        return None, {"source": "skipped"}
    if isinstance(evaluator, (str, Path)):
        from tldr_fast.serialization import load

        return load(evaluator), {"source": str(evaluator)}
    if evaluator is not None:
        return evaluator, {
            "source": "given",
            "arch": getattr(evaluator, "arch", type(evaluator).__name__),
        }
    from tldr_fast import datasets, models
    from tldr_fast.training import build_seeded, evaluate_classifier, train_classifier

    if subset is not None:
        full = datasets.load_dataset(name, "train", root=data_root)
        used = {row.numpy().tobytes() for row in train.images}
        outside = torch.tensor([row.numpy().tobytes() not in used for row in full.images])
        images, labels = full.images[outside], full.labels[outside]
        source = f"{name} training split outside the target's subset"
    else:
        test = datasets.load_dataset(name, "test", root=data_root)
        images, labels = test.images, test.labels
        source = f"{name} test split (the target used the whole training split)"
    if len(images) > EVALUATOR_MAX_IMAGES:
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 1))[
            :EVALUATOR_MAX_IMAGES
        ]
        images, labels = images[pick], labels[pick]
    c, h, w = images.shape[1:]
    model = build_seeded(
        lambda: models.MLP(in_channels=c, num_classes=train.num_classes, image_size=(h, w)),
        seed + 1,
    )
    train_classifier(
        model,
        images,
        labels,
        epochs=5,
        batch_size=128,
        seed=seed + 1,
        device=device,
        progress=progress,
    )
    return model, {
        "source": source,
        "arch": "MLP",
        "num_images": len(images),
        "seed": seed + 1,
        "accuracy_on_target_train": evaluate_classifier(
            model, train.images, train.labels, device=device
        ),
    }
