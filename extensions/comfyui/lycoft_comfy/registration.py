"""Hooking lycoft into ComfyUI's LoRA loading path (done once, when ComfyUI imports this package).

1. `comfy.weight_adapter.adapters`: ComfyUI's OFT and BOFT adapters are replaced, in place, by
   `LycoftOFTAdapter`, which reads every OFT layout (and hands back ComfyUI's own adapters when the
   "Load OFT (lycoft)" node asks for the stock formula). LoRA, LoHa, LoKr and GLoRA adapters stay first.
2. `comfy.lora.load_lora`: before ComfyUI matches a file's layers, the key map gains the OFT spellings it
   lacks (`keys.oft_aliases`); for a file without OFT layers the key map is passed on unchanged.
3. `comfy.utils.load_torch_file`: the tensors of a file with OFT layers carry the file's metadata
   (`lycoft.ui.state.TensorsWithMetadata`), which says how PEFT-style layers were parametrised; other files
   are returned as ComfyUI read them.
All three are looked up by ComfyUI at call time, so loaders and nodes need no change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import comfy.lora
import comfy.utils
import comfy.weight_adapter as weight_adapter

from lycoft.ui.keys import with_oft_aliases
from lycoft.ui.state import with_metadata

from .adapter import STOCK, LycoftOFTAdapter


def install() -> None:
    """Register lycoft with ComfyUI (idempotent)."""
    adapters = weight_adapter.adapters
    kept = [a for a in adapters if a not in STOCK and a is not LycoftOFTAdapter]
    adapters[:] = [*kept, LycoftOFTAdapter]
    if not getattr(comfy.lora.load_lora, "lycoft_wrapped", False):
        comfy.lora.load_lora = with_oft_aliases(comfy.lora.load_lora)
    if not getattr(comfy.utils.load_torch_file, "lycoft_wrapped", False):
        comfy.utils.load_torch_file = _with_metadata(comfy.utils.load_torch_file)


def _with_metadata(load_torch_file: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load_torch_file)
    def wrapper(ckpt: str, *args: Any, **kwargs: Any) -> Any:
        out = load_torch_file(ckpt, *args, **kwargs)
        if isinstance(out, tuple):
            return (with_metadata(out[0], ckpt, out[1]), *out[1:])
        return with_metadata(out, ckpt)

    wrapper.lycoft_wrapped = True
    return wrapper
