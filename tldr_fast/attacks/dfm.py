"""Data from Model / Data to Model chains (Benz, Zhang, Imtiaz, Kweon).

DfM extracts a dataset from a trained classifier without its training data: substitute
("background") images x_s are moved by l2-PGD so that the network's logits approach sampled
virtual logits Z_v, minimising ||Z(x_s + delta) - Z_v||_2 with ||delta||_2 <= epsilon and
x_s + delta in [0, 1]; the dataset is the pairs (x', Z(x')). DtM trains a fresh model on those
pairs with the l2 logit loss ||Z(x') - Z'(x')||_2. A chain M0 -> D1 -> M1 -> D2 -> ... measures how
much of M0's accuracy (and robustness) survives each cycle, on the original test set.

Virtual logits: the top logit ~ N(20, 2) at a uniformly drawn class; the other K - 1 logits have
means evenly spaced in [-3, 3], assigned to the other classes in random order, and sigma 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from tldr_fast.attacks.pgd import check_epsilon, evaluating, l2_pgd, pgd_attack, robust_accuracy
from tldr_fast.training import progress_bar
from tldr_fast.validation import (
    check_finite,
    check_finite_module,
    check_images,
    check_labels,
    check_positive_int,
)

TOP_MEAN, TOP_STD = 20.0, 2.0
REST_SPREAD, REST_STD = 3.0, 1.0


def virtual_logits(
    n: int, num_classes: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, K), top classes (n,)): the paper's virtual logit targets, seeded by `generator`."""
    n = check_positive_int(n, "n")
    k = check_positive_int(num_classes, "num_classes", minimum=2)
    top_class = torch.randint(k, (n,), generator=generator)
    rest_means = torch.linspace(-REST_SPREAD, REST_SPREAD, k - 1)
    order = torch.rand(n, k - 1, generator=generator).argsort(dim=1)  # a random permutation per row
    rest = rest_means[order] + REST_STD * torch.randn(n, k - 1, generator=generator)
    top = TOP_MEAN + TOP_STD * torch.randn(n, 1, generator=generator)
    # The k - 1 non-top classes of each row, in increasing order: skip over the top class.
    slots = torch.arange(k - 1).expand(n, -1)
    others = slots + (slots >= top_class[:, None]).long()
    logits = torch.empty(n, k).scatter_(1, others, rest).scatter_(1, top_class[:, None], top)
    return logits, top_class


def logit_l2_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 distance ||logits_i - targets_i||_2, shape (N,)."""
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(
            f"logits and targets must both have shape (N, K), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    return (logits - targets).norm(dim=1)


@dataclass(frozen=True)
class ExtractionConfig:
    """DfM settings: how many images, the l2 budget, PGD steps and step size, batch size."""

    num_images: int = 50_000
    epsilon: float = 10.0
    steps: int = 5
    step_size: float | None = None  # None: 2.5 * epsilon / steps
    batch_size: int = 1000

    def __post_init__(self):
        check_positive_int(self.num_images, "num_images")
        check_epsilon(self.epsilon)
        check_positive_int(self.steps, "steps")
        if self.step_size is not None:
            check_epsilon(self.step_size, "step_size")
        check_positive_int(self.batch_size, "batch_size")


@dataclass(frozen=True)
class TrainConfig:
    """Mini-batch Adam with a cosine schedule, for distillation and adversarial training."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3

    def __post_init__(self):
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class ExtractedData:
    """A DfM dataset: images in [0, 1], the network's logits on them, and the virtual targets."""

    images: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


def prepare_backgrounds(
    images: torch.Tensor, image_shape: Sequence[int], resize: bool = False
) -> torch.Tensor:
    """Background images in the model's (C, H, W): unchanged when they match, else resized on request.

    Resizing is area-averaged (bilinear with antialiasing) to H x W; grey becomes colour by
    repetition and colour becomes grey by the channel mean.
    """
    check_images(images, "backgrounds")
    c, h, w = (int(s) for s in image_shape)
    if tuple(images.shape[1:]) == (c, h, w):
        return images
    if not resize:
        raise ValueError(
            f"backgrounds have image shape {tuple(images.shape[1:])} but the model expects {(c, h, w)}; "
            "pass resize=True (CLI: --resize-background) to resize them"
        )
    x = images
    if x.shape[1] != c:
        x = x.mean(dim=1, keepdim=True)
        x = x.expand(-1, c, -1, -1)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0).contiguous()


def noise_backgrounds(n: int, image_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Uniform noise in [0, 1]: the fallback background when no image set is at hand."""
    n = check_positive_int(n, "n")
    return torch.rand(n, *image_shape, generator=torch.Generator().manual_seed(seed))


def extract(
    model: nn.Module,
    backgrounds: torch.Tensor,
    config: ExtractionConfig = ExtractionConfig(),
    seed: int = 0,
    progress: bool = False,
) -> ExtractedData:
    """DfM: `config.num_images` pairs (x', Z(x')) from l2-PGD toward virtual logits.

    Backgrounds are drawn uniformly with replacement; each gets its own virtual target.
    """
    check_images(backgrounds, "backgrounds", getattr(model, "input_shape", None))
    num_classes = check_positive_int(
        int(getattr(model, "num_classes", 0)), "model.num_classes", minimum=2
    )
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(backgrounds.shape[0], (config.num_images,), generator=gen)
    targets, _ = virtual_logits(config.num_images, num_classes, generator=gen)
    images, logits = [], []
    with evaluating(model):
        for start in progress_bar(
            range(0, config.num_images, config.batch_size), progress, desc="extract"
        ):
            x0 = backgrounds[picks[start : start + config.batch_size]]
            t = targets[start : start + config.batch_size].to(x0.device)
            x = l2_pgd(
                model,
                x0,
                lambda z, t=t: logit_l2_loss(z, t),
                epsilon=config.epsilon,
                steps=config.steps,
                step_size=config.step_size,
                maximize=False,
            )
            with torch.no_grad():
                logits.append(model(x))
            images.append(x)
    return ExtractedData(torch.cat(images), torch.cat(logits), targets)


def fit(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    config: TrainConfig,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
) -> nn.Module:
    """Minimise mean batch_loss(model, x, y) over shuffled mini-batches; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    for _ in progress_bar(range(config.epochs), progress, desc=desc):
        order = torch.randperm(inputs.shape[0], generator=gen)
        for start in range(0, inputs.shape[0], config.batch_size):
            idx = order[start : start + config.batch_size]
            if idx.numel() < 2:
                continue  # BatchNorm cannot train on a single sample
            model.train()
            loss = batch_loss(model, inputs[idx], targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def distill(
    student: nn.Module,
    data: ExtractedData,
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """DtM: train `student` on (image, logits) pairs with the l2 logit loss."""
    check_images(data.images, "data.images", getattr(student, "input_shape", None))
    check_finite(data.logits, "data.logits")
    return fit(
        student,
        data.images,
        data.logits,
        lambda m, x, z: logit_l2_loss(m(x), z).mean(),
        config,
        seed=seed,
        progress=progress,
        desc="distill",
    )


def adversarial_train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float,
    steps: int = 7,
    step_size: float | None = None,
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Madry adversarial training: cross-entropy on l2-PGD examples (radius epsilon) of every batch."""
    check_images(images, "images", getattr(model, "input_shape", None))
    check_labels(
        labels,
        "labels",
        getattr(model, "num_classes", int(labels.max()) + 1),
        batch=images.shape[0],
    )
    epsilon = check_epsilon(epsilon)

    def batch_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with evaluating(m):
            x_adv = pgd_attack(m, x, y, epsilon=epsilon, steps=steps, step_size=step_size)
        return F.cross_entropy(m(x_adv), y)

    return fit(
        model,
        images,
        labels,
        batch_loss,
        config,
        seed=seed,
        progress=progress,
        desc="adversarial training",
    )


@dataclass
class ChainResult:
    """One chain M0 -> D1 -> M1 ... : clean accuracy and l2 robustness of every M_i, extracted samples."""

    accuracy: list[float] = field(default_factory=list)
    robustness: list[dict[float, float]] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)  # per cycle i >= 1: images of D_i
    seconds: list[float] = field(default_factory=list)  # per cycle: extraction + distillation
    models: list[nn.Module] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "robustness": [{str(e): a for e, a in r.items()} for r in self.robustness],
            "seconds": self.seconds,
        }


def evaluate_model(
    model: nn.Module,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    robustness_eps: Sequence[float],
    robustness_size: int,
    robustness_steps: int = 20,
) -> tuple[float, dict[float, float]]:
    """Clean accuracy on the whole test set, l2-PGD accuracy per epsilon on its first robustness_size images."""
    clean = robust_accuracy(model, test_images, test_labels, epsilon=0.0)
    xs, ys = test_images[:robustness_size], test_labels[:robustness_size]
    robust = {
        float(eps): (
            robust_accuracy(model, xs, ys, epsilon=eps, steps=robustness_steps)
            if eps > 0
            else clean
        )
        for eps in robustness_eps
    }
    return clean, robust


def run_chain(
    origin: nn.Module,
    backgrounds: torch.Tensor,
    make_student: Callable[[], nn.Module],
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    cycles: int = 5,
    extraction: ExtractionConfig = ExtractionConfig(),
    distillation: TrainConfig = TrainConfig(),
    robustness_eps: Sequence[float] = (0.0, 1.0, 2.0, 3.0, 4.0),
    robustness_size: int = 1000,
    robustness_steps: int = 20,
    num_samples: int = 10,
    seed: int = 0,
    progress: bool = False,
    on_model: Callable[[ChainResult], None] | None = None,
) -> ChainResult:
    """Apply DfM and DtM `cycles` times from `origin` (M0); each M_i sees only D_i, each D_i only M_{i-1}.

    `on_model(result)` is called after every model is evaluated (e.g. to write partial tables).
    """
    cycles = check_positive_int(cycles, "cycles (k)")
    check_finite_module(origin, "origin")
    check_images(test_images, "test_images", getattr(origin, "input_shape", None))
    check_positive_int(robustness_size, "robustness_size")
    for eps in robustness_eps:
        if eps != 0:
            check_epsilon(eps, "robustness epsilon")
    result = ChainResult()
    model = origin
    for cycle in range(cycles + 1):
        if cycle > 0:
            start = time.perf_counter()
            data = extract(model, backgrounds, extraction, seed=seed + cycle, progress=progress)
            torch.manual_seed(seed + cycle)  # the student's initialisation
            model = distill(
                make_student(), data, distillation, seed=seed + cycle, progress=progress
            )
            result.seconds.append(time.perf_counter() - start)
            result.samples.append(_one_per_class(data, num_samples))
        clean, robust = evaluate_model(
            model, test_images, test_labels, robustness_eps, robustness_size, robustness_steps
        )
        result.models.append(model)
        result.accuracy.append(clean)
        result.robustness.append(robust)
        if on_model is not None:
            on_model(result)
    return result


def _one_per_class(data: ExtractedData, count: int) -> torch.Tensor:
    """The first extracted image of each top target class 0, 1, ... (count of them), for pictures."""
    top = data.targets.argmax(1)
    picks = []
    for c in range(min(count, data.targets.shape[1])):
        hits = torch.nonzero(top == c).flatten()
        if hits.numel():
            picks.append(data.images[hits[0]])
    return torch.stack(picks) if picks else data.images[:0]


def accuracy_table(results: dict[str, ChainResult]) -> str:
    """Markdown in the layout of the paper's Table 1: rows M_i, one column per origin, accuracy %."""
    names = list(results)
    rows = max(len(r.accuracy) for r in results.values())
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(rows):
        cells = [_pct(r.accuracy[i]) if i < len(r.accuracy) else "" for r in results.values()]
        lines.append(f"| M{i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def robustness_table(results: dict[str, ChainResult]) -> str:
    """Markdown in the layout of the paper's Table 2: per origin, accuracy % under l2-PGD per epsilon."""
    header, rule = ["model"], ["---"]
    for name, r in results.items():
        for eps in r.robustness[0]:
            header.append(f"{name} eps={eps:g}")
            rule.append("---")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    rows = max(len(r.robustness) for r in results.values())
    for i in range(rows):
        cells = [f"M{i}"]
        for r in results.values():
            width = len(r.robustness[0])
            cells += (
                [_pct(a) for a in r.robustness[i].values()]
                if i < len(r.robustness)
                else [""] * width
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"
