"""AUTOMATIC1111 (stable-diffusion-webui 1.10): OFT/BOFT layers as a network module type of its own.

A1111's Lora extension (`extensions-builtin/Lora`) reads a file (`networks.load_network`), maps each layer
prefix to a model layer, and asks each entry of `networks.module_types` in turn to `create_module` from that
layer's tensors; `networks.network_apply_weights` then adds the module's `calc_updown(weight)` to the layer's
weight (its `forward` is used instead with the "functional" Lora option). lycoft's module type sits ahead of
A1111's own OFT type: it takes every layer holding an OFT/BOFT tensor, in any layout, and returns the
difference to lycoft's merge at the network's multiplier (`NetworkModule.multiplier()`: the text-encoder or
UNet multiplier of `<lora:name:te:unet>`). LoRA, LoHa, LoKr, IA3, GLoRA, norm and full layers reach A1111's
own types unchanged.

A1111 names layers by kohya prefixes only (`lora_unet_...`, `lora_te_...`, LDM names). OFT layers spelled
otherwise (kohya legacy ``oft_unet_`` with diffusers names, PEFT / diffusers / OneTrainer dotted names) are
renamed to the kohya spelling as the file is read (`kohya_prefix`); other files are read as before.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from lycoft.formats.patches import MAIN_SUFFIXES, SUFFIXES, LayerPatch, layer_prefixes
from lycoft.naming import text_encoder_path
from lycoft.ui.comfy_adapter import load_weights
from lycoft.ui.state import TensorsWithMetadata, safetensors_metadata

log = logging.getLogger("lycoft")

_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.",
               "input_blocks.", "middle_block.", "output_blocks.", "out.", "time_embed.")
# prefix of a file's text-encoder layer -> (encoder index, path inside the CLIP model)
_TE_ROOTS = (("text_encoder_2.", 1), ("clip_g.", 1), ("text_encoder.", 0), ("clip_l.", 0))
_METADATA: dict[tuple[str, float], dict[str, str]] = {}
_FILE_NAMES: dict[str, dict[str, str]] = {}  # file -> {kohya prefix A1111 reads: prefix in the file}


def kohya_prefix(prefix: str, sdxl: bool) -> str | None:
    """The kohya spelling A1111 maps of an OFT layer prefix spelled otherwise, or None (kohya already, or not
    a UNet / CLIP layer)."""
    if prefix.startswith("oft_unet_"):
        return "lora_unet_" + prefix[len("oft_unet_"):]
    if prefix.startswith("oft_te"):
        return "lora_te" + prefix[len("oft_te"):]
    if "." not in prefix:
        return None
    path = prefix.removeprefix("base_model.model.")
    if path.startswith("unet.") or path.startswith(_UNET_ROOTS):
        return "lora_unet_" + path.removeprefix("unet.").replace(".", "_")
    index = 0
    for root, i in _TE_ROOTS:
        if path.startswith(root):
            path, index = path[len(root):], i
            break
    else:
        if not path.startswith(("text_model.", "encoder.layers.")):
            return None
    te = "lora_te2_" if index == 1 else ("lora_te1_" if sdxl else "lora_te_")
    return te + text_encoder_path(path).replace(".", "_")


def with_kohya_names(tensors: Any, filename: str, sdxl: bool) -> Any:
    """`tensors` (a file's state dict) with its OFT layers in the kohya spelling A1111 maps; the same object
    when there is nothing to rename."""
    if not isinstance(tensors, dict):
        return tensors
    renames = {p: k for p in layer_prefixes(tensors.keys()) if (k := kohya_prefix(p, sdxl)) is not None}
    _FILE_NAMES[os.path.abspath(filename)] = {k: p for p, k in renames.items()}
    if not renames:
        return tensors
    out = dict(tensors)
    for old, new in renames.items():
        for suffix in SUFFIXES:
            if f"{old}.{suffix}" in out:
                out[f"{new}.{suffix}"] = out.pop(f"{old}.{suffix}")
    return out


class _ReadsKohyaNames:
    """`networks.sd_models` seen by A1111's `load_network`: `read_state_dict` renames OFT layers
    (`with_kohya_names`); everything else is the webui's `modules.sd_models`."""

    def __init__(self, sd_models: Any) -> None:
        self._sd_models = sd_models

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sd_models, name)

    def read_state_dict(self, filename: str, *args: Any, **kwargs: Any) -> Any:
        tensors = self._sd_models.read_state_dict(filename, *args, **kwargs)
        shared = sys.modules.get("modules.shared")
        sdxl = bool(getattr(getattr(shared, "sd_model", None), "is_sdxl", False))
        return with_kohya_names(tensors, filename, sdxl)


def _metadata(filename: str) -> dict[str, str]:
    """The file's safetensors metadata as stored (A1111's `NetworkOnDisk.metadata` has JSON values decoded)."""
    try:
        key = (os.path.abspath(filename), os.path.getmtime(filename))
    except OSError:
        return {}
    if key not in _METADATA:
        _METADATA.clear()
        _METADATA[key] = safetensors_metadata(filename)
    return _METADATA[key]


def module_type_class(network: Any) -> type:
    """lycoft's `ModuleType` for A1111's `network` module (its `ModuleType` / `NetworkModule` bases)."""

    class LycoftOFTModule(network.NetworkModule):
        """One OFT/BOFT layer: `calc_updown` is lycoft's merge at the multiplier minus the weight (float32);
        a layer that could not be read (`patch` None, reported once) is left unchanged."""

        def __init__(self, net: Any, weights: Any, patch: LayerPatch | None) -> None:
            super().__init__(net, weights)
            self.patch = patch

        def calc_updown(self, orig_weight: torch.Tensor) -> tuple[torch.Tensor, None]:
            W = orig_weight.float()
            if self.patch is None:
                return torch.zeros_like(W), None
            return self.patch.merged(W, float(self.multiplier())) - W, None

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            """The "functional" Lora option: the layer's output plus the weight difference applied to `x`."""
            if self.ops is None:
                raise NotImplementedError(f"{self.network_key}: no functional form for {type(self.sd_module)}")
            updown, _ = self.calc_updown(self.sd_module.weight)
            return y + self.ops(x, weight=updown.to(x.dtype), bias=None, **self.extra_kwargs)

    class LycoftOFTModuleType(network.ModuleType):
        lycoft = True

        def create_module(self, net: Any, weights: Any) -> Any:
            parts: Mapping[str, torch.Tensor] = weights.w
            if not any(s in parts for s in MAIN_SUFFIXES):
                return None
            filename = net.network_on_disk.filename
            prefix = weights.network_key.partition(".")[0]
            key = _FILE_NAMES.get(os.path.abspath(filename), {}).get(prefix, prefix)  # as the file spells it
            tensors = TensorsWithMetadata({f"{key}.{s}": t for s, t in parts.items()}, _metadata(filename), filename)
            loaded = load_weights(key, tensors, set())
            return LycoftOFTModule(net, weights, None if loaded is None else LayerPatch(loaded[:2], loaded[2]))

    return LycoftOFTModuleType


def install() -> bool:
    """Put lycoft's module type first in A1111's `networks.module_types` and the OFT renaming in its file
    reader (idempotent); False when A1111's Lora extension is not loaded."""
    networks, network = sys.modules.get("networks"), sys.modules.get("network")
    module_types = getattr(networks, "module_types", None)
    if module_types is None or not hasattr(network, "ModuleType") or not hasattr(network, "NetworkModule"):
        return False
    if not any(getattr(t, "lycoft", False) for t in module_types):
        module_types.insert(0, module_type_class(network)())
    sd_models = getattr(networks, "sd_models", None)
    if sd_models is not None and not isinstance(sd_models, _ReadsKohyaNames):
        networks.sd_models = _ReadsKohyaNames(sd_models)
    return True
