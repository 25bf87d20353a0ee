"""Adapter key names (SPEC section 4): the one place that turns a module path into a file key.

UNet: ``lora_unet_<path>`` with diffusers paths for SD1.x/SD2.x and LDM paths for SDXL; text encoders:
``lora_te_`` (one encoder) or ``lora_te1_``/``lora_te2_`` (SDXL), always in the
``text_model_encoder_layers_...`` form, whatever transformers version built the model.
"""

from __future__ import annotations

import re

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"
KOHYA_LEGACY_UNET_PREFIX = "oft_unet"

_TE_FLAT = re.compile(r"^(encoder\.|embeddings\.|final_layer_norm)")


def text_encoder_path(path: str) -> str:
    """Normalise a CLIP module path to the ``text_model.`` form (transformers 5 may drop that wrapper)."""
    if path.startswith("text_model."):
        return path
    if _TE_FLAT.match(path):
        return "text_model." + path
    return path


def te_prefix(index: int, count: int) -> str:
    """``lora_te`` for a single text encoder, ``lora_te1``/``lora_te2`` when there are several."""
    return TE_PREFIX if count == 1 else f"{TE_PREFIX}{index + 1}"


def to_key(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def split_tensor_key(key: str) -> tuple[str, str]:
    """``lora_unet_x_y.oft_blocks`` -> (``lora_unet_x_y``, ``oft_blocks``); also ``k.oft_R.weight``."""
    head, _, tail = key.partition(".")
    return head, tail
