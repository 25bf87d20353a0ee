"""Rewriting a `.safetensors` file tensor by tensor: peak memory near one tensor, not the whole file.

The safetensors library writes from a complete dict of tensors, which for a merge means holding the whole
checkpoint (6.9 GB for SDXL) in memory. A safetensors file is a JSON header that lists every tensor's
dtype, shape and byte range, followed by the raw bytes in that order; when the output has the same keys
and shapes as the input (a merge changes values and maybe the dtype, never a shape), the whole header is
known before the first byte of data, so the data can be produced one tensor at a time.

Reads use plain ``readinto`` rather than a memory map: pages of a mapped 7 GB file stay counted in the
process's resident memory once touched, while the page cache behind plain reads does not, so a user (and
our peak-memory test) sees the real cost: the tensor being worked on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import torch

from .errors import AdapterFileError
from .safe_io import DTYPE_BITS, FIX_TRUNCATED, TensorInfo, _require_torch_dtype, read_safetensors_header

COPY_CHUNK = 16 * 1024 * 1024  # bytes copied at a time for tensors that pass through unchanged

SAFETENSORS_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_TORCH_OF = {name: dtype for dtype, name in SAFETENSORS_DTYPE.items() if name in FLOAT_DTYPES}
DTYPE_CHOICES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype of the tools


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the file being written: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPE_BITS[self.dtype] // 8


class SafetensorsInput:
    """A validated `.safetensors` file read one tensor at a time with plain reads (no memory map)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.header, self.metadata = read_safetensors_header(self.path)
        with open(self.path, "rb") as f:
            self.data_start = 8 + int.from_bytes(f.read(8), "little")
        self._file: BinaryIO | None = None

    def __enter__(self) -> SafetensorsInput:
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def keys(self) -> list[str]:
        return list(self.header)

    def info(self, key: str) -> TensorInfo:
        return self.header[key]

    def _seek(self, info: TensorInfo) -> BinaryIO:
        if self._file is None:
            raise RuntimeError("use SafetensorsInput inside a `with` block")
        self._file.seek(self.data_start + info.data_offsets[0])
        return self._file

    def read(self, key: str) -> torch.Tensor:
        """The tensor, in its file dtype, in freshly allocated memory (owned by the caller)."""
        info = self.header[key]
        dtype = _require_torch_dtype(self.path, key, info)
        buf = bytearray(info.nbytes)
        got = self._seek(info).readinto(buf)
        if got != info.nbytes:
            raise AdapterFileError(self.path, f"ended after {got} of {info.nbytes} bytes of this tensor",
                                   FIX_TRUNCATED, key)
        if not info.nbytes:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def copy_raw(self, key: str, out: BinaryIO) -> None:
        """Copy the tensor's bytes unchanged to `out`, COPY_CHUNK at a time."""
        info = self.header[key]
        f = self._seek(info)
        left = info.nbytes
        while left:
            chunk = f.read(min(left, COPY_CHUNK))
            if not chunk:
                raise AdapterFileError(self.path, "ended in the middle of this tensor", FIX_TRUNCATED, key)
            out.write(chunk)
            left -= len(chunk)


def header_bytes(tensors: Iterable[OutputTensor], metadata: Mapping[str, str] | None) -> bytes:
    """The length-prefixed JSON header for tensors stored back to back in the given order.

    Padded with spaces to a multiple of 8 bytes, as the safetensors library does, so that every tensor
    starts aligned in a memory map.
    """
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    pos = 0
    for t in tensors:
        if t.name in obj:
            raise ValueError(f"tensor {t.name!r} listed twice")
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (no copy when it is already contiguous)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def fits_dtype(t: torch.Tensor, dtype: str) -> bool:
    """Whether every value of the floating tensor `t` is finite, and stays finite once stored as `dtype`
    (``"F16"``: at most 65504). A patched weight that fails would load as inf/NaN without complaint."""
    if t.numel() == 0:
        return True
    torch_dtype = _TORCH_OF.get(dtype, torch.float32)
    # Two reductions and no tensor-sized temporaries (a NaN anywhere makes both NaN).
    low, high = (float(v) for v in torch.aminmax(t))
    limit = torch.finfo(torch_dtype).max
    return -limit <= low and high <= limit


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return SAFETENSORS_DTYPE[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be written here; use float32, float16 or bfloat16") from None


def write_streamed(
    out: BinaryIO,
    plan: list[OutputTensor],
    produce: Callable[[OutputTensor], torch.Tensor | None],
    metadata: Mapping[str, str] | None = None,
    copy_raw: Callable[[OutputTensor], None] | None = None,
) -> None:
    """Write a safetensors file whose tensors (names, dtypes, shapes) are known in advance.

    `produce(t)` returns each tensor's value (converted to `t.dtype`); a None means "copy it raw" and
    calls `copy_raw(t)`, which must write exactly `t.nbytes` bytes to `out`.
    """
    out.write(header_bytes(plan, metadata))
    for t in plan:
        value = produce(t)
        if value is None:
            if copy_raw is None:
                raise ValueError(f"{t.name}: no value produced")
            copy_raw(t)
            continue
        if tuple(value.shape) != t.shape:
            raise ValueError(f"{t.name}: produced shape {tuple(value.shape)}, the header says {t.shape}")
        torch_dtype = _require_torch_dtype("<output>", t.name, TensorInfo(t.dtype, t.shape, (0, t.nbytes)))
        out.write(tensor_bytes(value.to(torch_dtype)))
        del value


def rewrite_safetensors(
    src: SafetensorsInput,
    out: BinaryIO,
    produce: Callable[[str], torch.Tensor | None],
    out_dtype: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `src` to the open file `out`, tensor by tensor, in the source order.

    `produce(key)` returns the new value of a tensor (same shape), or None to keep it as it is.
    `out_dtype` ("F16", "BF16", "F32") converts every floating tensor; None keeps each tensor's dtype.
    Kept tensors of unchanged dtype are copied byte for byte without being decoded.
    """
    plan = []
    for key in src.keys():
        info = src.info(key)
        dtype = out_dtype if (out_dtype and info.dtype in FLOAT_DTYPES) else info.dtype
        plan.append(OutputTensor(key, dtype, info.shape))

    def value(t: OutputTensor) -> torch.Tensor | None:
        new = produce(t.name)
        if new is None and t.dtype != src.info(t.name).dtype:
            return src.read(t.name)
        return new

    write_streamed(out, plan, value, metadata, lambda t: src.copy_raw(t.name, out))


class OpenInputs:
    """Lazily opened `SafetensorsInput`s by path (each header parsed once), closed together on exit."""

    def __init__(self) -> None:
        self._open: dict[str, SafetensorsInput] = {}

    def __enter__(self) -> OpenInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        for src in self._open.values():
            src.__exit__(None, None, None)
        self._open.clear()

    def __getitem__(self, path: str) -> SafetensorsInput:
        src = self._open.get(path)
        if src is None:
            src = self._open[path] = SafetensorsInput(path).__enter__()
        return src
