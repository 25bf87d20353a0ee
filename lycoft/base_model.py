"""A base model on disk, seen without loading it: which weight tensor (or which rows of a fused one) each
adapter key rotates.

Sources: a single-file LDM checkpoint (``.safetensors``; ``.ckpt``/``.pt`` through a temporary safetensors
copy) or a diffusers folder (``unet/``, ``text_encoder/``, ``text_encoder_2/`` safetensors, sharded or
not). Only headers are read. The map is built from the file's own keys, so it fits the checkpoint at
hand (extra layers, EMA copies and SD2's 24th OpenCLIP layer simply have no adapter key), and it accepts
every spelling `lycoft.load` accepts (`network.candidate_index`): diffusers or LDM UNet names, text
encoders with or without ``text_model_``, ``lora_te1_`` for a single encoder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints.families import (
    FAMILIES,
    TEXT_ENCODER_COMPONENTS,
    detect_family_from_keys,
    detect_family_from_unet,
    family_info,
    family_of_metadata,
)
from .checkpoints.ldm_keys import (
    UNetLayout,
    ldm_key_to_modules,
    text_encoder_module_path,
    unet_module_path_to_ldm,
)
from .io.atomic import scratch_directory
from .io.errors import AdapterFileError
from .io.safe_io import read_safetensors_header, save_safetensors_atomic
from .io.torch_checkpoint import load_torch_checkpoint
from .naming import to_key

log = logging.getLogger("lycoft")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# diffusers folder component -> lycoft component name
DIFFUSERS_COMPONENTS = {"unet": "unet", **TEXT_ENCODER_COMPONENTS}


@dataclass(frozen=True)
class WeightSlot:
    """One adaptable layer weight inside a base-model file.

    Fields:
        key: the adapter key lycoft writes for this layer (``lora_unet_...``, ``lora_te_text_model_...``).
        component: ``unet``, ``te1`` or ``te2``.
        module: module path in diffusers / transformers names (``text_model.`` form for text encoders).
        file: the safetensors file holding the tensor.
        tensor: the tensor's name in that file.
        chunk, chunks: for OpenCLIP's fused ``in_proj_weight``: which of `chunks` row blocks is this layer.
        transposed: the file stores the layer weight transposed (OpenCLIP ``text_projection``).
        shape: the layer weight's shape (after taking the chunk and undoing the transpose).
    """

    key: str
    component: str
    module: str
    file: str
    tensor: str
    shape: tuple[int, ...]
    chunk: int | None = None
    chunks: int = 1
    transposed: bool = False

    def dim(self, side: str) -> int:
        """Channels an adapter on this layer rotates: output rows, or the flattened fan-in."""
        if side == "output":
            return self.shape[0]
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    def _rows(self, n_rows: int) -> slice:
        if self.chunk is None:
            return slice(0, n_rows)
        size = n_rows // self.chunks
        return slice(self.chunk * size, (self.chunk + 1) * size)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This layer's weight out of the file tensor (a view)."""
        part = tensor[self._rows(tensor.shape[0])]
        return part.T if self.transposed else part

    def put(self, tensor: torch.Tensor, weight: torch.Tensor) -> None:
        """Write this layer's new weight back into the file tensor (in place)."""
        tensor[self._rows(tensor.shape[0])] = weight.T if self.transposed else weight


@dataclass
class BaseModel:
    """Index of a base model's adaptable weights (see module docstring).

    Fields:
        path: what the user gave.
        kind: ``"single-file"`` or ``"diffusers"``.
        family: ``sd1``, ``sd2`` or ``sdxl``.
        layout: the UNet block layout used for LDM names.
        files: the safetensors files that hold model weights (single file: one; diffusers: every
            ``*.safetensors`` under unet/ and the text encoders; a ``.ckpt`` is read through a temporary copy).
        slots: adapter key (every accepted spelling) -> the slots it rotates (several when a diffusers folder
            has variants such as ``model.fp16.safetensors``).
        unmapped: tensor names under a model prefix that do not fit the family's layout (reported when an
            adapter key fails to match, since they explain why).
        metadata: the single file's safetensors metadata (empty for diffusers folders).
    """

    path: str
    kind: str
    family: str
    layout: UNetLayout
    files: list[str] = field(default_factory=list)
    slots: dict[str, list[WeightSlot]] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def add(self, slot: WeightSlot) -> None:
        for k in adapter_key_spellings(slot.component, slot.module, self.family, self.layout):
            bucket = self.slots.setdefault(k, [])
            if slot not in bucket:
                bucket.append(slot)

    def primary_slots(self) -> Iterator[WeightSlot]:
        """Every slot once."""
        seen = set()
        for bucket in self.slots.values():
            for s in bucket:
                if s not in seen:
                    seen.add(s)
                    yield s


def adapter_key_spellings(component: str, module: str, family: str, layout: UNetLayout | None = None
                          ) -> list[str]:
    """The adapter keys that name layer `module` of `component`, the one lycoft writes first.

    UNet: ``lora_unet_`` + the family's `FamilyInfo.unet_key_names` (LDM names for SDXL, diffusers
    names otherwise; docs/spec.md, "Key names"), and the other vocabulary as an alias. Text encoders: the
    encoder's `TextEncoderInfo.key_prefix` (``lora_te_``; ``lora_te1_``/``lora_te2_`` for SDXL) + the
    ``text_model_`` form; aliases without ``text_model_`` (LyCORIS under transformers 5) and, for a single
    encoder, ``lora_te1_``. Mirrors `lycoft.network.candidate_index` (a test keeps them equal).
    """
    info = family_info(family)
    if component == "unet":
        diffusers = to_key(info.unet_key_prefix, module)
        try:
            ldm = to_key(info.unet_key_prefix,
                         unet_module_path_to_ldm(module, layout or UNetLayout.for_family(family)))
        except ValueError:
            ldm = None
        keys = [ldm if (info.unet_key_names == "ldm" and ldm) else diffusers, diffusers]
        if ldm:
            keys.append(ldm)
    else:
        prefix = info.text_encoder(component).key_prefix
        wrapped = text_encoder_module_path(module)
        flat = wrapped[len("text_model."):] if wrapped.startswith("text_model.") else wrapped
        keys = [to_key(prefix, wrapped), to_key(prefix, flat)]
        if prefix == "lora_te":
            keys.append(to_key("lora_te1", "text_model." + flat))
    return list(dict.fromkeys(keys))


def primary_key(component: str, module: str, family: str, layout: UNetLayout | None = None) -> str:
    return adapter_key_spellings(component, module, family, layout)[0]


def _adaptable(module: str, param: str, shape: tuple[int, ...]) -> bool:
    """A Linear or Conv weight: 2-D or more, and not an embedding table (the only other 2-D weights)."""
    return param == "weight" and len(shape) >= 2 and "embeddings." not in module + "."


# ------------------------------------------------------------------------------------------ single file
def _index_single_file(base: BaseModel, file: str, shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        try:
            targets = ldm_key_to_modules(name, base.family, base.layout)
        except ValueError:
            base.unmapped.append(name)
            continue
        for t in targets:
            if t.chunk is not None:
                if shape[0] % t.chunks:
                    base.unmapped.append(name)
                    break
                lshape = (shape[0] // t.chunks, *shape[1:])
            else:
                lshape = tuple(reversed(shape)) if t.transposed else tuple(shape)
            if not _adaptable(t.module, t.param, lshape):
                continue
            key = primary_key(t.component, t.module, base.family, base.layout)
            base.add(WeightSlot(key, t.component, t.module, file, name, lshape, t.chunk, t.chunks, t.transposed))


def _detect_single_file_family(path: str, shapes: dict[str, tuple[int, ...]], family: str | None) -> str:
    try:
        detected = detect_family_from_keys(shapes)
    except ValueError as e:
        if family is None:
            raise AdapterFileError(path, f"not a Stable Diffusion checkpoint ({e})",
                                   "give an SD1/SD2/SDXL single-file checkpoint or a diffusers folder") from None
        return family
    if family is not None and family != detected:
        raise AdapterFileError(path, f"this is an {detected} checkpoint, not {family}",
                               f"use a {family} base, or adapters made for {detected}")
    return detected


# ------------------------------------------------------------------------------------------- diffusers
def _component_weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors"))
    if not files and any(p.suffix == ".bin" for p in folder.iterdir()):
        raise AdapterFileError(
            str(folder), "holds only .bin (pickle) weights, which cannot be patched tensor by tensor",
            "re-save the pipeline with save_pretrained(..., safe_serialization=True)",
        )
    return files


def _listed_components(root: Path) -> set[str]:
    """The model folders `model_index.json` says the pipeline has (``[null, null]`` entries are absent)."""
    index = _read_json(root / "model_index.json")
    return {k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None}


def _check_shards(folder: Path) -> None:
    """A sharded model's index must find all its shards (a partial download lacks some)."""
    for index in folder.glob("*.safetensors.index.json"):
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise AdapterFileError(
                str(folder), f"lacks {len(missing)} of the {len(shards)} weight files {index.name} lists "
                f"({', '.join(missing[:3])})", "the diffusers folder is incomplete: download or copy it again")


def _index_diffusers(base: BaseModel, root: Path) -> None:
    listed = _listed_components(root)
    for sub, component in DIFFUSERS_COMPONENTS.items():
        folder = root / sub
        if not folder.is_dir():
            if sub in listed:
                raise AdapterFileError(
                    str(root), f"has no {sub}/ folder, which its model_index.json lists: the base model is "
                    "incomplete", f"download or copy the whole diffusers folder again (with {sub}/)")
            continue
        _check_shards(folder)
        files = _component_weight_files(folder)
        if not files:
            raise AdapterFileError(
                str(folder), "holds no weights (no *.safetensors file): the base model is incomplete",
                f"download or copy {sub}/ again, with its diffusion_pytorch_model.safetensors or "
                "model.safetensors")
        for file in files:
            header, _ = read_safetensors_header(file)
            base.files.append(str(file))
            for name, info in header.items():
                module, _, param = name.rpartition(".")
                if component != "unet":
                    module = text_encoder_module_path(module)
                if not _adaptable(module, param, info.shape):
                    continue
                key = primary_key(component, module, base.family, base.layout)
                base.add(WeightSlot(key, component, module, str(file), name, info.shape))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterFileError(str(path), f"cannot be read as JSON ({e})", "check the diffusers folder") from None


# ------------------------------------------------------------------------------------------------- open
@contextmanager
def open_base(path: str | os.PathLike[str], family: str | None = None,
              next_to: str | os.PathLike[str] | None = None) -> Iterator[BaseModel]:
    """Index a base model (see module docstring); a context manager because a ``.ckpt`` is read through
    a temporary safetensors copy that lives until the exit: beside the output `next_to` when its folder
    exists (the same disk; one a killed run left is removed by the next write of that output), else in
    lycoft's folder of the system's temporary folder (`scratch_directory`)."""
    p = Path(path)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise AdapterFileError(str(p), "is a folder but not a diffusers pipeline (no model_index.json)",
                                   "give a diffusers folder or a single-file .safetensors/.ckpt checkpoint")
        if not (p / "unet" / "config.json").is_file():
            raise AdapterFileError(str(p), "has no unet/config.json", "give an SD1/SD2/SDXL diffusers folder")
        config = _read_json(p / "unet" / "config.json")
        detected = detect_family_from_unet(config)
        if family is not None and family != detected:
            raise AdapterFileError(str(p), f"this is an {detected} model, not {family}",
                                   f"use a {family} base, or adapters made for {detected}")
        base = BaseModel(str(p), "diffusers", detected, UNetLayout.from_config(config))
        _index_diffusers(base, p)
        yield base
        return
    if not p.exists():
        raise AdapterFileError(str(p), "file not found", "check the path")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        tensors = load_torch_checkpoint(str(p))
        beside = next_to is not None and Path(next_to).parent.is_dir()
        with scratch_directory(next_to if beside else None) as tmp:
            st = Path(tmp) / (p.stem + ".safetensors")
            save_safetensors_atomic(tensors, st)
            del tensors
            with _open_single(st, family, display=str(p)) as base:
                yield base
        return
    with _open_single(p, family) as base:
        yield base


@contextmanager
def _open_single(p: Path, family: str | None, display: str | None = None) -> Iterator[BaseModel]:
    header, metadata = read_safetensors_header(p)
    shapes = {k: info.shape for k, info in header.items()}
    fam = _detect_single_file_family(display or str(p), shapes, family)
    base = BaseModel(display or str(p), "single-file", fam, UNetLayout.for_family(fam), files=[str(p)],
                     metadata=metadata)
    _index_single_file(base, str(p), shapes)
    yield base


def family_of_adapter(metadata: dict[str, str]) -> str | None:
    """The family an adapter file says it was trained for (lycoft, kohya or SAI metadata), or None."""
    fam = metadata.get("lycoft.family")
    if fam in FAMILIES:
        return fam
    return family_of_metadata(metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", ""))
