"""A run directory has one owner: the process holding its lock, for the whole run.

`claim(run_dir, intent)` takes an exclusive `fcntl.flock` on RUN_DIR/.tldr-fast.lock (the OS
releases it when the process dies, kill -9 included), writes the holder's pid into it, removes the
atomic writer's stale temporary files, and checks the directory against the intent:

    "new"        the directory must be empty (or not exist): a fresh run never mixes with another
    "resume"     continue the run in it (or start one if it holds none)
    "overwrite"  delete the previous run's checkpoints and outputs, then start fresh
    "existing"   update a finished run (the evaluation writes its metrics next to it)

Claims are re-entrant within a process (the CLI claims before loading data, the engine again
inside): the inner claim is a no-op. In a torch.distributed job rank 0 is the owner: the other
ranks' claims check the path and hold nothing, since they never write. Checkpoint files live in RUN_DIR/checkpoints as
step-XXXXXXXX.safetensors; each names its run (a random id drawn when the run starts, kept on
resume), and rotation deletes only older checkpoints of the same run, never the newest one.
`check_checkpoint_header` is the schema of a checkpoint's header (its tensors are checked by the
engine, which knows the run's layout); `resume_newest` falls back past unreadable checkpoints.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tldr_fast.atomic_files import TEMP_PREFIX, check_output_dir, remove_stale_temps
from tldr_fast.serialization import read_header

CHECKPOINT_FORMAT = "tldr-fast/checkpoint"

LOCK_NAME = ".tldr-fast.lock"
INTENTS = ("new", "resume", "overwrite", "existing")
# What a run writes into its directory (tldr_fast.api.Result.save_to and the evaluation); only
# these and the checkpoints are deleted by "overwrite".
RUN_OUTPUTS = (
    "images.safetensors",
    "generators.safetensors",
    "kkt-lambdas.safetensors",
    "config.json",
    "history.json",
    "grid.png",
    "metrics.json",
    "report.html",
)
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})\.safetensors$")
_held: dict[Path, int] = {}  # resolved run directory -> claim depth in this process


class UnreadableCheckpoint(ValueError):
    """A checkpoint that is truncated, foreign or malformed: resume falls back past it."""


class CheckpointSkipped(UserWarning):
    """Resume skipped an unreadable checkpoint and continued from an older one."""


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked: held by another process, or holding another run."""


def run_intent(resume: bool, overwrite: bool) -> str:
    """The claim intent of a training run started with these flags."""
    if resume and overwrite:
        raise ValueError(
            "resume and overwrite exclude each other: resume continues the run, overwrite deletes it"
        )
    return "resume" if resume else "overwrite" if overwrite else "new"


@contextmanager
def claim(run_dir: str | os.PathLike, intent: str = "new", name: str = "run_dir") -> Iterator[Path]:
    """Hold `run_dir` exclusively for the block (see the module docstring); `name` labels errors."""
    if intent not in INTENTS:
        raise ValueError(f"intent must be one of {INTENTS}, got {intent!r}")
    path = Path(run_dir)
    if intent == "existing" and not path.is_dir():
        raise FileNotFoundError(f"{name} {path} is not a directory")
    check_output_dir(path, name)
    if _follower_rank():
        yield path  # rank 0 of the job holds the directory and alone writes into it
        return
    key = path.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    fd = _lock(path)
    try:
        _held[key] = 1
        for folder in (path, checkpoint_dir(path)):
            remove_stale_temps(folder)
        _check_intent(path, intent, name)
        yield path
    finally:
        _held.pop(key, None)
        os.close(fd)  # releases the flock


def _follower_rank() -> bool:
    """Whether this process is a rank other than 0 of a torch.distributed job (torchrun sets RANK
    before the process group exists)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() != 0
    return os.environ.get("RANK", "0") not in ("", "0")


def _lock(path: Path) -> int:
    lock_file = path / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = _holder(lock_file)
        raise RunDirectoryError(
            f"run directory {path} is in use by {holder} (lock {lock_file}); wait for it to finish "
            "or choose another directory"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _holder(lock_file: Path) -> str:
    try:
        pid = lock_file.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def _check_intent(path: Path, intent: str, name: str) -> None:
    if intent == "resume" and not list_checkpoints(path) and (path / "images.safetensors").exists():
        raise RunDirectoryError(
            f"{name} {path} holds a finished run whose checkpoints were dropped: there is nothing to "
            "resume from (keep them with --keep-checkpoints, or pass --overwrite to start again)"
        )
    if intent in ("resume", "existing"):
        return
    if intent == "overwrite":
        for old in list_checkpoints(path):
            old.unlink()
        for output in RUN_OUTPUTS:
            (path / output).unlink(missing_ok=True)
        return
    occupied = sorted(
        p.name for p in path.iterdir() if p.name != LOCK_NAME and not _empty_checkpoint_dir(p)
    )
    if occupied:
        shown = ", ".join(occupied[:5]) + (", ..." if len(occupied) > 5 else "")
        raise RunDirectoryError(
            f"{name} {path} is not empty (holds {shown}); pass --resume to continue the run in it, "
            "or --overwrite to delete its run and start again (API: resume=True or overwrite=True)"
        )


def _empty_checkpoint_dir(p: Path) -> bool:
    return p.name == "checkpoints" and p.is_dir() and not any(p.iterdir())


# -- checkpoints --------------------------------------------------------------------------------


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.safetensors"


def checkpoint_step(path: Path) -> int:
    return int(_CHECKPOINT_NAME.match(path.name).group(1))


def drop_checkpoints(run_dir: str | os.PathLike) -> int:
    """Delete a finished run's checkpoints (its outputs stay); returns how many were deleted."""
    old = list_checkpoints(run_dir)
    for path in old:
        path.unlink()
    return len(old)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files of a run directory, oldest (lowest step) first; temporaries excluded."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if _CHECKPOINT_NAME.match(p.name) and not p.name.startswith(TEMP_PREFIX)
    ]
    return sorted(found, key=checkpoint_step)


def rotate_checkpoints(newest: Path, run_id: str, keep: int) -> list[Path]:
    """Delete all but the `keep` newest checkpoints of run `run_id` up to `newest` (which is kept).

    Checkpoints of other runs, and files whose run id does not read back, are never touched."""
    step = checkpoint_step(newest)
    older = [
        p
        for p in list_checkpoints(newest.parent.parent)
        if checkpoint_step(p) < step and checkpoint_run_id(p) == run_id
    ]
    doomed = older[: max(len(older) - (keep - 1), 0)]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run that wrote checkpoint `path`; None when it does not read back."""
    try:
        run_id = read_header(path)[1].get("run_id")
    except (OSError, ValueError):
        return None
    return run_id if isinstance(run_id, str) else None


_HEADER_TYPES = {
    "kind": str,
    "config": dict,
    "generator": dict,
    "step": int,
    "history": dict,
    "classifier_sha256": str,
}


def check_checkpoint_header(path: Path, meta: dict) -> None:
    """Types and ranges of a checkpoint header; UnreadableCheckpoint naming the field otherwise."""
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UnreadableCheckpoint(
            f"{path} is not a tldr-fast checkpoint (format {meta.get('format')!r:.80})"
        )
    for key, kind in _HEADER_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise UnreadableCheckpoint(
                f"{path}: header field {key!r} must be a {kind.__name__}, got {meta.get(key)!r:.80}"
            )
    if meta["step"] != checkpoint_step(path):
        raise UnreadableCheckpoint(
            f"{path}: header says step {meta['step']}, the file name step {checkpoint_step(path)}"
        )
    for term, values in meta["history"].items():
        if (
            not isinstance(values, list)
            or len(values) != meta["step"]
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            raise UnreadableCheckpoint(
                f"{path}: history of {term!r} must be {meta['step']} numbers"
            )
    if not isinstance(meta.get("run_id", ""), str):
        raise UnreadableCheckpoint(
            f"{path}: header field 'run_id' must be a string, got {meta['run_id']!r:.80}"
        )


def resume_newest(run_dir: str | os.PathLike, load):
    """(load(path), path) for the newest checkpoint that `load` reads without UnreadableCheckpoint,
    warning (CheckpointSkipped) with each one skipped; ((None, None), None) when there is none at
    all; ValueError when there are checkpoints but none reads back."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            loaded = load(path)
        except UnreadableCheckpoint as err:
            skipped.append(str(err))
            continue
        if skipped:
            warnings.warn(
                CheckpointSkipped(f"resuming from {path}; skipped: {'; '.join(skipped)}"),
                stacklevel=2,
            )
        return loaded, path
    if skipped:
        raise ValueError(
            f"cannot resume in {run_dir}: no checkpoint reads back ({'; '.join(skipped)}); "
            "start again with --overwrite (API: overwrite=True)"
        )
    return (None, None), None
