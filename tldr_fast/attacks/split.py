"""Split-model inversion (a port of PySyft's split-learning tutorial).

A classifier is split into an on-device part, whose activations h = D(x) travel to a server, and a
server part S(h) that finishes the classification. An attacker who can query the on-device part
(or intercept h) trains a decoder G (transposed convolutions) on auxiliary images disjoint from the
target's training data, minimising mean_i ||G(D(a_i)) - a_i||^2, then reconstructs unseen inputs
x ~ G(D(x)). Scores: per-pixel MSE and SSIM (data range 1) against the true inputs, compared with a
baseline that always answers the auxiliary mean image.

The decoder mirrors the on-device blocks: for each [Conv k, ReLU, (Norm), MaxPool p/s] block, in
reverse, ConvTranspose(kernel p, stride s) undoes the pooling (output_padding restores a pixel that
floor division dropped) and ConvTranspose(kernel k) undoes the convolution; BatchNorm + ReLU in
between, a sigmoid at the end so outputs lie in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tldr_fast.attacks.dp import DPTrainingConfig, train_dp
from tldr_fast.models.classifiers import ImageClassifier
from tldr_fast.serialization import atomic_write, register_architecture, write_json_atomic
from tldr_fast.validation import check_finite_module, check_images, check_positive_int

# (conv channels, conv kernel, pool kernel, pool stride) per on-device block.
MNIST_BLOCKS = ((32, 5, 2, 2), (32, 5, 2, 2))
OMNIGLOT_BLOCKS = ((32, 7, 3, 3), (32, 7, 3, 2), (32, 5, 2, 2), (32, 3, 2, 2))
NORMS = ("none", "batch", "group")


def _block_sizes(size: tuple[int, int], blocks) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """[(after conv, after pool)] spatial sizes through the blocks; errors when the image is too small."""
    sizes, (h, w) = [], size
    for i, (_, k, p, s) in enumerate(blocks):
        ch, cw = h - k + 1, w - k + 1
        h, w = (ch - p) // s + 1, (cw - p) // s + 1
        if min(ch, cw) < p:
            raise ValueError(
                f"image size {size} is too small for the on-device blocks {blocks} (block {i} gets {(ch, cw)})"
            )
        sizes.append(((ch, cw), (h, w)))
    return sizes


def _norm(kind: str, channels: int) -> list[nn.Module]:
    if kind == "batch":
        return [nn.BatchNorm2d(channels)]
    if kind == "group":
        return [nn.GroupNorm(math.gcd(8, channels), channels)]
    return []


class SplitClassifier(ImageClassifier):
    """on_device: conv blocks -> activations sent to the server; server: Linear 256, ReLU, Dropout, Linear.

    `intercept(x)` is what leaves the device; `features(x)` the server's 256-d hidden layer; `head`
    its last Linear. Images in [0, 1] go in unnormalised, as in the paper.
    """

    blocks: tuple[tuple[int, int, int, int], ...] = ()

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size,
        norm: str = "none",
        dropout: float = 0.0,
        hidden: int = 256,
    ):
        super().__init__(in_channels, num_classes, image_size)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.norm, self.dropout, self.hidden = norm, float(dropout), int(hidden)
        sizes = _block_sizes(self.image_size, self.blocks)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, k, p, s in self.blocks:
            layers += [
                nn.Conv2d(c_in, c_out, k),
                nn.ReLU(),
                *_norm(norm, c_out),
                nn.MaxPool2d(p, s),
            ]
            if dropout:
                layers.append(nn.Dropout(dropout))
            c_in = c_out
        self.on_device = nn.Sequential(*layers)
        self.activation_shape = (c_in, *sizes[-1][1])
        self.server_hidden = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(self.activation_shape), self.hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(self.hidden, num_classes)

    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "norm": self.norm,
            "dropout": self.dropout,
            "hidden": self.hidden,
        }

    def intercept(self, x: torch.Tensor) -> torch.Tensor:
        """The on-device activations (N, *activation_shape): what the server (or an eavesdropper) sees."""
        self._check_input(x)
        return self.on_device(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.server_hidden(self.intercept(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


@register_architecture
class MnistSplitNet(SplitClassifier):
    """The split-learning MNIST target: [Conv5x5 32, ReLU, MaxPool2] x 2 on device (512 values at 28x28)."""

    arch = "MnistSplitNet"
    blocks = MNIST_BLOCKS

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size=28,
        norm: str = "none",
        dropout: float = 0.0,
        hidden: int = 256,
    ):
        super().__init__(in_channels, num_classes, image_size, norm, dropout, hidden)


@register_architecture
class OmniglotSplitNet(SplitClassifier):
    """The split-learning Omniglot target: four [Conv 32 (7,7,5,3), ReLU, Norm, MaxPool (3/3,3/2,2/2,2/2), Dropout]
    blocks, 105x105 -> 1x1x32 on device. norm="batch" is the paper's; DP-SGD needs norm="group"."""

    arch = "OmniglotSplitNet"
    blocks = OMNIGLOT_BLOCKS

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        image_size=105,
        norm: str = "batch",
        dropout: float = 0.2,
        hidden: int = 256,
    ):
        super().__init__(in_channels, num_classes, image_size, norm, dropout, hidden)


class InversionDecoder(nn.Module):
    """Transposed-convolution decoder from a split target's on-device activations to its input images.

    `history` holds the mean training MSE of every epoch `train_decoder` ran (to see it converge).
    """

    def __init__(self, target: SplitClassifier, width: int = 64):
        super().__init__()
        check_positive_int(width, "width")
        self.history: list[float] = []
        self.output_shape = target.input_shape
        sizes = _block_sizes(target.image_size, target.blocks)
        layers: list[nn.Module] = [nn.BatchNorm2d(target.activation_shape[0])]
        c_in = target.activation_shape[0]
        reversed_blocks = list(zip(target.blocks, sizes, strict=True))[::-1]
        for i, ((_, k, p, s), ((ch, cw), (h, w))) in enumerate(reversed_blocks):
            # The pooled map (h, w) came from (ch, cw): undo the pool, then the conv.
            pad = (ch - ((h - 1) * s + p), cw - ((w - 1) * s + p))
            layers += [
                nn.ConvTranspose2d(c_in, width, p, stride=s, output_padding=pad),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            last = i == len(reversed_blocks) - 1
            c_out = target.in_channels if last else width
            layers.append(nn.ConvTranspose2d(width, c_out, k))
            layers += [nn.Sigmoid()] if last else [nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.net = nn.Sequential(*layers)

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.net(activations)


@torch.no_grad()
def intercept_all(
    target: SplitClassifier, images: torch.Tensor, batch_size: int = 500
) -> torch.Tensor:
    """On-device activations of all images, target in eval mode (what a deployed device sends)."""
    was_training = target.training
    target.eval()
    out = torch.cat(
        [
            target.intercept(images[i : i + batch_size])
            for i in range(0, images.shape[0], batch_size)
        ]
    )
    target.train(was_training)
    return out


def train_decoder(
    target: SplitClassifier,
    aux_images: torch.Tensor,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    width: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> InversionDecoder:
    """Fit an InversionDecoder with MSE on (D(a), a) pairs from the attacker's auxiliary images."""
    from tqdm.auto import tqdm

    check_images(aux_images, "aux_images", expected_shape=target.input_shape)
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    if batch_size > aux_images.shape[0]:
        raise ValueError(
            f"batch_size ({batch_size}) must not exceed the number of auxiliary images ({aux_images.shape[0]})"
        )
    torch.manual_seed(seed)
    codes = intercept_all(target, aux_images)
    decoder = InversionDecoder(target, width=width)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    decoder.train()
    for _ in tqdm(range(epochs), desc="train decoder", disable=not progress, leave=False):
        order = torch.randperm(codes.shape[0], generator=gen)
        losses = []
        for start in range(0, codes.shape[0] - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.mse_loss(decoder(codes[idx]), aux_images[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        decoder.history.append(sum(losses) / len(losses))
    decoder.eval()
    return decoder


@torch.no_grad()
def reconstruct_inputs(
    target: SplitClassifier, decoder: InversionDecoder, images: torch.Tensor, batch_size: int = 500
) -> torch.Tensor:
    """G(D(x)) for every image: the attacker's guess of each input from what left the device."""
    check_images(images, "images", expected_shape=target.input_shape)
    check_finite_module(target, "target")
    check_finite_module(decoder, "decoder")
    codes = intercept_all(target, images, batch_size)
    return torch.cat(
        [decoder(codes[i : i + batch_size]) for i in range(0, codes.shape[0], batch_size)]
    )


def image_scores(originals: torch.Tensor, guesses: torch.Tensor) -> dict[str, float]:
    """Mean per-pixel MSE and mean SSIM (scikit-image's, data_range=1, batched) over the image pairs."""
    from tldr_fast.ssim import ssim

    if originals.shape != guesses.shape:
        raise ValueError(
            f"originals {tuple(originals.shape)} and guesses {tuple(guesses.shape)} differ in shape"
        )
    a, b = originals.detach().cpu().float(), guesses.detach().cpu().float().clamp(0, 1)
    return {
        "mse": float(((a.double() - b.double()) ** 2).mean()),
        "ssim": float(ssim(a, b).double().mean()),
    }


def mean_image_baseline(aux_images: torch.Tensor, test_images: torch.Tensor) -> dict[str, float]:
    """Scores of an attacker who ignores the activations and always answers the auxiliary mean image."""
    guess = aux_images.mean(0, keepdim=True).expand_as(test_images)
    return image_scores(test_images, guess)


def save_comparison_png(
    path, originals: torch.Tensor, guesses: torch.Tensor, count: int = 16, pad: int = 2
) -> Path:
    """A PNG with `count` originals in the top row and their reconstructions below."""
    from PIL import Image

    n = min(count, originals.shape[0])
    rows = torch.stack([originals[:n], guesses[:n]]).clamp(0, 1)  # (2, n, C, H, W)
    _, _, c, h, w = rows.shape
    canvas = torch.ones(c, 2 * h + 3 * pad, n * w + (n + 1) * pad)
    for r in range(2):
        for i in range(n):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            canvas[:, y : y + h, x : x + w] = rows[r, i]
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


@dataclass
class SplitData:
    """Disjoint image sets: the target's training data, the attacker's auxiliary data, unseen test inputs."""

    target_images: torch.Tensor
    target_labels: torch.Tensor
    aux_images: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    description: str


def _take(n: int | None, available: int, name: str) -> int:
    if n is None:
        return available
    check_positive_int(n, name)
    if n > available:
        raise ValueError(f"{name} = {n} but only {available} images are available for it")
    return n


def split_data(
    dataset: str = "mnist",
    n_target: int | None = None,
    n_aux: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    root=None,
) -> SplitData:
    """Disjoint target / auxiliary / test sets.

    mnist, mnist-bundled: the training split is shuffled (seeded) and halved; the target trains on
    the first half, the attacker's auxiliary images come from the second; test inputs come from the
    test split. omniglot: the target classifies the alphabet of background_small2 characters,
    training on the first 14 drawings of every character; the test inputs are the other 6
    drawings; the attacker uses the alphabets of background_small1 that background_small2 lacks
    (the two sets share Greek and Latin, which the attacker therefore does not get).
    """
    from tldr_fast import datasets

    gen = torch.Generator().manual_seed(seed)
    if dataset in ("mnist", "mnist-bundled"):
        images, labels = datasets.load(dataset, split="train", root=root)
        test_images, test_labels = datasets.load(dataset, split="test", root=root)
        order = torch.randperm(images.shape[0], generator=gen)
        half = images.shape[0] // 2
        t_idx = order[: _take(n_target, half, "n_target")]
        a_idx = order[half : half + _take(n_aux, images.shape[0] - half, "n_aux")]
        test_idx = torch.randperm(test_images.shape[0], generator=gen)[
            : _take(n_test, test_images.shape[0], "n_test")
        ]
        return SplitData(
            images[t_idx],
            labels[t_idx],
            images[a_idx],
            test_images[test_idx],
            test_labels[test_idx],
            10,
            f"{dataset}: target on {len(t_idx)} of one half of the training split, attacker on "
            f"{len(a_idx)} of the other half, {len(test_idx)} test-split inputs",
        )
    if dataset == "omniglot":
        target = datasets.load_dataset("omniglot", split="background_small2", root=root)
        alphabets = sorted({name.split("/")[0] for name in target.class_names})
        # The two small sets share Greek and Latin (1,000 identical files): the attacker keeps
        # only the alphabets the target never saw.
        aux = datasets.load_dataset("omniglot", split="background_small1", root=root)
        aux_classes = [
            i for i, name in enumerate(aux.class_names) if name.split("/")[0] not in alphabets
        ]
        aux_images = aux.images[torch.isin(aux.labels, torch.tensor(aux_classes))]
        aux_alphabets = sorted({aux.class_names[i].split("/")[0] for i in aux_classes})
        alphabet_of = torch.tensor(
            [alphabets.index(name.split("/")[0]) for name in target.class_names]
        )
        drawing = torch.zeros_like(target.labels)
        for c in range(target.num_classes):
            members = torch.nonzero(target.labels == c).flatten()
            drawing[members] = torch.arange(members.numel())
        train_pool = torch.nonzero(drawing < 14).flatten()
        test_pool = torch.nonzero(drawing >= 14).flatten()
        t_idx = train_pool[
            torch.randperm(train_pool.numel(), generator=gen)[
                : _take(n_target, train_pool.numel(), "n_target")
            ]
        ]
        test_idx = test_pool[
            torch.randperm(test_pool.numel(), generator=gen)[
                : _take(n_test, test_pool.numel(), "n_test")
            ]
        ]
        a_idx = torch.randperm(aux_images.shape[0], generator=gen)[
            : _take(n_aux, aux_images.shape[0], "n_aux")
        ]
        labels = alphabet_of[target.labels]
        return SplitData(
            target.images[t_idx],
            labels[t_idx],
            aux_images[a_idx],
            target.images[test_idx],
            labels[test_idx],
            len(alphabets),
            f"omniglot: target classifies the {len(alphabets)} alphabets of background_small2 "
            f"({', '.join(alphabets)}) from {len(t_idx)} images (drawings 1-14), test on {len(test_idx)} "
            f"drawings 15-20, attacker on {len(a_idx)} images of background_small1's other alphabets "
            f"({', '.join(aux_alphabets)})",
        )
    raise ValueError(f"dataset must be 'mnist', 'mnist-bundled' or 'omniglot', got {dataset!r}")


def build_target(dataset: str, num_classes: int, private: bool) -> SplitClassifier:
    """The paper's target for the dataset; Omniglot without BatchNorm and dropout when trained privately
    (the paper drops dropout for its DP runs; Opacus forbids BatchNorm, GroupNorm replaces it)."""
    if dataset == "omniglot":
        return OmniglotSplitNet(
            num_classes=num_classes,
            norm="group" if private else "batch",
            dropout=0.0 if private else 0.2,
        )
    return MnistSplitNet(num_classes=num_classes)


@dataclass
class SplitAttackConfig:
    """One table: a target per noise multiplier (None = non-private), each attacked by a fresh decoder.

    untrained_row adds a target left at its initialisation: the limit of infinite noise (epsilon 0),
    the floor below which no noise multiplier can push the attack.

    `seed` fixes the data split. `seeds` (default: `seed` alone) repeats every row once per training
    seed, which sets the target's initialisation, DP-SGD's sampling and noise, and the decoder's
    initialisation and batch order; every row of one seed starts from the same initialisation, so
    rows can be compared seed by seed (paired).
    """

    dataset: str = "mnist"
    noise_multipliers: tuple[float | None, ...] = (None, 0.3, 0.5, 0.7)
    n_target: int | None = 10000
    n_aux: int | None = 10000
    n_test: int | None = 1000
    target_epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    decoder_epochs: int = 10
    decoder_batch_size: int = 64
    decoder_lr: float = 1e-3
    decoder_width: int = 64
    seed: int = 0
    pictures: int = 16
    same_architecture: bool = True
    untrained_row: bool = False
    seeds: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.noise_multipliers and not self.untrained_row:
            raise ValueError(
                "no rows: noise_multipliers must name at least one setting (None for non-private) "
                "or untrained_row must be set"
            )
        for epochs, name in (
            (self.target_epochs, "target_epochs"),
            (self.decoder_epochs, "decoder_epochs"),
        ):
            check_positive_int(epochs, name)
        check_positive_int(self.seed, "seed", minimum=0)
        if self.seeds is not None:
            self.seeds = tuple(self.seeds)
            if not self.seeds:
                raise ValueError(
                    "seeds must name at least one training seed (or be None: the data seed alone)"
                )
            for seed in self.seeds:
                check_positive_int(seed, "seeds", minimum=0)
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(
                    f"seeds must not repeat (a repeated seed reruns the same row), got {self.seeds}"
                )
        # Fail before any training: every row's DP settings are checked up front.
        for noise in self.noise_multipliers:
            DPTrainingConfig(
                noise_multiplier=noise,
                max_grad_norm=self.max_grad_norm,
                epochs=self.target_epochs,
                batch_size=self.batch_size,
                lr=self.lr,
                delta=self.delta,
            )

    @property
    def training_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.seeds is not None else (self.seed,)


INTERVAL = (
    "95% Student t over seeds: mean +- t(0.975, n-1) * s / sqrt(n), s the sample standard deviation"
)


def t_interval(values, confidence: float = 0.95) -> dict:
    """Mean and two-sided Student t interval mean +- t((1+confidence)/2, n-1) s / sqrt(n) (none for n = 1)."""
    from scipy import stats

    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(values) / n
    half = None
    if n > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return {
        "values": values,
        "mean": mean,
        "half_width": half,
        "low": None if half is None else mean - half,
        "high": None if half is None else mean + half,
    }


def _row_tag(noise: float | None) -> str:
    if noise is None:
        return "nonprivate"
    return "untrained" if math.isinf(noise) else f"sigma{noise:g}"


def run_split_attack(config: SplitAttackConfig, run_dir, progress: bool = True, root=None) -> dict:
    """Train one target per noise multiplier and training seed, attack each, write the table.

    run_dir gets results.json (rewritten after every target, so an interrupted run keeps finished
    ones), target-<tag>.safetensors and recon-<tag>.png per row and seed (originals above
    reconstructions; "-seed<k>" is appended to the tag when there are several seeds). Seeds run one
    after the other, each through every row. Same-architecture mode (default) trains the
    non-private row with the DP rows' architecture too. Within a seed every target starts from the
    same initialisation and every decoder from the same seed with the same budget, so rows differ
    only in how the target was trained; the untrained row (noise multiplier inf) comes last.

    Each row of results.json holds the per-seed results (`per_seed`), their means (`attack`,
    `target_test_accuracy`), `seed_statistics` (t_interval of accuracy, MSE and SSIM) and, for rows
    other than the non-private one, `paired_vs_nonprivate`: t_interval of (row - non-private) per seed.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = split_data(
        config.dataset, config.n_target, config.n_aux, config.n_test, config.seed, root=root
    )
    settings = list(config.noise_multipliers) + ([math.inf] if config.untrained_row else [])
    summary = {
        "config": asdict(config),
        "data": data.description,
        "seeds": list(config.training_seeds),
        "interval": INTERVAL,
        "baseline_mean_image": mean_image_baseline(data.aux_images, data.test_images),
        "rows": [],
    }
    heads: dict[int, dict] = {}
    per_seed: dict[int, list[dict]] = {i: [] for i in range(len(settings))}
    for seed in config.training_seeds:
        for i, noise in enumerate(settings):
            heads[i], result = _run_row(noise, seed, data, config, run_dir, progress)
            per_seed[i].append(result)
            summary["rows"] = _summarise_rows([(heads[j], per_seed[j]) for j in sorted(heads)])
            write_json_atomic(run_dir / "results.json", _json_safe(summary))
    return summary


def _run_row(
    noise: float | None,
    seed: int,
    data: SplitData,
    config: SplitAttackConfig,
    run_dir: Path,
    progress: bool,
) -> tuple[dict, dict]:
    """Train (or, for noise inf, leave untrained), save and attack one target.

    Returns the row's seed-independent part (noise, privacy, architecture) and this seed's results.
    """
    untrained = noise is not None and math.isinf(noise)
    any_private = any(n is not None for n in config.noise_multipliers)
    private = noise is not None or (config.same_architecture and any_private)
    torch.manual_seed(seed)
    target = build_target(config.dataset, data.num_classes, private=private)
    if untrained:
        head = {
            "noise_multiplier": math.inf,
            "epsilon_classic": 0.0,
            "epsilon_prv": 0.0,
            "privacy": None,
        }
        history = []
        target.eval()
    else:
        train_cfg = DPTrainingConfig(
            noise_multiplier=noise,
            max_grad_norm=config.max_grad_norm,
            epochs=config.target_epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            delta=config.delta,
            seed=seed,
        )
        trained = train_dp(
            target, data.target_images, data.target_labels, train_cfg, progress=progress
        )
        privacy = trained.privacy.to_dict() if trained.privacy is not None else None
        head = {
            "noise_multiplier": noise,
            "epsilon_classic": privacy["epsilon_classic"] if privacy else math.inf,
            "epsilon_prv": privacy["epsilon_prv"] if privacy else math.inf,
            "privacy": privacy,
        }
        history = trained.history
    tag = _row_tag(noise) + (f"-seed{seed}" if len(config.training_seeds) > 1 else "")
    head |= {"architecture": target.arch, "norm": target.norm}
    result = _attack(target, noise, tag, seed, data, config, run_dir, progress)
    return head, {"seed": seed, "history": history, **result}


def _attack(
    target: SplitClassifier,
    noise: float | None,
    tag: str,
    seed: int,
    data: SplitData,
    config: SplitAttackConfig,
    run_dir: Path,
    progress: bool,
) -> dict:
    """Score, save and attack one target: its test accuracy, attack scores, decoder history and picture."""
    from tldr_fast import serialization
    from tldr_fast.training import evaluate_classifier

    accuracy = evaluate_classifier(target, data.test_images, data.test_labels)
    serialization.save(
        run_dir / f"target-{tag}.safetensors",
        target,
        metadata={
            "dataset": config.dataset,
            "noise_multiplier": _json_safe(noise),
            "seed": seed,
            "test_accuracy": accuracy,
        },
    )
    decoder = train_decoder(
        target,
        data.aux_images,
        epochs=config.decoder_epochs,
        batch_size=config.decoder_batch_size,
        lr=config.decoder_lr,
        width=config.decoder_width,
        seed=seed,
        progress=progress,
    )
    guesses = reconstruct_inputs(target, decoder, data.test_images)
    picture = save_comparison_png(
        run_dir / f"recon-{tag}.png", data.test_images, guesses, count=config.pictures
    )
    return {
        "target_test_accuracy": accuracy,
        "attack": image_scores(data.test_images, guesses),
        "decoder_history": decoder.history,
        "picture": picture.name,
    }


def _summarise_rows(rows: list[tuple[dict, list[dict]]]) -> list[dict]:
    """Per row: means and t intervals over seeds, and differences from the non-private row seed by seed."""
    reference = next(
        (
            {r["seed"]: r for r in results}
            for head, results in rows
            if head["noise_multiplier"] is None
        ),
        None,
    )
    out = []
    for head, results in rows:
        stats = {
            "target_test_accuracy": t_interval([r["target_test_accuracy"] for r in results]),
            "mse": t_interval([r["attack"]["mse"] for r in results]),
            "ssim": t_interval([r["attack"]["ssim"] for r in results]),
        }
        row = {
            **head,
            "target_test_accuracy": stats["target_test_accuracy"]["mean"],
            "attack": {"mse": stats["mse"]["mean"], "ssim": stats["ssim"]["mean"]},
            "seed_statistics": stats,
            "per_seed": results,
        }
        if len(results) == 1:  # one seed: the keys of a single-seed table
            row |= {key: results[0][key] for key in ("history", "decoder_history", "picture")}
        paired = [r for r in results if r["seed"] in (reference or {})]
        if head["noise_multiplier"] is not None and paired:
            row["paired_vs_nonprivate"] = {
                "seeds": [r["seed"] for r in paired],
                **{
                    score: t_interval(
                        [r["attack"][score] - reference[r["seed"]]["attack"][score] for r in paired]
                    )
                    for score in ("mse", "ssim")
                },
            }
        out.append(row)
    return out


def _json_safe(value):
    """JSON has no infinity: write epsilon = inf (no privacy) as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
