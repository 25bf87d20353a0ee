"""The layer names the ComfyUI-family key maps lack, for OFT files only.

ComfyUI (`comfy.lora.model_lora_keys_unet/clip`), Forge (`backend.patcher.lora`) and reForge
(`ldm_patched.modules.lora`) map a file's layer prefixes to model weights with the same spellings. OFT files
in the wild also use these, derived here from the entries the key map already has:
- kohya legacy ``oft_unet_<name>`` / ``oft_te_<name>`` (= ``lora_unet_<name>`` / ``lora_te_<name>``);
- PEFT and diffusers ``<diffusers path>``, ``unet.<path>`` and ``base_model.model.<path>`` for attention
  layers too (ComfyUI knows them only with ``.processor.``);
- text encoders under PEFT / transformers names: ``text_model.encoder...`` and the transformers 5 form
  ``encoder.layers...`` (bare: the first text encoder), ``text_encoder.encoder...``;
- OneTrainer / OMI: ``unet.<LDM path>``, ``clip_l.text_model...``, ``clip_g.text_model...``.
Only prefixes that name an OFT layer of the file being loaded are added, so other files load as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..formats.patches import layer_prefixes
from .state import stock_formula

_TE1 = "text_encoder.text_model."
_TE2 = "text_encoder_2.text_model."


def spellings(key: str, target: object) -> Iterator[str]:
    """Other names of the layer ComfyUI maps as `key` -> `target` (a model weight key)."""
    if key.startswith("lora_unet_"):
        yield "oft_unet_" + key[len("lora_unet_"):]
    elif key.startswith("lora_te"):
        yield "oft_te" + key[len("lora_te"):]
    elif key.startswith("unet."):
        path = key[len("unet."):].replace(".processor.to_", ".to_")
        if path.endswith(".to_out"):
            path += ".0"
        yield from (path, "unet." + path, "base_model.model." + path)
    elif key.startswith("diffusion_model.") and isinstance(target, str) and target == key + ".weight":
        yield "unet." + key[len("diffusion_model."):]
    elif key.startswith((_TE1, _TE2)):
        first = key.startswith(_TE1)
        path = key[len(_TE1 if first else _TE2):]  # encoder.layers.<i>.<module>
        te = "text_encoder." if first else "text_encoder_2."
        yield te + path
        if isinstance(target, str) and target.startswith(("clip_l.", "clip_g.")):
            yield target[: len("clip_l.")] + "text_model." + path
        if first:
            yield from ("text_model." + path, path, "base_model.model.text_model." + path)


def oft_aliases(file_keys: set[str] | list[str], key_map: Mapping[str, object]) -> dict[str, object]:
    """`{alias: target}` for the OFT layers of a file that `key_map` does not name yet."""
    wanted = layer_prefixes(file_keys) - set(key_map)
    if not wanted:
        return {}
    found: dict[str, object] = {}
    for key, target in key_map.items():
        for alias in spellings(key, target):
            if alias in wanted and alias not in found:
                found[alias] = target
    return found


def with_oft_aliases(load_lora: Callable[..., Any]) -> Callable[..., Any]:
    """A UI's ``load_lora(lora, to_load, ...)`` that first adds `oft_aliases` to the key map `to_load` (not
    when a load asks for the stock formula; a file without OFT layers passes through unchanged)."""

    @functools.wraps(load_lora)
    def wrapper(lora: Mapping, to_load: Mapping[str, object], *args: Any, **kwargs: Any) -> Any:
        if not stock_formula():
            extra = oft_aliases(lora.keys(), to_load)
            if extra:
                to_load = {**to_load, **extra}
        return load_lora(lora, to_load, *args, **kwargs)

    wrapper.lycoft_wrapped = True
    return wrapper
