"""`features=`: penultimate features of any classifier without subclassing it (tldr_fast.features),
through reconstruct, invert, evaluate and the CLI, under torch.func and torch.compile."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from relative_error import rel_rms
from torch import nn
from torch.func import functional_call, grad, vmap

from tldr_fast import api
from tldr_fast.config import InversionConfig, ReconstructionConfig
from tldr_fast.evaluate import fidelity
from tldr_fast.features import WithFeatures, extract_features, offers_features, with_features
from tldr_fast.grad_norm import per_sample_grad_norm, per_sample_grad_norm_and_forward

SHAPE = (3, 8, 8)
TINY = {
    "num_generators": 2,
    "batch_size": 6,
    "latent_dim": 4,
    "generator_width": 4,
    "steps": 2,
    "log_every": 1,
}


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock as written there: in-place ReLU and `out += identity`."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionStyle(nn.Module):
    """The structure of torchvision's ResNet, with no forward_with_features: conv1, bn1, in-place
    relu, layer1, avgpool, then torch.flatten and the fc head."""

    def __init__(self, num_classes: int = 10, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(TorchvisionBlock(width, width, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.avgpool(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(x, 1))


def external(dtype=torch.float32, seed: int = 0) -> TorchvisionStyle:
    torch.manual_seed(seed)
    model = TorchvisionStyle().to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def pooled(model: TorchvisionStyle, x):
    return model.avgpool(model.layer1(model.relu(model.bn1(model.conv1(x))))).flatten(1)


class _LogitsAndPooled(nn.Module):
    """features= as a module: x -> (logits, pooled features) of the model it holds."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), pooled(self.model, x)


def images(n: int = 5, dtype=torch.float64, seed: int = 1):
    return torch.rand(n, *SHAPE, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# -- choosing the features ----------------------------------------------------------------------


def test_a_model_with_forward_with_features_is_used_as_it_is():
    from tldr_fast.models import PaperCNN

    model = PaperCNN(3, 10, 8, channels=(4,), hidden=8)
    assert with_features(model) is model
    assert isinstance(with_features(model, "conv"), WithFeatures)  # a named layer overrides it


@pytest.mark.parametrize("features", [None, "avgpool", "callable"])
def test_features_of_a_torchvision_style_model(features):
    model = external(torch.float64)
    x = images()
    spec = (lambda v: (model(v), pooled(model, v))) if features == "callable" else features
    logits, feat = with_features(model, spec).forward_with_features(x)
    assert rel_rms(logits, model(x)) == 0
    assert feat.shape == (5, 4)
    assert rel_rms(feat, pooled(model, x)) == 0


def test_a_named_layer_is_flattened():
    model = external(torch.float64)
    _, feat = with_features(model, "layer1").forward_with_features(images())
    assert feat.shape == (5, 4 * 4 * 4)


def test_the_adapter_keeps_the_users_modules_and_nothing_else():
    model = external()
    adapted = with_features(model)
    assert adapted.model is model
    assert [id(p) for p in adapted.parameters()] == [id(p) for p in model.parameters()]
    assert len(list(adapted.named_parameters(remove_duplicate=False))) == len(
        list(model.parameters())
    )
    # A callable that is itself a module holding the model is not a second child of the adapter.
    as_module = with_features(model, _LogitsAndPooled(model))
    assert len(list(as_module.named_parameters(remove_duplicate=False))) == len(
        list(model.parameters())
    )
    assert (
        rel_rms(
            as_module.forward_with_features(images(dtype=torch.float32))[1],
            pooled(model, images(dtype=torch.float32)),
        )
        == 0
    )
    assert not model._forward_hooks and not model.fc._forward_hooks  # the tap leaves no hook behind
    adapted.forward_with_features(images(dtype=torch.float32))
    assert not model.fc._forward_hooks


def test_input_shape_and_num_classes_pass_through():
    from tldr_fast.models import PaperCNN

    model = PaperCNN(3, 10, 8, channels=(4,), hidden=8)
    adapted = with_features(model, "fc")
    assert adapted.input_shape == model.input_shape and adapted.num_classes == 10
    assert with_features(external()).input_shape is None


def test_unknown_layer_is_refused_by_name():
    with pytest.raises(
        ValueError,
        match=r"features = 'layer9' is not a submodule of TorchvisionStyle; .*conv1, bn1",
    ):
        with_features(external(), "layer9")
    with pytest.raises(ValueError, match="features = '' is not a submodule"):
        with_features(external(), "")


def test_features_of_the_wrong_type_are_refused():
    with pytest.raises(
        TypeError, match="features must be None, a submodule name or a callable .*got int"
    ):
        with_features(external(), 3)
    with pytest.raises(TypeError, match="classifier must be a torch.nn.Module, got str"):
        with_features("model")


def test_a_model_without_any_linear_is_refused_naming_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 10, 8), nn.Flatten())
    assert not offers_features(model)
    with pytest.raises(
        ValueError, match="Sequential has neither forward_with_features nor an nn.Linear.*features="
    ):
        with_features(model)


def test_a_layer_that_runs_twice_or_never_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.block(self.block(x)))

    with pytest.raises(ValueError, match="block runs more than once per forward"):
        with_features(Twice(), "block").forward_with_features(torch.rand(2, 4))
    with pytest.raises(ValueError, match="unused did not run in the classifier's forward pass"):
        with_features(Twice(), "unused").forward_with_features(torch.rand(2, 4))


def test_callable_features_must_have_one_row_per_image():
    model = external()
    adapted = with_features(model, lambda v: (model(v), v[:1]))
    with pytest.raises(ValueError, match=r"one row per image \(5\), got \(1, 3, 8, 8\)"):
        adapted.forward_with_features(images(dtype=torch.float32))


# -- torch.func and torch.compile ---------------------------------------------------------------


class _FeaturesAsForward(nn.Module):
    """forward = inner.forward_with_features, so functional_call runs it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner.forward_with_features(x)


@pytest.mark.parametrize("features", [None, "avgpool"])
def test_features_under_functional_call_vmap_and_grad(features):
    """grad of a function of the features with respect to the parameters through functional_call,
    per sample under vmap, equals plain autograd one sample at a time."""
    model = external(torch.float64)
    runner = _FeaturesAsForward(with_features(model, features))
    params = {n: p.detach() for n, p in runner.named_parameters()}
    x = images(3)

    def feature_energy(theta, xi):
        _, feat = functional_call(runner, theta, (xi.unsqueeze(0),))
        return feat.pow(2).sum()

    per_sample = vmap(grad(feature_energy), in_dims=(None, 0))(params, x)
    model.requires_grad_(True)
    for i in range(3):
        reference = torch.autograd.grad(
            pooled(model, x[i : i + 1]).pow(2).sum(),
            list(model.parameters()),
            allow_unused=True,
            materialize_grads=True,
        )
        for (name, g), ref in zip(per_sample.items(), reference, strict=True):
            assert rel_rms(g[i], ref) < 1e-12, name


@pytest.mark.parametrize("backend", ["ghost", "vmap"])
def test_gradient_norm_and_features_from_one_pass_of_an_external_model(backend):
    """The engine's call: per-sample norms with the features of the same forward, on a model that
    has no forward_with_features; norms and their d/dx equal the loop on the unwrapped model."""
    model = external(torch.float64).requires_grad_(False)
    adapted = with_features(model)
    x, y = images(4).requires_grad_(), torch.tensor([0, 3, 9, 3])
    norms, (logits, feat) = per_sample_grad_norm_and_forward(
        adapted, x, y, lambda v: adapted.forward_with_features(v), backend=backend
    )
    reference = per_sample_grad_norm(model, x, y, backend="loop")
    assert rel_rms(norms, reference) < 1e-12
    assert rel_rms(feat, pooled(model, x)) < 1e-12 and rel_rms(logits, model(x)) < 1e-12
    (dx,) = torch.autograd.grad(norms.sum() + feat.pow(2).sum(), x)
    (dx_ref,) = torch.autograd.grad(reference.sum() + pooled(model, x).pow(2).sum(), x)
    assert rel_rms(dx, dx_ref) < 1e-10


@settings(max_examples=5, deadline=None)
@given(batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_default_features_equal_the_head_input(batch, seed):
    model = external(torch.float64, seed=seed % 7)
    x = torch.rand(
        batch, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    _, feat = with_features(model).forward_with_features(x)
    assert torch.isfinite(feat).all()
    assert rel_rms(feat, pooled(model, x)) == 0


@pytest.mark.compile
def test_forward_with_features_compiles_as_one_graph():
    model = external()
    adapted = with_features(model, "avgpool")
    x = images(dtype=torch.float32)
    compiled = torch.compile(adapted.forward_with_features, fullgraph=True, backend="aot_eager")
    logits, feat = compiled(x)
    assert rel_rms(logits, model(x)) < 1e-6 and rel_rms(feat, pooled(model, x)) < 1e-6


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_step_on_an_external_model_equals_eager():
    """The engine's whole step (diversity terms, gradient norm, Adam) traced as one graph."""
    from tldr_fast import conditioning, objective
    from tldr_fast.compiled import CompiledStep
    from tldr_fast.engine import AdamState, make_step

    cfg = ReconstructionConfig(**TINY)
    template, params, buffers = objective.build_generators(cfg, 10, SHAPE)
    labels = (
        conditioning.balanced_labels(cfg.batch_size, 10, torch.device("cpu"))
        .expand(2, -1)
        .contiguous()
    )
    problem = objective.Problem(
        template, with_features(external().requires_grad_(False)), cfg, labels
    )
    step = make_step(problem, buffers)
    results = []
    for fn in (step, CompiledStep(step, backend="aot_eager")):
        torch.manual_seed(3)
        _, _, report = fn(dict(params), AdamState.zeros_like(params))
        results.append(report)
    for term in results[0]:
        torch.testing.assert_close(
            results[1][term], results[0][term], rtol=1e-4, atol=1e-5, msg=term
        )


# -- reconstruct, invert, evaluate, CLI ---------------------------------------------------------


@pytest.mark.parametrize(
    "entry, config", [(api.reconstruct, ReconstructionConfig), (api.invert, InversionConfig)]
)
def test_reconstruct_and_invert_take_an_external_model_unchanged(entry, config):
    model = external()
    result = entry(model, 10, SHAPE, config(**TINY), progress=False, samples_per_class=1)
    assert {"cos", "ortho"} <= set(result.history)
    assert result.images.shape == (2 * 10, *SHAPE)
    assert model.training is False and not model.fc._forward_hooks  # left as it was found


def test_a_named_feature_layer_is_recorded_for_the_evaluation(tmp_path):
    model = external()
    result = api.reconstruct(
        model,
        10,
        SHAPE,
        ReconstructionConfig(**TINY),
        progress=False,
        samples_per_class=1,
        features="layer1",
        run_dir=tmp_path,
    )
    assert json.loads((tmp_path / "config.json").read_text())["features"] == "layer1"
    assert api.Result.load_from(tmp_path).extra["features"] == "layer1"
    assert result.extra == {"features": "layer1"}


def test_a_bad_feature_layer_is_refused_before_training():
    with pytest.raises(ValueError, match="features = 'nope' is not a submodule"):
        api.reconstruct(
            external(), 10, SHAPE, ReconstructionConfig(**TINY), progress=False, features="nope"
        )


def test_no_features_needed_no_adapter():
    """With the diversity terms off, a model without any Linear trains as before."""
    model = nn.Sequential(nn.Conv2d(3, 10, 8), nn.Flatten())
    result = api.invert(
        model,
        10,
        SHAPE,
        InversionConfig(**TINY, gamma=0, delta=0),
        progress=False,
        samples_per_class=1,
    )
    assert "cos" not in result.history


def test_fidelity_feature_similarity():
    model = external()
    x = images(6, dtype=torch.float32)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    out = fidelity(x, y, target=model, features="avgpool")
    u = F.normalize(pooled(model, x).detach().double(), dim=1)
    expected = [float((u[:3] @ u[:3].T).sum() - 3) / 6, float(u[3] @ u[4])]
    assert out["target_feature_similarity"] == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert fidelity(x, y, target=model)["target_feature_similarity"] == pytest.approx(
        out["target_feature_similarity"]
    )
    copies = x[:1].expand(3, -1, -1, -1)
    same = fidelity(copies, torch.zeros(3, dtype=torch.int64), target=model)[
        "target_feature_similarity"
    ]
    assert same == pytest.approx(1.0, abs=1e-6)


def test_fidelity_without_features_to_read():
    model = nn.Sequential(nn.Conv2d(3, 10, 8), nn.Flatten())
    x, y = images(4, dtype=torch.float32), torch.tensor([0, 0, 1, 1])
    assert fidelity(x, y, target=model)["target_feature_similarity"] is None
    with pytest.raises(ValueError, match="features = 'fc' is not a submodule"):
        fidelity(x, y, target=model, features="fc")


def test_extract_features_in_batches_restores_training_mode():
    model = external().train()
    x = images(5, dtype=torch.float32)
    feat = extract_features(model, x, "avgpool", batch_size=2)
    assert model.training
    model.eval()
    assert rel_rms(feat, pooled(model, x)) < 1e-6


def test_cli_features_option(tmp_path, capsys):
    from tldr_fast import save
    from tldr_fast.cli import main
    from tldr_fast.models import PaperCNN

    torch.manual_seed(0)
    model_path = tmp_path / "model.safetensors"
    save(model_path, PaperCNN(3, 10, 8, channels=(4,), hidden=8))
    out = tmp_path / "run"
    argv = [
        "reconstruct",
        "--model",
        str(model_path),
        "--out",
        str(out),
        "--steps",
        "1",
        "--batch-size",
        "6",
        "--generators",
        "1",
        "--samples-per-class",
        "1",
        "--no-progress",
        "--set",
        "latent_dim=4",
        "--set",
        "generator_width=4",
        "--features",
        "conv",
    ]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["features"] == "conv"
    assert main([*argv[:-1], "conv9"]) == 2
    assert "features = 'conv9' is not a submodule of PaperCNN" in capsys.readouterr().err


def test_evaluation_reads_the_recorded_feature_layer(tmp_path):
    """evaluate_run takes the layer from config.json unless told otherwise (API and CLI)."""
    from tldr_fast import datasets, models, save
    from tldr_fast.cli import main
    from tldr_fast.evaluate import evaluate_run
    from tldr_fast.serialization import write_safetensors_atomic

    train = datasets.load_dataset("mnist-bundled", "train", subset=100, seed=0)
    torch.manual_seed(0)
    target = models.PaperCNN(1, 10, 28, channels=(4,), hidden=8)
    model_path = save(tmp_path / "target.safetensors", target)
    run = tmp_path / "run"
    recon, labels = train.images[::2], train.labels[::2]
    write_safetensors_atomic(
        run / "images.safetensors", {"images": recon, "labels": labels}, {"format": "test-run"}
    )
    (run / "config.json").write_text(
        json.dumps(
            {
                "kind": "reconstruct",
                "model": str(model_path),
                "dataset": "mnist-bundled",
                "subset": 100,
                "seed": 0,
                "features": "conv",
            }
        )
    )
    by_layer = {
        f: fidelity(recon, labels, target=target, features=f)["target_feature_similarity"]
        for f in ("conv", None)
    }
    assert by_layer["conv"] != pytest.approx(by_layer[None])
    options = {"heldout_data": None, "evaluator": False, "device": "cpu"}
    assert evaluate_run(run, **options)["fidelity"]["target_feature_similarity"] == pytest.approx(
        by_layer["conv"]
    )
    # An explicit layer wins: PaperCNN's own features are the output of its fc block.
    argv = [
        "evaluate",
        str(run),
        "--heldout",
        "none",
        "--evaluator",
        "none",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main([*argv, "--features", "fc"]) == 0
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["fidelity"]["target_feature_similarity"] == pytest.approx(by_layer[None])
