"""Matmul precision of the step and how far it moves the loss trajectory from fp32.

`matmul_precision(name, device_type)` runs the code inside it with the products and convolutions in
- "fp32": full fp32 (TF32 off for both cuBLAS matmuls and cuDNN convolutions);
- "tf32": fp32 inputs on TF32 tensor cores (both flags on; PyTorch's default turns on cuDNN's only);
- "bf16": `torch.autocast` to bfloat16 (matmuls, convolutions and batched products in bf16, the
  losses' reductions and softmaxes in fp32 as autocast keeps them).
Inside the engine's step that covers the generator's convolutions, the classifier's passes and the
ghost norms' batched products alike; the Adam update is elementwise and stays fp32.

`deviation_rows` runs the same seeded step trajectory (same initial generators, same noise) under
each precision and reports, per precision, the relative deviation of the total loss from the fp32
trajectory, |L_p(t) - L_fp32(t)| / |L_fp32(t)|, step by step: its maximum, its mean and its last
value. "fp32-repeat" reruns fp32 itself: what nondeterministic reductions alone give, the noise
floor against which a tolerance for TF32 / BF16 is chosen.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from bench.step import bench_classifier, make_runner

PRECISIONS = ("fp32", "tf32", "bf16")


@contextmanager
def matmul_precision(name: str, device_type: str):
    """Products and convolutions inside in the named precision; torch's flags restored on exit."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=name == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def loss_trajectory(
    precision: str,
    batch: int,
    steps: int,
    device,
    classifier=None,
    variant: str = "fast-eager",
    seed: int = 0,
) -> list[float]:
    """Total loss (mean over generators) after each of `steps` steps of `bench.step`'s `variant`."""
    device = torch.device(device)
    classifier = classifier if classifier is not None else bench_classifier(device)
    torch.manual_seed(seed)
    run = make_runner(variant, batch, classifier, device)
    with matmul_precision(precision, device.type):
        return [float(run()["total"].mean()) for _ in range(steps)]


def relative_deviation(trajectory: list[float], reference: list[float]) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(trajectory, reference, strict=True)]


def deviation_rows(
    batch: int, steps: int, device, precisions=("tf32", "bf16"), variant: str = "fast-eager"
) -> list[dict]:
    """One row per precision (and "fp32-repeat") against the fp32 trajectory of the same seed."""
    classifier = bench_classifier(device)
    reference = loss_trajectory("fp32", batch, steps, device, classifier, variant)
    rows = []
    for label in ("fp32-repeat", *precisions):
        trajectory = loss_trajectory(
            label.removesuffix("-repeat"), batch, steps, device, classifier, variant
        )
        deviation = relative_deviation(trajectory, reference)
        rows.append(
            {
                "precision": label,
                "variant": variant,
                "batch": batch,
                "steps": steps,
                "max_rel_dev": max(deviation),
                "mean_rel_dev": sum(deviation) / steps,
                "final_rel_dev": deviation[-1],
                "final_loss": trajectory[-1],
                "fp32_final_loss": reference[-1],
            }
        )
    return rows
