"""tldr-fast: training-like data reconstruction from trained image classifiers, fast.

The public names (docs/design.md) resolve lazily, so `import tldr_fast` stays cheap and a
command-line call pays only for the parts it uses.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "attacks",
    "conditioning",
    "datasets",
    "engine",
    "evaluate",
    "grad_norm",
    "kernels",
    "losses",
    "models",
    "objective",
    "report",
    "serialization",
    "ssim",
    "training",
}

_NAMES = {
    "train_classifier": "tldr_fast.training",
    "evaluate_classifier": "tldr_fast.training",
    "save": "tldr_fast.serialization",
    "load": "tldr_fast.serialization",
    "per_sample_grad_norm": "tldr_fast.grad_norm",
    "InversionConfig": "tldr_fast.config",
    "ReconstructionConfig": "tldr_fast.config",
    "invert": "tldr_fast.api",
    "reconstruct": "tldr_fast.api",
    "Result": "tldr_fast.api",
}

__all__ = sorted(_SUBMODULES | set(_NAMES))


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"tldr_fast.{name}")
    else:
        raise AttributeError(f"module 'tldr_fast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
