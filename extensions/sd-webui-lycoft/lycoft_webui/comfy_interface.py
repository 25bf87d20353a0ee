"""reForge and Forge Classic: UIs with ComfyUI's weight-adapter interface.

Their `load_lora` asks each class of a `weight_adapter.adapters` list to load a layer, and their patchers
call the adapter's `calculate_weight`. lycoft's adapter class, built on the UI's own base class, takes the
place of the UI's OFT and BOFT adapters; `load_lora` is wrapped to add the OFT key spellings the UI lacks
(`lycoft.ui.keys`), wherever the UI's LoRA code looks it up.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from lycoft.ui.comfy_adapter import adapter_class
from lycoft.ui.keys import with_oft_aliases

_ADAPTERS: dict[str, type] = {}


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def register(weight_adapter: ModuleType) -> type:
    """Put lycoft's adapter in place of the UI's OFT/BOFT adapters in `weight_adapter.adapters` (in place,
    idempotent); the UI's own classes stay available for nothing else asks for them."""
    stock = tuple(c for c in (getattr(weight_adapter, "OFTAdapter", None), getattr(weight_adapter, "BOFTAdapter", None))
                  if c is not None)
    key = weight_adapter.__name__
    if key not in _ADAPTERS:
        _ADAPTERS[key] = adapter_class(weight_adapter.WeightAdapterBase, lambda: stock)
    adapter = _ADAPTERS[key]
    adapters = weight_adapter.adapters
    adapters[:] = [a for a in adapters if a not in stock and a is not adapter] + [adapter]
    return adapter


def wrap_load_lora(*modules: ModuleType | None) -> None:
    """`module.load_lora` -> `with_oft_aliases(load_lora)` in each module that has one (not twice)."""
    for module in modules:
        load_lora = getattr(module, "load_lora", None) if module is not None else None
        if load_lora is not None and not getattr(load_lora, "lycoft_wrapped", False):
            module.load_lora = with_oft_aliases(load_lora)


def install_reforge() -> bool:
    weight_adapter = _import("ldm_patched.modules.weight_adapter")
    if weight_adapter is None or not hasattr(weight_adapter, "adapters"):
        return False
    register(weight_adapter)
    wrap_load_lora(_import("ldm_patched.modules.lora"))
    return True


def install_forge_classic() -> bool:
    weight_adapter = _import("modules_forge.packages.comfy.weight_adapter")
    if weight_adapter is None or not hasattr(weight_adapter, "adapters"):
        return False
    register(weight_adapter)
    # backend.patcher.lora and the Lora extension import load_lora by name: wrap it where it is looked up
    wrap_load_lora(_import("modules_forge.packages.comfy.lora"), _import("backend.patcher.lora"),
                   sys.modules.get("networks"))
    return True
