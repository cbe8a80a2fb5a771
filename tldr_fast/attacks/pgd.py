"""l2 projected gradient descent (Madry et al. 2018) on images in [0, 1], and l2 robust accuracy.

One step moves every image by `step_size` along its own normalised gradient, projects the total
perturbation back onto the l2 ball of radius epsilon around the start and clips to [0, 1]:

    x_{t+1} = clip_[0,1]( x_0 + Proj_eps( x_t +- alpha * g_t / ||g_t||_2 - x_0 ) ),  g_t = grad_x loss(x_t)

Clipping after the projection never leaves the ball: x_0 lies in [0, 1], so clipping only shrinks
each coordinate of the perturbation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from tldr_fast.validation import check_images, check_labels, check_positive_int

# Robustness evaluations in the Data-from-Model paper: step size 2.5 * epsilon / steps.
STEP_SIZE_FACTOR = 2.5


def check_epsilon(epsilon, name: str = "epsilon") -> float:
    """A perturbation budget must be a finite number > 0."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not math.isfinite(epsilon)
        or epsilon <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def default_step_size(epsilon: float, steps: int) -> float:
    """alpha = 2.5 * epsilon / steps: enough to reach the boundary of the ball from its centre."""
    return STEP_SIZE_FACTOR * epsilon / steps


def project_l2(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Scale each sample of delta (N, ...) so that ||delta_i||_2 <= epsilon; samples inside are kept."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (epsilon / norms).clamp(max=1.0)
    return delta * scale.view(-1, *([1] * (delta.dim() - 1)))


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode (BN running statistics, no dropout) and restore its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def l2_pgd(
    model: nn.Module,
    images: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    *,
    epsilon: float,
    steps: int,
    step_size: float | None = None,
    maximize: bool = True,
) -> torch.Tensor:
    """l2-PGD from `images` on `objective(model(x))` (per-sample losses, shape (N,)).

    Ascends the objective when `maximize`, descends it otherwise. The model is used as it is
    (callers put it in eval mode); its parameters receive no gradient.
    """
    check_images(images, "images")
    epsilon = check_epsilon(epsilon)
    steps = check_positive_int(steps, "steps")
    step_size = (
        default_step_size(epsilon, steps)
        if step_size is None
        else check_epsilon(step_size, "step_size")
    )
    direction = 1.0 if maximize else -1.0
    start = images.detach()
    x = start.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        loss = objective(model(x)).sum()
        (grad,) = torch.autograd.grad(loss, x)
        grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        moved = x.detach() + (direction * step_size) * grad / grad_norm
        x = (start + project_l2(moved - start, epsilon)).clamp_(0.0, 1.0)
    return x.detach()


def pgd_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float,
    steps: int = 20,
    step_size: float | None = None,
) -> torch.Tensor:
    """Untargeted l2-PGD: images within epsilon of `images` that maximise the cross-entropy."""
    return l2_pgd(
        model,
        images,
        lambda logits: F.cross_entropy(logits, labels, reduction="none"),
        epsilon=epsilon,
        steps=steps,
        step_size=step_size,
        maximize=True,
    )


def robust_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float,
    steps: int = 20,
    step_size: float | None = None,
    batch_size: int = 1000,
) -> float:
    """Accuracy under untargeted l2-PGD at radius epsilon; epsilon = 0 gives the clean accuracy."""
    check_images(images, "images")
    check_labels(
        labels,
        "labels",
        getattr(model, "num_classes", int(labels.max()) + 1),
        batch=images.shape[0],
    )
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not math.isfinite(epsilon)
        or epsilon < 0
    ):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    batch_size = check_positive_int(batch_size, "batch_size")
    correct = 0
    with evaluating(model):
        for start in range(0, images.shape[0], batch_size):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            if epsilon > 0:
                x = pgd_attack(model, x, y, epsilon=epsilon, steps=steps, step_size=step_size)
            with torch.no_grad():
                correct += int((model(x).argmax(1) == y).sum())
    return correct / max(images.shape[0], 1)
