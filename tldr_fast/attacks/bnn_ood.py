"""Inverted samples as a garbage class: retrain a BNN with an extra "none of these" class and compare
its confidence on out-of-distribution inputs with the original network's (an application of BNN inversion by SAT).

The SAT samples of label y are inputs the network calls y although most look like no digit; a
network retrained with them as class K (K = number of real classes) learns to send such inputs
there. Reported per input set: mean softmax confidence of the top real class (softmax over all
outputs), and the share of inputs the retrained network assigns to the garbage class.
"""

from __future__ import annotations

import numpy as np
import torch

from tldr_fast.attacks.bnn_model import BinarizedMLP
from tldr_fast.training import predict_logits, train_classifier


def real_class_confidence(
    model: BinarizedMLP, images: torch.Tensor, num_real: int
) -> tuple[float, float]:
    """(mean max softmax probability over the first num_real outputs, share of argmax >= num_real)."""
    logits = predict_logits(model, images)
    probs = logits.softmax(1)
    garbage = (
        float((logits.argmax(1) >= num_real).float().mean()) if logits.shape[1] > num_real else 0.0
    )
    return float(probs[:, :num_real].max(1).values.mean()), garbage


def garbage_class_experiment(
    model: BinarizedMLP,
    images: torch.Tensor,
    labels: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    garbage_pixels: np.ndarray,
    ood_sets: dict[str, torch.Tensor],
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 3e-2,
    seed: int = 0,
) -> dict:
    """Retrain `model`'s architecture with the SAT samples as an extra class; confidence before and after.

    images / test / ood_sets are pooled to the model's grid already (model.image_size == (grid, grid)).
    """
    if len(garbage_pixels) == 0:
        raise ValueError("garbage_pixels is empty: no inverted samples to use as the garbage class")
    k = model.num_classes
    config = {**model.config(), "num_classes": k + 1}
    retrained = BinarizedMLP(**config)
    garbage = model.pixels_to_images(torch.as_tensor(garbage_pixels, dtype=torch.float32))
    train_x = torch.cat([images, garbage])
    train_y = torch.cat([labels, torch.full((len(garbage),), k, dtype=labels.dtype)])
    train_classifier(
        retrained,
        train_x,
        train_y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=False,
        device="cpu",
    )
    report = {"garbage_samples": int(len(garbage)), "epochs": epochs}
    for name, net in (("original", model), ("with_garbage_class", retrained)):
        logits = predict_logits(net, test[0])
        entry = {"test_accuracy": float((logits.argmax(1) == test[1]).float().mean())}
        for set_name, x in {"in_distribution_test": test[0], **ood_sets}.items():
            confidence, garbage_share = real_class_confidence(net, x, k)
            entry[set_name] = {
                "mean_top_real_confidence": confidence,
                "share_to_garbage": garbage_share,
            }
        report[name] = entry
    return report
