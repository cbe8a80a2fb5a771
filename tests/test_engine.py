"""The trainer: bad input, frozen classifier, history, checkpoints, bit-exact resume, non-finite loss, diversity."""

from __future__ import annotations

import itertools

import pytest
import torch
from relative_error import rel_rms
from torch import nn

import tldr_fast as tf
from tldr_fast import engine
from tldr_fast.config import InversionConfig, ReconstructionConfig
from tldr_fast.models import PaperCNN
from tldr_fast.training import build_seeded

SHAPE = (1, 14, 14)
TINY = {
    "latent_dim": 8,
    "generator_width": 8,
    "batch_size": 10,
    "num_generators": 2,
    "steps": 3,
    "log_every": 1,
}


@pytest.fixture(scope="session")
def trained_classifier():
    """A small PaperCNN trained on 1000 bundled MNIST digits downsampled to 14 x 14 (once per session)."""
    images, labels = tf.datasets.load("mnist-bundled", subset=1000, seed=0)
    images = nn.functional.avg_pool2d(images, 2)
    # Seeded construction: the initial weights must not depend on which tests ran first.
    model = build_seeded(lambda: PaperCNN(1, 10, 14, channels=(8, 16), hidden=32), 0)
    return tf.train_classifier(
        model, images, labels, epochs=4, batch_size=50, lr=3e-3, seed=0, progress=False
    )


@pytest.fixture
def classifier():
    torch.manual_seed(3)
    return PaperCNN(1, 10, 14, channels=(4, 8), hidden=16).eval()


def _params_equal(a: engine.Trained, b: engine.Trained) -> bool:
    return a.params.keys() == b.params.keys() and all(
        torch.equal(a.params[k], b.params[k]) for k in a.params
    )


# -- bad input ------------------------------------------------------------------------------------


def test_image_shape_mismatch_names_both_shapes(classifier):
    with pytest.raises(ValueError, match=r"\(1, 28, 28\).*\(1, 14, 14\)"):
        engine.train(classifier, 10, (1, 28, 28), ReconstructionConfig(**TINY), progress=False)


def test_num_classes_mismatch(classifier):
    with pytest.raises(ValueError, match="num_classes is 7 but the classifier outputs 10 logits"):
        engine.train(classifier, 7, SHAPE, ReconstructionConfig(**TINY), progress=False)


def test_classifier_must_be_a_module():
    with pytest.raises(TypeError, match="classifier must be a torch.nn.Module, got function"):
        engine.train(lambda x: x, 10, SHAPE, ReconstructionConfig(**TINY), progress=False)


class _FlatOutput(nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)


class _NoFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(196, 10)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_classifier_with_wrong_output_shape():
    with pytest.raises(ValueError, match=r"logits of shape \(B, num_classes\), got \(2,\)"):
        engine.train(
            _FlatOutput(), 10, SHAPE, ReconstructionConfig(**TINY, gamma=0, delta=0), progress=False
        )


def test_classifier_that_fails_on_the_images_is_reported():
    with pytest.raises(ValueError, match=r"failed on generator images of shape \(2, 1, 28, 28\)"):
        engine.train(
            _NoFeatures(),
            10,
            (1, 28, 28),
            InversionConfig(**TINY, gamma=0, delta=0),
            progress=False,
        )


def test_diversity_needs_features():
    with pytest.raises(TypeError, match="forward_with_features"):
        engine.train(_NoFeatures(), 10, SHAPE, InversionConfig(**TINY), progress=False)


def test_feature_statistics_prior_needs_batch_norm():
    with pytest.raises(
        ValueError,
        match="eta_bn = 0.5 needs BatchNorm layers with running statistics.*_NoFeatures has none",
    ):
        engine.train(
            _NoFeatures(),
            10,
            SHAPE,
            ReconstructionConfig(**TINY, gamma=0, delta=0, eta_bn=0.5),
            progress=False,
        )


def test_plain_classifier_without_diversity_trains():
    torch.manual_seed(0)
    trained = engine.train(
        _NoFeatures(), 10, SHAPE, InversionConfig(**TINY, gamma=0, delta=0), progress=False
    )
    assert set(trained.history) == {"kl", "ce", "total"}


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"gamma": -1.0}, "weight gamma must be a finite number >= 0"),
        ({"eta_grad": float("nan")}, "weight eta_grad"),
        ({"alpha_pert": float("inf")}, "weight alpha_pert"),
        ({"num_generators": 0}, r"num_generators \(K\) must be an integer >= 1"),
        ({"batch_size": 1}, "too small for the diversity losses"),
        ({"eps": -0.1}, "weight eps"),
        ({"grad_norm_mode": "mean"}, "grad_norm_mode must be one of"),
        ({"output_activation": "relu"}, "output_activation must be one of"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"eta_bn": -1.0}, "weight eta_bn"),
        (
            {"batch_size": 1, "gamma": 0, "delta": 0, "eta_bn": 0.5},
            "too small for the feature-statistics prior",
        ),
    ],
)
def test_bad_config_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        ReconstructionConfig(**overrides)


def test_batch_of_one_is_fine_without_diversity():
    assert ReconstructionConfig(batch_size=1, gamma=0, delta=0).batch_size == 1


def test_presets():
    authors = ReconstructionConfig.authors()
    assert (authors.alpha, authors.alpha_pert, authors.beta, authors.beta_pert) == (5, 5, 10, 10)
    assert (authors.gamma, authors.delta, authors.eta_tv, authors.eta_pix, authors.eta_grad) == (
        10,
        7,
        2,
        0,
        2,
    )
    assert (authors.lr, authors.batch_size, authors.eps) == (3e-3, 1000, 0.6)
    assert not authors.ortho_normalized and authors.grad_norm_mode == "batch"
    paper = ReconstructionConfig.paper()
    assert (
        paper == ReconstructionConfig()
        and paper.ortho_normalized
        and paper.grad_norm_mode == "per_sample"
    )
    assert InversionConfig().vector_kind == "soft" and paper.vector_kind == "hot"
    with pytest.raises(ValueError, match="unknown ReconstructionConfig fields"):
        ReconstructionConfig.preset("paper", eta4=1.0)
    with pytest.raises(ValueError, match="preset must be one of"):
        ReconstructionConfig.preset("mine")


# -- the loop -------------------------------------------------------------------------------------


def test_classifier_is_frozen_in_eval_mode_and_restored(classifier):
    seen = []
    classifier.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    classifier.train()
    trained = engine.train(classifier, 10, SHAPE, ReconstructionConfig(**TINY), progress=False)
    assert seen and not any(seen)
    assert classifier.training and all(p.requires_grad for p in classifier.parameters())
    assert all(p.grad is None for p in classifier.parameters())
    assert {len(v) for v in trained.history.values()} == {3}
    assert set(trained.history) == {
        "kl",
        "kl_pert",
        "ce",
        "ce_pert",
        "cos",
        "ortho",
        "tv",
        "pix",
        "grad",
        "total",
    }


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-14), (torch.float32, 1e-6)])
@pytest.mark.parametrize("betas", [(0.5, 0.999), (0.9, 0.99)])
def test_functional_adam_follows_torch_optim_adam(dtype, tolerance, betas):
    # The engine's update against torch.optim.Adam over steps whose gradients span six orders of
    # magnitude and include an exactly zero one (denominator = eps), with fresh random values.
    params = {"w": torch.randn(40, 7, dtype=dtype), "b": torch.randn(7, dtype=dtype)}
    reference = {k: v.clone().requires_grad_() for k, v in params.items()}
    optimizer = torch.optim.Adam(reference.values(), lr=3e-3, betas=betas, eps=engine.ADAM_EPS)
    state = engine.AdamState.zeros_like(params)
    for scale in (1.0, 1e-3, 0.0, 1e3, 1e-2):
        grads = {k: torch.randn_like(v) * scale for k, v in params.items()}
        for k, tensor in reference.items():
            tensor.grad = grads[k].clone()
        optimizer.step()
        params, state = engine.adam_update(params, grads, state, 3e-3, *betas)
        for k, tensor in reference.items():
            assert torch.isfinite(params[k]).all()
            assert rel_rms(params[k], tensor.detach()) < tolerance
            assert rel_rms(state.m[k], optimizer.state[tensor]["exp_avg"]) < tolerance
            assert rel_rms(state.v[k], optimizer.state[tensor]["exp_avg_sq"]) < tolerance
    assert int(state.t) == 5


def test_seeded_runs_are_reproducible(classifier):
    cfg = ReconstructionConfig(**TINY, seed=5)
    a = engine.train(classifier, 10, SHAPE, cfg, progress=False)
    b = engine.train(classifier, 10, SHAPE, cfg, progress=False)
    assert _params_equal(a, b) and a.history == b.history
    c = engine.train(
        classifier, 10, SHAPE, ReconstructionConfig(**{**TINY, "seed": 6}), progress=False
    )
    assert not _params_equal(a, c)


def test_resume_is_bit_exact(classifier, tmp_path, monkeypatch):
    cfg = ReconstructionConfig(**{**TINY, "steps": 5}, checkpoint_every=2)
    uninterrupted = engine.train(classifier, 10, SHAPE, cfg, run_dir=tmp_path / "a", progress=False)

    # Kill the second run during step 3, after the checkpoint of step 2 was written.
    real_flush = engine._flush

    def killing_flush(pending, trained, last_checkpoint, bar):
        if trained.steps_done == 3:
            raise KeyboardInterrupt
        real_flush(pending, trained, last_checkpoint, bar)

    monkeypatch.setattr(engine, "_flush", killing_flush)
    with pytest.raises(KeyboardInterrupt):
        engine.train(classifier, 10, SHAPE, cfg, run_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(engine, "_flush", real_flush)
    assert [p.name for p in engine.list_checkpoints(tmp_path / "b")] == [
        "step-00000002.safetensors"
    ]

    torch.manual_seed(1234)  # whatever the global RNG holds now must not matter
    resumed = engine.train(
        classifier, 10, SHAPE, cfg, run_dir=tmp_path / "b", resume=True, progress=False
    )
    assert resumed.steps_done == 5
    assert _params_equal(uninterrupted, resumed)
    assert uninterrupted.history == resumed.history
    assert len(engine.list_checkpoints(tmp_path / "a")) == engine.CHECKPOINTS_KEPT


def test_resume_with_a_different_config_names_the_fields(classifier, tmp_path):
    cfg = ReconstructionConfig(**TINY, checkpoint_every=1)
    engine.train(classifier, 10, SHAPE, cfg, run_dir=tmp_path, progress=False)
    changed = ReconstructionConfig(**{**TINY, "steps": 6}, checkpoint_every=1, gamma=3.0, eps=0.2)
    with pytest.raises(
        ValueError, match=r"config differs in eps: 0\.1 -> 0\.2, gamma: 10\.0 -> 3\.0"
    ):
        engine.train(classifier, 10, SHAPE, changed, run_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="inversion run"):
        engine.train(
            classifier,
            10,
            SHAPE,
            InversionConfig(**TINY, checkpoint_every=1),
            run_dir=tmp_path,
            resume=True,
            progress=False,
        )
    # More steps is a valid continuation.
    longer = ReconstructionConfig(**{**TINY, "steps": 4}, checkpoint_every=1)
    assert (
        engine.train(
            classifier, 10, SHAPE, longer, run_dir=tmp_path, resume=True, progress=False
        ).steps_done
        == 4
    )


def test_resume_against_a_different_classifier_is_refused(classifier, tmp_path):
    cfg = ReconstructionConfig(**TINY, checkpoint_every=1)
    engine.train(classifier, 10, SHAPE, cfg, run_dir=tmp_path, progress=False)
    with torch.no_grad():
        classifier.classifier.bias.add_(1.0)
    with pytest.raises(ValueError, match="different classifier"):
        engine.train(classifier, 10, SHAPE, cfg, run_dir=tmp_path, resume=True, progress=False)


class _GoesBad(nn.Module):
    """Wraps a classifier; from the n-th forward call on its logits are NaN."""

    def __init__(self, inner, bad_from_call):
        super().__init__()
        self.inner, self.calls, self.bad_from_call = inner, itertools.count(1), bad_from_call
        self.input_shape = inner.input_shape

    def forward_with_features(self, x):
        logits, feat = self.inner.forward_with_features(x)
        if next(self.calls) >= self.bad_from_call:
            logits = logits * float("nan")
        return logits, feat

    def forward(self, x):
        return self.forward_with_features(x)[0]


def test_non_finite_loss_names_term_and_step_and_keeps_the_checkpoint(classifier, tmp_path):
    # Call 1 is the input probe; with eta_grad = 0 every step makes one classifier call.
    cfg = ReconstructionConfig(**{**TINY, "steps": 6}, checkpoint_every=2, eta_grad=0)
    bad = _GoesBad(classifier, bad_from_call=5)
    with pytest.raises(
        engine.NonFiniteLossError, match=r"'kl' is not finite at step 4.*step-00000002"
    ) as info:
        engine.train(bad, 10, SHAPE, cfg, run_dir=tmp_path, progress=False)
    assert (info.value.term, info.value.step) == ("kl", 4)
    assert [p.name for p in engine.list_checkpoints(tmp_path)] == ["step-00000002.safetensors"]


def test_trained_generator_modules_match_the_stack(classifier):
    trained = engine.train(classifier, 10, SHAPE, InversionConfig(**TINY), progress=False)
    g1 = trained.generator(1)
    last = f"to_image.{len(g1.to_image) - 1}.weight"
    assert torch.equal(g1.to_image[-1].weight, trained.params[last][1])


# -- the method -----------------------------------------------------------------------------------


def _mean_within_class_ssim(result) -> float:
    from skimage.metrics import structural_similarity

    scores = []
    for y in range(10):
        imgs = result.images[result.labels == y][:, 0].double().numpy()
        for i, j in itertools.combinations(range(len(imgs)), 2):
            scores.append(structural_similarity(imgs[i], imgs[j], data_range=1.0))
    return float(sum(scores) / len(scores))


@pytest.mark.slow
def test_diversity_losses_lower_within_class_ssim(trained_classifier):
    """Inversion with cosine + orthogonality gives more varied images than gamma = delta = 0.

    Averaged over three seeds: one run's difference depends on its trajectory, which the thread
    count's summation order changes (measured at 80 steps: 0.02-0.18 per seed, 0.07-0.09 on average
    at 1 and 2 threads)."""
    diverse, plain = [], []
    for seed in range(3):
        common = {
            **TINY,
            "num_generators": 1,
            "steps": 80,
            "batch_size": 20,
            "log_every": 10,
            "dropout": 0.0,
            "seed": seed,
        }
        for weights, scores in (
            ({"gamma": 10, "delta": 7}, diverse),
            ({"gamma": 0, "delta": 0}, plain),
        ):
            result = tf.invert(
                trained_classifier,
                10,
                SHAPE,
                InversionConfig(**common, **weights),
                progress=False,
                samples_per_class=4,
            )
            scores.append(_mean_within_class_ssim(result))
    assert sum(diverse) / 3 < sum(plain) / 3 - 0.02, (diverse, plain)
