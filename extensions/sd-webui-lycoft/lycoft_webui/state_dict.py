"""The webuis' Lora extension reads a file with `networks.load_lora_state_dict(filename)` (cached): its
tensors then carry the file's metadata (`lycoft.ui.state.with_metadata`), which says how PEFT-style layers
were parametrised. Files without OFT layers are returned as before."""

from __future__ import annotations

import functools
import sys
from typing import Any

from lycoft.ui.state import with_metadata


def install() -> bool:
    networks = sys.modules.get("networks")
    read = getattr(networks, "load_lora_state_dict", None)
    if read is None or getattr(read, "lycoft_wrapped", False):
        return read is not None

    @functools.lru_cache(maxsize=5)
    def load_lora_state_dict(filename: str) -> Any:
        return with_metadata(read(filename), filename)

    load_lora_state_dict.lycoft_wrapped = True
    networks.load_lora_state_dict = load_lora_state_dict
    return True
