"""Model and result files: safetensors weights plus a JSON header, written atomically, never unpickled.

A model file stores the module's state dict as safetensors tensors; its metadata holds one JSON
document under the key "tldr_fast": {"format": "tldr-fast/model", "arch": ..., "config": {...},
plus anything the caller adds (dataset, accuracy, ...)}. `load` rebuilds the module from the
registered architecture and its constructor arguments. A run result (anything with
`save_to(path)` and a registered loader) can be saved the same way.

Files are written by the one atomic writer (tldr_fast.atomic_files). Reading checks the
safetensors header against a schema before anything is allocated: known dtypes, byte ranges that
match the shapes and lie inside the file; a model file's tensors must match, name for name, the
dtypes and shapes of its architecture built (on the meta device) from the header's config, and
its floating-point tensors must be finite.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from tldr_fast.atomic_files import atomic_write, atomic_write_bytes, write_json_atomic  # noqa: F401  (re-exported)
from tldr_fast.validation import check_finite_tensors

MODEL_FORMAT = "tldr-fast/model"
_META_KEY = "tldr_fast"
_ARCHITECTURES: dict[str, type[nn.Module]] = {}
_FORMAT_LOADERS: dict[str, Callable[[Path], object]] = {}

# Bounds on what a header may ask for: its length, and a model config's JSON (a config lists layer
# sizes; a longer one is not a model tldr-fast wrote).
MAX_HEADER_BYTES = 256 * 2**20
MAX_CONFIG_CHARS = 4096
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


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
_ARCHITECTURE_MODULES = (
    "tldr_fast.attacks.bnn_model",
    "tldr_fast.attacks.dp",
    "tldr_fast.attacks.kkt",
    "tldr_fast.attacks.split",
)


def _register_builtin() -> None:
    import importlib

    from tldr_fast import models

    for module in _ARCHITECTURE_MODULES:
        importlib.import_module(module)
    for name in models.__all__:
        cls = getattr(models, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and getattr(cls, "arch", ""):
            _ARCHITECTURES.setdefault(cls.arch, cls)


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')} {self.shape}"


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata
    )


def write_safetensors_atomic(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict,
    plain_metadata: dict[str, str] | None = None,
) -> Path:
    """Tensors (made contiguous, on CPU) plus a JSON-serialisable metadata dict, written atomically.

    The file is serialised in memory and written by the one atomic writer (safetensors' own
    save_file would leave its own partial temporary file behind when killed)."""
    header = {**(plain_metadata or {}), _META_KEY: json.dumps(metadata, sort_keys=True)}
    return atomic_write_bytes(path, _safetensors_bytes(tensors, header))


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """(tensor name -> TensorInfo, tldr-fast header) of a file written by `write_safetensors_atomic`,
    checked by `read_layout`, whose metadata must hold a JSON object under the tldr-fast key."""
    infos, plain = read_layout(path)
    raw_meta = plain.get(_META_KEY)
    if raw_meta is None:
        raise ValueError(
            f"{path} is a safetensors file but has no tldr-fast header (key {_META_KEY!r} in its metadata)"
        )
    try:
        metadata = json.loads(raw_meta)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path} has a corrupt tldr-fast header: {err}") from err
    if not isinstance(metadata, dict):
        raise ValueError(
            f"{path} has a tldr-fast header that is {type(metadata).__name__}, expected a JSON object"
        )
    return infos, metadata


def read_layout(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensor name -> TensorInfo, plain metadata) of any safetensors file, read and checked without
    reading or allocating any tensor: every entry must have a known dtype, a shape of non-negative
    integers and a byte range that matches it and lies inside the file, and the ranges together
    cannot exceed the file. ValueError naming the file and the fault otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"file {path} does not exist" if not path.exists() else f"{path} is not a file"
        )
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > size - 8 or length > MAX_HEADER_BYTES:
            raise _unreadable(path, f"header length {length} in a file of {size} bytes")
        raw = fh.read(length)
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _unreadable(path, "its header is not JSON") from err
    if not isinstance(entries, dict):
        raise _unreadable(path, f"its header is a {type(entries).__name__}, not an object")
    plain = entries.pop("__metadata__", None) or {}
    if not isinstance(plain, dict) or not all(isinstance(v, str) for v in plain.values()):
        raise _unreadable(path, "__metadata__ must map names to strings")
    return _tensor_infos(path, entries, size - 8 - length), plain


def _tensor_infos(path: Path, entries: dict, data_size: int) -> dict[str, TensorInfo]:
    infos, total = {}, 0
    for name, entry in entries.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("dtype"), str)
            or entry["dtype"] not in _DTYPES
        ):
            got = entry.get("dtype") if isinstance(entry, dict) else entry
            raise _unreadable(
                path, f"tensor {name!r} has dtype {_clip(got)}; expected one of {sorted(_DTYPES)}"
            )
        dtype = _DTYPES[entry["dtype"]]
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not _int_list(shape) or len(shape) > 8:
            raise _unreadable(
                path,
                f"tensor {name!r} has shape {_clip(shape)}; expected a list of at most 8 integers >= 0",
            )
        if not _int_list(offsets) or len(offsets) != 2 or not offsets[0] <= offsets[1] <= data_size:
            raise _unreadable(
                path,
                f"tensor {name!r} has byte range {_clip(offsets)}; expected [begin, end] "
                f"within the file's {data_size} data bytes",
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise _unreadable(
                path,
                f"tensor {name!r}: shape {tuple(shape)} of {entry['dtype']} needs {nbytes} "
                f"bytes, its byte range holds {offsets[1] - offsets[0]}",
            )
        total += nbytes
        infos[name] = TensorInfo(dtype, tuple(shape))
    if total > data_size:
        raise _unreadable(
            path, f"its tensors claim {total} bytes but the file holds {data_size} data bytes"
        )
    return infos


def _unreadable(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file (truncated or foreign?): {why}")


def _int_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def check_tensors(
    path, infos: dict[str, TensorInfo], expected: dict[str, TensorInfo], what: str
) -> None:
    """The file's tensors must be exactly `expected` (names, dtypes, shapes); ValueError naming the first fault."""
    missing = sorted(expected.keys() - infos.keys())
    unexpected = sorted(infos.keys() - expected.keys())
    if missing or unexpected:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:5])}" if missing else "",
                f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
            )
            if part
        )
        raise ValueError(f"{path}: its tensors do not fit {what}: {detail}")
    for name, want in expected.items():
        if infos[name] != want:
            raise ValueError(
                f"{path}: tensor {name} is {infos[name].describe()} in the file; "
                f"{what} needs {want.describe()}"
            )


def read_safetensors(
    path: str | os.PathLike,
    expected: dict[str, TensorInfo] | None = None,
    what: str = "the expected layout",
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by `write_safetensors_atomic`; clear errors for foreign files.

    The header is checked (`read_header`, and against `expected` when given) before any tensor is read."""
    infos, metadata = read_header(path)
    if expected is not None:
        check_tensors(path, infos, expected, what)
    return _read_tensors(Path(path)), metadata


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, str(err)) from err


def expected_state(cls: type[nn.Module], config: dict, where: str) -> dict[str, TensorInfo]:
    """The state dict layout of cls(**config), built on the meta device (nothing allocated)."""
    skeleton = _build(cls, config, where, device="meta")
    return {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in skeleton.state_dict().items()}


def _build(cls: type[nn.Module], config, where: str, device=None) -> nn.Module:
    if not isinstance(config, dict) or len(json.dumps(config)) > MAX_CONFIG_CHARS:
        raise ValueError(
            f"{where}: config must be a JSON object of at most {MAX_CONFIG_CHARS} characters, "
            f"got {_clip(config)}"
        )
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(**config)
    except Exception as err:  # a constructor's own complaint about its arguments
        raise ValueError(
            f"{where}: config {_clip(config)} does not build {cls.__name__}: "
            f"{type(err).__name__}: {err}"
        ) from err


def _clip(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
    infos, header = read_header(path)
    fmt = header.get("format")
    if isinstance(fmt, str) and fmt in _FORMAT_LOADERS:
        return _FORMAT_LOADERS[fmt](path)
    if fmt != MODEL_FORMAT:
        raise ValueError(
            f"{path} has format {_clip(fmt)}; expected {MODEL_FORMAT!r} or one of {sorted(_FORMAT_LOADERS)}"
        )
    archs = architectures()
    arch = header.get("arch")
    if not isinstance(arch, str) or arch not in archs:
        raise ValueError(
            f"{path} names unknown architecture {_clip(arch)}; known architectures: {', '.join(sorted(archs))}"
        )
    config = header.get("config", {})
    what = f"architecture {arch!r} with config {_clip(config)}"
    skeleton = _build(archs[arch], config, str(path), device="meta")
    check_tensors(
        path,
        infos,
        {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in skeleton.state_dict().items()},
        what,
    )
    # Buffers a constructor makes without storing them (non-persistent) are bounded by the file too.
    needed = sum(
        t.numel() * t.element_size() for t in chain(skeleton.parameters(), skeleton.buffers())
    )
    if needed > 2 * path.stat().st_size + 2**20:
        raise ValueError(
            f"{path}: {what} needs {needed} bytes, far more than the file's {path.stat().st_size}"
        )
    tensors = _read_tensors(path)
    model = _build(archs[arch], config, str(path))
    model.load_state_dict(tensors, strict=True)
    check_finite_tensors(model.state_dict().items(), f"{path}: tensor")
    model.to(map_location)
    model.eval()
    model.metadata = {k: v for k, v in header.items() if k not in ("format", "arch", "config")}
    return model


def load_header(path: str | os.PathLike) -> dict:
    """Only the JSON header of a model file."""
    return read_header(path)[1]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a `.pt` file; the latter only with weights_only=True."""
    path = Path(path)
    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise ValueError(f"{path} does not hold a flat state dict of tensors")
        return state
    read_layout(path)  # a foreign file: its layout checked before any tensor is read
    return _read_tensors(path)


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding an object; FileNotFoundError or ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {_clip(value)}")
    return value


def _load_directory(path: Path):
    header_file = path / "config.json"
    if not header_file.is_file():
        raise FileNotFoundError(
            f"{path} is a directory but has no config.json; not a tldr-fast run directory"
        )
    header = read_json_object(header_file)
    if not isinstance(header.get("format", ""), str):
        raise ValueError(
            f"{header_file}: 'format' must be a string, got {_clip(header.get('format'))}"
        )
    fmt = header.get("format", "tldr-fast/run")
    if fmt not in _FORMAT_LOADERS:
        import tldr_fast.api  # noqa: F401  (registers the run-directory format)
    if fmt not in _FORMAT_LOADERS:
        raise ValueError(f"{path}: no loader registered for run format {fmt!r}")
    return _FORMAT_LOADERS[fmt](path)
