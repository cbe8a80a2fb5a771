"""`tldr-fast attack dfm`: Data-from-Model / Data-to-Model chains from a standard and a robust origin."""

from __future__ import annotations

import argparse

from tldr_fast.cli.train import ARCHS as TRAIN_ARCHS
from tldr_fast.cli.train import add_data_arguments

ARCHS = {**TRAIN_ARCHS, "lenet": "LeNet"}
ORIGINS = ("non-robust", "robust")


def register(commands, attacks) -> None:
    p = attacks.add_parser(
        "dfm",
        help="Data from Model: extract datasets by l2-PGD toward virtual logits, distil, chain k times",
        description=(
            "Train (or load) an origin model M0, then k times: extract a dataset D_i from M_{i-1} by "
            "l2-PGD from background images toward virtual logits, and distil a fresh model M_i on it. "
            "Writes Table 1 (test accuracy per cycle) and Table 2 (l2-PGD robustness) as JSON and "
            "Markdown, a picture of extracted images per cycle, and every model."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_data_arguments(p)
    p.set_defaults(dataset="mnist")
    p.add_argument(
        "--arch", choices=sorted(ARCHS), default="lenet", help="architecture of M0 and of every M_i"
    )
    p.add_argument("--cycles", type=int, default=5, help="k: number of DfM -> DtM cycles")
    p.add_argument(
        "--robust-origin",
        action="store_true",
        help="also run a chain from an l2-PGD adversarially trained M0",
    )
    p.add_argument(
        "--origins",
        nargs="+",
        choices=ORIGINS,
        default=None,
        help="which chains to run (default: non-robust, plus robust with --robust-origin)",
    )
    p.add_argument(
        "--origin",
        default=None,
        help="model file to use as the standard M0 instead of training one",
    )
    p.add_argument(
        "--robust-origin-model",
        default=None,
        help="model file to use as the robust M0 instead of training one",
    )

    g = p.add_argument_group("DfM (extraction)")
    g.add_argument("--extract", type=int, default=50_000, help="images extracted per cycle")
    g.add_argument(
        "--epsilon", type=float, default=10.0, help="l2 radius of the extraction perturbation"
    )
    g.add_argument("--steps", type=int, default=5, help="PGD steps per extracted batch")
    g.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="PGD step size (default 2.5 * epsilon / steps)",
    )
    g.add_argument("--extract-batch-size", type=int, default=1000)
    g.add_argument("--background", default="omniglot", help="background dataset name, or 'noise'")
    g.add_argument(
        "--background-split",
        default=None,
        help="split of the background dataset (default: train; omniglot: both small background sets)",
    )
    g.add_argument(
        "--background-count",
        type=int,
        default=10_000,
        help="background images to draw from (noise: how many)",
    )
    g.add_argument(
        "--resize-background",
        action="store_true",
        help="resize backgrounds of another image shape to the model's",
    )
    g.add_argument(
        "--invert-background",
        action="store_true",
        help="use 1 - x (Omniglot strokes are dark on white, MNIST's bright on black)",
    )

    g = p.add_argument_group("DtM (distillation) and origin training")
    g.add_argument("--origin-epochs", type=int, default=1)
    g.add_argument("--distill-epochs", type=int, default=2)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument(
        "--adv-epsilon",
        type=float,
        default=2.0,
        help="l2 radius of adversarial training for the robust M0",
    )
    g.add_argument("--adv-steps", type=int, default=3, help="PGD steps of adversarial training")

    g = p.add_argument_group("robustness evaluation (Table 2)")
    g.add_argument("--eval-eps", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0])
    g.add_argument(
        "--eval-steps", type=int, default=20, help="l2-PGD steps (step size 2.5 * eps / steps)"
    )
    g.add_argument(
        "--eval-size",
        type=int,
        default=1000,
        help="test images attacked per model (clean accuracy uses all)",
    )
    g.add_argument(
        "--test-size",
        type=int,
        default=None,
        help="use only the first N test images (default: all)",
    )

    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--out", default="dfm-run", help="directory for dfm.json, dfm.md, dfm.png and the models"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run, writes={"--out": "dir"})


def run(args) -> int:
    import shlex
    import sys
    import time
    from pathlib import Path

    import torch

    from tldr_fast import datasets, models, serialization, training
    from tldr_fast.attacks import dfm
    from tldr_fast.report import png_bytes
    from tldr_fast.validation import check_positive_int

    check_positive_int(args.cycles, "--cycles (k)")
    extraction = dfm.ExtractionConfig(
        num_images=args.extract,
        epsilon=args.epsilon,
        steps=args.steps,
        step_size=args.step_size,
        batch_size=args.extract_batch_size,
    )
    distillation = dfm.TrainConfig(
        epochs=args.distill_epochs, batch_size=args.batch_size, lr=args.lr
    )
    origin_training = dfm.TrainConfig(
        epochs=args.origin_epochs, batch_size=args.batch_size, lr=args.lr
    )
    device = torch.device(args.device) if args.device else training.default_device()
    progress = not args.no_progress
    out = Path(args.out)
    started = time.perf_counter()

    train = datasets.load_dataset(
        args.dataset, "train", root=args.data_root, subset=args.subset, seed=args.seed
    )
    test = datasets.load_dataset(args.dataset, "test", root=args.data_root)
    image_shape = tuple(train.images.shape[1:])
    backgrounds = _backgrounds(args, image_shape).to(device)
    test_size = (
        check_positive_int(args.test_size, "--test-size") if args.test_size is not None else None
    )
    test_x, test_y = test.images[:test_size].to(device), test.labels[:test_size].to(device)
    arch = getattr(models, ARCHS[args.arch])

    def make_model():
        c, h, w = image_shape
        return arch(in_channels=c, num_classes=train.num_classes, image_size=(h, w)).to(device)

    wanted = args.origins or (
        ["non-robust", "robust"]
        if args.robust_origin or args.robust_origin_model
        else ["non-robust"]
    )
    command = "tldr-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results, origin_seconds = {}, {}

    def write_tables(result=None) -> None:
        # Called after every evaluated model too, so a long run leaves complete partial tables.
        markdown = _write_tables(
            out, command, args, str(device), time.perf_counter() - started, origin_seconds, results
        )
        if result is None:
            print(markdown)

    for name in ORIGINS:
        if name not in wanted:
            continue
        build = _robust_origin if name == "robust" else _standard_origin
        origin, origin_seconds[name] = build(
            args, make_model, train, origin_training, device, progress
        )
        results[name] = dfm.run_chain(
            origin,
            backgrounds,
            make_model,
            test_x,
            test_y,
            cycles=args.cycles,
            extraction=extraction,
            distillation=distillation,
            robustness_eps=args.eval_eps,
            robustness_size=args.eval_size,
            robustness_steps=args.eval_steps,
            seed=args.seed,
            progress=progress,
            on_model=lambda r, name=name: (results.__setitem__(name, r), write_tables(r)),
        )
        for i, model in enumerate(results[name].models):
            serialization.save(
                out / f"{name}-M{i}.safetensors", model, metadata={"dfm_origin": name, "cycle": i}
            )
        print(
            f"{name} origin: "
            + ", ".join(f"M{i} {100 * a:.1f}%" for i, a in enumerate(results[name].accuracy))
        )
    write_tables()
    picture = _samples_picture(train.images, train.labels, results)
    serialization.atomic_write(out / "dfm.png", lambda tmp: tmp.write_bytes(png_bytes(picture)))
    print(f"wrote {out / 'dfm.json'}, {out / 'dfm.md'}, {out / 'dfm.png'} and the models in {out}")
    return 0


def _write_tables(
    out, command: str, args, device: str, seconds: float, origin_seconds: dict, results: dict
) -> str:
    """dfm.json (everything) and dfm.md (Tables 1 and 2) in `out`; returns the Markdown."""
    from tldr_fast import serialization
    from tldr_fast.attacks import dfm

    payload = {
        "command": command,
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "device": device,
        "seconds_total": seconds,
        "origin_training_seconds": origin_seconds,
        "results": {name: r.to_dict() for name, r in results.items()},
    }
    serialization.write_json_atomic(out / "dfm.json", payload)
    markdown = (
        f"Command: `{command}` ({seconds / 60:.1f} min on {device})\n\n"
        f"Table 1: test accuracy (%) of M_i on the {args.dataset} test set\n\n{dfm.accuracy_table(results)}\n"
        f"Table 2: accuracy (%) under l2-PGD, {args.eval_steps} steps, step 2.5*eps/{args.eval_steps}, "
        f"first {args.eval_size} test images (eps 0: {f'the first {args.test_size}' if args.test_size else 'all'} test images)\n\n{dfm.robustness_table(results)}"
    )
    serialization.atomic_write(out / "dfm.md", lambda tmp: tmp.write_text(markdown))
    return markdown


def _backgrounds(args, image_shape):
    from tldr_fast import datasets
    from tldr_fast.attacks import dfm

    if args.background == "noise":
        return dfm.noise_backgrounds(args.background_count, image_shape, seed=args.seed)
    if args.background == "omniglot" and args.background_split is None:
        import torch

        images = torch.cat(
            [
                datasets.load("omniglot", split, root=args.data_root)[0]
                for split in ("background_small1", "background_small2")
            ]
        )
    else:
        images, _ = datasets.load(
            args.background, args.background_split or "train", root=args.data_root
        )
    if images.shape[0] > args.background_count:
        import torch

        keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
        images = images[keep[: args.background_count]]
    images = dfm.prepare_backgrounds(images, image_shape, resize=args.resize_background)
    return 1.0 - images if args.invert_background else images


def _standard_origin(args, make_model, train, config, device, progress):
    import time

    from tldr_fast import serialization, training

    if args.origin:
        return serialization.load(args.origin).to(device).eval(), 0.0
    import torch

    start = time.perf_counter()
    torch.manual_seed(args.seed)  # the initialisation, like the robust origin's
    model = training.train_classifier(
        make_model(),
        train.images,
        train.labels,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=args.seed,
        device=device,
        progress=progress,
    )
    return model, time.perf_counter() - start


def _robust_origin(args, make_model, train, config, device, progress):
    import time

    import torch

    from tldr_fast import serialization
    from tldr_fast.attacks import dfm

    if args.robust_origin_model:
        return serialization.load(args.robust_origin_model).to(device).eval(), 0.0
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = dfm.adversarial_train(
        make_model(),
        train.images.to(device),
        train.labels.to(device),
        epsilon=args.adv_epsilon,
        steps=args.adv_steps,
        config=config,
        seed=args.seed,
        progress=progress,
    )
    return model, time.perf_counter() - start


def _samples_picture(images, labels, results, columns: int = 5):
    """The paper's Figure 2: row 0 the origin data, row i the images of D_i; one block of columns per origin."""
    from tldr_fast.report import tile

    first = [
        images[int((labels == c).nonzero()[0])] for c in range(columns) if bool((labels == c).any())
    ]
    cycles = max(len(r.samples) for r in results.values())
    rows = [sum(([*first, None] for _ in results), [])[:-1]]
    for i in range(cycles):
        row: list = []
        for r in results.values():
            picks = list(r.samples[i][:columns].cpu()) if i < len(r.samples) else []
            row += picks + [None] * (columns - len(picks)) + [None]
        rows.append(row[:-1])
    return tile(rows, scale=2)
