"""Model and result files: safetensors weights plus a JSON header, written atomically, never unpickled.

A model file stores the module's state dict as safetensors tensors; its metadata holds one JSON
document under the key "tldr_fast": {"format": "tldr-fast/model", "arch": ..., "config": {...},
plus anything the caller adds (dataset, accuracy, ...)}. `load` rebuilds the module from the
registered architecture and its constructor arguments. A run result (anything with
`save_to(path)` and a registered loader) can be saved the same way.

Writes go to a temporary file in the same directory, are fsync'ed, then renamed over the target,
so an interrupted save leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

MODEL_FORMAT = "tldr-fast/model"
_META_KEY = "tldr_fast"
_ARCHITECTURES: dict[str, type[nn.Module]] = {}
_FORMAT_LOADERS: dict[str, Callable[[Path], object]] = {}


def register_architecture(cls: type[nn.Module]) -> type[nn.Module]:
    """Make `load` able to rebuild `cls` (needs `.arch` and `.config()` giving its constructor kwargs)."""
    name = getattr(cls, "arch", None) or cls.__name__
    _ARCHITECTURES[name] = cls
    return cls


def register_format(fmt: str, loader: Callable[[Path], object]) -> None:
    """Make `load` dispatch files or directories whose header names `fmt` to `loader(path)`."""
    _FORMAT_LOADERS[fmt] = loader


def architectures() -> dict[str, type[nn.Module]]:
    _register_builtin()
    return dict(_ARCHITECTURES)


# Modules whose classifiers are registered with @register_architecture when imported.
_ARCHITECTURE_MODULES = ("tldr_fast.attacks.bnn_model", "tldr_fast.attacks.dp", "tldr_fast.attacks.kkt",
                         "tldr_fast.attacks.split")


def _register_builtin() -> None:
    import importlib

    from tldr_fast import models

    for module in _ARCHITECTURE_MODULES:
        importlib.import_module(module)
    for name in models.__all__:
        cls = getattr(models, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and getattr(cls, "arch", ""):
            _ARCHITECTURES.setdefault(cls.arch, cls)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path), fsync it, then rename it over `path` (and fsync the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def write_json_atomic(path: str | os.PathLike, payload) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True)))


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Tensors (made contiguous, on CPU) plus a JSON-serialisable metadata dict, written atomically."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {_META_KEY: json.dumps(metadata, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=header))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by `write_safetensors_atomic`; clear errors for foreign files."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(_META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or foreign?): {err}") from err
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but has no tldr-fast header (key {_META_KEY!r} in its metadata)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} has a corrupt tldr-fast header: {err}") from err
    return tensors, metadata


def save(path: str | os.PathLike, obj, metadata: dict | None = None) -> Path:
    """Write a model (nn.Module with `.arch` and `.config()`) or a result (object with `save_to`)."""
    if hasattr(obj, "save_to") and not isinstance(obj, nn.Module):
        return obj.save_to(path)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"save() takes an nn.Module or a Result, got {type(obj).__name__}")
    arch = getattr(obj, "arch", None)
    if not arch or not hasattr(obj, "config"):
        raise TypeError(
            f"{type(obj).__name__} cannot be saved as a model file: it needs an `arch` name and a "
            "`config()` method returning its constructor arguments"
        )
    header = {"format": MODEL_FORMAT, "arch": arch, "config": obj.config(), **(metadata or {})}
    return write_safetensors_atomic(path, obj.state_dict(), header)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Read a model file (or any registered format, e.g. a run directory) without unpickling."""
    path = Path(path)
    if path.is_dir():
        return _load_directory(path)
    if path.suffix == ".pt":
        raise ValueError(
            f"{path} is a pickle-based .pt file; read its state dict with load_state_dict_file(), "
            "which uses torch.load(weights_only=True), and build the module yourself"
        )
    tensors, header = read_safetensors(path)
    fmt = header.get("format")
    if fmt in _FORMAT_LOADERS:
        return _FORMAT_LOADERS[fmt](path)
    if fmt != MODEL_FORMAT:
        raise ValueError(f"{path} has format {fmt!r}; expected {MODEL_FORMAT!r} or one of {sorted(_FORMAT_LOADERS)}")
    archs = architectures()
    arch = header.get("arch")
    if arch not in archs:
        raise ValueError(f"{path} names unknown architecture {arch!r}; known architectures: {', '.join(sorted(archs))}")
    model = archs[arch](**header.get("config", {}))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit architecture {arch!r} with config {header.get('config')}: {err}") from err
    model.to(map_location)
    model.eval()
    model.metadata = {k: v for k, v in header.items() if k not in ("format", "arch", "config")}
    return model


def load_header(path: str | os.PathLike) -> dict:
    """Only the JSON header of a model file."""
    return read_safetensors(path)[1]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a `.pt` file; the latter only with weights_only=True."""
    path = Path(path)
    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} does not hold a flat state dict of tensors")
        return state
    from safetensors.torch import load_file

    return load_file(str(path))


def _load_directory(path: Path):
    header_file = path / "config.json"
    if not header_file.is_file():
        raise FileNotFoundError(f"{path} is a directory but has no config.json; not a tldr-fast run directory")
    header = json.loads(header_file.read_text())
    fmt = header.get("format", "tldr-fast/run")
    if fmt not in _FORMAT_LOADERS:
        import tldr_fast.api  # noqa: F401  (registers the run-directory format)
    if fmt not in _FORMAT_LOADERS:
        raise ValueError(f"{path}: no loader registered for run format {fmt!r}")
    return _FORMAT_LOADERS[fmt](path)
