"""Tiny checkpoints inside UIs built on ComfyUI's model code (ComfyUI itself, reForge's `ldm_patched`).

Their model detection (`detect_unet_config`) reads a tiny checkpoint's architecture; only the final table
match (`model_config_from_unet_config`, which wants the real models' widths: 320 channels, a 768-wide
context) is replaced by the SD15 / SDXL configs built on the detected tiny config, with CLIP models of the
tiny widths. ComfyUI's CLIP has a fixed 49408-token vocabulary, so the tiny 552-token embedding is padded
with zero rows, and a square text projection, so SDXL's 64 -> 32 projection is left out. Everything else
(checkpoint loading, key maps, model patchers) is the UI's own.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import torch

from lycoft.checkpoints.bundled import load_component_config


def tiny_model_config(ns: SimpleNamespace, family: str):
    """A replacement for `model_config_from_unet_config`; `ns` holds the UI's `supported_models`,
    `supported_models_base`, `sd1_clip` and `sdxl_clip` modules."""
    sm, base, sd1_clip, sdxl_clip = ns.supported_models, ns.supported_models_base, ns.sd1_clip, ns.sdxl_clip
    name = f"tiny-{family}"
    te1 = load_component_config(name, "text_encoder")
    if family == "sd1":
        clip = functools.partial(sd1_clip.SD1ClipModel, clip_model=sd1_clip.SDClipModel, textmodel_json_config=te1)
        target = base.ClipTarget(sd1_clip.SD1Tokenizer, clip)
    else:
        te2 = load_component_config(name, "text_encoder_2")

        class TinySDXLClip(sdxl_clip.SDXLClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (the UIs' signature)
                torch.nn.Module.__init__(self)
                # the tiny encoders have 2 layers: take the last hidden state (weights are what is tested)
                self.clip_l = sd1_clip.SDClipModel(layer="hidden", layer_idx=-1, device=device, dtype=dtype,
                                                   layer_norm_hidden_state=False, textmodel_json_config=dict(te1),
                                                   model_options=model_options)
                self.clip_g = sd1_clip.SDClipModel(layer="hidden", layer_idx=-1, device=device, dtype=dtype,
                                                   layer_norm_hidden_state=False, textmodel_json_config=dict(te2),
                                                   model_options={**model_options, "model_name": "clip_g"})
                self.dtypes = {dtype}

        target = base.ClipTarget(sdxl_clip.SDXLTokenizer, TinySDXLClip)

    def config(unet_config, state_dict=None, prefix=""):
        model_config = (sm.SD15 if family == "sd1" else sm.SDXL)(unet_config)
        model_config.clip_target = lambda state_dict={}: target  # noqa: B006
        return model_config

    return config


def load_checkpoint(ns: SimpleNamespace, ckpt: Path, family: str, dtype: torch.dtype, vocab: int | None = 49408):
    """(MODEL, CLIP) of a tiny checkpoint through the UI's `load_state_dict_guess_config`; `ns` as in
    `tiny_model_config`, plus `utils`, `sd` and `model_detection`. `vocab`: the UI's fixed CLIP vocabulary
    (None where the UI's CLIP takes it from the config, as reForge's transformers-based one does)."""
    sd = ns.utils.load_torch_file(str(ckpt))
    for k in list(sd):
        if vocab and k.endswith("token_embedding.weight") and sd[k].shape[0] < vocab:
            sd[k] = torch.cat([sd[k], sd[k].new_zeros(vocab - sd[k].shape[0], sd[k].shape[1])])
        if k.endswith("text_projection"):
            del sd[k]
    detection = ns.model_detection
    original = detection.model_config_from_unet_config
    detection.model_config_from_unet_config = tiny_model_config(ns, family)
    try:
        model, clip, _, _ = ns.sd.load_state_dict_guess_config(
            sd, output_vae=False, model_options={"dtype": dtype}, te_model_options={"dtype": dtype})
    finally:
        detection.model_config_from_unet_config = original
    return model, clip
