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
    RUN_DIR/checkpoints/            training checkpoints (when trained with a run_dir)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import stack_module_state

from tldr_fast import conditioning, distributed, engine, serialization
from tldr_fast.config import InversionConfig, ReconstructionConfig, _EngineConfig, config_from_dict
from tldr_fast.models.generator import Generator
from tldr_fast.objective import generate

RUN_FORMAT = "tldr-fast/run"
IMAGES_FORMAT = "tldr-fast/run-images"
GENERATORS_FORMAT = "tldr-fast/generators"


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
    extra: dict = field(default_factory=dict)

    def grid(self, padding: int = 2) -> np.ndarray:
        """uint8 picture (H', W', C): row y holds class y's images, generator after generator."""
        c, h, w = self.image_shape
        rows = [self.images[self.labels == y] for y in range(self.num_classes)]
        columns = max((len(r) for r in rows), default=0)
        canvas = torch.ones(c, self.num_classes * (h + padding) + padding, columns * (w + padding) + padding)
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
            {"format": GENERATORS_FORMAT, "generator": self.generators[0].config(), "num_generators": len(self.generators)},
        )
        serialization.write_json_atomic(run_dir / "history.json", {
            "steps": len(next(iter(self.history.values()), [])), "terms": self.history,
        })
        serialization.write_json_atomic(run_dir / "config.json", {
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
        })
        _write_png(run_dir / "grid.png", self.grid())
        return run_dir

    @classmethod
    def load_from(cls, run_dir: str | Path) -> Result:
        run_dir = Path(run_dir)
        header = json.loads((run_dir / "config.json").read_text())
        images, _ = serialization.read_safetensors(run_dir / "images.safetensors")
        weights, meta = serialization.read_safetensors(run_dir / "generators.safetensors")
        generators = []
        for k in range(meta["num_generators"]):
            module = Generator(**meta["generator"])
            module.load_state_dict({name: w[k] for name, w in weights.items()})
            generators.append(module)
        history = json.loads((run_dir / "history.json").read_text())["terms"]
        known = {"format", "kind", "config", "num_classes", "image_shape", "model", "dataset", "subset", "seed",
                 "train_seconds", "compile_seconds"}
        return cls(
            kind=header["kind"],
            images=images["images"],
            labels=images["labels"],
            generator_index=images["generator_index"],
            generators=generators,
            history=history,
            config=config_from_dict(header["kind"], header["config"]),
            num_classes=header["num_classes"],
            image_shape=tuple(header["image_shape"]),
            model=header.get("model"),
            dataset=header.get("dataset"),
            subset=header.get("subset"),
            train_seconds=header.get("train_seconds"),
            compile_seconds=header.get("compile_seconds"),
            extra={k: v for k, v in header.items() if k not in known},
        )


serialization.register_format(RUN_FORMAT, Result.load_from)


def _write_images(path: Path, result: Result) -> None:
    from safetensors.torch import save_file

    tensors = {
        "images": result.images.float().contiguous(),
        "labels": result.labels.long().contiguous(),
        "generator_index": result.generator_index.long().contiguous(),
    }
    # Plain safetensors metadata for any reader, plus the tldr-fast header read_safetensors expects.
    metadata = {"format": IMAGES_FORMAT, "tldr_fast": json.dumps({"format": IMAGES_FORMAT})}
    serialization.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


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
        noise = torch.randn(k * len(labels), n, device=device) if cfg.vector_kind == "soft" else None
        vectors = conditioning.condition_vectors(stacked.flatten(), n, cfg.vector_kind, noise).view(k, len(labels), n)
        template.train(dropout)
        try:
            x = generate(template, trained.params, trained.buffers, z, stacked, vectors)
        finally:
            template.train(True)
    index = torch.arange(k, device=device).repeat_interleave(len(labels))
    return x.flatten(0, 1).float().cpu(), stacked.flatten().cpu(), index.cpu()


# -- the public entry points --------------------------------------------------------------------


def _run(
    kind_cls, classifier, num_classes, image_shape, config, run_dir, resume, progress, samples_per_class, **meta
) -> Result:
    config = kind_cls() if config is None else config
    if not isinstance(config, kind_cls):
        raise TypeError(f"config must be a {kind_cls.__name__}, got {type(config).__name__}")
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
        raise ValueError(f"samples_per_class must be an integer >= 1, got {samples_per_class!r}")
    start = time.perf_counter()
    trained = engine.train(classifier, num_classes, image_shape, config, run_dir=run_dir, resume=resume, progress=progress)
    train_seconds = time.perf_counter() - start
    images, labels, index = sample_images(trained, samples_per_class, seed=config.seed + 1)
    shard = distributed.current_shard(config.batch_size)  # the images are the same on every rank
    generators = [trained.generator(i).cpu() for i in range(config.num_generators)]
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
        extra=distributed.run_record(shard),
        **meta,
    )
    if run_dir is not None:
        distributed.rank_zero(shard, result.save_to, run_dir)
    return result


def invert(
    classifier: nn.Module,
    num_classes: int,
    image_shape,
    config: InversionConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    samples_per_class: int = 10,
    model: str | None = None,
    dataset: str | None = None,
    subset: int | None = None,
) -> Result:
    """Network inversion (soft vectors, KL + CE + cosine + orthogonality) of a trained classifier.

    With run_dir, checkpoints are written there during training and the Result is saved there at
    the end; resume=True continues from the newest checkpoint. model/dataset/subset are recorded in
    config.json for the evaluation.
    """
    return _run(InversionConfig, classifier, num_classes, image_shape, config, run_dir, resume, progress,
                samples_per_class, model=model, dataset=dataset, subset=subset)


def reconstruct(
    classifier: nn.Module,
    num_classes: int,
    image_shape,
    config: ReconstructionConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    samples_per_class: int = 10,
    model: str | None = None,
    dataset: str | None = None,
    subset: int | None = None,
) -> Result:
    """Training-like data reconstruction (hot vectors, all nine terms); arguments as in `invert`."""
    return _run(ReconstructionConfig, classifier, num_classes, image_shape, config, run_dir, resume, progress,
                samples_per_class, model=model, dataset=dataset, subset=subset)
