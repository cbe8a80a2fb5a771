"""The trainer: K stacked generators against a frozen classifier, with checkpoints and resume.

One step is a pure function of (params, Adam state) -> (params, Adam state, loss terms): the noise
is drawn inside it from the global RNG, the gradient is `objective.grad_and_report` (which runs
the classifier on chunks when the config asks), the update is a functional Adam. No host
synchronisation happens inside the step; the loop reads the loss values back every `log_every`
steps (progress bar, history, non-finite check) and before each checkpoint.

Checkpoints (RUN_DIR/checkpoints/step-XXXXXXXX.safetensors, written atomically) hold the trainable
parameters (the stacked generators' and, with eta_kkt > 0, the KKT multipliers'), the Adam
moments, the step, the RNG state, the history, the config and the run's id, so a resumed run on
the CPU continues bit for bit where the killed one stopped. A checkpoint is only written after the
values of every step before it were found finite. The run directory is held
(tldr_fast.run_dir.claim) for the whole run; resume takes the newest checkpoint that reads back
against the run's layout and falls back past unreadable ones, naming each it skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from tldr_fast import conditioning, distributed
from tldr_fast.compiled import CompiledStep
from tldr_fast.config import RESUMABLE_FIELDS, _EngineConfig, config_from_dict
from tldr_fast.models.generator import Generator
from tldr_fast.objective import (
    Problem,
    active_terms,
    batch_norm_layers,
    build_generators,
    draw_noise,
    generator_parameters,
    grad_and_report,
    needs_features,
)
from tldr_fast.run_dir import (  # noqa: F401  (list_checkpoints and the checkpoint errors: the engine's API)
    CHECKPOINT_FORMAT,
    CheckpointSkipped,
    UnreadableCheckpoint,
    check_checkpoint_header,
    checkpoint_path,
    claim,
    list_checkpoints,
    resume_newest,
    rotate_checkpoints,
    run_intent,
)
from tldr_fast.serialization import (
    TensorInfo,
    read_header,
    read_safetensors,
    write_safetensors_atomic,
)
from tldr_fast.validation import check_finite_module

CHECKPOINTS_KEPT = 2
ADAM_EPS = 1e-8


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or Inf; `term` and `step` (1-based) say where it happened first."""

    def __init__(self, term: str, step: int, checkpoint: Path | None):
        self.term, self.step, self.checkpoint = term, step, checkpoint
        kept = (
            f"; the last good checkpoint is {checkpoint}"
            if checkpoint
            else "; no checkpoint was written"
        )
        super().__init__(f"loss term {term!r} is not finite at step {step}{kept}")


@dataclass
class AdamState:
    """Functional Adam: first and second moments per stacked parameter and the step count."""

    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    t: torch.Tensor  # 0-d float64: the number of updates taken

    @classmethod
    def zeros_like(cls, params: dict[str, torch.Tensor]) -> AdamState:
        device = next(iter(params.values())).device
        return cls(
            {k: torch.zeros_like(p) for k, p in params.items()},
            {k: torch.zeros_like(p) for k, p in params.items()},
            torch.zeros((), dtype=torch.float64, device=device),
        )


def adam_update(params, grads, state: AdamState, lr: float, beta1: float, beta2: float):
    """One Adam step (Kingma & Ba, with bias correction), returning new params and state:
    m <- lerp(m, g, 1 - beta1), v <- beta2 v + (1 - beta2) g^2,
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), in torch.optim.Adam's
    order of operations. Each new tensor is allocated once and then updated in place: on a CPU a
    pass into a fresh multi-megabyte tensor costs several times one into an existing tensor
    (page faults): the update of the demo's three generators, A/B in one process, 84 ms as
    fourteen out-of-place passes per parameter against 54 ms now."""
    t = state.t + 1
    step_size = lr / (1 - beta1**t)  # 0-d float64 (t is): no host synchronisation
    correction2_sqrt = (1 - beta2**t).sqrt()
    new_params, m, v = {}, {}, {}
    for name, p in params.items():
        g = grads[name]
        m[name] = torch.lerp(state.m[name], g, 1 - beta1)
        v[name] = torch.mul(state.v[name], beta2).addcmul_(g, g, value=1 - beta2)
        denom = v[name].sqrt().div_(correction2_sqrt.to(p.dtype)).add_(ADAM_EPS)
        new_params[name] = torch.addcmul(
            p, torch.div(m[name], denom), step_size.to(p.dtype), value=-1
        )
    return new_params, AdamState(m, v, t)


def make_step(problem: Problem, buffers: dict[str, torch.Tensor]):
    """The training step: (params, AdamState) -> (params, AdamState, {term: (K,)})."""
    cfg = problem.config

    def step(params, state: AdamState):
        noise = draw_noise(problem)
        grads, (_, report) = grad_and_report(params, buffers, noise, problem)
        if (
            problem.shard is not None
        ):  # the global batch's gradient and values from the ranks' shares
            grads, report = distributed.sum_over_ranks(problem.shard, grads, report)
        params, state = adam_update(params, grads, state, cfg.lr, cfg.adam_beta1, cfg.adam_beta2)
        return params, state, report

    return step


@dataclass
class Trained:
    """What training produced: the stacked generators and the per-step history of every term."""

    template: Generator
    # The trainable parameters: the generators' stacked ones (`generator_parameters`) and, with
    # eta_kkt > 0, the KKT multipliers' free parameters (objective.KKT_MULTIPLIERS, (K, B)).
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    config: _EngineConfig
    history: dict[str, list[float]] = field(default_factory=dict)
    steps_done: int = 0
    # config.compile: seconds of the first compiled call (tracing, code generation, one step; on
    # CUDA plus the graph capture), kept apart from the step times. None when not compiled.
    compile_seconds: float | None = None

    def generator(self, index: int) -> Generator:
        """Generator `index` as an ordinary module (on the parameters' device)."""
        module = Generator(**self.template.config())
        state = {
            k: v[index] for k, v in {**generator_parameters(self.params), **self.buffers}.items()
        }
        module.load_state_dict(state)
        return module.to(next(iter(self.params.values())).device)


# -- validation ---------------------------------------------------------------------------------


def validate_classifier(classifier, num_classes: int, image_shape, needs_features: bool) -> None:
    """Refuse a classifier that is not a module, expects other images or predicts other classes."""
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    image_shape = tuple(int(s) for s in image_shape)
    expected = getattr(classifier, "input_shape", None)
    if expected is not None and tuple(expected) != image_shape:
        raise ValueError(
            f"the generator's image shape {image_shape} (C, H, W) does not match the classifier's "
            f"input shape {tuple(expected)}"
        )
    if needs_features and not hasattr(classifier, "forward_with_features"):
        raise TypeError(
            f"the diversity losses (gamma, delta > 0) need penultimate features, but "
            f"{type(classifier).__name__} has no forward_with_features(x) -> (logits, features); "
            "add one or set gamma = delta = 0"
        )
    check_finite_module(classifier, "the classifier")
    device = _device_of(classifier)
    probe = torch.full((2, *image_shape), 0.5, device=device)
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            out = classifier(probe)
    except Exception as err:  # the model's own error says why; we add which shape we fed
        raise ValueError(
            f"the classifier failed on generator images of shape (2, {', '.join(map(str, image_shape))}): {err}"
        ) from err
    finally:
        classifier.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the classifier must return logits of shape (B, num_classes), got {got}")
    if out.shape[1] != num_classes:
        raise ValueError(
            f"num_classes is {num_classes} but the classifier outputs {out.shape[1]} logits per image"
        )


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def classifier_fingerprint(classifier: nn.Module) -> str:
    """sha256 of the classifier's state dict (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(classifier.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- checkpoints --------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"rng/cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng/cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng/cpu"])
    if device.type == "cuda" and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"], device)


def save_checkpoint(
    run_dir: Path, trained: Trained, state: AdamState, fingerprint: str, run_id: str
) -> Path:
    """Write the checkpoint of trained.steps_done, then delete this run's checkpoints beyond the newest few."""
    tensors = {f"params/{k}": v for k, v in trained.params.items()}
    tensors.update({f"buffers/{k}": v for k, v in trained.buffers.items()})
    tensors.update({f"adam_m/{k}": v for k, v in state.m.items()})
    tensors.update({f"adam_v/{k}": v for k, v in state.v.items()})
    tensors["adam_t"] = state.t
    tensors.update(_rng_state(next(iter(trained.params.values())).device))
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "kind": trained.config.kind,
        "config": trained.config.to_dict(),
        "generator": trained.template.config(),
        "step": trained.steps_done,
        "history": trained.history,
        "classifier_sha256": fingerprint,
        "run_id": run_id,
    }
    path = write_safetensors_atomic(checkpoint_path(run_dir, trained.steps_done), tensors, metadata)
    rotate_checkpoints(path, run_id, CHECKPOINTS_KEPT)
    return path


def _group(tensors: dict[str, torch.Tensor], prefix: str, device) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}


def _checkpoint_layout(trained: Trained, infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The tensors a checkpoint of this run must hold: names, dtypes and shapes."""
    layout = {}
    for prefix, group in (
        ("params/", trained.params),
        ("buffers/", trained.buffers),
        ("adam_m/", trained.params),
        ("adam_v/", trained.params),
    ):
        layout.update({prefix + k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in group.items()})
    layout["adam_t"] = TensorInfo(torch.float64, ())
    layout["rng/cpu"] = TensorInfo(torch.uint8, tuple(torch.get_rng_state().shape))
    device = next(iter(trained.params.values())).device
    cuda = infos.get("rng/cuda")
    if device.type == "cuda" or (
        cuda is not None and cuda.dtype == torch.uint8 and len(cuda.shape) == 1
    ):
        layout["rng/cuda"] = TensorInfo(torch.uint8, cuda.shape if cuda is not None else (0,))
    return layout


def load_checkpoint(path: Path, trained: Trained, fingerprint: str) -> tuple[AdamState, str | None]:
    """Restore params, history and RNG into `trained` from `path`, returning the Adam state and the
    run id; UnreadableCheckpoint for a damaged file, ValueError for a checkpoint of another run."""
    try:
        infos, meta = read_header(path)
    except ValueError as err:
        raise UnreadableCheckpoint(str(err)) from err
    check_checkpoint_header(path, meta)
    if meta["kind"] != trained.config.kind:
        raise ValueError(
            f"cannot resume: {path} is a {meta['kind']!r:.40} run, this is a {trained.config.kind} run"
        )
    try:
        saved = config_from_dict(meta["kind"], meta["config"])
    except (TypeError, ValueError) as err:
        raise UnreadableCheckpoint(f"{path}: its config does not read back: {err}") from err
    differing = [f for f in trained.config.differing_fields(saved) if f not in RESUMABLE_FIELDS]
    if differing:
        detail = ", ".join(
            f"{f}: {getattr(saved, f)!r} -> {getattr(trained.config, f)!r}" for f in differing
        )
        raise ValueError(f"cannot resume from {path}: the config differs in {detail}")
    if meta["classifier_sha256"] != fingerprint:
        raise ValueError(
            f"cannot resume from {path}: it was made against a different classifier (weights differ)"
        )
    if meta["step"] > trained.config.steps:
        raise ValueError(
            f"cannot resume: {path} is at step {meta['step']}, beyond steps={trained.config.steps}"
        )
    try:
        tensors, _ = read_safetensors(
            path, _checkpoint_layout(trained, infos), "this run's checkpoint layout"
        )
    except ValueError as err:
        raise UnreadableCheckpoint(str(err)) from err
    device = next(iter(trained.params.values())).device
    trained.params = _group(tensors, "params/", device)
    trained.buffers = _group(tensors, "buffers/", device)
    trained.history = {k: list(v) for k, v in meta["history"].items()}
    trained.steps_done = int(meta["step"])
    _set_rng_state(tensors, device)
    state = AdamState(
        _group(tensors, "adam_m/", device),
        _group(tensors, "adam_v/", device),
        tensors["adam_t"].to(device),
    )
    return state, meta.get("run_id")


# -- the loop -----------------------------------------------------------------------------------


def train(
    classifier: nn.Module,
    num_classes: int,
    image_shape,
    config: _EngineConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> Trained:
    """Train config.num_generators generators against `classifier` (frozen and in eval mode meanwhile).

    With run_dir, the directory is held for the run and must be empty unless resume=True (continue
    from its newest readable checkpoint) or overwrite=True (delete its run first)."""
    if not isinstance(config, _EngineConfig):
        raise TypeError(
            f"config must be an InversionConfig or ReconstructionConfig, got {type(config).__name__}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    image_shape = tuple(int(s) for s in image_shape)
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir whose checkpoints to continue from")
    run_dir = Path(run_dir) if run_dir is not None else None
    owner = (
        claim(run_dir, run_intent(resume, overwrite))
        if run_dir is not None
        else contextlib.nullcontext()
    )

    validate_classifier(classifier, num_classes, image_shape, needs_features(config))
    if "bn" in active_terms(config) and not batch_norm_layers(classifier):
        raise ValueError(
            f"eta_bn = {config.eta_bn} needs BatchNorm layers with running statistics in the classifier, "
            f"and {type(classifier).__name__} has none; set eta_bn = 0"
        )
    device = _device_of(classifier)
    template, params, buffers = build_generators(config, num_classes, image_shape, device)
    labels = conditioning.balanced_labels(config.batch_size, num_classes, device)
    problem = Problem(
        template,
        classifier,
        config,
        labels.expand(config.num_generators, -1).contiguous(),
        distributed.current_shard(config.batch_size),
    )

    frozen = [(p, p.requires_grad) for p in classifier.parameters()]
    was_training = classifier.training
    classifier.eval().requires_grad_(False)
    try:
        with owner:
            return _run(problem, params, buffers, run_dir, resume, progress)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        classifier.train(was_training)


def _run(
    problem: Problem, params, buffers, run_dir: Path | None, resume: bool, progress: bool
) -> Trained:
    cfg = problem.config
    trained = Trained(problem.template, params, buffers, cfg)
    fingerprint = classifier_fingerprint(problem.classifier)
    distributed.check_identical(problem.shard, cfg.to_dict(), fingerprint, problem.labels.device)
    torch.manual_seed(cfg.seed)
    (state, run_id), last_checkpoint = (
        resume_newest(run_dir, partial(load_checkpoint, trained=trained, fingerprint=fingerprint))
        if resume
        else ((None, None), None)
    )
    state = state or AdamState.zeros_like(params)
    run_id = run_id or uuid.uuid4().hex
    step_fn = make_step(problem, trained.buffers)
    if cfg.compile:
        step_fn = CompiledStep(step_fn)
    bar = _progress_bar(cfg, trained.steps_done, progress and distributed.is_writer(problem.shard))
    pending: list[dict[str, torch.Tensor]] = []
    try:
        while trained.steps_done < cfg.steps:
            trained.params, state, report = step_fn(trained.params, state)
            trained.steps_done += 1
            pending.append(report)
            at_checkpoint = (
                run_dir is not None
                and cfg.checkpoint_every
                and trained.steps_done % cfg.checkpoint_every == 0
            )
            if at_checkpoint or len(pending) >= cfg.log_every or trained.steps_done == cfg.steps:
                _flush(pending, trained, last_checkpoint, bar)
                pending = []
            if at_checkpoint:
                # Rank 0 writes the (global) state; every rank knows the file's name.
                distributed.rank_zero(
                    problem.shard, save_checkpoint, run_dir, trained, state, fingerprint, run_id
                )
                last_checkpoint = checkpoint_path(run_dir, trained.steps_done)
    finally:
        if bar is not None:
            bar.close()
    trained.compile_seconds = getattr(step_fn, "compile_seconds", None)
    return trained


def _flush(pending, trained: Trained, last_checkpoint, bar) -> None:
    """Move the pending steps' values to the host: history, non-finite check, progress bar."""
    first_step = trained.steps_done - len(pending) + 1
    names = list(pending[0])
    # One transfer for all pending steps: (steps, terms, K).
    values = torch.stack([torch.stack([r[n] for n in names]) for r in pending]).cpu()
    weights = active_terms(trained.config)
    for offset, per_step in enumerate(values):
        if not bool(torch.isfinite(per_step).all()):
            raise NonFiniteLossError(
                _first_non_finite(names, per_step, weights), first_step + offset, last_checkpoint
            )
        per_step = per_step.double()
        for name, v in zip(names, per_step.mean(dim=1).tolist(), strict=True):
            trained.history.setdefault(name, []).append(v)
    if bar is not None:
        bar.update(len(pending))
        bar.set_postfix({n: _short(trained.history[n][-1]) for n in names}, refresh=False)


def _first_non_finite(names: list[str], per_step: torch.Tensor, weights: dict[str, float]) -> str:
    """The first term, in equation order, whose weighted value (in the step's dtype, as the total sums
    it) is not finite; 'total' only when every weighted term is finite and their sum overflowed."""
    for name, value in zip(names, per_step, strict=True):
        if name != "total" and not bool(torch.isfinite(value * weights.get(name, 1.0)).all()):
            return name
    return "total"


def _short(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _progress_bar(cfg: _EngineConfig, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=initial, desc=cfg.kind, unit="step", dynamic_ncols=True)
