"""KKT reconstruction (Haim et al. 2022; multiclass: Buzaglo et al. 2023): training images from the weights alone.

Gradient flow on a homogeneous network with a separable training set converges in direction to a
KKT point of margin maximisation, min ||theta||^2 s.t. phi(x_i; theta) >= 1, so

    theta = sum_i lambda_i grad_theta phi(x_i; theta),   lambda_i >= 0,

with the multiclass margin phi(x; theta) = f_y(x) - max_{j != y} f_j(x). The attack looks for m
candidates x_j with labels y_j and multipliers lambda_j >= lambda_min that satisfy this equation:

    L(x, l) = || theta_hat - sum_j lambda_j grad_theta phi(x_j, y_j; theta_hat) ||^2
              + w_prior * sum_j ( relu(x_j - 1)^2 + relu(-x_j)^2 ),
    lambda_j = lambda_min + softplus(l_j),

where theta_hat = theta / ||theta|| (for a homogeneous network grad phi(x; c theta) =
c^(L-1) grad phi(x; theta), so the unit-norm weights only rescale lambda and the residual is a
relative one, comparable across targets). The weighted sum of per-sample gradients is one
gradient of s(theta) = sum_j lambda_j phi(x_j; theta); `torch.func.grad` of s, differentiated
again with respect to x and l, gives the attack's gradient without per-sample gradients. Adam
updates x (pixels, with the range prior) and l. Candidates are balanced over the classes, twice
as many as the training set by default.

`KKTMLP` is the target the method was designed for: a bias-free ReLU MLP (homogeneous in its
weights), trained by `tldr_fast.training.train_kkt_recipe` (small initialisation, full-batch
gradient descent to near-zero loss, no weight decay). The attack runs against any classifier;
BatchNorm layers are evaluated with their running statistics.

A result is saved as a run directory that `tldr-fast evaluate` scores:

    RUN_DIR/images.safetensors   "images" (m, C, H, W) float32 in [0, 1] (the candidates, clamped),
                                 "labels" (m,), "generator_index" (m,) zeros, "lambdas" (m,)
    RUN_DIR/config.json          {"format": "tldr-fast/kkt-run", "kind": "kkt", "config", "num_classes",
                                  "image_shape", "model", "dataset", "subset", "seed", "train_seconds"}
    RUN_DIR/history.json         {"steps": n, "terms": {"kkt": [...], "prior": [...], "loss": [...]}}
    RUN_DIR/grid.png             rows = classes, columns = candidates
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from tldr_fast.models.classifiers import ImageClassifier, _pair
from tldr_fast.serialization import register_architecture, register_format, write_json_atomic
from tldr_fast.validation import (
    check_finite_module,
    check_labels,
    check_nonnegative,
    check_positive_int,
)

RUN_FORMAT = "tldr-fast/kkt-run"
LAMBDAS_FORMAT = "tldr-fast/kkt-lambdas"
KIND = "kkt"


@register_architecture
class KKTMLP(ImageClassifier):
    """Flatten -> bias-free Linear + ReLU per hidden width -> bias-free Linear to the logits.

    Without biases, normalisation layers or dropout the logits are positively homogeneous of
    degree len(hidden) + 1 in the weights, the setting of the KKT characterisation. The default
    input normalisation, (x - 0.5) / (0.5 sqrt(C H W)), gives every input a norm of at most 1, so
    one gradient-descent step size suits the first layer and the rest alike.
    """

    arch = "KKTMLP"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size=28,
        hidden: tuple[int, ...] = (1000,),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        d_in = in_channels * math.prod(_pair(image_size))
        std = std or (0.5 * math.sqrt(d_in),) * in_channels
        super().__init__(in_channels, num_classes, image_size, mean, std)
        self.hidden = tuple(int(h) for h in hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for d_out in self.hidden:
            layers += [nn.Linear(d_in, d_out, bias=False), nn.ReLU()]
            d_in = d_out
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(d_in, num_classes, bias=False)

    def extra_config(self) -> dict:
        return {"hidden": list(self.hidden)}


@dataclass(frozen=True)
class KKTConfig:
    """Settings of the attack; `candidates=None` means twice the training-set size.

    The candidates start at 0.5 + init_scale * N(0, 1) (mid-grey in the target's normalised
    coordinates, where the bias-free MLP's origin lies) and the multipliers at lambda_init, just
    above lambda_min. Without biases phi(c x) = c phi(x) about that origin, so only lambda_j times
    the candidate's contrast is determined; small starting multipliers make the candidates grow to
    the pixel range instead of settling as low-contrast copies.
    """

    candidates: int | None = None
    steps: int = 1500
    lr_x: float = 0.003
    lr_lambda: float = 0.003
    lambda_min: float = 0.01
    lambda_init: float = 0.02
    init_scale: float = 0.2
    prior_weight: float = 10.0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        if self.candidates is not None:
            check_positive_int(self.candidates, "candidates", minimum=2)
        check_positive_int(self.steps, "steps")
        check_positive_int(self.log_every, "log_every")
        for name in ("lr_x", "lr_lambda", "init_scale"):
            if check_nonnegative(getattr(self, name), name) == 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        check_nonnegative(self.lambda_min, "lambda_min")
        if not check_nonnegative(self.lambda_init, "lambda_init") > self.lambda_min:
            raise ValueError(
                f"lambda_init must exceed lambda_min ({self.lambda_min}), got {self.lambda_init!r}"
            )
        check_nonnegative(self.prior_weight, "prior_weight")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class KKTResult:
    """Candidates after the attack (clamped to [0, 1]), their labels and multipliers, the loss history."""

    images: torch.Tensor
    labels: torch.Tensor
    lambdas: torch.Tensor
    history: dict[str, list[float]]
    config: KKTConfig
    num_classes: int
    image_shape: tuple[int, int, int]
    train_seconds: float
    model: str | None = None
    dataset: str | None = None
    subset: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def generator_index(self) -> torch.Tensor:
        return torch.zeros_like(self.labels)

    def save_to(self, run_dir: str | Path) -> Path:
        """Write the run directory described in the module docstring."""
        from tldr_fast.api import _write_images
        from tldr_fast.report import class_grid
        from tldr_fast.serialization import atomic_write, write_safetensors_atomic

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_images(run_dir / "images.safetensors", self)
        write_safetensors_atomic(
            run_dir / "lambdas.safetensors",
            {"lambdas": self.lambdas.contiguous()},
            {"format": LAMBDAS_FORMAT},
        )
        write_json_atomic(
            run_dir / "history.json", {"steps": len(self.history["loss"]), "terms": self.history}
        )
        write_json_atomic(
            run_dir / "config.json",
            {
                "format": RUN_FORMAT,
                "kind": KIND,
                "config": asdict(self.config),
                "num_classes": self.num_classes,
                "image_shape": list(self.image_shape),
                "model": self.model,
                "dataset": self.dataset,
                "subset": self.subset,
                "seed": self.config.seed,
                "train_seconds": self.train_seconds,
                **self.extra,
            },
        )
        grid = class_grid(self.images, self.labels, per_class=20, scale=1)
        atomic_write(run_dir / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
        return run_dir

    @classmethod
    def load_from(cls, run_dir: str | Path) -> KKTResult:
        """Read a run directory written by save_to (registered with `tldr_fast.serialization.load`)."""
        from tldr_fast.serialization import read_safetensors

        run_dir = Path(run_dir)
        header = json.loads((run_dir / "config.json").read_text())
        images, _ = read_safetensors(run_dir / "images.safetensors")
        lambdas, _ = read_safetensors(run_dir / "lambdas.safetensors")
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
        }
        return cls(
            images=images["images"],
            labels=images["labels"],
            lambdas=lambdas["lambdas"],
            history=json.loads((run_dir / "history.json").read_text())["terms"],
            config=KKTConfig(**header["config"]),
            num_classes=header["num_classes"],
            image_shape=tuple(header["image_shape"]),
            train_seconds=header["train_seconds"],
            model=header.get("model"),
            dataset=header.get("dataset"),
            subset=header.get("subset"),
            extra={k: v for k, v in header.items() if k not in known},
        )


register_format(RUN_FORMAT, KKTResult.load_from)


# ------------------------------------------------------------------------------ the objective


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """phi = f_y - max_{j != y} f_j per row."""
    own = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return own - others.amax(1)


def lambdas_from(free: torch.Tensor, lambda_min: float) -> torch.Tensor:
    """lambda = lambda_min + softplus(free): at least lambda_min, smooth in the free parameter."""
    return lambda_min + F.softplus(free)


def free_for(lam: float, lambda_min: float) -> float:
    """The free parameter whose `lambdas_from` is lam (> lambda_min): softplus^-1(lam - lambda_min),
    as d + log(1 - exp(-d)), d = lam - lambda_min, which does not overflow for a large d."""
    d = lam - lambda_min
    return d + math.log(-math.expm1(-d))


def margin_combination(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    lam: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """sum_j lam_j grad_params phi(x_j), one tensor per parameter.

    The weighted sum of per-sample gradients is grad_params of sum_j lam_j phi(x_j); it is built
    with torch.func.grad, so the result is differentiable in x and lam (and in params).
    """

    def weighted_margin(p):
        return (lam * margins(functional_call(model, (p, buffers), (x,)), labels)).sum()

    return grad(weighted_margin)(params)


def residual(params: dict[str, torch.Tensor], combination: dict[str, torch.Tensor]) -> torch.Tensor:
    """|| params - combination ||^2 summed over every parameter tensor."""
    return sum(((params[k] - combination[k]) ** 2).sum() for k in params)


def kkt_residual(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    lam: torch.Tensor,
) -> torch.Tensor:
    """|| params - sum_j lam_j grad_params phi(x_j) ||^2 summed over every parameter tensor."""
    return residual(params, margin_combination(model, params, buffers, x, labels, lam))


def pixel_prior(x: torch.Tensor) -> torch.Tensor:
    """sum relu(x - 1)^2 + relu(-x)^2: zero inside the pixel range [0, 1]."""
    return ((x - 1).relu() ** 2 + (-x).relu() ** 2).sum()


def unit_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters divided by their joint L2 norm, detached."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    norm = torch.sqrt(sum((p.double() ** 2).sum() for p in params.values())).to(
        next(iter(params.values())).dtype
    )
    return {k: p / norm for k, p in params.items()}


def kkt_loss(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    free: torch.Tensor,
    lambda_min: float,
    prior_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, KKT residual, pixel prior) of the objective in the module docstring."""
    residual = kkt_residual(model, params, buffers, x, labels, lambdas_from(free, lambda_min))
    prior = pixel_prior(x)
    return residual + prior_weight * prior, residual, prior


# ------------------------------------------------------------------------------ the attack


def candidate_labels(count: int, num_classes: int) -> torch.Tensor:
    """count labels, balanced over the classes, sorted (class 0's candidates first)."""
    from tldr_fast.conditioning import balanced_labels

    return balanced_labels(count, num_classes).sort().values


def attack(
    model: nn.Module,
    num_train: int | None = None,
    config: KKTConfig | None = None,
    *,
    labels: torch.Tensor | None = None,
    device=None,
    progress: bool = True,
    run_dir=None,
    model_path: str | None = None,
    dataset: str | None = None,
    subset: int | None = None,
) -> KKTResult:
    """Run the KKT reconstruction against `model` (an ImageClassifier: num_classes, input_shape).

    Candidates: `labels` if given, else config.candidates (default 2 * num_train) balanced labels.
    With run_dir the result is saved there (model_path/dataset/subset are recorded for evaluate).
    """
    from tldr_fast.training import default_device, progress_bar

    config = config or KKTConfig()
    if not hasattr(model, "num_classes") or not hasattr(model, "input_shape"):
        raise TypeError(
            f"model must be an image classifier with num_classes and input_shape, got {type(model).__name__}"
        )
    check_finite_module(model, "model")
    num_classes, shape = int(model.num_classes), tuple(model.input_shape)
    if labels is None:
        count = config.candidates
        if count is None:
            if num_train is None:
                raise ValueError(
                    "num_train is required when neither labels nor config.candidates is given"
                )
            count = 2 * check_positive_int(num_train, "num_train")
        labels = candidate_labels(count, num_classes)
    check_labels(labels, "labels", num_classes)
    device = torch.device(device) if device is not None else default_device()
    start = time.perf_counter()
    model = model.to(device).eval()
    params = unit_parameters(model)
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    labels = labels.to(device)
    gen = torch.Generator().manual_seed(config.seed)
    x = (
        (0.5 + config.init_scale * torch.randn(len(labels), *shape, generator=gen))
        .to(device)
        .requires_grad_(True)
    )
    # See KKTConfig for why the multipliers start small.
    free = torch.full(
        (len(labels),), free_for(config.lambda_init, config.lambda_min), device=device
    )
    free.requires_grad_(True)
    opt = torch.optim.Adam(
        [{"params": [x], "lr": config.lr_x}, {"params": [free], "lr": config.lr_lambda}]
    )
    history: dict[str, list[float]] = {"loss": [], "kkt": [], "prior": []}
    bar = progress_bar(range(config.steps), progress, desc="kkt")
    for step in bar:
        loss, residual, prior = kkt_loss(
            model, params, buffers, x, labels, free, config.lambda_min, config.prior_weight
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % config.log_every == 0 or step == config.steps - 1:
            values = [float(v.detach()) for v in (loss, residual, prior)]
            if not all(math.isfinite(v) for v in values):
                raise FloatingPointError(
                    f"kkt: the loss became non-finite at step {step} ({values})"
                )
            for key, v in zip(("loss", "kkt", "prior"), values):
                history[key].append(v)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(kkt=f"{values[1]:.4f}")
    result = KKTResult(
        images=x.detach().clamp(0, 1).float().cpu(),
        labels=labels.cpu(),
        lambdas=lambdas_from(free.detach(), config.lambda_min).float().cpu(),
        history=history,
        config=config,
        num_classes=num_classes,
        image_shape=shape,
        train_seconds=time.perf_counter() - start,
        model=model_path,
        dataset=dataset,
        subset=subset,
    )
    if run_dir is not None:
        result.save_to(run_dir)
    return result
