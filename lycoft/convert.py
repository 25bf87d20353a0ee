"""Adapter conversions: read any OFT/BOFT flavour, write lycoft/LyCORIS, PEFT or full differences.

Readers: the LyCORIS layout and its legacy forms (kohya ``oft_unet_``, LyCORIS 2.0 ``oft_diag``, files
without ``alpha``; `lycoft.formats.lycoris`), lycoft input-side files, PEFT OFT/BOFT
(`lycoft.formats.peft`). Writers:

- ``lycoris``: lycoft's file layout. Output-side modules as LyCORIS ``oft_blocks`` (what ComfyUI, A1111
  and LyCORIS read; constraint baked, alpha just above the norm); input-side ones (from PEFT) in lycoft's
  input-side layout, which only lycoft reads. Keys respelled: UNet in diffusers or LDM names (``keys``,
  default the family's convention: LDM for SDXL), text encoders in the ``text_model_`` form.
- ``peft``: input-side oft as a PEFT OFT adapter (exact Cayley), for one model component.
- ``diff``: ``<key>.diff`` full weight differences against a base model (`lycoft.diff`).

Key respelling needs the UNet's module names: from ``base`` when given, otherwise from the family's
bundled diffusers config (instantiated on the meta device: no weights, no download).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base_model import BaseModel, adapter_key_spellings, family_of_adapter, open_base
from .checkpoints.families import FAMILIES, FAMILY_INFO, SD1, family_info, modelspec_architecture, ss_base_model_version
from .checkpoints.ldm_keys import UNetLayout, text_encoder_module_path, unet_module_path_to_ldm
from .compatibility import RESCALED_OFT_FIX, UI_SAFE_LOSES, rescaled_oft_misreaders
from .formats.lycoris import (
    ModuleSpec,
    oft_as_one_stage_butterfly,
    parse_adapter_tensors,
    save_specs,
    specs_metadata,
)
from .formats.peft import PeftAdapter, PeftModule, is_peft_tensors, read_peft, write_peft
from .io.atomic import refuse_overwrite, same_file
from .io.errors import AdapterFileError
from .io.safe_io import read_safetensors
from .io.streaming import DTYPE_CHOICES
from .naming import to_key
from .ops import check_multiplier

log = logging.getLogger("lycoft")

TARGETS = ("lycoris", "peft", "diff")
KEY_STYLES = ("ldm", "diffusers")


@dataclass
class ReadAdapter:
    """An adapter of any flavour, in memory: LyCORIS-readable specs or a PEFT adapter."""

    path: str
    flavour: str  # "lycoris", "kohya-legacy", "lycoris-2.0", "lycoft-input", "peft-oft", "peft-boft", "diff"
    specs: dict[str, ModuleSpec] = field(default_factory=dict)
    peft: PeftAdapter | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)


def read_any_adapter(path: str, component: str | None = None, peft_config: str | None = None) -> ReadAdapter:
    """Read `path` whatever OFT/BOFT flavour it is (see module docstring); ``.diff`` files too."""
    if peft_config is not None and not os.path.isfile(peft_config):
        raise AdapterFileError(peft_config, "not found" if not os.path.exists(peft_config) else "is not a file",
                               "check the --peft-config path (a PEFT adapter_config.json)")
    p = Path(path)
    if p.is_dir():
        peft = read_peft(p, component, peft_config)
        return ReadAdapter(str(p), f"peft-{peft.kind}", peft=peft)
    tensors, metadata = read_safetensors(p)
    keys = list(tensors)
    if is_peft_tensors(keys):
        peft = read_peft(p, component, peft_config)
        return ReadAdapter(str(p), f"peft-{peft.kind}", peft=peft, metadata=metadata)
    if any(k.startswith(("lora_unet_", "lora_te")) and k.endswith((".oft_R.weight", ".boft_R")) for k in keys) \
            and metadata.get("lycoft.side") != "input":
        raise AdapterFileError(
            str(p), "looks like a kohya sd-scripts networks.oft_v2 / networks.boft file (PEFT math, kohya key "
            "names), which lycoft does not convert yet", "convert it with kohya's own tools, or merge it there")
    if keys and all(k.endswith((".diff", ".diff_b")) for k in keys):
        return ReadAdapter(str(p), "diff", metadata=metadata, diffs=tensors)
    specs = parse_adapter_tensors(tensors, metadata, str(p))
    sources = {s.source for s in specs.values()}
    flavour = "lycoft-input" if sources == {"lycoft-input"} else (
        sorted(sources - {"lycoris"})[0] if sources - {"lycoris"} else "lycoris")
    return ReadAdapter(str(p), flavour, specs=specs, metadata=metadata)


# ------------------------------------------------------------------------------------------ key index
@functools.cache
def _family_module_paths(family: str) -> tuple[tuple[str, str], ...]:
    """(component, module path) of every Linear/Conv layer of the family's real model, built on the meta
    device from the bundled configs (a superset of the tiny models' layers)."""
    import transformers
    from diffusers import UNet2DConditionModel

    from .checkpoints.bundled import load_component_config
    from .layers import SUPPORTED

    info = family_info(family)
    out: list[tuple[str, str]] = []
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_component_config(info.config, "unet"))
        models: dict[str, Any] = {"unet": unet}
        for te in info.text_encoders:
            cfg = load_component_config(info.config, te.component)
            text_cfg = transformers.CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
            models[te.name] = transformers.CLIPTextModel(text_cfg)
    for comp, model in models.items():
        for path, module in model.named_modules():
            if path and isinstance(module, SUPPORTED):
                out.append((comp, path if comp == "unet" else text_encoder_module_path(path)))
    return tuple(out)


def key_index(family: str, base: BaseModel | None = None) -> dict[str, tuple[str, str]]:
    """Every accepted adapter-key spelling -> (component, module path)."""
    index: dict[str, tuple[str, str]] = {}
    if base is not None:
        for slot in base.primary_slots():
            for k in adapter_key_spellings(slot.component, slot.module, family, base.layout):
                index.setdefault(k, (slot.component, slot.module))
        return index
    layout = UNetLayout.for_family(family)
    for comp, path in _family_module_paths(family):
        for k in adapter_key_spellings(comp, path, family, layout):
            index.setdefault(k, (comp, path))
    return index


def spell_key(component: str, path: str, family: str, style: str | None, layout: UNetLayout) -> str:
    """The key lycoft writes for a layer: text encoders in the ``text_model_`` form; UNet in `style`
    (``ldm`` / ``diffusers``; None = the family's convention)."""
    info = family_info(family)
    if component != "unet":
        return to_key(info.text_encoder(component).key_prefix, text_encoder_module_path(path))
    style = style or info.unet_key_names
    return to_key(info.unet_key_prefix, unet_module_path_to_ldm(path, layout) if style == "ldm" else path)


def guess_family(adapter: ReadAdapter) -> str:
    """Family from metadata, else from key names: keys or PEFT modules of a second text encoder
    (``lora_te2_``, ``te2``), or LDM UNet names, point to the family that has one or writes them (SDXL);
    otherwise sd1."""
    fam = family_of_adapter(adapter.metadata)
    if fam:
        return fam
    keys = list(adapter.specs) or list(adapter.diffs)
    peft_components = {m.component for m in adapter.peft.modules} if adapter.peft else set()
    for info in FAMILY_INFO.values():
        later = info.text_encoders[1:]
        if (any(k.startswith(te.key_prefix + "_") for te in later for k in keys)
                or any(te.name in peft_components for te in later)
                or (info.unet_key_names == "ldm" and any("input_blocks" in k or "output_blocks" in k for k in keys))):
            return info.name
    return SD1


# ------------------------------------------------------------------------------------------ converting
@dataclass
class ConvertReport:
    src: str
    out: str
    flavour: str
    to: str
    family: str
    layers: int = 0
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ui_safe: int = 0  # oft layers written as one-stage butterflies

    def summary(self) -> str:
        lines = [f"converted {self.src} ({self.flavour}, {self.family}) -> {self.out} "
                 f"({self.to}, {self.layers} layers)"]
        if self.unmatched:
            lines.append(f"  {len(self.unmatched)} keys matched no layer and were left out: "
                         + ", ".join(self.unmatched[:5]) + (" ..." if len(self.unmatched) > 5 else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _peft_location(adapter: ReadAdapter, m: PeftModule, family: str, base: BaseModel | None,
                   index: Mapping[str, tuple[str, str]]) -> tuple[str, str]:
    """A PEFT module's (component, path) in lycoft terms; TE paths get the ``text_model.`` form."""
    path = m.path if m.component == "unet" else text_encoder_module_path(m.path)
    key = adapter_key_spellings(m.component, path, family, base.layout if base else None)[0]
    if key not in index:
        raise AdapterFileError(adapter.path, f"layer {m.component}:{m.path} is not in the {family} model",
                               "check --family / --component, or give --base")
    return index[key]


def _respelled_specs(adapter: ReadAdapter, family: str, style: str | None, base: BaseModel | None,
                     allow_partial: bool, report: ConvertReport) -> dict[str, ModuleSpec]:
    """Specs keyed by lycoft's spelling, from LyCORIS-flavoured specs or PEFT OFT modules."""
    index = key_index(family, base)
    layout = base.layout if base else UNetLayout.for_family(family)
    out: dict[str, ModuleSpec] = {}
    if adapter.peft is not None:
        worst = 0.0
        for m in adapter.peft.modules:
            comp, path = _peft_location(adapter, m, family, base, index)
            key = spell_key(comp, path, family, style, layout)
            spec, err = m.to_spec(key, _fan_in(base, key))
            worst = max(worst, err)
            out[key] = spec
        if any(m.neumann for m in adapter.peft.modules):
            report.notes.append(
                f"PEFT trained with use_cayley_neumann=True: its rotations are a truncated series; the converted "
                f"adapter holds the exact rotation the series approximates (largest block difference "
                f"{worst:.2e}). --to diff reproduces PEFT's own merged weights exactly")
        return out
    for key, spec in adapter.specs.items():
        hit = index.get(key)
        if hit is None:
            report.unmatched.append(key)
            continue
        new = spell_key(*hit, family, style, layout)
        if new in out:
            raise AdapterFileError(adapter.path, f"{key} and another key both name layer {hit[1]}",
                                   "remove one of them")
        spec.key = new
        out[new] = spec
    if report.unmatched and not allow_partial:
        raise AdapterFileError(
            adapter.path, f"{len(report.unmatched)} keys name no layer of the {family} model "
            f"({', '.join(report.unmatched[:5])})", "check --family, give --base, or pass --allow-partial")
    return out


def _fan_in(base: BaseModel | None, key: str) -> int | None:
    if base is None or key not in base.slots:
        return None
    return base.slots[key][0].dim("input")


def _notes_for_lycoris(specs: Mapping[str, ModuleSpec], flavour: str) -> list[str]:
    notes = []
    if flavour == "kohya-legacy":
        notes.append("kohya networks.oft counted blocks (dim = block count): layers keep their block size, so "
                     "files with block_size > block_num still do not load in the LyCORIS loader (ComfyUI and "
                     "A1111 read them)")
    if any(s.rescale is not None and s.algo == "oft" for s in specs.values()):
        notes.append(f"oft with rescale, which stock {' and '.join(rescaled_oft_misreaders())} ignore: "
                     f"{RESCALED_OFT_FIX}")
    return notes


def _one_stage_butterflies(specs: dict[str, ModuleSpec], report: ConvertReport) -> dict[str, ModuleSpec]:
    """`--ui-safe`: every rescaled output-side oft module as the one-stage butterfly with its merged weight."""
    out = {}
    for key, spec in specs.items():
        if spec.algo == "oft" and spec.side == "output" and spec.rescale is not None:
            spec = oft_as_one_stage_butterfly(spec)
            report.ui_safe += 1
        out[key] = spec
    if report.ui_safe:
        report.notes.append(f"--ui-safe: {report.ui_safe} rescaled oft layers written as one-stage butterflies "
                            f"(the same weights; stock {' and '.join(rescaled_oft_misreaders())} now apply their "
                            f"rescale); {UI_SAFE_LOSES}")
    else:
        report.notes.append("--ui-safe: no oft layer has rescale, so every stock UI reads the file as it is; "
                            "nothing was changed")
    return out


def convert_adapter(
    src: str,
    out: str,
    to: str,
    base: str | None = None,
    keys: str | None = None,
    family: str | None = None,
    multiplier: float = 1.0,
    dtype: str | None = None,
    force: bool = False,
    allow_partial: bool = False,
    component: str | None = None,
    peft_config: str | None = None,
    peft_layout: str = "diffusers",
    ui_safe: bool = False,
) -> ConvertReport:
    """Convert the adapter `src` to `out` in format `to` (``lycoris``, ``peft`` or ``diff``).

    Args:
        base: base model (single file or diffusers folder): required for ``diff``; otherwise gives the exact
            UNet layout and layer shapes (PEFT ``block_share`` files need it).
        keys: UNet key style of ``lycoris`` output: ``ldm`` or ``diffusers`` (default: family convention).
        family: ``sd1``/``sd2``/``sdxl``; default from the base, the file metadata, or the key names.
        multiplier: strength baked into ``diff`` output (lycoft semantics; PEFT files only at 1).
        dtype: ``fp16``/``bf16``/``fp32`` of the written tensors (diff default: the base's dtype).
        component: model of bare PEFT keys (``unet``, ``te1``, ``te2``); for ``peft`` output, which model to
            export when the adapter covers several.
        peft_config: the PEFT adapter_config.json when the file does not carry it.
        peft_layout: ``diffusers`` (one file, config in metadata) or ``peftmodel`` (a folder).
        ui_safe: ``lycoris`` output: write rescaled oft layers as one-stage butterflies, the layout whose
            rescale stock ComfyUI and reForge apply (`lycoft.formats.lycoris.oft_as_one_stage_butterfly`).
    """
    if to not in TARGETS:
        raise ValueError(f"--to {to!r} is not known; use one of {', '.join(TARGETS)}")
    if keys is not None and keys not in KEY_STYLES:
        raise ValueError(f"--keys {keys!r} is not known; use ldm or diffusers")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"--family {family!r} is not known; use one of {', '.join(FAMILIES)}")
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype {dtype!r} is not known; use one of {', '.join(DTYPE_CHOICES)}")
    if ui_safe and to != "lycoris":
        raise ValueError(f"--ui-safe shapes --to lycoris output; --to {to} writes no oft blocks, drop --ui-safe")
    if to == "diff" and base is None:
        raise ValueError("--to diff needs --base <checkpoint or diffusers folder>: differences are W' - W")
    multiplier = check_multiplier(multiplier, "--multiplier")
    if not os.path.exists(src):
        raise AdapterFileError(src, "not found", "check the --in path")
    if same_file(src, out) or (base is not None and same_file(base, out)):
        raise ValueError(f"--out {out} is one of the inputs; write the conversion to a new path")
    if to == "peft" and peft_layout == "peftmodel":
        if os.path.exists(out) and not force:
            raise FileExistsError(f"{out} exists; pass --force to overwrite")
    else:
        refuse_overwrite(out, force)
    adapter = read_any_adapter(src, component, peft_config)
    torch_dtype = DTYPE_CHOICES[dtype] if dtype else None
    with ExitStack() as stack:
        model = stack.enter_context(open_base(base, family, next_to=out)) if base is not None else None
        fam = family or (model.family if model else None) or guess_family(adapter)
        meta_fam = family_of_adapter(adapter.metadata)
        if model is not None and meta_fam is not None and meta_fam != model.family:
            raise AdapterFileError(src, f"was made for {meta_fam} (file metadata) but the base is {model.family}",
                                   f"use a {meta_fam} base")
        report = ConvertReport(src, out, adapter.flavour, to, fam)
        if adapter.flavour == "diff":
            raise AdapterFileError(src, "holds full weight differences already; they cannot become OFT again",
                                   "convert the original adapter")
        if to == "diff":
            _to_diff(adapter, model, out, multiplier, torch_dtype, allow_partial, report)
        elif to == "lycoris":
            if adapter.peft is not None and adapter.peft.kind != "oft":
                raise AdapterFileError(src, "is a PEFT BOFT adapter, which has no lycoft/LyCORIS form",
                                       "export full weight differences: --to diff --base <model>")
            specs = _respelled_specs(adapter, fam, keys, model, allow_partial, report)
            if ui_safe:
                specs = _one_stage_butterflies(specs, report)
            report.notes += _notes_for_lycoris(specs, adapter.flavour)
            if any(s.side == "input" for s in specs.values()):
                report.notes.append("input-side adapter: written in lycoft's input-side layout, which lycoft "
                                    "and (after --to peft) PEFT read; UIs need --to diff")
            # the family's kohya/SAI strings, unless the source file carries its own
            family_md = {"ss_base_model_version": ss_base_model_version(fam),
                         "modelspec.architecture": modelspec_architecture(fam, adapter="lora")}
            metadata = specs_metadata(specs, fam, {**family_md, **adapter.metadata})
            metadata["lycoft.converted_from"] = f"{adapter.flavour}: {os.path.basename(src)}"
            if report.ui_safe:
                metadata["lycoft.ui_safe"] = "rescaled oft layers stored as one-stage butterflies"
            if adapter.flavour == "kohya-legacy":  # no longer a networks.oft file
                metadata["ss_network_module"] = "lycoft.kohya"
            save_specs(specs, out, metadata, torch_dtype)
            report.layers = len(specs)
        else:
            _to_peft(adapter, fam, model, out, component, peft_layout, allow_partial, report)
    return report


def _to_peft(adapter: ReadAdapter, fam: str, model: BaseModel | None, out: str, component: str | None,
             layout: str, allow_partial: bool, report: ConvertReport) -> None:
    if adapter.peft is not None and adapter.peft.kind != "oft":
        raise AdapterFileError(adapter.path, "is a PEFT BOFT adapter already", "nothing to convert")
    specs = _respelled_specs(adapter, fam, "diffusers", model, allow_partial, report)
    outside = [k for k, s in specs.items() if s.side != "input"]
    if outside:
        raise AdapterFileError(
            adapter.path, f"rotates the output side ({outside[0]} ...), which PEFT cannot express (PEFT rotates "
            "the input side)", "export full weight differences instead: --to diff --base <model>")
    index = key_index(fam, model)
    by_component: dict[str, dict[str, ModuleSpec]] = {}
    for key, spec in specs.items():
        comp, path = index[key]
        by_component.setdefault(comp, {})[path] = spec
    if component is None:
        if len(by_component) > 1:
            raise ValueError(f"the adapter covers {', '.join(sorted(by_component))}; a PEFT file holds one model: "
                             "pass --component with one of them")
        component = next(iter(by_component))
    if component not in by_component:
        raise ValueError(f"the adapter has no {component} layers (it has {', '.join(sorted(by_component))})")
    write_peft(by_component[component], out, layout)
    report.layers = len(by_component[component])
    report.notes.append(f"PEFT OFT config: exact Cayley (use_cayley_neumann=False); model: {component}")


def _to_diff(adapter: ReadAdapter, model: BaseModel, out: str, multiplier: float, dtype: torch.dtype | None,
             allow_partial: bool, report: ConvertReport) -> None:
    from .diff import LayerChange, export_diff
    from .merge import apply_spec

    changes: list[LayerChange] = []
    if adapter.peft is not None:
        if multiplier != 1.0:
            raise ValueError("PEFT adapters have no strength; use --multiplier 1")
        index = key_index(model.family, model)
        for m in adapter.peft.modules:
            comp, path = _peft_location(adapter, m, model.family, model, index)
            key = adapter_key_spellings(comp, path, model.family, model.layout)[0]
            slot = model.slots[key][0]
            dim = slot.dim("input")
            if m.kind == "oft":
                dim = m.rotation_blocks(dim).shape[0] * m.block_size
            else:
                dim = m.tensors["boft_R"].shape[1] * m.block_size
            changes.append(LayerChange(key, m.merged, "input", dim))
    else:
        for key, spec in adapter.specs.items():
            changes.append(LayerChange(key, functools.partial(apply_spec, spec=spec, multiplier=multiplier),
                                       spec.side, spec.layout_dim))
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": '{"algo": "full"}',
        "ss_base_model_version": family_info(model.family).ss_base_model_version,
        "lycoft.diff_of": os.path.basename(adapter.path),
        "lycoft.diff_multiplier": str(multiplier),
        "lycoft.family": model.family,
    }
    report.layers, report.unmatched = export_diff(model, changes, out, adapter.path, dtype, allow_partial, metadata)
    report.notes.append(f"strength {multiplier:g} is baked in: load the .diff file at strength 1")
