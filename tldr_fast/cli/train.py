"""`tldr-fast train`: train a classifier on a dataset and write it as a model file."""

from __future__ import annotations

import argparse
from pathlib import Path

ARCHS = {"cnn": "PaperCNN", "mlp": "MLP"}
RECIPES = ("adam", "kkt")


def register(commands, attacks) -> None:
    p = commands.add_parser(
        "train",
        help="train a classifier (the model to attack) and write a .safetensors model file",
        description="Train PaperCNN or MLP on a dataset split, print train/test accuracy, write the model file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_data_arguments(p)
    p.add_argument("--arch", choices=sorted(ARCHS), default="cnn", help="classifier architecture")
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        default="adam",
        help="adam: mini-batch Adam on cross-entropy; kkt: the KKT attack's target (a bias-free "
        "ReLU MLP, small initialisation, full-batch gradient descent to near-zero loss, no "
        "weight decay; --arch, --epochs and --batch-size do not apply)",
    )
    p.add_argument(
        "--kkt-steps",
        type=int,
        default=5000,
        help="kkt recipe: at most this many gradient-descent steps",
    )
    p.add_argument(
        "--kkt-hidden",
        type=int,
        nargs="+",
        default=[1000],
        help="kkt recipe: hidden widths of the MLP",
    )
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="model.safetensors", help="model file to write")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run, writes={"--out": "file"})


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--dataset/--subset/--seed/--data-root, shared by every command that trains on a dataset."""
    from tldr_fast.datasets import NAMES

    p.add_argument("--dataset", choices=NAMES, default="mnist-bundled", help="training data")
    p.add_argument(
        "--subset", type=int, default=None, help="balanced training subset size (e.g. 1000)"
    )
    p.add_argument("--seed", type=int, default=0)
    add_data_root_argument(p)


def add_data_root_argument(p: argparse.ArgumentParser) -> None:
    """--data-root, the same option on every command that reads a dataset from disk."""
    p.add_argument(
        "--data-root",
        default=None,
        help="dataset root (default: $TLDR_DATA, then the data folder beside a source checkout, "
        "then ~/.cache/tldr-fast)",
    )


def train_and_save(
    dataset: str,
    subset: int | None,
    arch: str,
    epochs: int,
    out: str,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    data_root=None,
    device=None,
    progress: bool = True,
):
    """Train `arch` on the dataset's (subset of the) training split, test on its test split, save."""
    from tldr_fast import models, training

    architecture = getattr(models, ARCHS.get(arch, arch))

    def fit(model, train, test):
        training.train_classifier(
            model, train.images, train.labels, epochs=epochs, batch_size=batch_size, lr=lr,
            seed=seed, test=(test.images, test.labels), device=device, progress=progress,
        )  # fmt: skip
        return {"epochs": epochs}

    return _train_on_dataset(dataset, subset, seed, data_root, out, architecture, fit)


def train_kkt_and_save(
    dataset: str,
    subset: int | None,
    out: str,
    seed: int = 0,
    hidden=(1000,),
    steps: int = 5000,
    data_root=None,
    device=None,
    progress: bool = True,
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    delta: float = 1e-5,
):
    """`training.train_kkt_recipe` on a KKTMLP (seeded initialisation), tested and saved like
    `train_and_save`; with a noise_multiplier trained as DP-GD, its privacy in the metadata."""
    from functools import partial

    from tldr_fast import training
    from tldr_fast.attacks.kkt import KKTMLP

    def fit(model, train, test):
        training.train_kkt_recipe(
            model, train.images, train.labels, steps=steps, test=(test.images, test.labels),
            device=device, progress=progress, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, delta=delta, seed=seed,
        )  # fmt: skip
        report = model.train_report
        recipe = {"recipe": "kkt", "steps": steps, "final_loss": report.epoch_losses[-1]}
        return recipe if report.privacy is None else {**recipe, "privacy": report.privacy}

    return _train_on_dataset(
        dataset, subset, seed, data_root, out, partial(KKTMLP, hidden=tuple(hidden)), fit
    )


def _train_on_dataset(dataset, subset, seed, data_root, out, architecture, fit):
    """Build `architecture(in_channels, num_classes, image_size)` from a seed, `fit(model, train,
    test)` it (returning the recipe's metadata), and save it with what `evaluate` needs to rebuild
    its training set: dataset, subset, seed and data root."""
    import time

    from tldr_fast import datasets, serialization, training

    start = time.perf_counter()
    train = datasets.load_dataset(dataset, "train", root=data_root, subset=subset, seed=seed)
    test = datasets.load_dataset(dataset, "test", root=data_root)
    c, h, w = train.images.shape[1:]
    model = training.build_seeded(
        lambda: architecture(in_channels=c, num_classes=train.num_classes, image_size=(h, w)), seed
    )
    recipe = fit(model, train, test)
    report = model.train_report
    metadata = {"dataset": dataset, "subset": subset, "seed": seed, **recipe}
    metadata.update(train_accuracy=report.train_accuracy, test_accuracy=report.test_accuracy)
    if data_root is not None:
        metadata["data_root"] = str(Path(data_root).resolve())
    serialization.save(out, model.cpu(), metadata=metadata)
    report.seconds = time.perf_counter() - start
    return model, report


def run(args) -> int:
    if args.recipe == "kkt":
        model, report = train_kkt_and_save(
            args.dataset,
            args.subset,
            args.out,
            seed=args.seed,
            hidden=args.kkt_hidden,
            steps=args.kkt_steps,
            data_root=args.data_root,
            device=args.device,
            progress=not args.no_progress,
        )
    else:
        model, report = train_and_save(
            args.dataset,
            args.subset,
            args.arch,
            args.epochs,
            args.out,
            seed=args.seed,
            batch_size=args.batch_size,
            lr=args.lr,
            data_root=args.data_root,
            device=args.device,
            progress=not args.no_progress,
        )
    print(
        f"{model.arch} on {args.dataset} (subset {args.subset or 'all'}): "
        f"train accuracy {report.train_accuracy:.4f}, test accuracy {report.test_accuracy:.4f}, "
        f"{report.seconds:.1f} s"
    )
    print(f"wrote {args.out}")
    return 0
