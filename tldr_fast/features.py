"""Penultimate features of any classifier, without subclassing it.

The diversity terms (cosine, orthogonality) compare the classifier's features phi(x) (B, D). The
engine reads them from `classifier.forward_with_features(x) -> (logits, features)`; `with_features`
gives any classifier that method:

- features=None: the classifier's own forward_with_features when it has one, else the input of its
  last nn.Linear in module order (the head of a torchvision-style ResNet or ViT);
- features="name": the output of that submodule (a name from classifier.named_modules()), flattened
  to (B, D);
- features=callable: fn(x) -> (logits, features), computed through the classifier's modules (for
  example a closure over the classifier), features flattened to (B, D).

The adapter holds the classifier as its only child, so every module the gradient-norm backends
hook or call is the user's own module, and torch.func (functional_call, vmap, grad) and
torch.compile see one ordinary module: logits are `classifier(x)`, the features are read by a
temporary forward hook (`module_hooks`, which traces) during that same forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tldr_fast.module_hooks import temporary_forward_hooks

# What `features=` accepts: None, a submodule name, or x -> (logits, features).
FeatureSpec = str | Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None


class WithFeatures(nn.Module):
    """`classifier` with forward_with_features(x) -> (logits, features (B, D)).

    Exactly one of `layer` (a submodule name; `read_input` takes that module's input instead of its
    output) and `fn` (x -> (logits, features)) is given. forward(x) is classifier(x).
    """

    def __init__(
        self,
        classifier: nn.Module,
        layer: str | None = None,
        read_input: bool = False,
        fn: Callable | None = None,
    ):
        super().__init__()
        if (layer is None) == (fn is None):
            raise ValueError("WithFeatures needs exactly one of layer and fn")
        self.model = classifier
        # Callers save and restore `training` of the module they are handed: start from the user's.
        self.training = classifier.training
        self.layer = layer
        self.read_input = read_input
        # Set past nn.Module.__setattr__: a callable that is itself a module must not become a
        # second child, whose parameters the gradient-norm backends would see twice.
        object.__setattr__(self, "fn", fn)

    @property
    def input_shape(self):
        return getattr(self.model, "input_shape", None)

    @property
    def num_classes(self):
        return getattr(self.model, "num_classes", None)

    def describe(self) -> str:
        """Where the features come from, in words (for error messages)."""
        if self.fn is not None:
            return f"the callable {getattr(self.fn, '__qualname__', type(self.fn).__name__)}"
        return f"the {'input' if self.read_input else 'output'} of {self.layer}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fn is not None:
            logits, feat = self.fn(x)
        else:
            logits, feat = self._tapped_forward(x)
        if not isinstance(feat, torch.Tensor) or feat.dim() < 1 or feat.shape[0] != x.shape[0]:
            got = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
            raise ValueError(
                f"features from {self.describe()} must have one row per image ({x.shape[0]}), got {got}"
            )
        return logits, feat.flatten(1)

    def _tapped_forward(self, x: torch.Tensor):
        captured: list[torch.Tensor] = []

        def hook_for(_):
            def keep(module, args, kwargs, output):
                if captured:
                    raise ValueError(
                        f"{self.layer} runs more than once per forward, so its "
                        f"{'input' if self.read_input else 'output'} is not one feature "
                        "vector per image; pass features= another submodule name or a callable"
                    )
                captured.append(args[0] if self.read_input else output)

            return keep

        with temporary_forward_hooks([self.model.get_submodule(self.layer)], hook_for):
            logits = self.model(x)
        if not captured:
            raise ValueError(
                f"{self.layer} did not run in the classifier's forward pass; "
                "pass features= a submodule that does, or a callable"
            )
        return logits, captured[0]


def offers_features(classifier: nn.Module) -> bool:
    """Whether features=None finds features: a forward_with_features method or an nn.Linear."""
    return callable(getattr(classifier, "forward_with_features", None)) or any(
        isinstance(module, nn.Linear) for module in classifier.modules()
    )


def last_linear(classifier: nn.Module) -> str:
    """Name of the classifier's last nn.Linear in module order; refuses a classifier without one."""
    names = [name for name, module in classifier.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(
            f"{type(classifier).__name__} has neither forward_with_features nor an nn.Linear "
            "whose input could serve as features; pass features= a submodule name or a callable "
            "x -> (logits, features)"
        )
    return names[-1]


def with_features(classifier: nn.Module, features: FeatureSpec = None) -> nn.Module:
    """`classifier` itself when features is None and it has forward_with_features, else a
    `WithFeatures` adapter reading the features as `features` says (see the module docstring)."""
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    if features is None:
        if callable(getattr(classifier, "forward_with_features", None)):
            return classifier
        return WithFeatures(classifier, layer=last_linear(classifier), read_input=True)
    if isinstance(features, str):
        modules = dict(classifier.named_modules())
        if not features or features not in modules:
            known = ", ".join([name for name in modules if name][:8])
            raise ValueError(
                f"features = {features!r} is not a submodule of {type(classifier).__name__}; "
                f"its module names look like: {known}"
            )
        return WithFeatures(classifier, layer=features)
    if callable(features):
        return WithFeatures(classifier, fn=features)
    raise TypeError(
        f"features must be None, a submodule name or a callable x -> (logits, features), "
        f"got {type(features).__name__}"
    )


@torch.no_grad()
def extract_features(
    classifier: nn.Module,
    images: torch.Tensor,
    features: FeatureSpec = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """(N, D) float32 features of `images` on the CPU, read as `with_features` says, with the
    classifier in eval mode and run in batches on its own device."""
    adapted = with_features(classifier, features)
    device = next((t.device for t in classifier.parameters()), torch.device("cpu"))
    was_training = classifier.training
    classifier.eval()
    try:
        out = [
            adapted.forward_with_features(images[i : i + batch_size].to(device))[1].float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        classifier.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
