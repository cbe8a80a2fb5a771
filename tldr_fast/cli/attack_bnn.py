"""`tldr-fast attack bnn`: train a binarised MLP, encode it as CNF, sample inputs of every label by SAT."""

from __future__ import annotations

import argparse


def register(commands, attacks) -> None:
    p = attacks.add_parser(
        "bnn",
        help="BNN inversion by SAT: CNF encoding of a binarised MLP, diverse inputs per label",
        description=(
            "Train a binarised MLP on binarised SIZE x SIZE digits, encode it exactly as CNF, and sample "
            "inputs the network assigns to each label. Writes samples_label<y>.png per label, bnn.json "
            "(accuracy, formula sizes per layer, timings, counts) and the model. With --garbage, retrains "
            "with the samples as an extra class and reports the confidence change on OOD inputs."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--dataset", default="mnist-bundled", help="training data (tldr_fast.datasets name)"
    )
    p.add_argument(
        "--size", type=int, default=10, help="input grid: images are pooled to SIZE x SIZE"
    )
    p.add_argument("--hidden", type=int, nargs="+", default=[100, 50], help="hidden layer widths")
    p.add_argument(
        "--pixel-threshold",
        type=float,
        default=0.3,
        help="a pooled cell is +1 when its mean exceeds this",
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--samples", type=int, default=100, help="samples per label")
    p.add_argument(
        "--labels", type=int, nargs="+", default=None, help="labels to invert (default: all)"
    )
    p.add_argument("--sampler", choices=("auto", "cmsgen", "blocking"), default="auto")
    p.add_argument(
        "--encoding",
        choices=("totalizer", "cardenc"),
        default="totalizer",
        help="hidden-neuron encoding",
    )
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per label")
    p.add_argument(
        "--min-on", type=int, default=None, help="at least this many +1 pixels per sample"
    )
    p.add_argument(
        "--max-on", type=int, default=None, help="at most this many +1 pixels per sample"
    )
    p.add_argument(
        "--garbage",
        action="store_true",
        help="retrain with the samples as a garbage class; OOD report",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run, writes={"--out": "dir"})


def run(args) -> int:
    import json
    import time
    from pathlib import Path

    import torch

    from tldr_fast import datasets, serialization
    from tldr_fast.attacks import bnn
    from tldr_fast.attacks.bnn_model import BinarizedMLP, pool_images
    from tldr_fast.attacks.bnn_ood import garbage_class_experiment
    from tldr_fast.report import tile
    from tldr_fast.training import train_classifier
    from tldr_fast.validation import check_positive_int

    check_positive_int(args.samples, "--samples")
    check_positive_int(args.epochs, "--epochs")
    out = Path(args.out)
    images, labels = datasets.load(args.dataset, split="train", seed=args.seed)
    test_images, test_labels = datasets.load(args.dataset, split="test", seed=args.seed)
    pooled, test_pooled = pool_images(images, args.size), pool_images(test_images, args.size)
    num_classes = int(labels.max()) + 1
    model = BinarizedMLP(
        1,
        num_classes,
        args.size,
        grid=args.size,
        hidden=tuple(args.hidden),
        pixel_threshold=args.pixel_threshold,
    )
    train_classifier(
        model,
        pooled,
        labels,
        epochs=args.epochs,
        batch_size=128,
        lr=args.lr,
        seed=args.seed,
        test=(test_pooled, test_labels),
        progress=False,
        device="cpu",
    )
    serialization.save(out / "model.safetensors", model)
    start = time.perf_counter()
    formula = bnn.encode(model, args.encoding)
    encode_seconds = time.perf_counter() - start
    report = {
        "dataset": args.dataset,
        "size": args.size,
        "hidden": args.hidden,
        "encoding": args.encoding,
        "train_accuracy": model.train_report.train_accuracy,
        "test_accuracy": model.train_report.test_accuracy,
        "encode_seconds": encode_seconds,
        "formula": formula.sizes(),
        "labels": [],
    }
    print(
        f"BNN test accuracy {model.train_report.test_accuracy:.4f}; CNF {formula.num_vars} variables, "
        f"{len(formula.clauses)} clauses ({encode_seconds:.1f} s)"
    )
    all_pixels = []
    for label in args.labels if args.labels is not None else range(num_classes):
        result = bnn.invert(
            model,
            label,
            num_samples=args.samples,
            sampler=args.sampler,
            time_limit=args.time_limit,
            seed=args.seed + label,
            min_on=args.min_on,
            max_on=args.max_on,
            formula=formula,
        )
        entry = result.to_dict()
        report["labels"].append(entry)
        print(
            f"label {label}: {entry['samples']} samples, {result.status}, {result.seconds:.1f} s, "
            f"distinct share {entry['distinct_fraction']:.3f}"
        )
        if len(result.pixels):
            all_pixels.append(result.pixels)
            cells = model.pixels_to_images(torch.as_tensor(result.pixels, dtype=torch.float32))
            rows = [list(cells[i : i + 10]) for i in range(0, len(cells), 10)]
            grid = tile(rows, scale=4)
            serialization.atomic_write(
                out / f"samples_label{label}.png", lambda tmp, g=grid: g.save(tmp, format="PNG")
            )
        serialization.write_json_atomic(
            out / "bnn.json", report
        )  # a run stopped later keeps the labels done
    found = sum(e["samples"] for e in report["labels"])
    seconds = sum(e["seconds"] for e in report["labels"])
    report["total"] = {
        "samples": found,
        "seconds": seconds,
        "samples_per_second": found / seconds if seconds else None,
        "draws": sum(e["draws"] for e in report["labels"]),
    }
    if args.garbage and all_pixels:
        import numpy as np

        noise = torch.rand(
            1000, 1, args.size, args.size, generator=torch.Generator().manual_seed(args.seed)
        )
        ood = {"uniform_noise": noise}
        try:
            omniglot, _ = datasets.load("omniglot", split="background_small1", subset=None)
            ood["omniglot_inverted"] = pool_images(
                1.0 - omniglot, args.size
            )  # strokes bright on dark, like MNIST
        except FileNotFoundError as err:
            print(f"omniglot not found, OOD report uses noise only: {str(err).splitlines()[0]}")
        report["garbage_class"] = garbage_class_experiment(
            model,
            pooled,
            labels,
            (test_pooled, test_labels),
            np.concatenate(all_pixels),
            ood,
            epochs=args.epochs,
            lr=args.lr,
            seed=args.seed,
        )
        print(json.dumps(report["garbage_class"], indent=1))
    serialization.write_json_atomic(out / "bnn.json", report)
    print(f"wrote {out / 'bnn.json'}")
    return 0
