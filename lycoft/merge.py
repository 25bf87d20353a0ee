"""Bake adapters into a base model on disk, streamed tensor by tensor.

``merge_adapters(base, [AdapterArg("a.safetensors", 1.0), ...], out)`` reads the base model's headers,
matches every adapter key to the weight it rotates (`lycoft.base_model`), then rewrites each file tensor
by tensor (`lycoft.io.streaming`): a weight some adapter touches is read, rotated by each adapter in
the order given (the fused OpenCLIP ``in_proj_weight`` one q/k/v third at a time) and written; every
other tensor (VAE, EMA, extra keys) is copied byte for byte. Peak memory is a few copies of the largest
patched tensor. The output is written next to its final path and renamed into place only when complete
(and verified, with ``verify``); the input is only read.

Semantics are lycoft's (`lycoft.ops.merged_weight`, the LyCORIS formula, computed from the file's tensors):
multiplier m -> oft ``(m (R - I) + I)^T W``, boft per-stage ``m R_i + (1 - m) I``, rescale after the
rotation, constraint bound ``alpha * out``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ._version import __version__
from .base_model import BaseModel, WeightSlot, family_of_adapter, open_base
from .formats.lycoris import ModuleSpec, read_adapter
from .formats.peft import is_peft_tensors
from .io.atomic import atomic_directory, atomic_write, refuse_overwrite, same_file
from .io.errors import AdapterFileError
from .io.safe_io import DTYPE_BITS, read_safetensors_header
from .io.streaming import (
    DTYPE_CHOICES,
    FLOAT_DTYPES,
    SafetensorsInput,
    dtype_name,
    fits_dtype,
    rewrite_safetensors,
)
from .ops import adapter_rotation, check_multiplier, merged_weight, rotate

log = logging.getLogger("lycoft")

VERIFY_TOL = {"F32": 1e-5, "F64": 1e-5, "F16": 4e-3, "BF16": 3e-2}  # relative, on layer outputs


@dataclass(frozen=True)
class AdapterArg:
    """An adapter file and the multiplier (strength) to bake it in with."""

    path: str
    multiplier: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "multiplier", check_multiplier(self.multiplier, f"adapter {self.path}: strength"))

    @classmethod
    def parse(cls, text: str) -> AdapterArg:
        """``a.safetensors`` or ``a.safetensors:0.7`` (a trailing ``:<number>`` is the multiplier).

        File names may contain ``:``: a text that names an existing file, and none without its tail, is
        taken whole. A tail that is not a finite number is refused when the part before it is a file or
        the tail looks like a number (``a.safetensors:0,7``), rather than reported as a missing file."""
        head, sep, tail = text.rpartition(":")
        if not sep or not head:
            return cls(text, 1.0)
        try:
            value = float(tail)
        except ValueError:
            if os.path.exists(text) or not (os.path.exists(head) or _LOOKS_NUMERIC.fullmatch(tail)):
                return cls(text, 1.0)
            fix = (f"write the decimal with a dot: {head}:{tail.replace(',', '.')}" if "," in tail
                   else f"give it as FILE:M, e.g. {head}:0.7")
            raise ValueError(f"--adapter {text}: the strength {tail!r} is not a number; {fix}") from None
        if os.path.exists(text) and not os.path.exists(head):
            return cls(text, 1.0)
        return cls(head, check_multiplier(value, f"--adapter {text}: the strength"))


# A tail that a user meant as a strength: a digit among signs, dots, commas, spaces or an exponent.
_LOOKS_NUMERIC = re.compile(r"[\d.,eE+\-\s]*\d[\d.,eE+\-\s]*")


class MergeVerificationError(RuntimeError):
    """A merged layer of the written output differs from the adapter applied on the fly (``verify``)."""


@dataclass
class _Op:
    slot: WeightSlot
    spec: ModuleSpec
    multiplier: float
    adapter: int


@dataclass
class MergeReport:
    """What a merge did. `unmatched[i]`: keys of adapter i that named no layer of the base."""

    base: str
    out: str
    kind: str
    family: str
    adapters: list[AdapterArg]
    matched: list[int] = field(default_factory=list)
    unmatched: list[list[str]] = field(default_factory=list)
    patched_tensors: int = 0
    verified: list[tuple[str, float, float]] = field(default_factory=list)  # (adapter key, rel. error, tol)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"merged {len(self.adapters)} adapter(s) into {self.family} {self.kind} {self.base} -> {self.out} "
                 f"({self.patched_tensors} tensors patched, {self.seconds:.1f} s)"]
        for a, n, miss in zip(self.adapters, self.matched, self.unmatched):
            line = f"  {a.path} x{a.multiplier:g}: {n} layers"
            if miss:
                line += f", {len(miss)} keys matched nothing: {', '.join(miss[:5])}" + (" ..." if len(miss) > 5 else "")
            lines.append(line)
        if self.verified:
            worst = max(self.verified, key=lambda v: v[1] / v[2])
            lines.append(f"  verify: {len(self.verified)} layers against the adapter applied on the fly, "
                         f"worst relative error {worst[1]:.2e} ({worst[0]}, tolerance {worst[2]:.0e})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ one weight
@torch.no_grad()
def apply_spec(weight: torch.Tensor, spec: ModuleSpec, multiplier: float = 1.0) -> torch.Tensor:
    """`weight` with the adapter of `spec` merged in at strength `multiplier`, in float32."""
    return merged_weight(weight.float(), spec.blocks, side=spec.side, constraint=spec.constraint,
                         multiplier=multiplier, rescale=spec.rescale)


@torch.no_grad()
def _on_the_fly(weight: torch.Tensor, ops: Sequence[_Op], x: torch.Tensor) -> torch.Tensor:
    """Output of the layer with the adapters applied on the fly, over the weight the earlier adapters produce:
    the last adapter rotates the layer's output channels (output side) or its input features (input side,
    Linear and 1x1 convs) instead of the weight, as `OFTLayer`'s activation path does; multiplier 0 is
    the plain layer, as in `OFTLayer.forward`."""
    w = weight.float()
    for op in ops[:-1]:
        w = apply_spec(w, op.spec, op.multiplier)
    spec, multiplier = ops[-1].spec, ops[-1].multiplier
    if multiplier == 0.0:
        return _layer_output(w, x)
    R = adapter_rotation(spec.blocks, constraint=spec.constraint, multiplier=multiplier)
    channel = -1 if w.dim() == 2 else 1
    if spec.side == "output":
        y = rotate(R, _layer_output(w, x), dim=channel)
    elif math.prod(w.shape[2:]) == 1:
        y = _layer_output(w, rotate(R, x, dim=channel, transpose=True))
    else:  # an input rotation of a wider kernel does not line up with the layer input: weight path
        return _layer_output(merged_weight(w, spec.blocks, side=spec.side, rescale=spec.rescale, rotation=R), x)
    if spec.rescale is not None:
        shape = [1] * y.dim()
        shape[channel] = -1
        y = y * spec.rescale.reshape(shape)
    return y


def _layer_output(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The Linear / ConvNd of `weight` (no bias; convs padded by half the kernel) on the probe `x`."""
    w = weight.float()
    if w.dim() == 2:
        return F.linear(x, w)
    if w.dim() not in (3, 4, 5):
        raise ValueError(f"a weight of shape {tuple(w.shape)} is not a Linear or Conv weight")
    conv = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3]
    return conv(x, w, None, 1, tuple(k // 2 for k in w.shape[2:]))


def _probe_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 2:
        return torch.randn(3, shape[1], generator=g)
    return torch.randn(2, shape[1], *[max(k, 3) + 2 for k in shape[2:]], generator=g)


# --------------------------------------------------------------------------------------------- planning
def _load_adapters(adapters: Sequence[AdapterArg]) -> list[tuple[dict[str, ModuleSpec], dict[str, str]]]:
    loaded = []
    for a in adapters:
        if not os.path.isfile(a.path):
            raise AdapterFileError(a.path, "file not found", "check the --adapter path")
        header, _ = read_safetensors_header(a.path)
        if is_peft_tensors(list(header)):
            raise AdapterFileError(a.path, "is a PEFT adapter", "convert it first: tools/convert.py --to lycoris "
                                   "(OFT), or bake PEFT BOFT as --to diff and load that in your UI")
        loaded.append(read_adapter(a.path))
    return loaded


def _plan(base: BaseModel, adapters: Sequence[AdapterArg], loaded, allow_partial: bool, report: MergeReport
          ) -> dict[tuple[str, str], list[_Op]]:
    ops: dict[tuple[str, str], list[_Op]] = {}
    for i, (arg, (specs, metadata)) in enumerate(zip(adapters, loaded)):
        fam = family_of_adapter(metadata)
        if fam is not None and fam != base.family:
            raise AdapterFileError(
                arg.path, f"was made for {fam} (file metadata), but the base {base.path} is {base.family}",
                f"use a {fam} base model, or an adapter trained on {base.family}",
            )
        unmatched: list[str] = []
        matched = 0
        seen: dict[WeightSlot, str] = {}
        for key, spec in specs.items():
            slots = base.slots.get(key)
            if not slots:
                unmatched.append(key)
                continue
            for slot in slots:
                if slot in seen:
                    raise AdapterFileError(arg.path, f"{seen[slot]} and {key} both name layer {slot.module}",
                                           "remove one of them (they are two spellings of the same layer)")
                seen[slot] = key
                dim = slot.dim(spec.side)
                if spec.layout_dim != dim:
                    raise AdapterFileError(
                        arg.path,
                        f"{key} rotates {spec.layout_dim} channels ({tuple(spec.blocks.shape)}) but layer "
                        f"{slot.module} of the base has {dim} ({slot.tensor}, shape {slot.shape})",
                        "the adapter was trained for another model; merge it into the model it was made for",
                    )
                ops.setdefault((slot.file, slot.tensor), []).append(_Op(slot, spec, arg.multiplier, i))
            matched += 1
        report.matched.append(matched)
        report.unmatched.append(unmatched)
        if not matched:
            hint = (f"; {len(base.unmapped)} base tensors did not fit the {base.family} layout, e.g. "
                    f"{base.unmapped[0]}" if base.unmapped else "")
            raise AdapterFileError(
                arg.path, f"none of its {len(specs)} keys (e.g. {next(iter(specs))}) names a layer of the "
                f"{base.family} base {base.path}{hint}",
                "the adapter is for another model or family; check both files",
            )
        if unmatched and not allow_partial:
            shown = ", ".join(unmatched[:8]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 8 else "")
            raise AdapterFileError(
                arg.path, f"{len(unmatched)} of {len(specs)} adapter keys match no layer of the base: {shown}",
                "check that adapter and base belong together, or pass --allow-partial (allow_partial=True) "
                "to merge the rest",
            )
    return ops


def _patcher(src: SafetensorsInput, file: str, ops: dict[tuple[str, str], list[_Op]], adapters: Sequence[AdapterArg],
             out_dtype: str | None) -> Callable[[str], torch.Tensor | None]:
    def patched(name: str) -> torch.Tensor | None:
        todo = ops.get((file, name))
        if not todo:
            return None
        W = src.read(name).float()  # a fresh buffer we own: float32 input is neither copied nor shared
        by_slot: dict[WeightSlot, list[_Op]] = {}
        for op in todo:
            by_slot.setdefault(op.slot, []).append(op)
        if len(by_slot) == 1:
            slot, slot_ops = next(iter(by_slot.items()))
            if slot.chunk is None and not slot.transposed:
                # The common case: the layer is the whole tensor; drop each input as soon as it is rotated.
                for op in sorted(slot_ops, key=lambda o: o.adapter):
                    W = apply_spec(W, op.spec, op.multiplier)
                return W
        for slot, slot_ops in by_slot.items():
            part = slot.take(W)
            for op in sorted(slot_ops, key=lambda o: o.adapter):
                part = apply_spec(part, op.spec, op.multiplier)
            slot.put(W, part)
        return W

    def produce(name: str) -> torch.Tensor | None:
        W = patched(name)
        if W is not None:
            _require_finite(W, out_dtype or src.info(name).dtype, name, file, ops[(file, name)], adapters)
        return W

    return produce


def _require_finite(W: torch.Tensor, dtype: str, name: str, file: str, todo: Sequence[_Op],
                    adapters: Sequence[AdapterArg]) -> None:
    """Refuse to write a patched weight that is not finite in its output dtype: an adapter holding huge
    values, or a huge strength, would otherwise bake inf/NaN into a checkpoint that loads without complaint."""
    if fits_dtype(W, dtype):
        return
    used = sorted({(adapters[op.adapter].path, op.multiplier) for op in todo})
    names = ", ".join(f"{path} x{m:g}" for path, m in used)
    raise ValueError(
        f"merging {names} into {name} of {file} gives weights that are not finite in {dtype}; "
        "use a strength near 1, and check the adapter with tools/inspect.py (its largest rotation angles)")


def _verify_sample(ops: dict[tuple[str, str], list[_Op]], count: int) -> list[tuple[str, str, WeightSlot]]:
    """Up to `count` patched layers spread over the model, a fused q/k/v third among them if any."""
    slots = sorted({(f, t, op.slot) for (f, t), lst in ops.items() for op in lst},
                   key=lambda x: (x[0], x[1], x[2].chunk or 0))
    if count <= 0 or not slots:
        return []
    step = max(len(slots) / count, 1.0)
    chosen = [slots[int(i * step)] for i in range(min(count, len(slots)))]
    fused = next((s for s in slots if s[2].chunk is not None), None)
    if fused is not None and fused not in chosen:
        chosen[-1] = fused
    return chosen


def _verify(out_files: dict[str, str], ops, count: int, report: MergeReport) -> None:
    """Compare layers of the written output with the adapters applied on the fly to the input."""
    for i, (file, tensor, slot) in enumerate(_verify_sample(ops, count)):
        slot_ops = sorted((op for op in ops[(file, tensor)] if op.slot == slot), key=lambda o: o.adapter)
        # One weight in memory at a time (the layer's output on the probe is small): the input's weight is
        # dropped before the output's is read.
        with SafetensorsInput(file) as src:
            before = slot.take(src.read(tensor))
        x = _probe_input(tuple(before.shape), seed=i)
        expected = _on_the_fly(before, slot_ops, x)
        del before
        with SafetensorsInput(out_files[file]) as dst:
            info = dst.info(tensor)
            got = _layer_output(slot.take(dst.read(tensor)), x)
        err = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        tol = VERIFY_TOL.get(info.dtype, 1e-5)
        report.verified.append((slot.key, err, tol))
        if not err <= tol:
            raise MergeVerificationError(
                f"verification failed: layer {slot.module} ({tensor} in {file}) differs from the adapter applied "
                f"on the fly by {err:.2e} (relative; tolerance {tol:.0e}); nothing was written"
            )


# ------------------------------------------------------------------------------------------------ writing
def _check_paths(base: Path, out: Path, adapters: Sequence[AdapterArg], force: bool) -> None:
    if not base.exists():
        raise AdapterFileError(str(base), "not found", "give a single-file checkpoint or a diffusers folder")
    if same_file(base, out):
        raise ValueError(f"--out {out} is the base model itself; write the merge to a new path "
                         "(the input is never modified)")
    for a in adapters:
        if same_file(a.path, out):
            raise ValueError(f"--out {out} is the adapter {a.path}; choose another output path")
    if base.is_dir():
        if out.resolve().is_relative_to(base.resolve()):
            raise ValueError(f"--out {out} is inside the base folder {base}; choose a path outside it")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is a file; a diffusers base is merged into a folder")
        if out.exists() and not force:
            raise FileExistsError(f"{out} exists; pass --force to replace it")
    else:
        if out.suffix != ".safetensors":
            raise ValueError(f"--out {out}: a single-file merge is written as .safetensors; name it *.safetensors")
        refuse_overwrite(out, force)


def _out_dtype(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype {dtype!r} is not known; use one of {', '.join(DTYPE_CHOICES)}")
        dtype = DTYPE_CHOICES[dtype]
    return dtype_name(dtype)


def _merge_metadata(metadata: dict[str, str], adapters: Sequence[AdapterArg]) -> dict[str, str]:
    md = dict(metadata)
    md["lycoft.merged_adapters"] = json.dumps(
        [{"file": os.path.basename(a.path), "multiplier": a.multiplier} for a in adapters])
    md["lycoft.merge_version"] = __version__
    return md


def _output_bytes(files: Sequence[str | Path], out_dtype: str | None) -> int:
    """About how large the rewritten `files` are: their size, with floating tensors at `out_dtype`."""
    total = 0
    for file in files:
        total += os.path.getsize(file)
        if out_dtype and str(file).endswith(".safetensors"):
            header, _ = read_safetensors_header(file)
            for info in header.values():
                if info.dtype in FLOAT_DTYPES:
                    total += info.nbytes * DTYPE_BITS[out_dtype] // DTYPE_BITS[info.dtype] - info.nbytes
    return total


def _write_single(base: BaseModel, out: Path, ops, out_dtype, adapters, verify: int, report) -> None:
    src_file = base.files[0]

    def write(tmp: Path) -> None:
        with SafetensorsInput(src_file) as src, open(tmp, "wb") as f:
            rewrite_safetensors(src, f, _patcher(src, src_file, ops, adapters, out_dtype), out_dtype,
                                _merge_metadata(base.metadata, adapters))
        if verify:
            _verify({src_file: str(tmp)}, ops, verify, report)

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write, size_hint=_output_bytes([src_file], out_dtype))


def _write_diffusers(base: BaseModel, out: Path, ops, out_dtype, verify: int, report) -> None:
    root = Path(base.path)
    rewritten: dict[str, str] = {}
    size = _output_bytes([p for p in root.rglob("*") if p.is_file()], out_dtype)
    with atomic_directory(out, size_hint=size) as tmp:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            target = tmp / rel
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if str(path) in base.files or (out_dtype and path.name.endswith(".safetensors")):
                with SafetensorsInput(path) as src, open(target, "wb") as f:
                    rewrite_safetensors(src, f, _patcher(src, str(path), ops, report.adapters, out_dtype), out_dtype,
                                        src.metadata or None)
                rewritten[str(path)] = str(target)
            elif path.suffix == ".bin" and path.parent.name in ("unet", "text_encoder", "text_encoder_2"):
                log.warning("lycoft: dropping %s: its safetensors sibling carries the merged weights", rel)
            else:
                shutil.copy2(path, target)
        if out_dtype:
            _fix_index_sizes(tmp)
        if verify:
            _verify(rewritten, ops, verify, report)


def _fix_index_sizes(root: Path) -> None:
    """Sharded weights: the index's ``total_size`` changes with the dtype."""
    for index in root.rglob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        shards = set(data.get("weight_map", {}).values())
        total = 0
        for shard in shards:
            header, _ = read_safetensors_header(index.parent / shard)
            total += sum(info.nbytes for info in header.values())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def merge_adapters(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterArg | str],
    out: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    allow_partial: bool = False,
    verify: int = 0,
) -> MergeReport:
    """Merge `adapters` (in order) into `base` and write the result to `out`; see the module docstring.

    Args:
        base: single-file checkpoint (``.safetensors``, or ``.ckpt`` read safely) or diffusers folder.
        adapters: files with optional multipliers (`AdapterArg`, or ``"a.safetensors:0.7"``).
        out: ``.safetensors`` for a single-file base, a folder for a diffusers base.
        dtype: ``"fp16"``, ``"bf16"``, ``"fp32"``: cast every floating tensor; None keeps the base's dtypes.
        force: replace an existing `out`.
        allow_partial: adapter keys that match no layer are reported instead of refused.
        verify: check this many merged layers of the written output against the adapters applied on the
            fly before the output is moved into place (0: no check).
    """
    t0 = time.perf_counter()
    args = [a if isinstance(a, AdapterArg) else AdapterArg.parse(a) for a in adapters]
    if not args:
        raise ValueError("no adapter given; pass at least one --adapter file")
    base_p, out_p = Path(base), Path(out)
    _check_paths(base_p, out_p, args, force)
    out_dtype = _out_dtype(dtype)
    loaded = _load_adapters(args)
    with open_base(base_p, next_to=out_p) as model:
        report = MergeReport(str(base_p), str(out_p), model.kind, model.family, args)
        ops = _plan(model, args, loaded, allow_partial, report)
        report.patched_tensors = len(ops)
        if model.kind == "single-file":
            _write_single(model, out_p, ops, out_dtype, args, verify, report)
        else:
            _write_diffusers(model, out_p, ops, out_dtype, verify, report)
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["AdapterArg", "MergeReport", "MergeVerificationError", "apply_spec", "merge_adapters"]
