"""Full weight differences: ``<key>.diff`` = ``W' - W`` with the layer's shape ``(out, in, k...)``.

For consumers that cannot read an adapter correctly (ComfyUI ignores rescale on oft and squares the
strength, old A1111 has no BOFT, nothing but PEFT reads PEFT files, stable-diffusion.cpp has no OFT at
all): LyCORIS loads such a file as its ``full`` algorithm, ComfyUI and A1111 as a "diff"/"full" network,
and every one of them adds ``strength * diff``. The rotation is baked at the multiplier given here, so the
file is meant to be used at strength 1.

Base weights come from a base model on disk (`lycoft.base_model`), read one tensor at a time; the output
is streamed too (`lycoft.io.streaming`), so memory stays near one layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .base_model import BaseModel, WeightSlot
from .io.atomic import atomic_write
from .io.errors import AdapterFileError
from .io.streaming import FLOAT_DTYPES, OpenInputs, OutputTensor, dtype_name, fits_dtype, write_streamed


@dataclass
class LayerChange:
    """One adapted layer of any adapter flavour.

    Fields:
        key: an adapter key naming the layer (any spelling `lycoft.load` accepts).
        apply: base weight (float32, the layer's shape) -> adapted weight (float32).
        side: ``output`` or ``input``: which dimension the adapter rotates.
        dim: how many channels it rotates (checked against the base layer).
    """

    key: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    side: str
    dim: int


def match_changes(base: BaseModel, changes: Sequence[LayerChange], source: str, allow_partial: bool
                  ) -> tuple[list[tuple[WeightSlot, LayerChange]], list[str]]:
    """Pair each change with its base layer; unmatched keys are an error unless `allow_partial`."""
    pairs, unmatched = [], []
    for change in changes:
        slots = base.slots.get(change.key)
        if not slots:
            unmatched.append(change.key)
            continue
        slot = slots[0]  # variants of a diffusers folder hold the same weights
        if slot.dim(change.side) != change.dim:
            raise AdapterFileError(
                source, f"{change.key} rotates {change.dim} channels but layer {slot.module} of the base has "
                f"{slot.dim(change.side)} ({slot.tensor}, shape {slot.shape})",
                "use the base model the adapter was trained for",
            )
        pairs.append((slot, change))
    if not pairs:
        raise AdapterFileError(source, f"none of its {len(changes)} layers is in the {base.family} base {base.path}",
                               "use the base model the adapter was trained for")
    if unmatched and not allow_partial:
        shown = ", ".join(unmatched[:8]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 8 else "")
        raise AdapterFileError(source, f"{len(unmatched)} of {len(changes)} layers match nothing in the base: {shown}",
                               "check the base model, or pass --allow-partial to export the rest")
    return pairs, unmatched


def export_diff(base: BaseModel, changes: Sequence[LayerChange], out: str | os.PathLike[str],
                source: str, dtype: torch.dtype | None = None, allow_partial: bool = False,
                metadata: Mapping[str, str] | None = None) -> tuple[int, list[str]]:
    """Write ``<key>.diff`` for every change (keys in lycoft's spelling); returns (layers written,
    unmatched keys). `dtype`: of the differences; default the base weight's own (float32 if not a float)."""
    pairs, unmatched = match_changes(base, changes, source, allow_partial)
    with OpenInputs() as inputs:
        plan, jobs = [], {}
        for slot, change in pairs:
            name = f"{slot.key}.diff"
            if name in jobs:
                raise AdapterFileError(source, f"two of its keys name layer {slot.module}", "remove the duplicate")
            file_dtype = inputs[slot.file].info(slot.tensor).dtype
            out_dtype = dtype_name(dtype) if dtype is not None else (
                file_dtype if file_dtype in FLOAT_DTYPES else "F32")
            plan.append(OutputTensor(name, out_dtype, slot.shape))
            jobs[name] = (slot, change)

        def produce(t: OutputTensor) -> torch.Tensor:
            slot, change = jobs[t.name]
            W = slot.take(inputs[slot.file].read(slot.tensor)).float()
            d = change.apply(W) - W
            if not fits_dtype(d, t.dtype):
                raise AdapterFileError(source, f"the difference of layer {slot.key} is not finite in {t.dtype}",
                                       "use a strength near 1, and check the adapter with tools/inspect.py")
            return d

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                write_streamed(fh, plan, produce, dict(metadata or {}))

        atomic_write(out, write)
    return len(plan), unmatched
