"""Configurations of the two TLDR objectives: frozen dataclasses with the presets `paper` and `authors`.

    inversion:      alpha KL + beta CE + gamma Cos + delta Ortho                 (soft vectors)
    reconstruction: alpha KL + alpha_pert KL' + beta CE + beta_pert CE' + gamma Cos + delta Ortho
                    + eta_tv TV + eta_pix Pix + eta_grad GradNorm                 (hot vectors)

(paper names: alpha' = alpha_pert, beta' = beta_pert, eta1 = eta_tv, eta2 = eta_pix, eta3 = eta_grad;
' marks the term evaluated on the perturbed image.) Beyond the paper, eta_bn weighs a tenth term, the
feature-statistics prior of DeepInversion (Yin et al. 2020): the distance of the generated batch's
per-channel mean and variance at every BatchNorm layer of the classifier from that layer's running
statistics, which summarise the training data. 0 in both presets. eta_kkt (both objectives, 0 in
both presets) weighs the KKT residual of Haim et al. (2022): how far the classifier's weights are
from a non-negative combination of the margin gradients of the generated images.

`paper` is the default: the paper's method with the open choices it leaves made (L2-normalised
Gram, per-sample gradient norms, images in [0, 1]). The paper gives no weights, so `paper` uses the
authors' published weights, except eta_tv: our TV is the paper's per-image *sum* (about 57 for a
real MNIST digit), so with the authors' eta1 = 2 a real digit would pay ~114 in TV against the
classification terms' few units; `paper` uses 0.02 (a real digit's TV then weighs ~1, comparable
to one KL or CE term).
`authors` reproduces the TLDR authors' code; each place where it differs
from the paper is a named field:
- `ortho_normalized=False`: their Gram matrix is of the raw features;
- `grad_norm_mode="batch"`: their norm is of the batch-mean gradient, not the mean per-sample norm;
- `eps=0.6`: their eps 1.2 on a [-1, 1] pixel scale, expressed on our [0, 1] scale;
- `eta_tv=2`: their eta1, applied to the paper's per-image-sum TV;
- `batch_size=1000`, `lr=3e-3`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import ClassVar

from tldr_fast import conditioning, losses
from tldr_fast.models.generator import OUTPUT_ACTIVATIONS

GRAD_NORM_MODES = ("per_sample", "batch")
# The engine's step runs inside torch.func transforms; the `loop` backend (plain autograd, one
# sample at a time) cannot, and is the tests' oracle rather than an engine backend.
ENGINE_GRAD_NORM_BACKENDS = ("auto", "ghost", "vmap")
PRESETS = ("paper", "authors")

# Fields that may change when a run is resumed: they do not alter the trajectory of the steps
# already taken (more steps extend the run; checkpoint and log cadence are bookkeeping; the compiled
# step draws the same noise and computes the same update as the eager one, to float tolerance, and
# so does the chunked one).
# torch.manual_seed takes seeds below 2^64.
MAX_SEED = 2**64 - 1

RESUMABLE_FIELDS = frozenset(
    {"steps", "checkpoint_every", "log_every", "compile", "classifier_chunk_size"}
)


def _check_weight(name: str, value) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"weight {name} must be a finite number >= 0, got {value!r}")


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclass(frozen=True)
class _EngineConfig:
    """Fields shared by both objectives. Batch size is per generator."""

    alpha: float = 5.0
    beta: float = 10.0
    gamma: float = 10.0
    delta: float = 7.0
    steps: int = 500
    batch_size: int = 100
    lr: float = 3e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    num_generators: int = 3
    seed: int = 0
    conditioning: str = "vector-matrix"
    vector_kind: str = "soft"
    latent_dim: int = 100
    generator_width: int = 64
    dropout: float = 0.5
    output_activation: str = "sigmoid"
    ortho_normalized: bool = True
    impl: str = "auto"
    # torch.compile the step (fullgraph) and, on CUDA, replay it as a CUDA graph. Off by default:
    # the first compilation of the double-backward step takes minutes on a CPU, longer than short
    # runs; turn it on for long or large-batch runs (a second process reuses the compile cache).
    compile: bool = False
    # Run the classifier on chunks of at most this many images per generator (None: the whole batch
    # at once): its passes and the gradient norm's double backward then need memory for one chunk;
    # the diversity losses still compare the whole batch. Same gradient up to float rounding.
    classifier_chunk_size: int | None = None
    checkpoint_every: int = 100
    log_every: int = 10
    # Beyond the paper and 0 in both presets: the KKT residual of the classifier's weights against
    # each generator's batch (objective.TERM_WEIGHTS "kkt", docs/kkt.md), with one learnable
    # multiplier per generator and batch position, lambda = kkt_lambda_min + softplus(rho),
    # starting at kkt_lambda_init. The batch's sum stands for a training set of kkt_train_size
    # images (None: the batch itself, the plain sum).
    eta_kkt: float = 0.0
    kkt_train_size: int | None = None
    kkt_lambda_min: float = 0.01
    kkt_lambda_init: float = 0.02

    kind: ClassVar[str] = ""
    WEIGHTS: ClassVar[tuple[str, ...]] = ("alpha", "beta", "gamma", "delta", "eta_kkt")

    def __post_init__(self):
        for name in self.WEIGHTS:
            _check_weight(name, getattr(self, name))
        _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("num_generators (K)", self.num_generators, 1)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("latent_dim", self.latent_dim, 1)
        _check_int("generator_width", self.generator_width, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_int("log_every", self.log_every, 1)
        for name in ("lr", "adam_beta1", "adam_beta2", "dropout"):
            _check_weight(name, getattr(self, name))
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0")
        if self.adam_beta1 >= 1 or self.adam_beta2 >= 1 or self.dropout >= 1:
            raise ValueError(
                f"adam_beta1, adam_beta2 and dropout must be < 1, got {self.adam_beta1}, {self.adam_beta2}, {self.dropout}"
            )
        conditioning.check_mode(self.conditioning)
        _check_choice("vector_kind", self.vector_kind, conditioning.VECTOR_KINDS)
        _check_choice("output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        _check_choice("impl", self.impl, losses.IMPLS)
        if self.classifier_chunk_size is not None:
            _check_int("classifier_chunk_size", self.classifier_chunk_size, 1)
        _check_bool("compile", self.compile)
        _check_bool("ortho_normalized", self.ortho_normalized)
        self._check_batch_compares("the diversity losses", ("gamma", "delta"))
        if self.kkt_train_size is not None:
            _check_int("kkt_train_size", self.kkt_train_size, 1)
        _check_weight("kkt_lambda_min", self.kkt_lambda_min)
        _check_weight("kkt_lambda_init", self.kkt_lambda_init)
        if self.kkt_lambda_init <= self.kkt_lambda_min:
            raise ValueError(
                f"kkt_lambda_init must exceed kkt_lambda_min ({self.kkt_lambda_min}), "
                f"got {self.kkt_lambda_init!r}"
            )

    def _check_batch_compares(self, terms: str, weights: tuple[str, ...]) -> None:
        """Terms that compare samples within a batch need batch_size >= 2 when any of their weights is on."""
        if self.batch_size < 2 and any(getattr(self, w) > 0 for w in weights):
            values = ", ".join(f"{w}={getattr(self, w)}" for w in weights)
            raise ValueError(
                f"batch_size {self.batch_size} is too small for {terms} ({values}): they compare samples "
                "within a batch and need batch_size >= 2"
            )

    # -- presets and serialisation --------------------------------------------------------------

    @classmethod
    def preset(cls, name: str = "paper", **overrides):
        """The named preset with `overrides` applied (unknown field names are refused)."""
        _check_choice("preset", name, PRESETS)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        base = cls._authors_fields() if name == "authors" else {}
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides):
        return cls.preset("paper", **overrides)

    @classmethod
    def authors(cls, **overrides):
        return cls.preset("authors", **overrides)

    @classmethod
    def _authors_fields(cls) -> dict:
        return {"ortho_normalized": False, "batch_size": 1000, "lr": 3e-3}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict):
        """The config of a `to_dict()` dict; unknown or non-string field names are refused by name."""
        if not isinstance(fields, dict):
            raise ValueError(
                f"a {cls.__name__} is read from a dict of fields, got {type(fields).__name__}"
            )
        unknown = sorted(map(str, set(fields) - {f.name for f in dataclasses.fields(cls)}))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**fields)

    def differing_fields(self, other: _EngineConfig) -> list[str]:
        """Names of the fields whose values differ from `other` (all fields if the kinds differ)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))

    def weights(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.WEIGHTS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class InversionConfig(_EngineConfig):
    """Network inversion (paper 3.3): soft conditioning vectors, no image priors."""

    kind: ClassVar[str] = "inversion"


@dataclass(frozen=True)
class ReconstructionConfig(_EngineConfig):
    """Training-like data reconstruction (paper 3.4): hot vectors and all nine terms."""

    alpha_pert: float = 5.0
    beta_pert: float = 10.0
    eta_tv: float = 0.02
    eta_pix: float = 0.0
    eta_grad: float = 2.0
    # Beyond the paper and 0 in both presets: the feature-statistics prior (see losses.feature_statistics)
    # summed over the classifier's BatchNorm layers.
    eta_bn: float = 0.0
    eps: float = 0.1
    vector_kind: str = "hot"
    grad_norm_mode: str = "per_sample"
    grad_norm_backend: str = "auto"
    grad_norm_chunk_size: int | None = None

    kind: ClassVar[str] = "reconstruction"
    WEIGHTS: ClassVar[tuple[str, ...]] = (
        "alpha",
        "alpha_pert",
        "beta",
        "beta_pert",
        "gamma",
        "delta",
        "eta_tv",
        "eta_pix",
        "eta_grad",
        "eta_bn",
        "eta_kkt",
    )

    def __post_init__(self):
        super().__post_init__()
        _check_weight("eps", self.eps)
        if self.eps > 1:
            raise ValueError(
                f"eps must lie in [0, 1] (an L-inf radius on the [0, 1] pixel scale), got {self.eps!r}"
            )
        self._check_batch_compares("the feature-statistics prior", ("eta_bn",))
        _check_choice("grad_norm_mode", self.grad_norm_mode, GRAD_NORM_MODES)
        _check_choice("grad_norm_backend", self.grad_norm_backend, ENGINE_GRAD_NORM_BACKENDS)
        if self.grad_norm_chunk_size is not None:
            _check_int("grad_norm_chunk_size", self.grad_norm_chunk_size, 1)

    @classmethod
    def _authors_fields(cls) -> dict:
        return {**super()._authors_fields(), "grad_norm_mode": "batch", "eps": 0.6, "eta_tv": 2.0}


def config_from_dict(kind: str, fields: dict) -> _EngineConfig:
    classes = {"inversion": InversionConfig, "reconstruction": ReconstructionConfig}
    _check_choice("kind", kind, tuple(classes))
    return classes[kind].from_dict(fields)
