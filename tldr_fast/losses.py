"""The TLDR loss terms in plain torch: the reference (and CPU path) for the fused kernels.

Every term is a batch statistic returning a 0-d tensor. Low-precision inputs (float16, bfloat16)
are accumulated in float32; float32 and float64 keep their dtype. All functions are pure tensor
code with no host synchronisation, so they run under `torch.func` transforms (the engine vmaps
them over K generators) and `torch.compile(fullgraph=True)`.

Notation: N samples in the batch, D feature dimensions, f^_i = f_i / ||f_i||.
- kl:    (1/N) sum_i KL(c_i || softmax(z_i)) = (1/N) sum_i sum_k c_ik (log c_ik - log_softmax(z_i)_k)
- ce:    (1/N) sum_i -log_softmax(z_i)_{y_i}
- cos:   (1/(N(N-1))) sum_{i != j} f^_i . f^_j
- ortho: (1/N^2) sum_{i,j} (G_ij - delta_ij)^2, G = F^ F^^T (or F F^T for the authors' variant)
- tv:    (1/N) sum_i sum_{c,h,w} (x_{h+1,w} - x_{h,w})^2 + (x_{h,w+1} - x_{h,w})^2
- pix:   (1/N) sum_i sum_{c,h,w} relu(-x) + relu(x - 1)
- bn:    ||mu(a) - running_mean||_2 + ||var(a) - running_var||_2 for the input a of one BatchNorm
         layer, mean and (unbiased) variance per channel over the batch and positions (beyond the
         paper: the feature-statistics prior of DeepInversion, Yin et al. 2020)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Implementations `diversity_losses` and `tv_pixel` accept: "auto" picks the Triton kernels of
# tldr_fast.kernels for CUDA tensors and this module's torch code otherwise.
IMPLS = ("auto", "triton", "torch")

# Below this norm a feature vector is treated as zero (its normalised version is then ~0).
_NORM_EPS = 1e-12


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.to(_accumulation_dtype(x))


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _use_kernels(impl: str, x: torch.Tensor) -> bool:
    # The kernels import this module (their torch path), so they are imported lazily by the caller.
    return impl == "triton" or (impl == "auto" and x.is_cuda)


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape (N, num_classes), got {tuple(logits.shape)}")


def _check_features(feat: torch.Tensor) -> None:
    if feat.dim() != 2:
        raise ValueError(f"feat must have shape (N, D), got {tuple(feat.shape)}")
    if feat.shape[0] < 2:
        # The cosine term averages over N(N-1) pairs: undefined for one sample. We refuse rather
        # than return a silent zero that would make a diversity weight do nothing.
        raise ValueError(
            f"the diversity losses need at least 2 samples per batch, got feat of shape "
            f"{tuple(feat.shape)}; use batch_size >= 2 or set gamma = delta = 0"
        )


def _check_image_batch(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")


def kl(logits: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(cond || softmax(logits)); cond rows are distributions (0 log 0 = 0)."""
    _check_logits(logits)
    if cond.shape != logits.shape:
        raise ValueError(f"cond must have the shape of logits {tuple(logits.shape)}, got {tuple(cond.shape)}")
    log_q = F.log_softmax(_acc(logits), dim=-1)
    cond = cond.to(log_q.dtype)
    return (torch.special.xlogy(cond, cond) - cond * log_q).sum(-1).mean()


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits against integer labels."""
    _check_logits(logits)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    return F.cross_entropy(_acc(logits), labels)


def _normalize(feat: torch.Tensor) -> torch.Tensor:
    return F.normalize(_acc(feat), dim=-1, eps=_NORM_EPS)


def _cosine_from_normalized(fn: torch.Tensor) -> torch.Tensor:
    # sum_{i != j} f^_i . f^_j = ||sum_i f^_i||^2 - sum_i ||f^_i||^2: O(N D), no N x N matrix.
    n = fn.shape[0]
    # vector_norm reduces in place: no N x D temporary of squares (peak memory <= 2x the features).
    pair_sum = fn.sum(0).square().sum() - torch.linalg.vector_norm(fn).square()
    return pair_sum / (n * (n - 1))


def _ortho_from_rows(f: torch.Tensor) -> torch.Tensor:
    # ||F F^T - I||_F^2 = ||F^T F||_F^2 - 2 ||F||_F^2 + N. The D x D route avoids the N x N matrix
    # when D < N; when N <= D the N x N route is cheaper and has no cancellation (D >> N).
    n, d = f.shape
    if d < n:
        sq = (f.T @ f).square().sum() - 2 * torch.linalg.vector_norm(f).square() + n
    else:
        eye = torch.eye(n, dtype=f.dtype, device=f.device)
        sq = (f @ f.T - eye).square().sum()
    return sq / (n * n)


def cosine_diversity(feat: torch.Tensor) -> torch.Tensor:
    """Signed mean pairwise cosine similarity of the rows of feat (N, D), N >= 2."""
    _check_features(feat)
    return _cosine_from_normalized(_normalize(feat))


def ortho_diversity(feat: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """(1/N^2) ||G - I||_F^2 with G the Gram matrix of the rows (L2-normalised unless normalized=False)."""
    _check_features(feat)
    return _ortho_from_rows(_normalize(feat) if normalized else _acc(feat))


def diversity_losses(
    feat: torch.Tensor, normalized: bool = True, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine_diversity, ortho_diversity) from one normalisation pass; the objective calls this."""
    _check_impl(impl)
    _check_features(feat)
    if _use_kernels(impl, feat):
        from tldr_fast.kernels.diversity import diversity_losses as fused

        return fused(feat, normalized=normalized, impl=impl)
    fn = _normalize(feat)
    return _cosine_from_normalized(fn), _ortho_from_rows(fn if normalized else _acc(feat))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-image sum of squared vertical and horizontal neighbour differences, mean over the batch."""
    _check_image_batch(x)
    x = _acc(x)
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).square().sum()
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).square().sum()
    return (dh + dw) / x.shape[0]


def pixel_range(x: torch.Tensor) -> torch.Tensor:
    """Per-image sum of how far pixels lie outside [0, 1], mean over the batch."""
    _check_image_batch(x)
    x = _acc(x)
    return (F.relu(-x) + F.relu(x - 1)).sum() / x.shape[0]


def tv_pixel(x: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(total_variation(x), pixel_range(x)); the objective calls this so one kernel can read x once."""
    _check_impl(impl)
    if _use_kernels(impl, x):
        from tldr_fast.kernels.tv_pixel import tv_pixel as fused

        return fused(x, impl=impl)
    return total_variation(x), pixel_range(x)


def feature_statistics(a: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """Distance of a batch's per-channel statistics from a BatchNorm layer's running statistics.

    a: (N, C, ...) the layer's input; running_mean, running_var: (C,), what the layer accumulated
    over its training data. ||mean(a) - running_mean||_2 + ||var(a) - running_var||_2, per channel
    over every dimension but 1, variance unbiased (as BatchNorm accumulates it).
    """
    if a.dim() < 2 or a.shape[1] != running_mean.shape[0] or running_var.shape != running_mean.shape:
        raise ValueError(
            f"feature_statistics needs a (N, C, ...) input and (C,) statistics, got {tuple(a.shape)}, "
            f"{tuple(running_mean.shape)} and {tuple(running_var.shape)}"
        )
    if a.numel() // a.shape[1] < 2:
        raise ValueError(f"feature_statistics needs at least 2 values per channel, got input {tuple(a.shape)}")
    channels = _acc(a).transpose(0, 1).flatten(1)  # (C, N * positions)
    mean, var = channels.mean(1), channels.var(1, correction=1)
    return (mean - _acc(running_mean)).norm() + (var - _acc(running_var)).norm()


def shifted_channel_sums(a: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum d, sum d^2) per channel of d = a - shift, a (N, C, ...), shift (C,): the sufficient
    statistics of `feature_statistics`, additive over chunks of the batch."""
    d = _acc(a).transpose(0, 1).flatten(1) - _acc(shift)[:, None]
    return d.sum(1), d.square().sum(1)


def feature_statistics_from_sums(shifted_sum: torch.Tensor, shifted_square_sum: torch.Tensor, count: int,
                                 shift: torch.Tensor, running_mean: torch.Tensor,
                                 running_var: torch.Tensor) -> torch.Tensor:
    """`feature_statistics` from `shifted_channel_sums` over count values per channel:
    mean = shift + S1 / M, var = (S2 - S1^2 / M) / (M - 1). A shift near the mean (the running
    mean) keeps S2 - S1^2 / M from cancelling."""
    mean_shift = shifted_sum / count
    var = (shifted_square_sum - shifted_sum * mean_shift) / (count - 1)
    return (_acc(shift) + mean_shift - _acc(running_mean)).norm() + (var - _acc(running_var)).norm()


def perturb(x: torch.Tensor, eps: float, noise: torch.Tensor) -> torch.Tensor:
    """L-inf perturbation to a random corner of the eps-ball, kept in [0, 1]: clamp(x + eps sign(noise), 0, 1).

    The caller draws `noise` (any symmetric distribution, e.g. standard normal) so the function
    stays pure and the noise can be generated inside a compiled step.
    """
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    return (x + eps * torch.sign(noise)).clamp(0.0, 1.0)
