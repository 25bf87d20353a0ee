"""The frozen base model for training: load it, freeze it, place it, and pick its attention kernel.

`peek_family` answers "which family is this?" from file headers and configs alone, so the dataset (whose
default resolution depends on the family) can be checked before any weights are read. `load_models`
does the heavy part: `lycoft.checkpoints.load_pipeline`, then everything is frozen and moved to the
training device in the weight dtype (fp16/bf16 under mixed precision, except a `--no_half_vae` VAE).
Adapters are added later by `lycoft.inject`; they keep their own float32 parameters.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def peek_family(source: str | None, override: str | None = None) -> str | None:
    """The model family of `source` without loading weights; None when only loading can tell (hub ids)."""
    if override:
        return override
    if not source:
        return None
    from lycoft.checkpoints.families import detect_family_from_keys, detect_family_from_unet
    from lycoft.checkpoints.loading import BUILTIN_PREFIX, BUILTINS, read_checkpoint_header

    if source.startswith(BUILTIN_PREFIX):
        return BUILTINS.get(source[len(BUILTIN_PREFIX):])
    path = Path(source).expanduser()
    try:
        if path.is_dir() and (path / "unet" / "config.json").is_file():
            return detect_family_from_unet(json.loads((path / "unet" / "config.json").read_text()))
        if path.is_file() and path.suffix.lower() == ".safetensors":
            shapes, _ = read_checkpoint_header(path)
            return detect_family_from_keys(shapes)
    except (OSError, ValueError) as e:
        logger.debug("could not tell the family of %s before loading it: %s", source, e)
    return None


@dataclass
class Models:
    """The pieces of a Stable Diffusion pipeline that training touches (all frozen)."""

    pipe: Any
    family: str
    v_prediction: bool
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any  # DDPMScheduler with the pipeline's betas and prediction type
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    attention: str = "sdpa"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)


def load_models(cfg: TrainConfig, device: torch.device) -> Models:
    """Load the base pipeline named by `cfg`, frozen, on `device`, in the training weight dtype."""
    from diffusers import DDPMScheduler

    from lycoft.checkpoints.families import pipeline_text_encoders
    from lycoft.checkpoints.loading import load_pipeline

    pipe, family, v_prediction = load_pipeline(
        cfg.pretrained_model_name_or_path,
        family=cfg.family_override,
        v_prediction=True if cfg.v_parameterization else None,
        vae=cfg.vae,
    )
    logger.info("loaded %s: family %s, %s", cfg.pretrained_model_name_or_path, family,
                "v-prediction" if v_prediction else "epsilon prediction")
    if v_prediction and cfg.v_pred_like_loss:
        raise ConfigError(f"--v_pred_like_loss is for epsilon models, but {cfg.pretrained_model_name_or_path} "
                          "predicts v; drop it")
    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    vae_dtype = torch.float32 if cfg.no_half_vae else weight_dtype
    text_encoders, tokenizers = pipeline_text_encoders(pipe, family)
    for module in (pipe.unet, pipe.vae, *text_encoders):
        module.requires_grad_(False)
        module.eval()
    placement = [(pipe.unet, weight_dtype), (pipe.vae, vae_dtype), *((te, weight_dtype) for te in text_encoders)]
    for module, dtype in placement:
        module.to(device)
        if module.dtype != dtype:  # (diffusers warns about every dtype cast, needed or not)
            module.to(dtype=dtype)
    sched_config = dict(pipe.scheduler.config)
    sched_config["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    # Lin et al. 2023's zero-terminal-SNR rescaling, the one kohya sd-scripts applies. A keyword, because
    # from_config drops config keys that the saved file left at their defaults.
    zero_snr = {"rescale_betas_zero_snr": True} if cfg.zero_terminal_snr else {}
    noise_scheduler = DDPMScheduler.from_config(sched_config, **zero_snr)
    models = Models(pipe, family, v_prediction, pipe.unet, pipe.vae, text_encoders, tokenizers,
                    noise_scheduler, weight_dtype, vae_dtype)
    models.attention = configure_attention(pipe.unet, xformers=cfg.xformers, sdpa=cfg.sdpa)
    return models


def configure_attention(unet: torch.nn.Module, *, xformers: bool, sdpa: bool) -> str:
    """SDPA (diffusers' default processor) unless xformers is asked for and can run here.

    xformers is CUDA-only, and `diffusers.utils.is_xformers_available()` says True even where its
    kernels cannot load, so the enable call itself is the test; any failure falls back to SDPA.
    """
    if xformers:
        if not torch.cuda.is_available():
            logger.warning("--xformers needs a CUDA GPU; using PyTorch SDPA attention instead")
        else:
            try:
                unet.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as e:  # ModuleNotFoundError, ValueError, NotImplementedError ...
                logger.warning("xformers could not be enabled (%s: %s); using PyTorch SDPA attention instead",
                               type(e).__name__, e)
    if sdpa or xformers:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def enable_gradient_checkpointing(models: Models, text_encoders: bool) -> None:
    """Recompute activations in backward (non-reentrant, so adapter weights that are not inputs of a
    checkpointed block still get gradients, and DDP sees each gradient once)."""
    models.unet.enable_gradient_checkpointing()
    # Older diffusers only checkpoint in train mode; there is no dropout in these models to switch on.
    models.unet.train()
    if text_encoders:
        for te in models.text_encoders:
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            te.train()


def release_cached_memory(device: torch.device) -> None:
    """Hand the memory PyTorch's allocator keeps cached on `device` back to the driver (nothing on a CPU).
    Called after each VAE batch of latent caching unless ``--highvram``, as kohya sd-scripts does: batches of
    other bucket sizes leave fragments that a small GPU then lacks for training."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "empty_cache"):
        backend.empty_cache()


def compile_unet(models: Models, backend: str) -> None:
    """``--torch_compile``: the UNet compiled in place with `backend` (the module and its state-dict names
    stay, so adapters, saving and sampling see the same UNet). The first step compiles; a new bucket size
    compiles again."""
    models.unet.compile(backend=backend)
    logger.info("the UNet is compiled with torch.compile (backend %s) at its first step", backend)
