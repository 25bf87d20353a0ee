"""Forge (lllyasviel/stable-diffusion-webui-forge): OFT/BOFT layers as a patch type of their own.

Forge's `backend.patcher.lora.load_lora` asks its LoRA "collections" in turn (`lora_collection_priority`),
and `merge_lora_to_weight` applies patches `(patch_type, payload)`, looking unknown types up in
`extra_weight_calculators`. lycoft adds a collection ahead of Forge's own that reads the file's OFT layers
(every layout, with the spellings Forge's key maps lack) and hands everything else on unchanged, and the
calculator of its patch type: lycoft's merge at the multiplier given, into Forge's float32 patch buffer.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
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
        to_load = {**to_load, **oft_aliases(lora.keys(), to_load)}
        loaded: set[str] = set()
        patches = {}
        for x in layer_prefixes(lora.keys()) & set(to_load):
            weights = load_weights(x, lora, loaded)
            if weights is not None:
                patches[to_load[x]] = (PATCH_TYPE, weights)
        rest = {k: v for k, v in lora.items() if k not in loaded} if loaded else lora
        patch_dict, remaining = self._next_load_lora()(rest, to_load)
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
