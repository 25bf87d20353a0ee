"""The weight adapter for UIs with ComfyUI's adapter interface (ComfyUI, reForge's `ldm_patched`).

Those UIs ask each class of their adapter list to `load` a layer prefix of a file; the adapter they get is
applied by the weight patcher (`calculate_weight`: LoRA loaders, hooks, checkpoint saving) or, in ComfyUI,
by the bypass loader (`bypass_forward`). Both evaluate `lycoft.formats.patches.LayerPatch`: the weights of
`tools/merge.py --adapter file:strength`, computed in float32 whatever the UI's patch dtype, the bias
untouched in bypass mode.

`weights` is `(blocks, scale, reading)`: ComfyUI moves the tensors between devices and re-creates an adapter
as `type(a)(a.loaded_keys, weights)`, so everything it needs is in that tuple.

`adapter_class(base, stock)` builds the class on the UI's own `WeightAdapterBase` (the UIs test
`isinstance(patch, WeightAdapterBase)`); `stock()` returns the UI's own OFT/BOFT adapter classes, used when
a load asks for the stock formula (`lycoft.ui.state.formula(stock=True)`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from ..formats.patches import LayerPatch, conv_forward, layer_parts, read_layer
from ..io.errors import AdapterFileError
from . import state

log = logging.getLogger("lycoft")


def load_weights(x: str, lora: dict[str, torch.Tensor], loaded_keys: set[str]) -> tuple | None:
    """`(blocks, scale, reading)` of the OFT layer `x` of a file's tensors (its keys added to `loaded_keys`),
    or None when `x` holds none; a damaged layer is reported in one line and skipped."""
    parts = layer_parts(lora, x)
    if not parts:
        return None
    source = state.source_of(lora)
    try:
        patch = read_layer(x, parts, state.metadata_of(lora), path=source)
    except AdapterFileError as e:
        log.error("lycoft: layer not loaded: %s", e)
        return None
    if patch is None:
        return None
    if patch.reading.assumed:
        state.warn_once(source, "records no Cayley parametrisation for its oft_R layers (no PEFT config in its "
                        "metadata); read as PEFT's default 5-term Cayley-Neumann series")
    loaded_keys.update(f"{x}.{suffix}" for suffix in parts)
    return (patch.blocks, patch.scale, patch.reading)


def patch_weight(weights: tuple, weight: torch.Tensor, strength: float,
                 function: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """`weight` (a UI's patch buffer, any dtype) set in place to the merged weight at `strength`."""
    W = weight.float()
    diff = LayerPatch(weights[:2], weights[2]).merged(W, strength) - W
    weight.copy_(W + (function(diff) if function is not None else diff))
    return weight


def adapter_class(base: type, stock: Callable[[], tuple[type, ...]]) -> type:
    """The OFT adapter class for a UI whose adapters derive from `base`."""

    class LycoftOFTAdapter(base):
        """One OFT/BOFT layer of any layout, applied with lycoft's strength semantics."""

        name = "lycoft-oft"

        def __init__(self, loaded_keys: set[str], weights: tuple) -> None:
            self.loaded_keys = loaded_keys
            self.weights = weights

        @classmethod
        def load(cls, x: str, lora: dict[str, torch.Tensor], alpha: float | None, dora_scale: torch.Tensor | None,
                 loaded_keys: set[str] | None = None) -> Any:
            if loaded_keys is None:
                loaded_keys = set()
            if state.stock_formula():
                for stock_cls in stock():
                    adapter = stock_cls.load(x, lora, alpha, dora_scale, loaded_keys)
                    if adapter is not None:
                        return adapter
                return None
            weights = load_weights(x, lora, loaded_keys)
            return None if weights is None else cls(loaded_keys, weights)

        def calculate_weight(self, weight: torch.Tensor, key: str, strength: float, strength_model: float,
                             offset: Any, function: Callable[[torch.Tensor], torch.Tensor] | None,
                             intermediate_dtype: torch.dtype = torch.float32, original_weight: Any = None
                             ) -> torch.Tensor:
            """`weight` (a narrowed view with offsets) set in place; on failure left unchanged, one error line
            (as the UIs' own adapters do)."""
            try:
                patch_weight(self.weights, weight, strength, function)
            except Exception as e:
                log.error("lycoft: %s not patched: %s", key, e)
            return weight

        def bypass_forward(self, org_forward: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any,
                           **kwargs: Any) -> torch.Tensor:
            """ComfyUI's bypass mode: the layer's output with the adapter applied on its activations, bias
            untouched (`multiplier`, `is_conv`, `kernel_size` are set on the adapter by ComfyUI's hook)."""
            multiplier = float(getattr(self, "multiplier", 1.0))
            module = getattr(org_forward, "__self__", None)
            bias = getattr(module, "bias", None)
            is_conv = bool(getattr(self, "is_conv", x.dim() > 2))
            kernel = math.prod(getattr(self, "kernel_size", (1,)) or (1,)) if is_conv else 1
            patch = LayerPatch(self.weights[:2], self.weights[2])
            if patch.on_activations(kernel):
                fan_in = x.shape[1] * kernel if is_conv else x.shape[-1]
                return patch.forward(lambda t: org_forward(t, *args, **kwargs), x, multiplier,
                                     channel_dim=1 if is_conv else -1, bias=bias, fan_in=fan_in)
            # An input rotation of a wider kernel does not line up with the layer input: use the weight.
            merged = patch.merged(module.weight.to(device=x.device), multiplier).to(x.dtype)
            b = None if bias is None else bias.to(device=x.device, dtype=x.dtype)
            return conv_forward(merged, b, x, module)

    return LycoftOFTAdapter
