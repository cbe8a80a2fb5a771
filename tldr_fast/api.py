"""`invert` and `reconstruct`: train the generators, sample their images, return a `Result`.

A Result saved with `tldr_fast.save(run_dir, result)` (or `result.save_to(run_dir)`) is a run
directory, the format the evaluation reads:

    RUN_DIR/images.safetensors      "images" (M, C, H, W) float32 in [0, 1], "labels" (M,) int64,
                                    "generator_index" (M,) int64; metadata format tldr-fast/run-images
    RUN_DIR/config.json             {"format", "kind", "config", "num_classes", "image_shape",
                                     "model", "dataset", "subset", "seed"}
    RUN_DIR/history.json            {"steps": n, "terms": {term: [value per step, mean over generators]}}
    RUN_DIR/grid.png                rows = classes, columns = generators x samples
    RUN_DIR/generators.safetensors  the K generators' stacked weights and their constructor arguments
    RUN_DIR/kkt-lambdas.safetensors "lambdas" (K, B) float32, the KKT term's multipliers per
                                    generator and batch position (only when eta_kkt > 0)
    RUN_DIR/checkpoints/            training checkpoints (when trained with a run_dir)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import stack_module_state

from tldr_fast import conditioning, distributed, engine, serialization
from tldr_fast.config import InversionConfig, ReconstructionConfig, _EngineConfig, config_from_dict
from tldr_fast.features import FeatureSpec, with_features
from tldr_fast.models.generator import Generator
from tldr_fast.objective import generate, generator_parameters, kkt_lambdas, needs_features
from tldr_fast.run_dir import claim, drop_checkpoints, run_intent
from tldr_fast.serialization import TensorInfo

RUN_FORMAT = "tldr-fast/run"
IMAGES_FORMAT = "tldr-fast/run-images"
GENERATORS_FORMAT = "tldr-fast/generators"
KKT_LAMBDAS_FORMAT = "tldr-fast/run-kkt-lambdas"
KKT_LAMBDAS_FILE = "kkt-lambdas.safetensors"


@dataclass
class Result:
    """Images sampled from the trained generators, with their labels, the generators and the history."""

    kind: str
    images: torch.Tensor  # (M, C, H, W) float32 in [0, 1], on the CPU
    labels: torch.Tensor  # (M,) int64: the conditioning label of each image
    generator_index: torch.Tensor  # (M,) int64: which generator made it
    generators: list[Generator]
    history: dict[str, list[float]]
    config: _EngineConfig
    num_classes: int
    image_shape: tuple[int, int, int]
    model: str | None = None
    dataset: str | None = None
    subset: int | None = None
    # Wall seconds of the training loop, and of the first compiled call within it (tracing, code
    # generation, one step; None when the step was not compiled): compile time apart from step time.
    train_seconds: float | None = None
    compile_seconds: float | None = None
    # eta_kkt > 0: the KKT term's multipliers lambda (K, B) float32, on the CPU; batch position i
    # has the label balanced_labels(B, num_classes)[i] in every generator. None otherwise.
    kkt_lambdas: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def grid(self, padding: int = 2) -> np.ndarray:
        """uint8 picture (H', W', C): row y holds class y's images, generator after generator."""
        c, h, w = self.image_shape
        rows = [self.images[self.labels == y] for y in range(self.num_classes)]
        columns = max((len(r) for r in rows), default=0)
        canvas = torch.ones(
            c, self.num_classes * (h + padding) + padding, columns * (w + padding) + padding
        )
        for y, row in enumerate(rows):
            for j, image in enumerate(row):
                top, left = padding + y * (h + padding), padding + j * (w + padding)
                canvas[:, top : top + h, left : left + w] = image
        array = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return array[:, :, 0] if c == 1 else array

    def save_to(self, run_dir: str | Path) -> Path:
        """Write the run directory (see the module docstring); each file atomically."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_images(run_dir / "images.safetensors", self)
        params, _ = stack_module_state(self.generators)
        serialization.write_safetensors_atomic(
            run_dir / "generators.safetensors",
            params,
            {
                "format": GENERATORS_FORMAT,
                "generator": self.generators[0].config(),
                "num_generators": len(self.generators),
            },
        )
        if self.kkt_lambdas is not None:
            serialization.write_safetensors_atomic(
                run_dir / KKT_LAMBDAS_FILE,
                {"lambdas": self.kkt_lambdas.float().contiguous()},
                {"format": KKT_LAMBDAS_FORMAT},
            )
        serialization.write_json_atomic(
            run_dir / "history.json",
            {
                "steps": len(next(iter(self.history.values()), [])),
                "terms": self.history,
            },
        )
        serialization.write_json_atomic(
            run_dir / "config.json",
            {
                "format": RUN_FORMAT,
                "kind": self.kind,
                "config": self.config.to_dict(),
                "num_classes": self.num_classes,
                "image_shape": list(self.image_shape),
                "model": self.model,
                "dataset": self.dataset,
                "subset": self.subset,
                "seed": self.config.seed,
                "train_seconds": self.train_seconds,
                "compile_seconds": self.compile_seconds,
                **self.extra,
            },
        )
        _write_png(run_dir / "grid.png", self.grid())
        return run_dir

    @classmethod
    def load_from(cls, run_dir: str | Path) -> Result:
        """Read a run directory; every file's header is checked before its tensors are read."""
        run_dir = Path(run_dir)
        header = serialization.read_json_object(run_dir / "config.json")
        try:
            config = config_from_dict(header.get("kind"), header.get("config"))
            num_classes, image_shape = _run_shape(header)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{run_dir / 'config.json'}: {err}") from err
        images = _read_images(run_dir / "images.safetensors", image_shape)
        generators = _read_generators(run_dir / "generators.safetensors")
        lambdas_path = run_dir / KKT_LAMBDAS_FILE
        lambdas = (
            serialization.read_safetensors(
                lambdas_path,
                {"lambdas": TensorInfo(torch.float32, (config.num_generators, config.batch_size))},
                "the KKT multipliers (num_generators, batch_size) of its config",
            )[0]["lambdas"]
            if lambdas_path.exists()
            else None
        )
        history = serialization.read_json_object(run_dir / "history.json").get("terms")
        if not isinstance(history, dict) or not all(
            isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
            for v in history.values()
        ):
            raise ValueError(
                f"{run_dir / 'history.json'}: 'terms' must map each term to a list of numbers"
            )
        known = {
            "format",
            "kind",
            "config",
            "num_classes",
            "image_shape",
            "model",
            "dataset",
            "subset",
            "seed",
            "train_seconds",
            "compile_seconds",
        }
        return cls(
            kind=config.kind,
            images=images["images"],
            labels=images["labels"],
            generator_index=images["generator_index"],
            generators=generators,
            history=history,
            config=config,
            num_classes=num_classes,
            image_shape=image_shape,
            model=header.get("model"),
            dataset=header.get("dataset"),
            subset=header.get("subset"),
            train_seconds=header.get("train_seconds"),
            compile_seconds=header.get("compile_seconds"),
            kkt_lambdas=lambdas,
            extra={k: v for k, v in header.items() if k not in known},
        )


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _run_shape(header: dict) -> tuple[int, tuple[int, int, int]]:
    num_classes, image_shape = header.get("num_classes"), header.get("image_shape")
    if not _is_count(num_classes, 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r:.80}")
    if not (
        isinstance(image_shape, list)
        and len(image_shape) == 3
        and all(_is_count(s, 1) for s in image_shape)
    ):
        raise ValueError(
            f"image_shape must be three integers >= 1 (C, H, W), got {image_shape!r:.80}"
        )
    return num_classes, tuple(image_shape)


def _read_images(path: Path, image_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    infos, _ = serialization.read_header(path)
    shape = infos["images"].shape if "images" in infos else ()
    count = shape[0] if len(shape) == 4 else 0
    layout = {
        "images": TensorInfo(torch.float32, (count, *image_shape)),
        "labels": TensorInfo(torch.int64, (count,)),
        "generator_index": TensorInfo(torch.int64, (count,)),
    }
    return serialization.read_safetensors(
        path, layout, f"a run's images of shape (M, {', '.join(map(str, image_shape))})"
    )[0]


def _read_generators(path: Path) -> list[Generator]:
    infos, meta = serialization.read_header(path)
    k = meta.get("num_generators")
    if not _is_count(k, 1):
        raise ValueError(f"{path}: num_generators must be an integer >= 1, got {k!r:.80}")
    single = serialization.expected_state(Generator, meta.get("generator"), str(path))
    layout = {name: TensorInfo(info.dtype, (k, *info.shape)) for name, info in single.items()}
    weights, _ = serialization.read_safetensors(
        path, layout, f"{k} stacked generators of its config"
    )
    generators = []
    for index in range(k):
        module = Generator(**meta["generator"])
        module.load_state_dict({name: w[index] for name, w in weights.items()})
        generators.append(module)
    return generators


serialization.register_format(RUN_FORMAT, Result.load_from)


def _write_images(path: Path, result: Result) -> None:
    tensors = {
        "images": result.images.float().contiguous(),
        "labels": result.labels.long().contiguous(),
        "generator_index": result.generator_index.long().contiguous(),
    }
    # Plain safetensors metadata for any reader, plus the tldr-fast header read_safetensors expects.
    serialization.write_safetensors_atomic(
        path, tensors, {"format": IMAGES_FORMAT}, plain_metadata={"format": IMAGES_FORMAT}
    )


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    serialization.atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


# -- sampling -----------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(trained: engine.Trained, samples_per_class: int, seed: int, dropout: bool = True):
    """(images, labels, generator_index): samples_per_class images of every class from every generator.

    dropout=True samples the way the generators were trained (dropout active, as the paper uses it
    for diversity); BatchNorm always uses the statistics of the sampling batch.
    """
    cfg, template = trained.config, trained.template
    n, k = template.num_classes, cfg.num_generators
    device = next(iter(trained.params.values())).device
    labels = conditioning.balanced_labels(n * samples_per_class, n, device).sort().values
    stacked = labels.expand(k, -1).contiguous()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        z = torch.randn(k, len(labels), template.latent_dim, device=device)
        noise = (
            torch.randn(k * len(labels), n, device=device) if cfg.vector_kind == "soft" else None
        )
        vectors = conditioning.condition_vectors(stacked.flatten(), n, cfg.vector_kind, noise).view(
            k, len(labels), n
        )
        template.train(dropout)
        try:
            x = generate(
                template, generator_parameters(trained.params), trained.buffers, z, stacked, vectors
            )
        finally:
            template.train(True)
    index = torch.arange(k, device=device).repeat_interleave(len(labels))
    return x.flatten(0, 1).float().cpu(), stacked.flatten().cpu(), index.cpu()


# -- the public entry points --------------------------------------------------------------------


def _run(
    kind_cls,
    classifier,
    num_classes,
    image_shape,
    config,
    run_dir,
    resume,
    overwrite,
    progress,
    samples_per_class,
    features,
    keep_checkpoints,
    **meta,
) -> Result:
    config = kind_cls() if config is None else config
    if not isinstance(config, kind_cls):
        raise TypeError(f"config must be a {kind_cls.__name__}, got {type(config).__name__}")
    if (
        isinstance(samples_per_class, bool)
        or not isinstance(samples_per_class, int)
        or samples_per_class < 1
    ):
        raise ValueError(f"samples_per_class must be an integer >= 1, got {samples_per_class!r}")
    if features is not None or needs_features(config):
        classifier = with_features(classifier, features)
    if run_dir is None:
        return _train_and_sample(
            classifier,
            num_classes,
            image_shape,
            config,
            None,
            resume,
            overwrite,
            progress,
            samples_per_class,
            features,
            keep_checkpoints,
            meta,
        )
    # The directory is held from before training until the result is saved in it.
    with claim(run_dir, run_intent(resume, overwrite)):
        return _train_and_sample(
            classifier,
            num_classes,
            image_shape,
            config,
            run_dir,
            resume,
            overwrite,
            progress,
            samples_per_class,
            features,
            keep_checkpoints,
            meta,
        )


def _train_and_sample(
    classifier,
    num_classes,
    image_shape,
    config,
    run_dir,
    resume,
    overwrite,
    progress,
    samples_per_class,
    features,
    keep_checkpoints,
    meta,
) -> Result:
    start = time.perf_counter()
    trained = engine.train(
        classifier,
        num_classes,
        image_shape,
        config,
        run_dir=run_dir,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )
    train_seconds = time.perf_counter() - start
    images, labels, index = sample_images(trained, samples_per_class, seed=config.seed + 1)
    shard = distributed.current_shard(config.batch_size)  # the images are the same on every rank
    generators = [trained.generator(i).cpu() for i in range(config.num_generators)]
    lambdas = kkt_lambdas(trained.params, config)
    result = Result(
        kind=config.kind,
        images=images,
        labels=labels,
        generator_index=index,
        generators=generators,
        history=trained.history,
        config=config,
        num_classes=num_classes,
        image_shape=tuple(int(s) for s in image_shape),
        train_seconds=train_seconds,
        compile_seconds=trained.compile_seconds,
        kkt_lambdas=None if lambdas is None else lambdas.detach().float().cpu(),
        # A layer name is recorded so the evaluation reads the same features; a callable cannot be.
        extra={
            **distributed.run_record(shard),
            **({"features": features} if isinstance(features, str) else {}),
        },
        **meta,
    )
    if run_dir is not None:
        distributed.rank_zero(shard, result.save_to, run_dir)
        if (
            not keep_checkpoints
        ):  # the run is complete in its outputs; checkpoints only serve a resume
            distributed.rank_zero(shard, drop_checkpoints, run_dir)
    return result


def invert(
    classifier: nn.Module,
    num_classes: int,
    image_shape,
    config: InversionConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    samples_per_class: int = 10,
    model: str | None = None,
    dataset: str | None = None,
    subset: int | None = None,
    features: FeatureSpec = None,
    keep_checkpoints: bool = True,
) -> Result:
    """Network inversion (soft vectors, KL + CE + cosine + orthogonality) of a trained classifier.

    With run_dir, the directory is held (one writer) from the start until the Result is saved there
    at the end, checkpoints are written there during training; it must be empty unless
    resume=True (continue from the newest readable checkpoint) or overwrite=True (delete the run
    it holds first). model/dataset/subset are recorded in config.json for the evaluation.
    features: where the diversity terms read the classifier's penultimate features
    (`tldr_fast.features.with_features`): None (its forward_with_features, else the input of its
    last nn.Linear), a submodule name (its output, flattened; recorded in config.json) or a
    callable x -> (logits, features). keep_checkpoints=False deletes the checkpoints once the
    Result is saved (a finished run is then complete in its outputs, and cannot be resumed).
    """
    return _run(
        InversionConfig,
        classifier,
        num_classes,
        image_shape,
        config,
        run_dir,
        resume,
        overwrite,
        progress,
        samples_per_class,
        features,
        keep_checkpoints,
        model=model,
        dataset=dataset,
        subset=subset,
    )


def reconstruct(
    classifier: nn.Module,
    num_classes: int,
    image_shape,
    config: ReconstructionConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    samples_per_class: int = 10,
    model: str | None = None,
    dataset: str | None = None,
    subset: int | None = None,
    features: FeatureSpec = None,
    keep_checkpoints: bool = True,
) -> Result:
    """Training-like data reconstruction (hot vectors, all nine terms); arguments as in `invert`."""
    return _run(
        ReconstructionConfig,
        classifier,
        num_classes,
        image_shape,
        config,
        run_dir,
        resume,
        overwrite,
        progress,
        samples_per_class,
        features,
        keep_checkpoints,
        model=model,
        dataset=dataset,
        subset=subset,
    )
