"""Supervised training of the classifiers under attack: seeded Adam on cross-entropy, with a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tldr_fast.validation import check_images, check_labels, check_positive_int


@dataclass
class TrainReport:
    """What `train_classifier` measured: final train/test accuracy, loss per epoch, wall time."""

    train_accuracy: float
    test_accuracy: float | None
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    # (epsilon, delta) spent by a DP-trained model, as `attacks.dp.rdp_privacy` reports it.
    privacy: dict | None = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(n: int, batch_size: int, gen: torch.Generator | None):
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def build_seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """factory() with the global RNG seeded for the call and restored afterwards: the initial
    weights depend on `seed` alone, not on what the process drew before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> nn.Module:
    """Train `model` in place with Adam on cross-entropy and return it in eval mode.

    Mini-batch order, dropout and initialisation-independent randomness are drawn from `seed`, so a
    CPU run is reproducible. The report is attached as `model.train_report`.
    """
    num_classes = getattr(model, "num_classes", None)
    check_images(images, "images", getattr(model, "input_shape", None))
    check_labels(labels, "labels", num_classes or int(labels.max()) + 1, batch=images.shape[0])
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    if test is not None:
        check_images(test[0], "test images", getattr(model, "input_shape", None))
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    report = TrainReport(train_accuracy=0.0, test_accuracy=None)
    start = time.perf_counter()
    bar = progress_bar(range(epochs), progress, desc=f"train {type(model).__name__}")
    for _ in bar:
        model.train()
        total, count = torch.zeros((), device=device), 0
        for idx in _batches(len(images), batch_size, gen):
            if len(idx) < 2 and any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
            ):
                continue  # BatchNorm cannot train on a single sample
            x, y = images[idx].to(device), labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
            count += len(idx)
        sched.step()
        report.epoch_losses.append(float(total) / max(count, 1))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{report.epoch_losses[-1]:.4f}")
    model.eval()
    report.seconds = time.perf_counter() - start
    report.train_accuracy = evaluate_classifier(model, images, labels, device=device)
    if test is not None:
        report.test_accuracy = evaluate_classifier(model, *test, device=device)
    model.train_report = report
    return model


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int = 1024, device=None
) -> torch.Tensor:
    """Logits of `model` in eval mode, computed in batches, returned on the CPU."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [
        model(images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1024,
    device=None,
) -> float:
    """Top-1 accuracy in [0, 1]."""
    if len(images) != len(labels):
        raise ValueError(f"images has {len(images)} entries but labels has {len(labels)}")
    logits = predict_logits(model, images, batch_size=batch_size, device=device)
    return float((logits.argmax(1) == labels).float().mean())


def progress_bar(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def train_kkt_recipe(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 5000,
    lr: float = 5.0,
    init_scale: float = 0.03,
    target_loss: float = 1e-5,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    delta: float = 1e-5,
    seed: int = 0,
) -> nn.Module:
    """Haim et al.'s training for KKT reconstruction: the initial weights multiplied by init_scale,
    then full-batch gradient descent on cross-entropy, no momentum and no weight decay, until the
    loss falls below target_loss or `steps` steps have run. Returns the model in eval mode with
    `model.train_report` (epoch_losses holds the loss every 100 steps and the last one).

    With a noise_multiplier sigma the same recipe runs as DP-GD through Opacus
    (`attacks.dp.make_private` with batch size n): every step is a Poisson batch of sample rate 1,
    i.e. the full batch, each per-sample gradient clipped to L2 norm <= max_grad_norm = C, plus
    N(0, (sigma C)^2 I) on their sum, divided by n; `seed` seeds the noise. All `steps` steps run
    (stopping at target_loss would make the step count depend on the data beyond what the
    accountant covers), and `train_report.privacy` records the (epsilon, delta) spent.

    Small initialisation and a long run to near-zero loss are what bring the weights close to a
    KKT point of margin maximisation, the condition the KKT attack inverts. The defaults suit
    `tldr_fast.attacks.kkt.KKTMLP`, whose inputs have norm <= 1 (a larger step kills every ReLU
    of a network whose inputs are not so scaled).
    """
    check_images(images, "images", getattr(model, "input_shape", None))
    check_labels(
        labels,
        "labels",
        getattr(model, "num_classes", None) or int(labels.max()) + 1,
        batch=images.shape[0],
    )
    check_positive_int(steps, "steps")
    for name, value in (("lr", lr), ("init_scale", init_scale), ("target_loss", target_loss)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not value > 0
            or value == float("inf")
        ):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(init_scale)
    x, y = images.to(device), labels.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    report = TrainReport(train_accuracy=0.0, test_accuracy=None)
    start = time.perf_counter()
    model.train()
    hooks = loader = None
    if noise_multiplier is not None:
        from tldr_fast.attacks import dp

        config = dp.DPTrainingConfig(
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, epochs=steps,
            batch_size=len(x), lr=lr, delta=delta, seed=seed,
        )  # fmt: skip
        hooks, opt, loader = dp.make_private(model, opt, x, y, config)
    label = "kkt recipe" if loader is None else f"kkt recipe, DP-GD sigma={noise_multiplier:g}"
    bar = progress_bar(range(steps), progress, desc=f"train {type(model).__name__} ({label})")
    try:
        for step in bar:
            xb, yb = (x, y) if loader is None else next(iter(loader))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach()) if step % 100 == 0 or step == steps - 1 else None
            if value is not None:
                report.epoch_losses.append(value)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{value:.2e}")
            if value is not None and value < target_loss and loader is None:
                break
    finally:
        if hooks is not None:
            hooks.cleanup()
    if loader is not None:
        report.privacy = dp.rdp_privacy(1 / len(loader), steps, noise_multiplier, delta)
    model.eval()
    report.seconds = time.perf_counter() - start
    report.train_accuracy = evaluate_classifier(model, images, labels, device=device)
    if test is not None:
        report.test_accuracy = evaluate_classifier(model, *test, device=device)
    model.train_report = report
    return model
