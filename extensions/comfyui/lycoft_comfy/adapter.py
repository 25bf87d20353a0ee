"""The weight adapter ComfyUI uses for every OFT/BOFT layer once this extension is installed.

ComfyUI asks each class in `comfy.weight_adapter.adapters` to `load` a layer prefix of a file; the adapter
it gets is then applied by the weight patcher (`calculate_weight`: LoraLoader, hooks, Save Checkpoint) or
by the bypass loader (`bypass_forward`). Both evaluate `lycoft.formats.patches.LayerPatch`, lycoft's merge:
the same weights as `tools/merge.py --adapter file:strength`, computed in float32 whatever ComfyUI's patch
dtype (its fp16 path on GPUs included), bias untouched in bypass mode.

`weights` is `(blocks, scale, reading)`: ComfyUI moves the tensors between devices and re-creates the
adapter as `type(a)(a.loaded_keys, weights)`, so everything it needs is in that tuple.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import comfy.weight_adapter as weight_adapter
import torch
from comfy.weight_adapter.base import WeightAdapterBase

from lycoft.formats.patches import LayerPatch, conv_forward, layer_parts, read_layer
from lycoft.io.errors import AdapterFileError

from . import state

log = logging.getLogger("lycoft")


class LycoftOFTAdapter(WeightAdapterBase):
    """One OFT/BOFT layer of any layout, applied with lycoft's strength semantics."""

    name = "lycoft-oft"

    def __init__(self, loaded_keys: set[str], weights: tuple) -> None:
        self.loaded_keys = loaded_keys
        self.weights = weights

    @property
    def patch(self) -> LayerPatch:
        blocks, scale, reading = self.weights
        return LayerPatch((blocks, scale), reading)

    @classmethod
    def load(cls, x: str, lora: dict[str, torch.Tensor], alpha: float | None, dora_scale: torch.Tensor | None,
             loaded_keys: set[str] | None = None) -> WeightAdapterBase | None:
        if loaded_keys is None:
            loaded_keys = set()
        if state.stock_formula():
            return _stock_load(x, lora, alpha, dora_scale, loaded_keys)
        parts = layer_parts(lora, x)
        if not parts:
            return None
        try:
            patch = read_layer(x, parts, state.metadata_of(lora), path=state.source_of(lora))
        except AdapterFileError as e:
            log.error("lycoft: layer not loaded: %s", e)
            return None
        if patch is None:
            return None
        if patch.reading.assumed:
            state.warn_once(state.source_of(lora), "records no Cayley parametrisation for its oft_R layers "
                            "(no PEFT config in its metadata); read as PEFT's default 5-term Cayley-Neumann series")
        loaded_keys.update(f"{x}.{suffix}" for suffix in parts)
        return cls(loaded_keys, (patch.blocks, patch.scale, patch.reading))

    # -- weight patching (LoraLoader, hooks, Save Checkpoint) -------------------------------------------
    def calculate_weight(self, weight: torch.Tensor, key: str, strength: float, strength_model: float,
                         offset: Any, function: Callable[[torch.Tensor], torch.Tensor] | None,
                         intermediate_dtype: torch.dtype = torch.float32, original_weight: Any = None
                         ) -> torch.Tensor:
        """`weight` (ComfyUI's patch buffer, any dtype; a narrowed view with offsets) set in place to the
        merged weight at strength `strength`; on failure left unchanged with one error line."""
        try:
            W = weight.float()
            merged = self.patch.merged(W, strength)
            diff = merged - W
            weight.copy_(W + (function(diff) if function is not None else diff))
        except Exception as e:  # ComfyUI's own adapters report and leave the layer as it was, too
            log.error("lycoft: %s not patched: %s", key, e)
        return weight

    # -- bypass (activations; the weights stay as they are) ---------------------------------------------
    def bypass_forward(self, org_forward: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any,
                       **kwargs: Any) -> torch.Tensor:
        multiplier = float(getattr(self, "multiplier", 1.0))
        module = getattr(org_forward, "__self__", None)
        bias = getattr(module, "bias", None)
        is_conv = bool(getattr(self, "is_conv", x.dim() > 2))
        kernel = math.prod(getattr(self, "kernel_size", (1,)) or (1,)) if is_conv else 1
        patch = self.patch
        if patch.on_activations(kernel):
            fan_in = x.shape[1] * kernel if is_conv else x.shape[-1]
            return patch.forward(lambda t: org_forward(t, *args, **kwargs), x, multiplier,
                                 channel_dim=1 if is_conv else -1, bias=bias, fan_in=fan_in)
        # An input rotation of a wider kernel does not line up with the layer input: use the weight.
        weight = module.weight.to(device=x.device)
        merged = patch.merged(weight, multiplier).to(x.dtype)
        b = None if bias is None else bias.to(device=x.device, dtype=x.dtype)
        return conv_forward(merged, b, x, module)


def _stock_load(x: str, lora: dict[str, torch.Tensor], alpha: float | None, dora_scale: torch.Tensor | None,
                loaded_keys: set[str]) -> WeightAdapterBase | None:
    """ComfyUI's own OFT/BOFT adapters, for the "ComfyUI stock" formula of the Load OFT node."""
    for stock in (weight_adapter.OFTAdapter, weight_adapter.BOFTAdapter):
        adapter = stock.load(x, lora, alpha, dora_scale, loaded_keys)
        if adapter is not None:
            return adapter
    return None
