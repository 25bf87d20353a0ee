"""Reading `.safetensors` files from strangers, and writing them atomically.

Adapters and checkpoints come from the internet. Before the safetensors library maps a single byte we
parse and check the header ourselves (8-byte little-endian length, then a JSON object), so that a
damaged, truncated or hostile file fails with an `AdapterFileError` that names the file, the key and
the fix, and a header that claims a 10^12-element tensor is refused before anything is allocated.

The checks are as strict as the format (and the safetensors library, which would refuse the same files
less helpfully): known dtypes only, sizes that match shapes exactly, tensors that tile the data area with
no overlap, no gap and no trailing bytes. Two things we refuse that the library tolerates: duplicate
JSON keys (the library silently keeps the last one, so two tools could read two different tensors), and
strings that are not encodable as UTF-8 (lone surrogate escapes). Unknown extra fields inside a tensor
entry are tolerated, as the library does.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lycoft.io.atomic import atomic_write, scratch_directory
from lycoft.io.errors import AdapterFileError

MAX_HEADER_BYTES = 100_000_000
"""The safetensors library refuses larger headers; a real adapter's header is a few hundred KB."""

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
"""Every dtype of the safetensors format (0.8) and its size in bits (F4/F6 are packed, sub-byte)."""

# Torch names for the format's dtypes; looked up by name because older torch builds lack the newer
# float8/float4 types, and torch has no 6-bit floats at all. F4 comes back packed two per byte, as the
# safetensors library returns it.
_TORCH_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64",
    "F4": "float4_e2m1fn_x2",
}  # fmt: skip

_INT64_MAX = 2**63 - 1

FIX_TRUNCATED = "the file is truncated or damaged: re-download it and compare its size with the source"
FIX_DAMAGED = (
    "the file is damaged or was written by a non-conforming tool: re-download it, "
    "or re-export it with the safetensors library"
)
FIX_NOT_SAFETENSORS = (
    "if it is a pickle checkpoint (.ckpt/.pt/.bin), load it with load_torch_checkpoint "
    "or convert it to .safetensors; otherwise check the path"
)


@dataclass(frozen=True)
class TensorInfo:
    """One validated header entry: what the file says about a tensor, before reading its bytes.

    `data_offsets` are relative to the start of the data area (after the header), as in the format.
    """

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype this loads as, or None where this torch build has none (F6, old float8)."""
        return torch_dtype_of(self.dtype)


def torch_dtype_of(dtype: str) -> torch.dtype | None:
    """The torch dtype for a safetensors dtype name, or None if this torch build cannot represent it."""
    name = _TORCH_DTYPE_NAMES.get(dtype)
    found = getattr(torch, name, None) if name else None
    return found if isinstance(found, torch.dtype) else None


class _DuplicateKey(Exception):
    """Raised from inside json.loads; deliberately not a ValueError so it cannot pass for a syntax error."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _sniff(prefix: bytes) -> str:
    """Guess what a non-safetensors file is from its first bytes, to make the error actionable."""
    if prefix.startswith(b"PK\x03\x04"):
        return "it looks like a PyTorch zip checkpoint (.ckpt/.pt/.bin)"
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return "it looks like a Python pickle (a legacy .ckpt/.pt/.bin checkpoint)"
    if prefix.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file itself: run `git lfs pull` or download the file"
    if prefix.startswith(b"GGUF"):
        return "it looks like a GGUF file"
    if prefix and all(32 <= b < 127 or b in b"\t\r\n" for b in prefix):
        return "it looks like a text file (an HTML error page instead of the download?)"
    return ""


def _short(value: Any, limit: int = 60) -> str:
    """repr() for messages, cut so a hostile 100 MB header cannot produce a 100 MB error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _is_index(value: Any) -> bool:
    """A JSON integer usable as a size or offset (bool is an int in Python, not in JSON)."""
    return type(value) is int and 0 <= value <= _INT64_MAX


def _check_text(path: str, text: str, key: str, what: str) -> None:
    """Refuse strings with lone surrogate escapes (`"\\ud800"`): not UTF-8, other readers choke on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        problem = f"{what} {_short(text)} is not valid Unicode"
        raise AdapterFileError(path, problem, FIX_DAMAGED, key) from None


def require_regular_file(path: str | os.PathLike[str]) -> os.stat_result:
    """Stat `path`, raising `AdapterFileError` unless it is an existing regular file (not a dir or FIFO)."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        fix = "check the path (and that the download finished)"
        raise AdapterFileError(p, "file not found", fix) from None
    except OSError as e:
        fix = "check the path and its permissions"
        raise AdapterFileError(p, f"cannot be read ({e.strerror})", fix) from e
    if stat.S_ISDIR(st.st_mode):
        raise AdapterFileError(p, "is a directory, not a file", "pass the path of the file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise AdapterFileError(p, "is not a regular file (a pipe or device?)", "pass the path of a file")
    return st


def _read_header_bytes(path: str) -> tuple[bytes, int]:
    """Return the raw JSON header and the size of the data area, checking the length field first."""
    require_regular_file(path)
    # O_NONBLOCK: if the path was swapped for a FIFO after the stat, open() must not block forever.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise AdapterFileError(path, f"cannot be opened ({e.strerror})", "check its permissions") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise AdapterFileError(path, "is not a regular file", "pass the path of a file")
        size = st.st_size
        prefix = f.read(8)
        if size < 8 or len(prefix) < 8:
            kind = _sniff(prefix)
            if size == 0:
                raise AdapterFileError(path, "not a safetensors file: it is empty", FIX_TRUNCATED)
            raise AdapterFileError(
                path,
                f"not a safetensors file: it has {size} bytes, fewer than the 8-byte header length"
                + (f"; {kind}" if kind else ""),
                FIX_NOT_SAFETENSORS,
            )
        n = int.from_bytes(prefix, "little")
        if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
            peek = f.read(min(64, size - 8))
            kind = _sniff(prefix + peek)
            if kind and not peek.startswith(b"{"):
                raise AdapterFileError(path, f"not a safetensors file: {kind}", FIX_NOT_SAFETENSORS)
            if n < 2:
                problem = f"header length {n} is too small for a JSON object"
            elif n > MAX_HEADER_BYTES:
                problem = f"header length {n} exceeds the format's limit of {MAX_HEADER_BYTES} bytes"
            else:
                problem = f"header length {n} exceeds the {size - 8} bytes that follow the length field"
            if peek.startswith(b"{"):
                raise AdapterFileError(path, problem, FIX_TRUNCATED)
            raise AdapterFileError(path, f"not a safetensors file: {problem}", FIX_NOT_SAFETENSORS)
        raw = f.read(n)
        if len(raw) != n:
            raise AdapterFileError(path, "the file shrank while being read", FIX_TRUNCATED)
    return raw, size - 8 - n


def _parse_json(path: str, raw: bytes) -> dict[str, Any]:
    looks_json = raw.lstrip(b" \t\r\n").startswith(b"{")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if not looks_json:
            problem = "not a safetensors file: the header is not text"
            raise AdapterFileError(path, problem, FIX_NOT_SAFETENSORS) from e
        raise AdapterFileError(
            path, f"header is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {8 + e.start})", FIX_DAMAGED
        ) from e
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise AdapterFileError(path, "appears twice in the header", FIX_DAMAGED, key=e.key) from None
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and Python's limit on huge integer literals; RecursionError a
        # header of 100 MB of "[[[[...".
        if not looks_json:
            raise AdapterFileError(
                path, "not a safetensors file: the header is not a JSON object", FIX_NOT_SAFETENSORS
            ) from None
        problem = f"header is not valid JSON ({_short(str(e), 120)})"
        raise AdapterFileError(path, problem, FIX_DAMAGED) from None
    if not isinstance(obj, dict):
        raise AdapterFileError(path, f"header is a JSON {_json_type(obj)}, not an object", FIX_DAMAGED)
    return obj


def _parse_metadata(path: str, raw: Any) -> dict[str, str]:
    if raw is None:  # the library accepts `"__metadata__": null`
        return {}
    if not isinstance(raw, dict):
        problem = f"__metadata__ is a JSON {_json_type(raw)}, not an object of strings"
        raise AdapterFileError(path, problem, FIX_DAMAGED, "__metadata__")
    for k, v in raw.items():
        _check_text(path, k, k, "metadata key")
        if not isinstance(v, str):
            raise AdapterFileError(
                path,
                f"metadata value is a JSON {_json_type(v)} ({_short(v)}), but the format allows only strings",
                "re-save the file with string metadata (json.dumps structured values)",
                key=k,
            )
        _check_text(path, v, k, "metadata value")
    return raw


def _numel_up_to(shape: list[int], cap: int) -> int | None:
    """Product of `shape`, exact for up to 64 dims (so messages can quote it), else None once it exceeds
    `cap`: bounded work even for a hostile header with a million huge dims."""
    if 0 in shape:
        return 0
    if len(shape) <= 64:
        return math.prod(shape)
    n = 1
    for d in shape:
        n *= d
        if n > cap:
            return None
    return n


def _parse_entry(path: str, name: str, entry: Any, data_size: int) -> TensorInfo:
    _check_text(path, name, name, "tensor name")
    if not isinstance(entry, dict):
        raise AdapterFileError(
            path, f"entry is a JSON {_json_type(entry)}, not an object with dtype, shape and data_offsets",
            FIX_DAMAGED, name,
        )
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in entry]
    if missing:
        raise AdapterFileError(path, f"entry lacks {', '.join(missing)}", FIX_DAMAGED, name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise AdapterFileError(
            path, f"unknown dtype {_short(dtype)} (safetensors knows {', '.join(DTYPE_BITS)})",
            f"{FIX_DAMAGED}; or update safetensors if the file uses a newer dtype", name,
        )
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        problem = f"shape {_short(shape)} is not a list of non-negative integers below 2**63"
        raise AdapterFileError(path, problem, FIX_DAMAGED, name)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
        raise AdapterFileError(
            path, f"data_offsets {_short(offsets)} is not a pair [begin, end] of non-negative integers",
            FIX_DAMAGED, name,
        )
    begin, end = offsets
    if begin > end:
        problem = f"data_offsets [{begin}, {end}] end before they begin"
        raise AdapterFileError(path, problem, FIX_DAMAGED, name)
    if end > data_size:
        raise AdapterFileError(
            path, f"data_offsets [{begin}, {end}] reach past the end of the data area ({data_size} bytes)",
            FIX_TRUNCATED, name,
        )
    bits = DTYPE_BITS[dtype]
    nbytes = end - begin
    numel = _numel_up_to(shape, cap=(8 * nbytes) // bits)
    if numel is None or numel * bits != 8 * nbytes:
        if numel is None:
            need = f"more than {nbytes}"
        elif numel * bits % 8:
            need = "a fractional number of"
        else:
            need = str(numel * bits // 8)
        problem = (
            f"shape {_short(shape)} of {dtype} needs {need} bytes, "
            f"but data_offsets [{begin}, {end}] hold {nbytes}"
        )
        raise AdapterFileError(path, problem, FIX_DAMAGED, name)
    return TensorInfo(dtype, tuple(shape), (begin, end))


def _check_tiling(path: str, infos: Mapping[str, TensorInfo], data_size: int) -> None:
    """The tensors must cover the data area exactly: no overlap, no gap, nothing after the last one."""
    pos, prev = 0, None
    for name, info in sorted(infos.items(), key=lambda kv: kv[1].data_offsets):
        begin, end = info.data_offsets
        if begin < pos:
            raise AdapterFileError(
                path, f"data_offsets [{begin}, {end}] start inside tensor {prev!r}, which ends at {pos}: "
                "tensors overlap", FIX_DAMAGED, name,
            )
        if begin > pos:
            after = f"tensor {prev!r}" if prev is not None else "the start of the data area"
            raise AdapterFileError(
                path, f"data_offsets [{begin}, {end}] leave a gap of {begin - pos} bytes after {after}",
                FIX_DAMAGED, name,
            )
        pos, prev = end, name
    if pos != data_size:
        raise AdapterFileError(
            path, f"the tensors end at byte {pos} of the data area, but it has {data_size} bytes "
            f"({data_size - pos} bytes belong to no tensor)", FIX_DAMAGED,
        )


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a `.safetensors` header without reading any tensor data.

    Returns ``(header, metadata)``: one `TensorInfo` per tensor in file order, and the ``__metadata__``
    strings (empty if absent). Raises `AdapterFileError` for anything that is not a well-formed
    safetensors file; memory use is bounded by the header size (at most 100 MB), whatever it claims.
    """
    p = os.fspath(path)
    raw, data_size = _read_header_bytes(p)
    obj = _parse_json(p, raw)
    metadata = _parse_metadata(p, obj.pop("__metadata__", None))
    header = {name: _parse_entry(p, name, entry, data_size) for name, entry in obj.items()}
    _check_tiling(p, header, data_size)
    return header, metadata


@contextmanager
def _library_errors(path: str, key: str | None = None) -> Iterator[None]:
    """Whatever slips past our checks (a file changed since, a dtype torch lacks) still names the file."""
    try:
        yield
    except (SafetensorError, OSError, RuntimeError, TypeError) as e:
        problem = f"safetensors could not read it ({_short(str(e), 200)})"
        raise AdapterFileError(path, problem, FIX_DAMAGED, key) from e


def _require_torch_dtype(path: str, key: str, info: TensorInfo) -> torch.dtype:
    dtype = info.torch_dtype
    if dtype is None:
        raise AdapterFileError(
            path, f"dtype {info.dtype} cannot be represented by torch {torch.__version__}",
            "update torch, or re-export the file with a common dtype (F16, BF16, F32)", key,
        )
    return dtype


class SafetensorsReader:
    """An open, validated `.safetensors` file, read one tensor at a time (see `open_safetensors`).

    `keys`, `metadata`, `get_shape` and `get_dtype` answer from the validated header without touching
    tensor data; `get_tensor` materialises one tensor.
    """

    def __init__(self, path: str, handle: Any, header: dict[str, TensorInfo], metadata: dict[str, str]):
        self.path = path
        self.header = header
        self._handle = handle
        self._metadata = metadata

    def _info(self, key: str) -> TensorInfo:
        info = self.header.get(key)
        if info is None:
            raise AdapterFileError(self.path, "no such tensor in the file", "check the key name", key)
        return info

    def keys(self) -> list[str]:
        """Tensor names, in the order the header lists them."""
        return list(self.header)

    def __contains__(self, key: object) -> bool:
        return key in self.header

    def __len__(self) -> int:
        return len(self.header)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get_shape(self, key: str) -> tuple[int, ...]:
        return self._info(key).shape

    def get_dtype(self, key: str) -> torch.dtype:
        return _require_torch_dtype(self.path, key, self._info(key))

    def get_tensor(self, key: str) -> torch.Tensor:
        self.get_dtype(key)
        with _library_errors(self.path, key):
            return self._handle.get_tensor(key)


@contextmanager
def open_safetensors(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> Iterator[SafetensorsReader]:
    """Open a `.safetensors` file for streaming: validate the header, then read tensors on demand.

    For merges and conversions of multi-GB checkpoints: peak memory stays near the largest tensor
    instead of the whole file. Usage::

        with open_safetensors("model.safetensors") as f:
            for key in f.keys():
                process(key, f.get_tensor(key))
    """
    p = os.fspath(path)
    header, metadata = read_safetensors_header(p)
    device_name = str(torch.device(device))  # a bad device is the caller's error, not the file's
    with _library_errors(p):
        handle = safe_open(p, framework="pt", device=device_name)
    with handle:
        yield SafetensorsReader(p, handle, header, metadata)


def _all_finite(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()):
        return True
    try:
        return bool(torch.isfinite(t).all())
    except (NotImplementedError, RuntimeError):
        pass
    try:  # float8 kernels are missing for isfinite on CPU; widen (one tensor at a time).
        return bool(torch.isfinite(t.to(torch.float32)).all())
    except (NotImplementedError, RuntimeError):
        return True  # packed float4 has no inf/NaN encoding, and torch cannot even convert it


def read_safetensors(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    keys: Iterable[str] | None = None,
    check_finite: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate and load a `.safetensors` file: ``(tensors, metadata)``.

    Args:
        path: the file.
        device: where the tensors go (the safetensors library copies straight there).
        keys: load only these tensors (in this order); a key the file lacks raises `AdapterFileError`.
        check_finite: also refuse the file if any floating tensor holds NaN or inf (a diverged
            training run), naming those keys. Costs one pass over the data.
    """
    p = os.fspath(path)
    with open_safetensors(p, device=device) as f:
        wanted = f.keys() if keys is None else list(keys)
        missing = [k for k in wanted if k not in f]
        if missing:
            sample = ", ".join(repr(k) for k in f.keys()[:3])
            raise AdapterFileError(
                p, f"the file has no tensor named so ({len(missing)} requested keys missing; "
                f"it has {len(f)} tensors, e.g. {sample or 'none'})",
                "check the key names or pass the right file", missing[0],
            )
        tensors = {k: f.get_tensor(k) for k in wanted}
        metadata = f.metadata()
    if check_finite:
        bad = [k for k, t in tensors.items() if not _all_finite(t)]
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise AdapterFileError(
                p, f"tensors {', '.join(repr(k) for k in bad[:5])}{more} contain NaN or inf",
                "the weights are broken (diverged training?): use an earlier checkpoint or retrain", bad[0],
            )
    return tensors, metadata


def _check_metadata(path: str, metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{path}: metadata has type {type(metadata).__name__}; pass a dict of str -> str")
    for k, v in metadata.items():
        if not isinstance(k, str):
            raise TypeError(f"{path}: metadata key {k!r} has type {type(k).__name__}; keys must be str")
        if not isinstance(v, str):
            raise TypeError(
                f"{path}: metadata {k!r} has type {type(v).__name__} ({_short(v)}); safetensors metadata "
                "values must be str: use str() for numbers and json.dumps() for lists and dicts"
            )
    return dict(metadata)


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `tensors` (and string `metadata`) to `path` as `.safetensors`, atomically (see `atomic_write`).

    Tensors are detached, moved to CPU and made contiguous; tensors sharing storage (tied weights,
    views of one buffer) are copied, since the format stores each tensor's bytes separately.
    Returns the path written.
    """
    p = os.fspath(path)
    meta = _check_metadata(p, metadata)
    prepared: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for k, t in tensors.items():
        if not isinstance(k, str):
            raise TypeError(f"{p}: tensor key {k!r} has type {type(k).__name__}; tensor names must be str")
        if k == "__metadata__":
            raise ValueError(f"{p}: '__metadata__' is reserved by the format; rename that tensor")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{p}: value of {k!r} has type {type(t).__name__}, not a torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storage:
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        prepared[k] = t

    def write(tmp: Path) -> None:
        # safetensors writes through a `.tmpXXXXXX` file of its own beside the path it is given, which a
        # killed writer would leave in the output folder: it gets a scratch folder that the next write of
        # `path` removes (`remove_stale`), and its result is moved onto the temporary.
        with scratch_directory(os.path.realpath(p)) as scratch:
            save_file(prepared, os.fspath(scratch / "x"), metadata=meta)
            os.replace(scratch / "x", tmp)

    return atomic_write(p, write)
