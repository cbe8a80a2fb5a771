"""How a generator is told which class to produce (TLDR paper, section 3.2).

Four modes:
- `label`:  a learned embedding of the label;
- `vector`: an N-dimensional conditioning vector (soft for inversion, hot for reconstruction);
            a soft vector is softmax(v) with v standard normal, and its argmax is the label, which
            the generator never sees directly;
- `matrix`: unconditioned up to an N x N map, then the hot N x N matrix (row and column of the
            label set to one) is concatenated as an extra channel;
- `vector-matrix`: both (the paper's experiments).

The vectors double as the KL target. Everything here is pure tensor code: random draws take their
noise as an argument (or a torch.Generator), so the engine can draw it inside a compiled step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("label", "vector", "matrix", "vector-matrix")
VECTOR_KINDS = ("soft", "hot")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"conditioning must be one of {MODES}, got {mode!r}")
    return mode


def uses_vector(mode: str) -> bool:
    return check_mode(mode) in ("vector", "vector-matrix")


def uses_matrix(mode: str) -> bool:
    return check_mode(mode) in ("matrix", "vector-matrix")


def balanced_labels(batch: int, num_classes: int, device=None) -> torch.Tensor:
    """0, 1, ..., N-1, 0, 1, ...: every class equally often (up to the remainder)."""
    return torch.arange(batch, device=device) % num_classes


def hot_vectors(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """One-hot rows (B, N)."""
    return F.one_hot(labels, num_classes).to(dtype)


def soft_vectors_from_noise(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax(v) where v is `noise` (B, N) with its largest entry swapped into position `labels`.

    For v with exchangeable entries (e.g. standard normal) this samples exactly the distribution
    of softmax(v) conditioned on argmax = label, so the argmax of every row is its label.
    """
    if noise.dim() != 2 or labels.shape != noise.shape[:1]:
        raise ValueError(
            f"noise must be (B, N) and labels (B,), got {tuple(noise.shape)} and {tuple(labels.shape)}"
        )
    top = noise.argmax(-1, keepdim=True)
    lab = labels.unsqueeze(-1)
    v_top = noise.gather(-1, top)
    v_lab = noise.gather(-1, lab)
    swapped = noise.scatter(-1, top, v_lab).scatter(-1, lab, v_top)
    return swapped.softmax(-1)


def soft_vectors(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random soft conditioning vectors (B, N) whose argmax is `labels`."""
    noise = torch.randn(labels.shape[0], num_classes, generator=generator, device=labels.device)
    return soft_vectors_from_noise(noise, labels)


def hot_matrix(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, N, N) with row and column `label` set to one, zeros elsewhere."""
    hot = hot_vectors(labels, num_classes, dtype)
    row = hot.unsqueeze(-1)  # (B, N, 1): picks the row
    col = hot.unsqueeze(-2)  # (B, 1, N): picks the column
    return torch.maximum(row, col).unsqueeze(1)


def condition_vectors(
    labels: torch.Tensor, num_classes: int, kind: str, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Conditioning vectors of the given kind: `hot` (reconstruction) or `soft` (inversion, needs noise)."""
    if kind == "hot":
        return hot_vectors(labels, num_classes)
    if kind == "soft":
        if noise is None:
            raise ValueError("soft conditioning vectors need noise of shape (B, num_classes)")
        return soft_vectors_from_noise(noise, labels)
    raise ValueError(f"vector kind must be one of {VECTOR_KINDS}, got {kind!r}")
