"""The naive reference step: the nine-term reconstruction objective written straight from the paper.

What a researcher would write first, and the baseline every speedup in `bench step` is measured
against: one generator as an ordinary module with `torch.optim.Adam`, eager autograd, the N x N
Gram matrix of the normalised features for both diversity terms, and per-sample gradient norms as
`torch.func.vmap(grad)` over the classifier (every per-sample gradient materialised), all
differentiated by one `loss.backward()`. The math is the engine's (`tests/test_compiled_step.py`
checks that both give the same loss on the same noise); only the implementation is naive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from tldr_fast import conditioning
from tldr_fast.config import ReconstructionConfig
from tldr_fast.objective import TERM_WEIGHTS, make_generator


def naive_terms(
    generator: nn.Module,
    classifier: nn.Module,
    config: ReconstructionConfig,
    labels: torch.Tensor,
    z: torch.Tensor,
    perturb_noise: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The nine loss terms for one generator's batch, each a 0-d tensor."""
    n = labels.shape[0]
    vectors = F.one_hot(labels, classifier.num_classes).float()
    x = generator(z, labels, vectors)
    x_pert = (x + config.eps * perturb_noise.sign()).clamp(0, 1)
    logits, feat = classifier.forward_with_features(x)
    logits_pert = classifier(x_pert)

    cos, ortho = naive_diversity(feat, config.ortho_normalized)
    return {
        "kl": F.kl_div(F.log_softmax(logits, 1), vectors, reduction="batchmean"),
        "kl_pert": F.kl_div(F.log_softmax(logits_pert, 1), vectors, reduction="batchmean"),
        "ce": F.cross_entropy(logits, labels),
        "ce_pert": F.cross_entropy(logits_pert, labels),
        "cos": cos,
        "ortho": ortho,
        "tv": (
            (x[:, :, 1:] - x[:, :, :-1]).pow(2).sum()
            + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).sum()
        )
        / n,
        "pix": (F.relu(-x) + F.relu(x - 1)).sum() / n,
        "grad": naive_grad_norms(classifier, x, labels).mean(),
    }


def naive_diversity(
    feat: torch.Tensor, normalized: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, ortho) diversity from the N x N Gram matrices of the features."""
    n = feat.shape[0]
    unit = F.normalize(feat, dim=1, eps=1e-12)
    gram = unit @ unit.T
    rows = unit if normalized else feat
    ortho_gram = rows @ rows.T
    cos = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    return cos, (ortho_gram - torch.eye(n, device=feat.device)).pow(2).sum() / n**2


def naive_grad_norms(classifier: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample norms ||grad_theta CE(f(x_i), y_i)|| from vmap(grad): every gradient materialised."""
    params = dict(classifier.named_parameters())

    def sample_loss(p, xi, yi):
        return F.cross_entropy(functional_call(classifier, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, labels)
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()


class NaiveStep:
    """One generator trained with torch.optim.Adam on the naive objective; call it to take a step."""

    def __init__(
        self, classifier: nn.Module, config: ReconstructionConfig, image_shape, device=None
    ):
        self.classifier = classifier.eval().requires_grad_(False)
        self.config = config
        self.generator = make_generator(config, classifier.num_classes, image_shape).to(device)
        self.optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2)
        )
        self.labels = conditioning.balanced_labels(
            config.batch_size, classifier.num_classes, device
        )
        self.weights = {term: getattr(config, name) for term, name in TERM_WEIGHTS.items()}

    def __call__(self) -> torch.Tensor:
        b, shape = self.config.batch_size, self.generator.image_shape
        device = self.labels.device
        z = torch.randn(b, self.config.latent_dim, device=device)
        terms = naive_terms(
            self.generator,
            self.classifier,
            self.config,
            self.labels,
            z,
            torch.randn(b, *shape, device=device),
        )
        loss = sum(w * terms[t] for t, w in self.weights.items() if w > 0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
