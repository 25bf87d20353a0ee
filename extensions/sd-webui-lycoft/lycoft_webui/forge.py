"""Forge (lllyasviel/stable-diffusion-webui-forge): OFT/BOFT layers as a patch type of their own.

Forge's `backend.patcher.lora.load_lora` asks its LoRA "collections" in turn (`lora_collection_priority`),
and `merge_lora_to_weight` applies patches `(patch_type, payload)`, looking unknown types up in
`extra_weight_calculators`. lycoft adds a collection ahead of Forge's own that reads the file's OFT layers
(every layout, with the spellings Forge's key maps lack) and hands everything else on unchanged, and the
calculator of its patch type: lycoft's merge at the multiplier given, into Forge's float32 patch buffer.

Forge before its 2024 backend (and Forge Classic, which keeps that code) has the same two pieces in
`ldm_patched`: `lora.load_lora(lora, to_load)` and `model_patcher.extra_weight_calculators`; there the
module's `load_lora` is wrapped the same way (`install_ldm_patched`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lycoft.formats.patches import layer_prefixes
from lycoft.ui.comfy_adapter import load_weights, patch_weight
from lycoft.ui.keys import oft_aliases
from lycoft.ui.state import TensorsWithMetadata, metadata_of, source_of

PATCH_TYPE = "lycoft_oft"


def calculate(weight: torch.Tensor, strength: float, payload: tuple) -> torch.Tensor:
    """Forge's extra weight calculator: `weight` set in place to lycoft's merge at `strength`."""
    return patch_weight(payload, weight, strength)


class OFTCollection:
    """A LoRA collection (Forge asks `load_lora` of the first that has it) for the OFT layers of a file."""

    def __init__(self, priority: list) -> None:
        self.priority = priority  # Forge's list this collection sits in: the next one gets the rest

    def _next_load_lora(self) -> Any:
        after = self.priority[self.priority.index(self) + 1:] if self in self.priority else self.priority
        return next(c.load_lora for c in after if hasattr(c, "load_lora"))

    def load_lora(self, lora: Mapping[str, torch.Tensor], to_load: Mapping[str, object]) -> tuple[dict, dict]:
        return load_oft_then(self._next_load_lora(), lora, to_load)


def load_oft_then(next_load_lora: Callable[..., tuple[dict, dict]], lora: Mapping[str, torch.Tensor],
                  to_load: Mapping[str, object]) -> tuple[dict, dict]:
    """Forge's `load_lora` contract: `(patches, remaining tensors)`, lycoft's for the OFT layers of `lora`,
    `next_load_lora`'s (the UI's own) for the rest."""
    to_load = {**to_load, **oft_aliases(lora.keys(), to_load)}
    loaded: set[str] = set()
    patches = {}
    for x in layer_prefixes(lora.keys()) & set(to_load):
        weights = load_weights(x, lora, loaded)
        if weights is not None:
            patches[to_load[x]] = (PATCH_TYPE, weights)
    rest = {k: v for k, v in lora.items() if k not in loaded} if loaded else lora
    patch_dict, remaining = next_load_lora(rest, to_load)
    patch_dict.update(patches)
    if getattr(lora, "metadata", None) is not None and type(remaining) is dict:
        # Forge loads the UNet's layers, then the text encoders' from what remains: keep the metadata
        remaining = TensorsWithMetadata(remaining, metadata_of(lora), source_of(lora))
    return patch_dict, remaining


def install() -> bool:
    try:
        forge_lora = importlib.import_module("backend.patcher.lora")
    except ImportError:
        return False
    priority = getattr(forge_lora, "lora_collection_priority", None)
    calculators = getattr(forge_lora, "extra_weight_calculators", None)
    if priority is None or calculators is None:  # a Forge with ComfyUI's adapters (Forge Classic)
        return False
    calculators[PATCH_TYPE] = calculate
    if not any(isinstance(c, OFTCollection) for c in priority):
        priority.insert(0, OFTCollection(priority))
    return True


def install_ldm_patched() -> bool:
    """Forge before its 2024 backend and Forge Classic: `ldm_patched` without ComfyUI's adapter list."""
    try:
        patcher = importlib.import_module("ldm_patched.modules.model_patcher")
        lora = importlib.import_module("ldm_patched.modules.lora")
    except ImportError:
        return False
    calculators = getattr(patcher, "extra_weight_calculators", None)
    load_lora = getattr(lora, "load_lora", None)
    if calculators is None or load_lora is None:
        return False
    calculators[PATCH_TYPE] = calculate
    if not getattr(load_lora, "lycoft_wrapped", False):
        # ldm_patched.modules.sd looks load_lora up on the module at every load
        wrapper = functools.wraps(load_lora)(functools.partial(load_oft_then, load_lora))
        wrapper.lycoft_wrapped = True
        lora.load_lora = wrapper
    return True
