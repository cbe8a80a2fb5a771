"""The TLDR loss terms in plain torch, the one reference for the fused kernels, and the one place
(`resolve_impl`) that chooses between this code and the kernels of `tldr_fast.kernels`.

Every term is a batch statistic returning a 0-d tensor; the `stacked_*` functions take K
independent batches stacked along a leading dim and return (K,), in one call (one kernel launch).
Low-precision inputs (float16, bfloat16) are accumulated in float32; float32 and float64 keep their
dtype. All functions are pure tensor code with no host synchronisation, so they run under
`torch.func` transforms and `torch.compile(fullgraph=True)`, the kernels included.

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

# Implementations every loss with a fused kernel accepts (`resolve_impl`).
IMPLS = ("auto", "triton", "torch")

# Below this norm a feature vector is treated as zero (its normalised version is then ~0).
_NORM_EPS = 1e-12

# impl="auto" on CUDA: the smallest per-problem sizes from which the Triton kernels were measured
# faster than this module's torch code in the same mode (eager, or inside torch.compile where
# Inductor fuses the torch code), float32, H100; docs/kernels.md has the table and its source.
# diversity: (N D, D) of the features; tv_pixel: (N C H W,) of the images; None: never.
_AUTO_TRITON_FROM = {
    ("diversity", False): (1 << 22, 256),
    ("diversity", True): (1 << 24, 1),
    ("tv_pixel", False): (16384 * 784,),
    ("tv_pixel", True): None,
}


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.to(_accumulation_dtype(x))


def _problem_size(loss: str, x: torch.Tensor) -> tuple[int, ...]:
    """The sizes `_AUTO_TRITON_FROM` compares, of one problem of x (its leading dim stacks them)."""
    if loss == "diversity":
        return (x.shape[-2] * x.shape[-1], x.shape[-1])
    return (x[0].numel() if x.dim() == 5 else x.numel(),)


def resolve_impl(impl: str, x: torch.Tensor, loss: str) -> str:
    """ "triton" or "torch" for `loss` ("diversity" or "tv_pixel") on input x; the one place that
    decides. "torch" is this module's code; "triton" the fused kernels of tldr_fast.kernels (CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1), with a clear error where they cannot run;
    "auto" per device from measured speed: torch on CPU (Triton has no CPU backend; the
    interpreter is for correctness only), on CUDA `_AUTO_TRITON_FROM`. A trace-time constant
    under torch.compile (device, dtype, shape and mode are static), not a host sync."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    # Imported here, not at the top: Triton's import costs a second that torch-only runs skip.
    from tldr_fast.kernels import runtime

    supported = x.dtype in runtime.SUPPORTED_DTYPES
    if impl == "auto":
        smallest = _AUTO_TRITON_FROM[loss, torch.compiler.is_compiling()]
        if (
            not (x.is_cuda and supported and runtime.device_unsupported(x) is None)
            or smallest is None
        ):
            return "torch"
        size = _problem_size(loss, x)
        return "triton" if all(s >= m for s, m in zip(size, smallest, strict=True)) else "torch"
    reason = runtime.device_unsupported(x)
    if reason is not None:
        raise RuntimeError(reason)
    if not supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in runtime.SUPPORTED_DTYPES)
        raise TypeError(f"impl='triton' supports dtypes {names}; got {x.dtype}")
    return "triton"


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape (N, num_classes), got {tuple(logits.shape)}")


def _check_tensor(t: torch.Tensor, name: str, shape: str) -> None:
    """A floating-point tensor whose rank is that of `shape`, e.g. "(N, D)"."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != shape.count(",") + 1:
        raise ValueError(f"{name} must have shape {shape}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_features(feat: torch.Tensor, shape: str = "(N, D)") -> None:
    _check_tensor(feat, "feat", shape)
    if feat.shape[-2] < 2:
        # The cosine term averages over N(N-1) pairs: undefined for one sample. We refuse rather
        # than return a silent zero that would make a diversity weight do nothing.
        raise ValueError(
            f"the diversity losses need at least 2 samples per batch (N >= 2), got feat of shape "
            f"{tuple(feat.shape)}; use batch_size >= 2 or set gamma = delta = 0"
        )
    if feat.shape[-1] < 1:
        raise ValueError(
            f"feat must have at least 1 column (D >= 1), got shape {tuple(feat.shape)}"
        )


def _check_image_batch(x: torch.Tensor, shape: str = "(N, C, H, W)") -> None:
    _check_tensor(x, "x", shape)
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")


def kl(logits: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(cond || softmax(logits)); cond rows are distributions (0 log 0 = 0)."""
    _check_logits(logits)
    if cond.shape != logits.shape:
        raise ValueError(
            f"cond must have the shape of logits {tuple(logits.shape)}, got {tuple(cond.shape)}"
        )
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
    # fn (..., N, D) -> (...).
    n = fn.shape[-2]
    # vector_norm reduces in place: no N x D temporary of squares (peak memory <= 2x the features).
    pair_sum = fn.sum(-2).square().sum(-1) - torch.linalg.vector_norm(fn, dim=(-2, -1)).square()
    return pair_sum / (n * (n - 1))


def _ortho_from_rows(f: torch.Tensor) -> torch.Tensor:
    # ||F F^T - I||_F^2 = ||F^T F||_F^2 - 2 ||F||_F^2 + N. The D x D route avoids the N x N matrix
    # when D < N; when N <= D the N x N route is cheaper and has no cancellation (D >> N).
    # f (..., N, D) -> (...).
    n, d = f.shape[-2:]
    if d < n:
        sq = (
            (f.mT @ f).square().sum((-2, -1))
            - 2 * torch.linalg.vector_norm(f, dim=(-2, -1)).square()
            + n
        )
    else:
        eye = torch.eye(n, dtype=f.dtype, device=f.device)
        sq = (f @ f.mT - eye).square().sum((-2, -1))
    return sq / (n * n)


def cosine_diversity(feat: torch.Tensor) -> torch.Tensor:
    """Signed mean pairwise cosine similarity of the rows of feat (N, D), N >= 2."""
    _check_features(feat)
    return _cosine_from_normalized(_normalize(feat))


def ortho_diversity(feat: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """(1/N^2) ||G - I||_F^2 with G the Gram matrix of the rows (L2-normalised unless normalized=False)."""
    _check_features(feat)
    return _ortho_from_rows(_normalize(feat) if normalized else _acc(feat))


def stacked_diversity_losses(
    feats: torch.Tensor, normalized: bool = True, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine_diversity, ortho_diversity), each (K,), of K independent feature batches feats
    (K, N, D), from one normalisation pass or one launch of the fused kernel (`resolve_impl`);
    the objective calls this once for its K generators."""
    _check_features(feats, "(K, N, D)")
    if resolve_impl(impl, feats, "diversity") == "triton":
        from tldr_fast.kernels.diversity import diversity_losses as fused

        return fused(feats, normalized=normalized)
    fn = _normalize(feats)
    return _cosine_from_normalized(fn), _ortho_from_rows(fn if normalized else _acc(feats))


def diversity_losses(
    feat: torch.Tensor, normalized: bool = True, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine_diversity, ortho_diversity) of one feature batch feat (N, D): 0-d tensors."""
    _check_features(feat)
    cos, ortho = stacked_diversity_losses(feat.unsqueeze(0), normalized, impl)
    return cos[0], ortho[0]


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    # x (..., N, C, H, W) -> (...)
    x = _acc(x)
    dims = (-4, -3, -2, -1)
    dh = (x[..., 1:, :] - x[..., :-1, :]).square().sum(dims)
    dw = (x[..., :, 1:] - x[..., :, :-1]).square().sum(dims)
    return (dh + dw) / x.shape[-4]


def _pixel_range(x: torch.Tensor) -> torch.Tensor:
    x = _acc(x)
    return (F.relu(-x) + F.relu(x - 1)).sum((-4, -3, -2, -1)) / x.shape[-4]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-image sum of squared vertical and horizontal neighbour differences, mean over the batch."""
    _check_image_batch(x)
    return _total_variation(x)


def pixel_range(x: torch.Tensor) -> torch.Tensor:
    """Per-image sum of how far pixels lie outside [0, 1], mean over the batch."""
    _check_image_batch(x)
    return _pixel_range(x)


def stacked_tv_pixel(x: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(total_variation, pixel_range), each (K,), of K independent image batches x (K, N, C, H, W),
    in one read of x when the fused kernel runs (`resolve_impl`); the objective calls this once."""
    _check_image_batch(x, "(K, N, C, H, W)")
    if resolve_impl(impl, x, "tv_pixel") == "triton":
        from tldr_fast.kernels.tv_pixel import tv_pixel as fused

        return fused(x)
    return _total_variation(x), _pixel_range(x)


def tv_pixel(x: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(total_variation(x), pixel_range(x)) of one image batch x (N, C, H, W): 0-d tensors."""
    _check_image_batch(x)
    tv, pix = stacked_tv_pixel(x.unsqueeze(0), impl)
    return tv[0], pix[0]


def weighted_tv_pixel(x: torch.Tensor, w_tv, w_pix, impl: str = "auto"):
    """(w_tv TV + w_pix Pix, TV, Pix) of x (N, C, H, W); TV and Pix detached, for logging. With
    the fused kernel the gradient is written in the forward pass (one read of x, one write of
    dL/dx). w_tv, w_pix: Python floats or 0-d tensors."""
    _check_image_batch(x)
    if resolve_impl(impl, x, "tv_pixel") == "torch":
        tv, pix = _total_variation(x), _pixel_range(x)
        return w_tv * tv + w_pix * pix, tv.detach(), pix.detach()
    from tldr_fast.kernels.tv_pixel import weighted_tv_pixel as fused

    # torch.full, not torch.tensor: a fill kernel, no host-to-device copy, so CUDA graphs capture it.
    weights = [
        v.float().reshape(1)
        if isinstance(v, torch.Tensor)
        else torch.full((1,), float(v), device=x.device, dtype=torch.float32)
        for v in (w_tv, w_pix)
    ]
    loss, tv, pix = fused(x.unsqueeze(0), *weights)
    return loss[0], tv[0], pix[0]


def feature_statistics(
    a: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    """Distance of a batch's per-channel statistics from a BatchNorm layer's running statistics.

    a: (N, C, ...) the layer's input; running_mean, running_var: (C,), what the layer accumulated
    over its training data. ||mean(a) - running_mean||_2 + ||var(a) - running_var||_2, per channel
    over every dimension but 1, variance unbiased (as BatchNorm accumulates it).
    """
    if (
        a.dim() < 2
        or a.shape[1] != running_mean.shape[0]
        or running_var.shape != running_mean.shape
    ):
        raise ValueError(
            f"feature_statistics needs a (N, C, ...) input and (C,) statistics, got {tuple(a.shape)}, "
            f"{tuple(running_mean.shape)} and {tuple(running_var.shape)}"
        )
    if a.numel() // a.shape[1] < 2:
        raise ValueError(
            f"feature_statistics needs at least 2 values per channel, got input {tuple(a.shape)}"
        )
    channels = _acc(a).transpose(0, 1).flatten(1)  # (C, N * positions)
    mean, var = channels.mean(1), channels.var(1, correction=1)
    return (mean - _acc(running_mean)).norm() + (var - _acc(running_var)).norm()


def shifted_channel_sums(a: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum d, sum d^2) per channel of d = a - shift, a (N, C, ...), shift (C,): the sufficient
    statistics of `feature_statistics`, additive over chunks of the batch."""
    d = _acc(a).transpose(0, 1).flatten(1) - _acc(shift)[:, None]
    return d.sum(1), d.square().sum(1)


def feature_statistics_from_sums(
    shifted_sum: torch.Tensor,
    shifted_square_sum: torch.Tensor,
    count: int,
    shift: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
) -> torch.Tensor:
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
        raise ValueError(
            f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}"
        )
    return (x + eps * torch.sign(noise)).clamp(0.0, 1.0)
