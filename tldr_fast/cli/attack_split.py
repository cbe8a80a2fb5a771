"""`tldr-fast attack split` (split-model inversion vs DP-SGD), `dp-epsilon` (accounting), `dp-train`."""

from __future__ import annotations

import argparse
import math


def register(commands, attacks) -> None:
    p = attacks.add_parser(
        "split",
        help="split-model inversion: decode on-device activations back to images, against DP-SGD targets",
        description="Train a split target per noise multiplier (plus a non-private one), train a decoder from the "
        "on-device activations of auxiliary images (disjoint from the target's data), reconstruct unseen test "
        "inputs; write results.json, a model file and an originals-over-reconstructions PNG per row.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=("mnist", "mnist-bundled", "omniglot"), default="mnist")
    p.add_argument(
        "--noise",
        type=float,
        nargs="*",
        default=[0.3, 0.5, 0.7],
        help="DP-SGD noise multipliers (none: only the non-private and/or untrained rows)",
    )
    p.add_argument("--no-nonprivate", action="store_true", help="skip the non-private target row")
    p.add_argument(
        "--untrained",
        action="store_true",
        help="add a row for the untrained target (the infinite-noise limit, epsilon 0)",
    )
    p.add_argument(
        "--n-target", type=int, default=10000, help="target training images (0: all available)"
    )
    p.add_argument(
        "--n-aux", type=int, default=10000, help="attacker's auxiliary images (0: all available)"
    )
    p.add_argument(
        "--n-test", type=int, default=1000, help="test inputs to reconstruct (0: all available)"
    )
    p.add_argument("--epochs", type=int, default=3, help="target training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="target (expected) batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="target Adam learning rate")
    p.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="DP-SGD per-sample clipping norm C"
    )
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--decoder-epochs", type=int, default=10)
    p.add_argument("--decoder-width", type=int, default=64)
    p.add_argument("--decoder-batch-size", type=int, default=64)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split (and of training when --seeds is not given)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="training seeds: every row is repeated once per seed (target initialisation, DP-SGD sampling "
        "and noise, decoder initialisation and batch order), the data split stays fixed by --seed; the "
        "table gives per-seed scores, their means with 95%% Student t intervals, and each row's difference "
        "from the non-private row of the same seed",
    )
    from tldr_fast.cli.train import add_data_root_argument

    add_data_root_argument(p)
    p.add_argument("--out", default="runs/split", help="run directory")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_split, writes={"--out": "dir"})

    e = commands.add_parser(
        "dp-epsilon",
        help="(epsilon, delta) of DP-SGD: classic RDP (TF Privacy's compute_dp_sgd_privacy) and PRV",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("--n", type=int, required=True, help="training set size")
    e.add_argument("--batch-size", type=int, required=True)
    e.add_argument("--epochs", type=float, required=True)
    e.add_argument("--noise", type=float, required=True, help="noise multiplier sigma")
    e.add_argument("--delta", type=float, default=1e-5)
    e.set_defaults(func=run_dp_epsilon)

    t = commands.add_parser(
        "dp-train",
        help="train PaperCNNGroupNorm with DP-SGD (Opacus) and write a model file for `reconstruct`",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from tldr_fast.cli.train import add_data_arguments

    add_data_arguments(t)
    t.add_argument(
        "--noise", type=float, default=None, help="noise multiplier (omit for non-private training)"
    )
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--delta", type=float, default=1e-5)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--out", default="model-dp.safetensors")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_dp_train, writes={"--out": "file"})


def _format_epsilon(eps: float) -> str:
    return "inf" if not math.isfinite(eps) else f"{eps:.3g}"


def run_dp_epsilon(args) -> int:
    from tldr_fast.attacks.dp import dp_sgd_privacy

    spent = dp_sgd_privacy(args.n, args.batch_size, args.epochs, args.noise, args.delta)
    print(
        f"DP-SGD: n={args.n}, batch {args.batch_size} (q={spent.sample_rate:.4g}), {args.epochs:g} epochs = "
        f"{spent.steps} steps, noise multiplier {args.noise:g}, delta={args.delta:g}"
    )
    print(
        f"  epsilon (classic RDP, TF Privacy compute_dp_sgd_privacy): {_format_epsilon(spent.epsilon_classic)}"
        f" (order {spent.order_classic:g})"
    )
    print(
        f"  epsilon (RDP, improved conversion of Balle et al. 2020): {_format_epsilon(spent.epsilon_rdp_improved)}"
    )
    print(
        f"  epsilon (PRV accountant, Opacus):                        {_format_epsilon(spent.epsilon_prv)}"
    )
    return 0


def _optional_count(value: int) -> int | None:
    return None if value == 0 else value


def run_split(args) -> int:
    from tldr_fast.attacks.split import SplitAttackConfig, run_split_attack

    noises = ([] if args.no_nonprivate else [None]) + list(args.noise)
    config = SplitAttackConfig(
        dataset=args.dataset,
        noise_multipliers=tuple(noises),
        n_target=_optional_count(args.n_target),
        n_aux=_optional_count(args.n_aux),
        n_test=_optional_count(args.n_test),
        target_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_grad_norm=args.max_grad_norm,
        delta=args.delta,
        decoder_epochs=args.decoder_epochs,
        decoder_width=args.decoder_width,
        decoder_batch_size=args.decoder_batch_size,
        seed=args.seed,
        untrained_row=args.untrained,
        seeds=None if args.seeds is None else tuple(args.seeds),
    )
    summary = run_split_attack(config, args.out, progress=not args.no_progress, root=args.data_root)
    print(summary["data"])
    print_split_table(summary)
    print(f"wrote {args.out}/results.json")
    return 0


def _row_name(noise) -> str:
    if noise is None:
        return "non-private"
    return "untrained" if math.isinf(noise) else f"{noise:g}"


def _mean_interval(stat: dict, digits: int) -> str:
    """ "mean" for one seed, "mean +- half-width" otherwise."""
    mean = f"{stat['mean']:.{digits}f}"
    return mean if stat["half_width"] is None else f"{mean} +- {stat['half_width']:.{digits}f}"


def _signed_interval(stat: dict, digits: int) -> str:
    """ "+mean" for one seed, "+mean [low, high]" otherwise."""
    mean = f"{stat['mean']:+.{digits}f}"
    return (
        mean
        if stat["half_width"] is None
        else f"{mean} [{stat['low']:+.{digits}f}, {stat['high']:+.{digits}f}]"
    )


def _per_seed(stat: dict, digits: int, signed: bool = False) -> str:
    return " ".join(f"{v:{'+' if signed else ''}.{digits}f}" for v in stat["values"])


def print_split_table(summary: dict) -> None:
    """The table (per-seed scores, mean +- 95% t half-width) and the paired differences from the non-private row."""
    seeds = summary["seeds"]
    print(
        f"seeds {', '.join(map(str, seeds))}"
        + (f"; {summary['interval']}" if len(seeds) > 1 else "")
    )
    print(
        f"{'noise':>11} {'eps classic':>11} {'eps PRV':>8} {'accuracy':>8} {'MSE per seed':>{7 * len(seeds)}} "
        f"{'MSE':>16} {'SSIM per seed':>{6 * len(seeds)}} {'SSIM':>14}"
    )
    for row in summary["rows"]:
        stats = row["seed_statistics"]
        print(
            f"{_row_name(row['noise_multiplier']):>11} {_format_epsilon(row['epsilon_classic']):>11} "
            f"{_format_epsilon(row['epsilon_prv']):>8} {row['target_test_accuracy']:8.4f} "
            f"{_per_seed(stats['mse'], 4):>{7 * len(seeds)}} {_mean_interval(stats['mse'], 4):>16} "
            f"{_per_seed(stats['ssim'], 3):>{6 * len(seeds)}} {_mean_interval(stats['ssim'], 3):>14}"
        )
    base = summary["baseline_mean_image"]
    print(
        f"{'mean image':>11} {'':>11} {'':>8} {'':>8} {'':>{7 * len(seeds)}} {base['mse']:16.4f} "
        f"{'':>{6 * len(seeds)}} {base['ssim']:14.3f}"
    )
    paired = [row for row in summary["rows"] if "paired_vs_nonprivate" in row]
    if paired:
        print("difference from the non-private row of the same seed (row - non-private):")
        print(
            f"{'noise':>11} {'dMSE per seed':>{8 * len(seeds)}} {'dMSE':>26} {'dSSIM per seed':>{7 * len(seeds)}} "
            f"{'dSSIM':>23}"
        )
        for row in paired:
            diff = row["paired_vs_nonprivate"]
            print(
                f"{_row_name(row['noise_multiplier']):>11} {_per_seed(diff['mse'], 4, signed=True):>{8 * len(seeds)}} "
                f"{_signed_interval(diff['mse'], 4):>26} {_per_seed(diff['ssim'], 3, signed=True):>{7 * len(seeds)}} "
                f"{_signed_interval(diff['ssim'], 3):>23}"
            )


def run_dp_train(args) -> int:
    from tldr_fast import datasets, serialization
    from tldr_fast.attacks.dp import DPTrainingConfig, PaperCNNGroupNorm, train_dp
    from tldr_fast.training import evaluate_classifier

    train = datasets.load_dataset(
        args.dataset, "train", root=args.data_root, subset=args.subset, seed=args.seed
    )
    test = datasets.load_dataset(args.dataset, "test", root=args.data_root)
    c, h, w = train.images.shape[1:]
    model = PaperCNNGroupNorm(in_channels=c, num_classes=train.num_classes, image_size=(h, w))
    config = DPTrainingConfig(
        noise_multiplier=args.noise,
        max_grad_norm=args.max_grad_norm,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        delta=args.delta,
        seed=args.seed,
    )
    result = train_dp(model, train.images, train.labels, config, progress=not args.no_progress)
    accuracy = evaluate_classifier(model, test.images, test.labels)
    privacy = result.privacy.to_dict() if result.privacy is not None else None
    serialization.save(
        args.out,
        model,
        metadata={
            "dataset": args.dataset,
            "subset": args.subset,
            "seed": args.seed,
            "epochs": args.epochs,
            "test_accuracy": accuracy,
            "dp": {
                "noise_multiplier": args.noise,
                "max_grad_norm": args.max_grad_norm,
                "batch_size": args.batch_size,
                "privacy": privacy,
            },
        },
    )
    eps = (
        "non-private"
        if privacy is None
        else (
            f"epsilon {_format_epsilon(privacy['epsilon_classic'])} (classic) / {_format_epsilon(privacy['epsilon_prv'])} "
            f"(PRV) at delta {args.delta:g}"
        )
    )
    print(
        f"{model.arch} on {args.dataset} (subset {args.subset or 'all'}): test accuracy {accuracy:.4f}, {eps}"
    )
    print(f"wrote {args.out}")
    return 0
