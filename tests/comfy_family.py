"""Tiny checkpoints inside UIs built on ComfyUI's model code (ComfyUI itself, reForge's `ldm_patched`).

Their model detection (`detect_unet_config`) reads a tiny checkpoint's architecture; only the final table
match (`model_config_from_unet_config`, which wants the real models' widths: 320 channels, a 768-wide
context) is replaced by the SD15 / SDXL configs built on the detected tiny config, with CLIP models of the
tiny widths. ComfyUI's CLIP has a fixed 49408-token vocabulary, so the tiny 552-token embedding is padded
with zero rows, and a square text projection, so SDXL's 64 -> 32 projection is left out. Everything else
(checkpoint loading, key maps, model patchers) is the UI's own. The `ldm_patched` of Forge before 2.0 and of
Forge Classic is ComfyUI's early-2024 code: its CLIP reads its config from a JSON file, takes no
`model_options`, and its checkpoint loader reads a file (`load_checkpoint_guess_config`) in the dtypes its
command line names (`ns.args`: `--unet-in-fp16`, `--clip-in-fp16`, `--clip-in-fp32`).
"""

from __future__ import annotations

import functools
import inspect
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from lycoft.checkpoints.bundled import load_component_config


def tiny_model_config(ns: SimpleNamespace, family: str):
    """A replacement for `model_config_from_unet_config`; `ns` holds the UI's `supported_models`,
    `supported_models_base`, `sd1_clip` and `sdxl_clip` modules."""
    sm, base, sd1_clip, sdxl_clip = ns.supported_models, ns.supported_models_base, ns.sd1_clip, ns.sdxl_clip
    name = f"tiny-{family}"
    legacy = _legacy(ns)

    def te_config(component: str) -> dict | str:
        config = load_component_config(name, component)
        if not legacy:
            return config
        path = Path(tempfile.mkdtemp()) / f"{component}.json"
        path.write_text(json.dumps(config))
        return str(path)

    te1 = te_config("text_encoder")
    if family == "sd1":
        clip = functools.partial(sd1_clip.SD1ClipModel, clip_model=sd1_clip.SDClipModel, textmodel_json_config=te1)
        target = base.ClipTarget(sd1_clip.SD1Tokenizer, clip)
    else:
        te2 = te_config("text_encoder_2")

        class TinySDXLClip(sdxl_clip.SDXLClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (the UIs' signature)
                torch.nn.Module.__init__(self)
                # the tiny encoders have 2 layers: take the last hidden state (weights are what is tested)
                options = ({}, {}) if legacy else ({"model_options": model_options},
                                                   {"model_options": {**model_options, "model_name": "clip_g"}})
                self.clip_l = sd1_clip.SDClipModel(layer="hidden", layer_idx=-1, device=device, dtype=dtype,
                                                   layer_norm_hidden_state=False, textmodel_json_config=te1,
                                                   **options[0])
                self.clip_g = sd1_clip.SDClipModel(layer="hidden", layer_idx=-1, device=device, dtype=dtype,
                                                   layer_norm_hidden_state=False, textmodel_json_config=te2,
                                                   **options[1])
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
        if _legacy(ns):
            # the early-2024 loader picks the dtypes from the UI's command line (`ns.args`)
            ns.args.unet_in_fp16 = ns.args.clip_in_fp16 = dtype == torch.float16
            ns.args.clip_in_fp32 = dtype == torch.float32
            unet_dtype = ns.sd.model_management.unet_dtype
            getattr(unet_dtype, "cache_clear", lambda: None)()  # cached per process: the flags changed
            path = Path(tempfile.mkdtemp()) / ckpt.name
            save_file({k: v.contiguous() for k, v in sd.items()}, path)
            model, clip, _, _ = ns.sd.load_checkpoint_guess_config(str(path), output_vae=False)
        else:
            model, clip, _, _ = ns.sd.load_state_dict_guess_config(
                sd, output_vae=False, model_options={"dtype": dtype}, te_model_options={"dtype": dtype})
    finally:
        detection.model_config_from_unet_config = original
    return model, clip


def _legacy(ns: SimpleNamespace) -> bool:
    """ComfyUI's early-2024 model code (no `model_options`), as in Forge 1's and Forge Classic's `ldm_patched`."""
    return "model_options" not in inspect.signature(ns.sd1_clip.SDClipModel.__init__).parameters
