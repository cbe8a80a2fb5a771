"""DP-SGD training (Opacus) and its privacy accounting.

DP-SGD (Abadi et al. 2016): each step samples a batch by Poisson sampling with rate q = B/n, clips
every per-sample gradient to L2 norm <= C, sums, adds N(0, (sigma C)^2 I) and divides by the
expected batch size B. After T steps the sampled Gaussian mechanism has Renyi DP
rdp(alpha) = T * RDP_SGM(q, sigma, alpha) (Mironov et al. 2019), converted to (epsilon, delta)-DP:

- classic:  epsilon = min_alpha rdp(alpha) + log(1/delta) / (alpha - 1), over TensorFlow Privacy's
  order grid, with T = ceil(epochs n / B). This is what TF Privacy's `compute_dp_sgd_privacy`
  printed when the split-learning study was written, and it reproduces that study's table.
- improved RDP: the same RDP curve with the conversion of Balle et al. 2020
  epsilon = rdp + log((alpha - 1)/alpha) - (log delta + log alpha)/(alpha - 1) (Opacus).
- PRV: numerical composition of privacy loss random variables (Gopi et al. 2021, Opacus), the
  tightest of the three (up to its stated eps_error).

Opacus needs per-sample gradients, which BatchNorm mixes across samples; a model with BatchNorm is
rejected with a message naming the GroupNorm variant (`PaperCNNGroupNorm`, or `norm="group"` for
the split targets).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tldr_fast.models import PaperCNN
from tldr_fast.serialization import register_architecture
from tldr_fast.validation import check_images, check_labels, check_nonnegative, check_positive_int

# The RDP orders of TensorFlow Privacy's compute_dp_sgd_privacy (2019-2022).
TF_PRIVACY_ORDERS: tuple[float, ...] = (
    1.25,
    1.5,
    1.75,
    2.0,
    2.25,
    2.5,
    3.0,
    3.5,
    4.0,
    4.5,
    *map(float, range(5, 64)),
    128.0,
    256.0,
    512.0,
)


# TF Privacy's orders with 20 more between 1.0003 and 1.18: with little noise and sample rate 1
# (full-batch DP-GD) epsilon is large and its best order lies below 1.25.
RDP_ORDERS: tuple[float, ...] = (
    *(1 + 0.25 * 10 ** (-3 * k / 20) for k in range(20, 0, -1)),
    *TF_PRIVACY_ORDERS,
)


def check_delta(delta) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def check_sample_rate(sample_rate) -> float:
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, (int, float))
        or not 0 < sample_rate <= 1
    ):
        raise ValueError(
            f"sample_rate must be in (0, 1] (batch size / dataset size), got {sample_rate!r}"
        )
    return float(sample_rate)


def dp_sgd_steps(n: int, batch_size: int, epochs: float) -> int:
    """T = ceil(epochs * n / B), the step count compute_dp_sgd_privacy assumes."""
    check_positive_int(n, "n")
    check_positive_int(batch_size, "batch_size")
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) must not exceed the dataset size n ({n})")
    if (
        isinstance(epochs, bool)
        or not isinstance(epochs, (int, float))
        or not epochs > 0
        or math.isinf(epochs)
    ):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
    return int(math.ceil(epochs * n / batch_size))


@functools.lru_cache(maxsize=64)
def _rdp_curve(
    sample_rate: float, steps: int, noise_multiplier: float, orders: tuple[float, ...]
) -> tuple[float, ...]:
    """rdp(alpha) for every order; cached because both RDP conversions read the same (slow) curve."""
    from opacus.accountants.analysis import rdp

    return tuple(
        rdp.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=list(orders)
        )
    )


def _check_mechanism(
    sample_rate, steps, noise_multiplier, delta
) -> tuple[float, int, float, float]:
    return (
        check_sample_rate(sample_rate),
        check_positive_int(steps, "steps"),
        check_nonnegative(noise_multiplier, "noise_multiplier"),
        check_delta(delta),
    )


def epsilon_classic(
    sample_rate: float, steps: int, noise_multiplier: float, delta: float, orders=TF_PRIVACY_ORDERS
) -> tuple[float, float]:
    """(epsilon, best order) with the classic conversion min_a rdp(a) + log(1/delta)/(a-1)."""
    q, steps, sigma, delta = _check_mechanism(sample_rate, steps, noise_multiplier, delta)
    if sigma == 0:
        return math.inf, math.nan
    curve = _rdp_curve(q, steps, sigma, tuple(orders))
    eps, order = min(
        (r + math.log(1 / delta) / (a - 1), a) for a, r in zip(orders, curve, strict=True)
    )
    return float(eps), float(order)


def epsilon_rdp_improved(
    sample_rate: float, steps: int, noise_multiplier: float, delta: float, orders=TF_PRIVACY_ORDERS
) -> tuple[float, float]:
    """(epsilon, best order) from the same RDP curve with Balle et al. 2020's conversion (Opacus)."""
    from opacus.accountants.analysis import rdp

    q, steps, sigma, delta = _check_mechanism(sample_rate, steps, noise_multiplier, delta)
    if sigma == 0:
        return math.inf, math.nan
    with warnings.catch_warnings():
        # Opacus warns when the best order is at the grid's end; the grid is fixed on purpose.
        warnings.simplefilter("ignore", UserWarning)
        eps, order = rdp.get_privacy_spent(
            orders=list(orders), rdp=list(_rdp_curve(q, steps, sigma, tuple(orders))), delta=delta
        )
    return float(eps), float(order)


def epsilon_prv(
    sample_rate: float, steps: int, noise_multiplier: float, delta: float, eps_error: float = 0.01
) -> float:
    """epsilon from Opacus' PRV accountant (an upper bound within eps_error of the true curve)."""
    from opacus.accountants import PRVAccountant

    q, steps, sigma, delta = _check_mechanism(sample_rate, steps, noise_multiplier, delta)
    if sigma == 0:
        return math.inf
    accountant = PRVAccountant()
    accountant.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta, eps_error=eps_error))


@dataclass(frozen=True)
class PrivacySpent:
    """(epsilon, delta) of T steps of the sampled Gaussian mechanism, by three accountants."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_classic: float
    order_classic: float
    epsilon_rdp_improved: float
    epsilon_prv: float

    def to_dict(self) -> dict:
        return asdict(self)


def privacy_spent(
    sample_rate: float, steps: int, noise_multiplier: float, delta: float
) -> PrivacySpent:
    eps_c, order_c = epsilon_classic(sample_rate, steps, noise_multiplier, delta)
    return PrivacySpent(
        noise_multiplier=float(noise_multiplier),
        sample_rate=float(sample_rate),
        steps=int(steps),
        delta=float(delta),
        epsilon_classic=eps_c,
        order_classic=order_c,
        epsilon_rdp_improved=epsilon_rdp_improved(sample_rate, steps, noise_multiplier, delta)[0],
        epsilon_prv=epsilon_prv(sample_rate, steps, noise_multiplier, delta),
    )


def rdp_privacy(sample_rate: float, steps: int, noise_multiplier: float, delta: float) -> dict:
    """{"accountant", "noise_multiplier", "sample_rate", "steps", "delta", "epsilon", "order"}:
    the improved-RDP epsilon over RDP_ORDERS. This is the accountant for sample rate 1, where
    Opacus' PRV accountant (inside `privacy_spent`) does not return."""
    eps, order = epsilon_rdp_improved(sample_rate, steps, noise_multiplier, delta, RDP_ORDERS)
    return {
        "accountant": "rdp",
        "noise_multiplier": float(noise_multiplier),
        "sample_rate": float(sample_rate),
        "steps": int(steps),
        "delta": float(delta),
        "epsilon": eps,
        "order": order,
    }


def dp_sgd_privacy(
    n: int, batch_size: int, epochs: float, noise_multiplier: float, delta: float
) -> PrivacySpent:
    """The setting of compute_dp_sgd_privacy: q = B/n, T = ceil(epochs n / B)."""
    steps = dp_sgd_steps(n, batch_size, epochs)
    return privacy_spent(batch_size / n, steps, noise_multiplier, delta)


@register_architecture
class PaperCNNGroupNorm(PaperCNN):
    """PaperCNN with every BatchNorm replaced by GroupNorm (min(32, C) groups; Opacus' own choice).

    BatchNorm couples the samples of a batch, so per-sample gradients (and DP-SGD) are undefined
    for it; GroupNorm normalises each sample on its own.
    """

    arch = "PaperCNNGroupNorm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _replace_batchnorm(self)


def _replace_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(
                module, name, nn.GroupNorm(math.gcd(32, child.num_features), child.num_features)
            )
        else:
            _replace_batchnorm(child)


@dataclass
class DPTrainingConfig:
    """noise_multiplier None trains without privacy (same batches, optimizer and steps, no clipping)."""

    noise_multiplier: float | None = 1.0
    max_grad_norm: float = 1.0
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    delta: float = 1e-5
    seed: int = 0

    def __post_init__(self):
        if self.noise_multiplier is not None:
            check_nonnegative(self.noise_multiplier, "noise_multiplier")
        if (
            isinstance(self.max_grad_norm, bool)
            or not isinstance(self.max_grad_norm, (int, float))
            or not self.max_grad_norm > 0
        ):
            raise ValueError(f"max_grad_norm must be a number > 0, got {self.max_grad_norm!r}")
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_nonnegative(self.lr, "lr")
        check_delta(self.delta)

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None


@dataclass
class DPTrainingResult:
    model: nn.Module
    config: DPTrainingConfig
    privacy: PrivacySpent | None
    history: list[dict] = field(default_factory=list)


def _check_training_data(model: nn.Module, images, labels, batch_size: int) -> None:
    check_images(images, "images")
    check_labels(
        labels,
        "labels",
        num_classes=int(getattr(model, "num_classes", int(labels.max()) + 1)),
        batch=images.shape[0],
    )
    if batch_size > images.shape[0]:
        raise ValueError(
            f"batch_size ({batch_size}) must not exceed the number of training images ({images.shape[0]})"
        )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: DPTrainingConfig,
):
    """Opacus' (hooks, DPOptimizer, Poisson DataLoader) for `model` (left unwrapped) on the data.

    The loader draws each example with probability q = 1 / ceil(n / B) per step (Opacus), for
    ceil(n / B) steps per epoch; the optimizer clips to config.max_grad_norm and adds noise of std
    noise_multiplier * max_grad_norm before dividing by the expected batch size.
    """
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    if not config.private:
        raise ValueError("make_private needs a noise_multiplier (got None: non-private training)")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(
            f"{type(model).__name__} cannot be trained with DP-SGD: {errors[0]}. Use a BatchNorm-free "
            "variant (PaperCNNGroupNorm, or norm='group' for the split targets)"
        )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels),
        batch_size=config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    engine = PrivacyEngine(accountant="prv")
    return engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        noise_generator=torch.Generator().manual_seed(config.seed + 1),
        wrap_model=False,
    )


def train_dp(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: DPTrainingConfig,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> DPTrainingResult:
    """Train `model` (in place) with Adam, privately (DP-SGD via Opacus) or not, and account for it.

    Cross-entropy on logits; images in [0, 1] (N, C, H, W). Returns the model, the (epsilon,
    delta) spent (None when non-private) and per-epoch loss / train accuracy / test accuracy.
    """
    from tqdm.auto import tqdm

    from tldr_fast.training import evaluate_classifier

    _check_training_data(model, images, labels, config.batch_size)
    # Opacus refuses a model in eval mode, and a model we trained before is left in eval mode.
    model.train()
    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    hooks = None
    if config.private:
        hooks, optimizer, loader = make_private(model, optimizer, images, labels, config)
    else:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(images, labels),
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(config.seed),
        )
    label = f"DP-SGD sigma={config.noise_multiplier:g}" if config.private else "non-private"
    history = []
    try:
        for epoch in range(config.epochs):
            model.train()
            total_loss, correct, seen = 0.0, 0, 0
            for x, y in tqdm(
                loader,
                desc=f"{label} epoch {epoch + 1}/{config.epochs}",
                disable=not progress,
                leave=False,
            ):
                optimizer.zero_grad(set_to_none=True)
                logits = model(x)
                # Mean over the batch, written so an empty Poisson batch (still a DP step whose
                # update is pure noise) gives 0 instead of NaN.
                loss = nn.functional.cross_entropy(logits, y, reduction="sum") / max(x.shape[0], 1)
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach()) * x.shape[0]
                correct += int((logits.argmax(1) == y).sum())
                seen += x.shape[0]
            row = {
                "epoch": epoch + 1,
                "loss": total_loss / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
            }
            if test is not None:
                row["test_accuracy"] = evaluate_classifier(model, *test)
            history.append(row)
    finally:
        if hooks is not None:
            hooks.cleanup()
    model.eval()
    privacy = None
    if config.private:
        privacy = privacy_spent(
            1 / len(loader), config.epochs * len(loader), config.noise_multiplier, config.delta
        )
    return DPTrainingResult(model=model, config=config, privacy=privacy, history=history)
