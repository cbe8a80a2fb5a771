"""The KKT term of the TLDR objective (eta_kkt): its value and gradients (generators and multipliers)
against a per-image autograd reference in float64, the chunked path, the attack's residual on a
homogeneous target, the multipliers in the trainable state (checkpoints, resume, the saved run)
and refused values."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from relative_error import rel_rms
from torch.func import functional_call, grad_and_value

import tldr_fast as tf
from tldr_fast import api, conditioning, engine, objective, serialization
from tldr_fast.attacks import kkt
from tldr_fast.config import InversionConfig, ReconstructionConfig
from tldr_fast.models import PaperCNN

SHAPE = (1, 8, 8)
TINY = {"latent_dim": 6, "generator_width": 4, "dropout": 0.0, "batch_size": 6}
# Every other term off: the reference below computes the KKT term alone.
ONLY_KKT = {w: 0.0 for w in ReconstructionConfig.WEIGHTS} | {"eta_kkt": 1.5}


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(1)
    return PaperCNN(1, 10, 8, channels=(4, 8), hidden=16).eval().requires_grad_(False)


def float64_problem(cfg, classifier, seed=5):
    """(problem, params, buffers, noise) in float64, the trainable params (multipliers included)
    drawn at random so that every multiplier differs."""
    double = copy.deepcopy(classifier).double()
    template, params, buffers = objective.build_generators(cfg, 10, SHAPE)
    labels = (
        conditioning.balanced_labels(cfg.batch_size, 10).expand(cfg.num_generators, -1).contiguous()
    )
    problem = objective.Problem(template, double, cfg, labels)
    torch.manual_seed(seed)
    params = {k: torch.randn_like(v, dtype=torch.float64) * 0.3 for k, v in params.items()}
    buffers = {k: v.double() if v.is_floating_point() else v for k, v in buffers.items()}
    noise = {k: v.double() for k, v in objective.draw_noise(problem).items()}
    return problem, params, buffers, noise


def reference_kkt(problem, params, buffers, noise) -> torch.Tensor:
    """(K,) R_k = ||theta - (N / B) sum_i lambda_ki grad_theta phi(x_ki)||^2 / ||theta||^2, one
    image at a time with torch.autograd.grad, phi = f_y - max_{j != y} f_j written out."""
    cfg, clf = problem.config, problem.classifier
    vectors = objective.condition(problem, noise)
    generator_params = {k: v for k, v in params.items() if k != objective.KKT_MULTIPLIERS}
    x = objective.generate(
        problem.template, generator_params, buffers, noise["z"], problem.labels, vectors
    )
    lam = cfg.kkt_lambda_min + torch.nn.functional.softplus(params[objective.KKT_MULTIPLIERS])
    theta = {k: p.detach().clone().requires_grad_(True) for k, p in clf.named_parameters()}
    clf_buffers = dict(clf.named_buffers())
    k_count, b = problem.labels.shape
    scale = (cfg.kkt_train_size or b) / b
    norm2 = sum((p.detach() ** 2).sum() for p in theta.values())
    residuals = []
    for k in range(k_count):
        total = {n: torch.zeros_like(p) for n, p in theta.items()}
        for i in range(b):
            y = int(problem.labels[k, i])
            logits = functional_call(clf, (theta, clf_buffers), (x[k, i : i + 1],))[0]
            others = torch.cat([logits[:y], logits[y + 1 :]])
            phi = logits[y] - others.max()
            grads = torch.autograd.grad(phi, list(theta.values()), create_graph=True)
            for n, g in zip(theta, grads, strict=True):
                total[n] = total[n] + scale * lam[k, i] * g
        residuals.append(sum(((theta[n].detach() - total[n]) ** 2).sum() for n in theta) / norm2)
    return torch.stack(residuals)


def autograd_gradients(problem, params, buffers, noise):
    """(eta_kkt * sum_k R_k of the reference, its gradient w.r.t. every trainable parameter)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    values = reference_kkt(problem, leaves, buffers, noise)
    loss = problem.config.eta_kkt * values.sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return values.detach(), dict(zip(leaves, grads, strict=True))


def relative_rms_over(grads, reference, names) -> float:
    diff = sum(float((grads[n] - reference[n]).pow(2).sum()) for n in names)
    scale = sum(float(reference[n].pow(2).sum()) for n in names)
    assert scale > 0
    return (diff / scale) ** 0.5


@pytest.mark.parametrize(
    ("config_cls", "overrides"),
    [
        (ReconstructionConfig, {}),
        (
            ReconstructionConfig,
            {"kkt_train_size": 20, "kkt_lambda_min": 0.1, "kkt_lambda_init": 0.3},
        ),
        (InversionConfig, {"kkt_train_size": 3}),
    ],
    ids=["plain-sum", "train-size-20", "inversion"],
)
def test_term_and_its_gradients_equal_the_per_image_autograd_reference(
    classifier, config_cls, overrides
):
    weights = {w: 0.0 for w in config_cls.WEIGHTS} | {"eta_kkt": 1.5}
    cfg = config_cls(**{**TINY, "num_generators": 2, **weights, **overrides})
    problem, params, buffers, noise = float64_problem(cfg, classifier)
    assert params[objective.KKT_MULTIPLIERS].shape == (2, 6)
    grads, (loss, report) = grad_and_value(objective.objective, has_aux=True)(
        params, buffers, noise, problem
    )
    values, reference = autograd_gradients(problem, params, buffers, noise)
    assert set(report) == {"kkt", "total"}
    assert rel_rms(report["kkt"], values) < 1e-12
    assert rel_rms(loss, 1.5 * values.sum()) < 1e-12
    assert set(grads) == set(reference)
    generator_names = [n for n in reference if n != objective.KKT_MULTIPLIERS]
    assert relative_rms_over(grads, reference, generator_names) < 1e-10
    assert rel_rms(grads[objective.KKT_MULTIPLIERS], reference[objective.KKT_MULTIPLIERS]) < 1e-10


def test_on_a_homogeneous_target_the_term_is_the_attacks_residual():
    """One hidden layer (degree 2 in the weights): with N = B, R_k is kkt.kkt_residual at the
    unit-norm weights with the same multipliers."""
    torch.manual_seed(2)
    target = kkt.KKTMLP(1, 10, 8, hidden=(12,)).double().eval().requires_grad_(False)
    cfg = ReconstructionConfig(**{**TINY, "num_generators": 2, **ONLY_KKT})
    problem, params, buffers, noise = float64_problem(cfg, target)
    _, report = objective.objective(params, buffers, noise, problem)
    vectors = objective.condition(problem, noise)
    x = objective.generate(
        problem.template,
        objective.generator_parameters(params),
        buffers,
        noise["z"],
        problem.labels,
        vectors,
    )
    lam = objective.kkt_lambdas(params, cfg)
    unit = kkt.unit_parameters(copy.deepcopy(problem.classifier).requires_grad_(True))
    for k in range(2):
        expected = kkt.kkt_residual(problem.classifier, unit, {}, x[k], problem.labels[k], lam[k])
        assert rel_rms(report["kkt"][k], expected) < 1e-12


@pytest.mark.parametrize(
    ("overrides", "chunk"),
    [
        ({**ONLY_KKT, "kkt_train_size": 50}, 4),  # 4 + 2: a remainder chunk
        ({"num_generators": 2, "eta_kkt": 0.7, "eta_bn": 0.5, "grad_norm_mode": "batch"}, 1),
        ({"num_generators": 1, "eta_kkt": 0.7, "eta_pix": 1.0}, 5),
    ],
    ids=["kkt-alone-remainder", "with-batch-statistics-chunk-of-one", "all-terms"],
)
def test_chunked_path_equals_the_whole_batch(classifier, overrides, chunk):
    cfg = ReconstructionConfig(**{**TINY, "num_generators": 2, **overrides})
    problem, params, buffers, noise = float64_problem(cfg, classifier)
    torch.manual_seed(7)
    whole, (loss, report) = grad_and_value(objective.objective, has_aux=True)(
        params, buffers, noise, problem
    )
    torch.manual_seed(7)
    chunked, (chunked_loss, chunked_report) = objective.chunked_grad_and_value(
        params, buffers, noise, problem, chunk
    )
    assert torch.allclose(chunked_loss, loss, rtol=1e-12, atol=0)
    assert set(chunked_report) == set(report) and "kkt" in report
    for term in report:
        torch.testing.assert_close(
            chunked_report[term], report[term], rtol=1e-10, atol=1e-12, msg=term
        )
    assert set(chunked) == set(whole)
    generator_names = [n for n in whole if n != objective.KKT_MULTIPLIERS]
    assert relative_rms_over(chunked, whole, generator_names) < 1e-10
    assert rel_rms(chunked[objective.KKT_MULTIPLIERS], whole[objective.KKT_MULTIPLIERS]) < 1e-10


def test_off_by_default_adds_no_state_and_no_term(classifier):
    cfg = ReconstructionConfig(**TINY)
    assert cfg.eta_kkt == 0 and InversionConfig().eta_kkt == 0
    assert ReconstructionConfig.authors().eta_kkt == 0
    template, params, _ = objective.build_generators(cfg, 10, SHAPE)
    assert set(params) == set(dict(template.named_parameters()))
    assert objective.kkt_lambdas(params, cfg) is None
    problem, params, buffers, noise = float64_problem(cfg, classifier)
    _, report = objective.objective(params, buffers, noise, problem)
    assert "kkt" not in report


def test_multipliers_start_at_lambda_init():
    cfg = ReconstructionConfig(**TINY, num_generators=3, eta_kkt=1.0, kkt_lambda_init=0.5)
    _, params, _ = objective.build_generators(cfg, 10, SHAPE)
    lam = objective.kkt_lambdas(params, cfg)
    assert lam.shape == (3, 6)
    torch.testing.assert_close(lam, torch.full((3, 6), 0.5), rtol=1e-6, atol=0)


def _run(classifier, run_dir, steps, **kwargs):
    cfg = ReconstructionConfig(
        **{**TINY, "num_generators": 2, "steps": steps, "log_every": 1},
        eta_kkt=2.0,
        kkt_train_size=30,
        checkpoint_every=1,
    )
    return api.reconstruct(
        classifier, 10, SHAPE, cfg, run_dir=run_dir, progress=False, samples_per_class=1, **kwargs
    )


def test_a_run_trains_checkpoints_resumes_and_saves_the_multipliers(classifier, tmp_path):
    clf = copy.deepcopy(classifier)
    straight = _run(clf, tmp_path / "a", steps=3)
    assert "kkt" in straight.history and len(straight.history["kkt"]) == 3
    initial = torch.full((2, 6), 0.02)
    assert straight.kkt_lambdas.shape == (2, 6)
    assert not torch.allclose(straight.kkt_lambdas, initial)  # Adam moved them

    # The checkpoint holds the multipliers' free parameters and their Adam moments.
    checkpoint = engine.list_checkpoints(tmp_path / "a")[-1]
    tensors, _ = serialization.read_safetensors(checkpoint)
    name = objective.KKT_MULTIPLIERS
    assert {f"params/{name}", f"adam_m/{name}", f"adam_v/{name}"} <= set(tensors)
    torch.testing.assert_close(
        kkt.lambdas_from(tensors[f"params/{name}"], 0.01), straight.kkt_lambdas, rtol=0, atol=0
    )

    # Resumed from step 2 of a second run: the same multipliers and generators, bit for bit.
    _run(clf, tmp_path / "b", steps=2)
    resumed = _run(clf, tmp_path / "b", steps=3, resume=True)
    assert torch.equal(resumed.kkt_lambdas, straight.kkt_lambdas)
    assert torch.equal(resumed.images, straight.images)
    assert resumed.history == straight.history

    # The exported generators hold the generators' weights only; the multipliers have their file.
    infos, meta = serialization.read_header(tmp_path / "a" / "generators.safetensors")
    stacked = dict(straight.generators[0].state_dict())
    assert set(infos) == set(stacked) and not any("kkt" in n for n in infos)
    assert meta["num_generators"] == 2
    loaded = tf.load(tmp_path / "a")
    assert torch.equal(loaded.kkt_lambdas, straight.kkt_lambdas)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["eta_kkt"] == 2.0
    # A run without the term writes no multipliers file.
    plain = api.reconstruct(
        clf,
        10,
        SHAPE,
        ReconstructionConfig(**TINY, steps=1),
        run_dir=tmp_path / "c",
        progress=False,
        samples_per_class=1,
    )
    assert plain.kkt_lambdas is None and not (tmp_path / "c" / api.KKT_LAMBDAS_FILE).exists()
    assert tf.load(tmp_path / "c").kkt_lambdas is None


def test_trained_generators_do_not_see_the_multipliers(classifier):
    cfg = ReconstructionConfig(**TINY, num_generators=2, steps=1, eta_kkt=1.0)
    trained = engine.train(copy.deepcopy(classifier), 10, SHAPE, cfg, progress=False)
    assert objective.KKT_MULTIPLIERS in trained.params
    module = trained.generator(1)  # load_state_dict is strict: an extra tensor would be refused
    assert set(module.state_dict()) == set(objective.generator_parameters(trained.params)) | set(
        trained.buffers
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"eta_kkt": -1.0}, r"^weight eta_kkt must be a finite number >= 0, got -1.0$"),
        ({"eta_kkt": float("nan")}, r"^weight eta_kkt must be a finite number >= 0, got nan$"),
        ({"kkt_train_size": 0}, r"^kkt_train_size must be an integer >= 1, got 0$"),
        ({"kkt_lambda_min": -0.1}, r"^weight kkt_lambda_min must be a finite number >= 0"),
        (
            {"kkt_lambda_init": 0.01},
            r"^kkt_lambda_init must exceed kkt_lambda_min \(0.01\), got 0.01$",
        ),
    ],
)
def test_bad_values_are_refused_in_one_line(overrides, match):
    for cls in (ReconstructionConfig, InversionConfig):
        with pytest.raises(ValueError, match=match):
            cls(**overrides)


def test_cli_sets_the_term_and_refuses_a_bad_value_in_one_line(classifier, tmp_path, capsys):
    from tldr_fast.cli import main

    model = tmp_path / "model.safetensors"
    tf.save(model, classifier)
    common = ["--model", str(model), "--steps", "2", "--batch-size", "6", "--generators", "2"]
    common += ["--samples-per-class", "1", "--no-progress", "--set", "latent_dim=6"]
    out = tmp_path / "run"
    args = ["--out", str(out), "--set", "eta_kkt=0.5", "--set", "kkt_train_size=100"]
    assert main(["invert", *common, *args]) == 0
    record = json.loads((out / "config.json").read_text())["config"]
    assert (record["eta_kkt"], record["kkt_train_size"]) == (0.5, 100)
    assert len(json.loads((out / "history.json").read_text())["terms"]["kkt"]) == 2
    assert (out / api.KKT_LAMBDAS_FILE).exists()
    capsys.readouterr()
    bad = ["--out", str(tmp_path / "bad"), "--set", "eta_kkt=-1"]
    assert main(["reconstruct", *common, *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "tldr-fast reconstruct: error: weight eta_kkt must be a finite number >= 0, got -1.0"
    ]
