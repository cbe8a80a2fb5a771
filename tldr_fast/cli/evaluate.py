"""`tldr-fast evaluate RUN_DIR`: score a run against its target's training data, write metrics.json and report.html."""

from __future__ import annotations

import argparse


def register(commands, attacks) -> None:
    p = commands.add_parser(
        "evaluate",
        help="measure how much training data a run recovered (SSIM protocols, held-out gap, fidelity)",
        description=(
            "Compare a run's images with the target's training images (authors' Hungarian protocol, "
            "Haim et al.'s nearest-neighbour protocol), with an equally sized held-out set from the "
            "test split (the leakage gap, with a bootstrap interval), and score fidelity. Writes "
            "RUN_DIR/metrics.json and a self-contained RUN_DIR/report.html, and prints a summary. "
            "Under torchrun the ranks share the SSIM matrices and rank 0 writes and prints."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="directory with images.safetensors and config.json"
    )
    p.add_argument(
        "--dataset",
        "--train-data",
        dest="train_data",
        metavar="NAME",
        default=None,
        help="dataset the target was trained on (default: from the model file or config.json)",
    )
    p.add_argument(
        "--subset",
        type=int,
        default=None,
        help="balanced training subset size the target used (default: from the model file or config.json)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of that subset (default: recorded seed)"
    )
    from tldr_fast.cli.train import add_data_root_argument

    add_data_root_argument(p)
    p.add_argument(
        "--threshold", type=float, default=0.4, help="SSIM threshold for 'reconstructed'"
    )
    p.add_argument(
        "--heldout",
        choices=("test", "none"),
        default="test",
        help="'test': compare against a balanced held-out set from the test split; 'none': skip the gap",
    )
    p.add_argument(
        "--evaluator",
        default=None,
        help="evaluator model file; 'none' skips it; default: train an MLP on data disjoint from the target's",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap replicates for the gap interval"
    )
    p.add_argument(
        "--features",
        metavar="LAYER",
        default=None,
        help="submodule of the target whose output (flattened) the feature similarity compares "
        "(default: the run's recorded layer, else forward_with_features or the last nn.Linear's input)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu or cuda (default: cuda when available; under torchrun the rank's GPU, or the CPU with gloo)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run, writes={"RUN_DIR": "run"})


def run(args) -> int:
    from tldr_fast import distributed
    from tldr_fast.validation import check_in_range, check_positive_int

    check_in_range(args.threshold, "--threshold", 0.0, 1.0)
    check_positive_int(args.bootstrap, "--bootstrap")
    if args.subset is not None:
        check_positive_int(args.subset, "--subset")
    # Launched by torchrun: join its process group; the ranks share the SSIM matrices.
    rank_device = distributed.init_from_env()
    try:
        return _evaluate_and_report(args, args.device or rank_device)
    finally:
        if rank_device is not None:
            distributed.dist.destroy_process_group()


def _evaluate_and_report(args, device) -> int:
    import torch.distributed as dist

    from tldr_fast.evaluate import evaluate_run
    from tldr_fast.report import summary_rows
    from tldr_fast.run_dir import claim

    evaluator = False if args.evaluator == "none" else args.evaluator
    with claim(args.run_dir, "existing", "RUN_DIR"):  # no run may write into it meanwhile
        metrics = evaluate_run(
            args.run_dir,
            train_data=args.train_data,
            subset=args.subset,
            heldout_data=None if args.heldout == "none" else "test",
            evaluator=evaluator,
            seed=args.seed,
            device=device,
            data_root=args.data_root,
            threshold=args.threshold,
            num_bootstrap=args.bootstrap,
            progress=not args.no_progress,
            features=args.features,
        )
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0  # rank 0 reports
    rows = summary_rows(metrics)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print(
        f"wrote {args.run_dir}/metrics.json and {args.run_dir}/report.html ({metrics['seconds']:.1f} s)"
    )
    return 0
