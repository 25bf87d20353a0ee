"""Adapter key names (docs/spec.md, "Key names"): the one place that turns a module path into a file key.

UNet: ``lora_unet_<path>`` with diffusers paths for SD1.x/SD2.x and LDM paths for SDXL; text encoders:
``lora_te_`` (one encoder) or ``lora_te1_``/``lora_te2_`` (SDXL), always in the
``text_model_encoder_layers_...`` form, whatever transformers version built the model.
"""

from __future__ import annotations

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"
KOHYA_LEGACY_UNET_PREFIX = "oft_unet"

def text_encoder_path(path: str) -> str:
    """A CLIP text-encoder module (or parameter) path in the ``text_model.``-wrapped form.

    transformers >= 5.6 flattened ``CLIPTextModel`` (``encoder.layers.0.self_attn.q_proj``); older versions
    and ``CLIPTextModelWithProjection`` wrap it (``text_model.encoder.layers.0.self_attn.q_proj``). Adapter
    keys and LDM files always use the wrapped form. ``text_projection`` stays top level.
    """
    if path in ("", "text_model", "text_projection"):
        return path or "text_model"
    if path.startswith(("text_model.", "text_projection.")):
        return path
    return "text_model." + path


def te_prefix(index: int, count: int) -> str:
    """``lora_te`` for a single text encoder, ``lora_te1``/``lora_te2`` when there are several."""
    return TE_PREFIX if count == 1 else f"{TE_PREFIX}{index + 1}"


def to_key(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def split_tensor_key(key: str) -> tuple[str, str]:
    """``lora_unet_x_y.oft_blocks`` -> (``lora_unet_x_y``, ``oft_blocks``); also ``k.oft_R.weight``."""
    head, _, tail = key.partition(".")
    return head, tail
