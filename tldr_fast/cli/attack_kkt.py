"""`tldr-fast attack kkt`: KKT reconstruction of training images from a trained classifier's weights."""

from __future__ import annotations

import argparse


def register(commands, attacks) -> None:
    del commands  # an attack subcommand only
    from tldr_fast.attacks.kkt import KKTConfig

    d = KKTConfig()
    p = attacks.add_parser(
        "kkt",
        help="KKT reconstruction (Haim et al. 2022, multiclass): candidates whose margin gradients add up to the weights",
        description=(
            "Optimise candidate images x_j and multipliers lambda_j >= lambda_min so that the "
            "target's unit-norm weights equal sum_j lambda_j grad_theta phi(x_j), phi the multiclass "
            "margin, with a pixel-range prior. Strongest on targets trained by `tldr-fast train "
            "--recipe kkt`; runs against any classifier. Writes a run directory that `tldr-fast "
            "evaluate RUN_DIR` scores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="classifier file written by `tldr-fast train` (.safetensors)"
    )
    p.add_argument(
        "--out", required=True, help="run directory to write (images, grid.png, config, history)"
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="training-set size of the target (default: the subset recorded in the model file)",
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="candidate images (default: 2 x the training-set size)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps")
    p.add_argument(
        "--lr-x", type=float, default=d.lr_x, help="Adam learning rate of the candidates"
    )
    p.add_argument(
        "--lr-lambda", type=float, default=d.lr_lambda, help="Adam learning rate of the multipliers"
    )
    p.add_argument(
        "--lambda-min", type=float, default=d.lambda_min, help="lower bound of every multiplier"
    )
    p.add_argument("--lambda-init", type=float, default=d.lambda_init, help="starting multiplier")
    p.add_argument(
        "--init-scale",
        type=float,
        default=d.init_scale,
        help="std of the candidates' start around 0.5",
    )
    p.add_argument(
        "--prior-weight", type=float, default=d.prior_weight, help="weight of the pixel-range prior"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run, writes={"--out": "dir"})


def run(args) -> int:
    from pathlib import Path

    from tldr_fast.attacks.kkt import KKTConfig, attack
    from tldr_fast.cli.engine import _load_classifier

    model = _load_classifier(args.model)
    meta = getattr(model, "metadata", {}) or {}
    train_size = args.train_size if args.train_size is not None else meta.get("subset")
    if train_size is None and args.candidates is None:
        raise ValueError(f"--train-size is required: {args.model} records no training subset size")
    config = KKTConfig(
        candidates=args.candidates,
        steps=args.steps,
        lr_x=args.lr_x,
        lr_lambda=args.lr_lambda,
        lambda_min=args.lambda_min,
        lambda_init=args.lambda_init,
        init_scale=args.init_scale,
        prior_weight=args.prior_weight,
        seed=args.seed,
    )
    result = attack(
        model,
        train_size,
        config,
        device=args.device,
        progress=not args.no_progress,
        run_dir=args.out,
        model_path=str(Path(args.model).resolve()),
        dataset=meta.get("dataset"),
        subset=meta.get("subset"),
    )
    print(
        f"kkt: {len(result.images)} candidates x {config.steps} steps in {result.train_seconds:.1f} s; "
        f"final KKT residual {result.history['kkt'][-1]:.4f} (relative to the unit-norm weights)"
    )
    print(
        f"run directory: {Path(args.out).resolve()}  (score it with `tldr-fast evaluate {args.out}`)"
    )
    return 0
