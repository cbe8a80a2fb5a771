"""The one writer of every file tldr-fast produces, and the checks of output paths made before any work.

A write goes to a temporary file in the target's own directory (so the rename cannot cross file
systems), named TEMP_PREFIX + target name + random suffix, is fsync'ed, renamed over the target and
the directory is fsync'ed: an interrupted write leaves the old file or the new one, never a mix,
plus at most one temporary file with the known prefix, which `remove_stale_temps` deletes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_PREFIX = ".tldr-fast-tmp."


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path), fsync it, then rename it over `path` (and fsync the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp creates 0600; give the file the permissions an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: str | os.PathLike, payload) -> Path:
    return atomic_write_bytes(path, json.dumps(payload, indent=2, sort_keys=True).encode())


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete this writer's leftover temporary files in `folder` (only safe while no write is under way)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# -- output paths, checked before any work --------------------------------------------------------


def check_output_dir(path: str | os.PathLike, name: str) -> Path:
    """Create directory `path` if needed and prove it writable; ValueError naming `name` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is an existing file; expected a directory to write into")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"{name} {path}: cannot create the directory ({err.strerror or err})"
        ) from err
    _probe_writable(path, name)
    return path


def check_output_file(path: str | os.PathLike, name: str) -> Path:
    """`path` must be a file path (not a directory) whose directory exists or can be made, writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{name} {path} is a directory; expected the path of a file to write "
            f"(e.g. {path / 'model.safetensors'})"
        )
    if path.exists() and not path.is_file():
        raise ValueError(f"{name} {path} exists and is not a regular file")
    check_output_dir(path.parent, f"{name} {path}: its directory")
    return path


def _probe_writable(folder: Path, name: str) -> None:
    # os.access answers for the real uid and ignores read-only mounts; creating a file is the test.
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}probe.", dir=folder)
    except OSError as err:
        raise ValueError(f"{name} {folder} is not writable ({err.strerror or err})") from err
    os.close(fd)
    os.unlink(probe)
