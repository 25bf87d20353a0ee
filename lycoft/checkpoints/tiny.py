"""The builtin tiny models: real diffusers pipelines of the sd1 / sd2 / sdxl shapes, randomly initialised.

They make 64x64 images from 8x8 latents, build in well under a second and train on a CPU in
milliseconds per step; tests, the demo and ``builtin:tiny-<family>`` use them. Their configs are
bundled JSON (``checkpoints/configs/tiny-*``); the layout follows the real models (SD1: 4 levels, conv
``proj_in``; SD2: linear projection, gelu text encoder, v-prediction; SDXL: 3 levels, text_time
add-embeddings, two text encoders of *different* widths 32 and 64, because ``from_single_file`` tells
SDXL's two CLIP branches apart only by width).
"""

from __future__ import annotations

from typing import Any

import torch

from .bundled import bundled_config_dir, load_component_config
from .families import TextEncoderInfo, family_info
from .tokenizer import tokenizer_for_config


def _text_encoder(config_name: str, te: TextEncoderInfo) -> Any:
    import transformers

    cfg = load_component_config(config_name, te.component)
    text_cfg = transformers.CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    return getattr(transformers, te.model_class)(text_cfg)


def build_tiny_pipeline(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny random ``StableDiffusionPipeline`` (sd1, sd2) or ``StableDiffusionXLPipeline`` (sdxl).

    Weights are a deterministic function of `seed` (the global torch RNG is left untouched). The
    tokenizers use the tiny byte-level vocabulary (552 tokens). Default image size 64x64 (latents 8x8).
    """
    import diffusers
    from diffusers import AutoencoderKL

    info = family_info(family)
    name = info.tiny_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Fixed construction order: every module draws its init from the same seeded stream.
        unet = getattr(diffusers, info.denoiser_class).from_config(load_component_config(name, "unet"))
        vae = AutoencoderKL.from_config(load_component_config(name, "vae"))
        encoders = [_text_encoder(name, te) for te in info.text_encoders]
    sched_cfg = load_component_config(name, "scheduler")
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    folder = bundled_config_dir(name)
    parts: dict[str, Any] = dict(vae=vae, unet=unet, scheduler=scheduler)
    for te, encoder in zip(info.text_encoders, encoders):
        parts[te.component] = encoder
        parts[te.tokenizer] = tokenizer_for_config(folder, te.tokenizer, encoder.config.vocab_size)
    if info.pipeline_class == "StableDiffusionPipeline":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, info.pipeline_class)(**parts)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe
