"""The frozen base model for training: load it, freeze it, place it, and pick its attention kernel.

`check_model_files` answers "which family is this?" from file headers and configs alone, so the dataset
(whose default resolution depends on the family) can be checked before any weights are read; on the way it
refuses what cannot load (a missing, truncated or empty model, a family flag that contradicts the file, a
``--vae`` without VAE weights) with a `ConfigError` naming the file. `load_models` does the heavy part:
`lycoft.checkpoints.load_pipeline` in the weight dtype (fp16/bf16 under mixed precision, except a `--no_half_vae`
VAE; a single file read tensor by tensor, onto the device with ``--lowram``), then everything is frozen and moved
to the training device; what fails there for a reason of the
files (a pickle that could run code, an unknown hub id, a damaged folder) is a `ConfigError` too. Adapters
are added later by `lycoft.inject`; they keep their own float32 parameters.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lycoft.io.errors import AdapterFileError, UnsafeCheckpointError
from lycoft.training.errors import ConfigError, first_line
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


MODEL_FLAG = "--pretrained_model_name_or_path"
_SOURCES = "give a .safetensors/.ckpt file, a diffusers folder (with model_index.json), a hub id or builtin:tiny-sd1"


def check_model_files(cfg: TrainConfig) -> str | None:
    """Check the base model and ``--vae`` without loading weights; returns the model's family when the
    headers tell (None for hub ids and pickles: only loading can tell)."""
    from lycoft.checkpoints.families import detect_family_from_keys, detect_family_from_unet
    from lycoft.checkpoints.loading import BUILTIN_PREFIX, PICKLE_SUFFIXES, read_checkpoint_header

    source = cfg.pretrained_model_name_or_path
    if cfg.vae:
        _check_vae(cfg.vae)
    if not source or source.startswith(BUILTIN_PREFIX):
        return peek_family(source, cfg.family_override)
    path = Path(source).expanduser()
    detected = None
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            what = "an empty folder" if not any(path.iterdir()) else "a folder without model_index.json"
            raise ConfigError(f"{MODEL_FLAG} {source} is {what}, not a diffusers model; {_SOURCES}")
        try:
            detected = detect_family_from_unet(json.loads((path / "unet" / "config.json").read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{MODEL_FLAG} {source}: unet/config.json cannot be read ({first_line(e)}); the "
                              "diffusers folder is incomplete or damaged: download it again") from None
    elif path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            return cfg.family_override
        try:
            shapes, _ = read_checkpoint_header(path)
        except AdapterFileError as e:
            raise ConfigError(f"{MODEL_FLAG} {e}") from None
        try:
            detected = detect_family_from_keys(shapes)
        except ValueError as e:
            raise ConfigError(f"{MODEL_FLAG} {source} is not a Stable Diffusion checkpoint ({first_line(e)}); "
                              f"{_SOURCES}") from None
    elif _looks_like_a_path(source):
        raise ConfigError(f"{MODEL_FLAG} {source} does not exist{_resolved(path)}; {_SOURCES}")
    else:
        return cfg.family_override  # a hub id: only loading it can tell
    forced = cfg.family_override
    if forced and detected and forced != detected:
        flag = f"--model_family {forced}" if cfg.model_family else "--v2" if cfg.v2 else "--sdxl"
        raise ConfigError(f"{MODEL_FLAG} {source} is an {detected} model, but {flag} says {forced}; drop {flag} "
                          f"(the family is read from the model) or give an {forced} model")
    return detected


def _looks_like_a_path(source: str) -> bool:
    """A hub id is ``owner/name``; anything with a file suffix, a leading ``.``, ``/`` or ``~``, or more than
    one ``/`` is a local path that is not there."""
    from lycoft.checkpoints.loading import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

    return (Path(source).suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
            or source.startswith((".", "/", "~", "\\")) or source.count("/") != 1 or "\\" in source)


def _check_vae(source: str) -> None:
    path = Path(source).expanduser()
    fix = "give a VAE .safetensors/.ckpt file or a diffusers VAE folder"
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "vae" / "config.json").is_file()):
            raise ConfigError(f"--vae {source} is a folder without config.json or vae/config.json; {fix}")
        return
    if not path.is_file():
        raise ConfigError(f"--vae {source} does not exist{_resolved(path)}; {fix}")
    if path.suffix.lower() != ".safetensors":
        return  # a pickle: checked when it is loaded
    from lycoft.checkpoints.loading import read_checkpoint_header

    try:
        shapes, _ = read_checkpoint_header(path)
    except AdapterFileError as e:
        raise ConfigError(f"--vae {e}") from None
    if not any("decoder.conv_in." in key for key in shapes):
        raise ConfigError(f"--vae {source} holds no VAE weights (no decoder.conv_in tensor among its "
                          f"{len(shapes)}); {fix}")


def _resolved(path: Path) -> str:
    return "" if path.is_absolute() else f" (resolved from {Path.cwd()})"


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

    source = cfg.pretrained_model_name_or_path
    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    vae_dtype = torch.float32 if cfg.no_half_vae else weight_dtype
    if cfg.lowram and not Path(source).expanduser().is_file():
        logger.warning("--lowram reads single-file checkpoints straight onto the device; %s loads through the "
                       "CPU as without it", source)
    try:
        # A single file is read tensor by tensor into the training dtypes: the weights are held once, where
        # diffusers' reader holds a half-precision file, its float32 copy and the cast copy at once (about 3x the
        # memory, docs/training.md). --lowram reads onto the device: kohya sd-scripts' "load models to VRAM instead
        # of RAM" (library/train_util.py load_target_model passes accelerator.device as the load device).
        pipe, family, v_prediction = load_pipeline(
            source,
            family=cfg.family_override,
            v_prediction=True if cfg.v_parameterization else None,
            vae=cfg.vae,
            dtype=weight_dtype,
            vae_dtype=vae_dtype,
            device=device if cfg.lowram else torch.device("cpu"),
        )
    except UnsafeCheckpointError as e:
        raise ConfigError(
            f"{e.path}: refused to load this pickle checkpoint: it holds Python objects besides tensors, and loading "
            "them could run code. Use a .safetensors release of the model, or convert it where you trust it (load "
            "it with torch.load(weights_only=False), save its state_dict with safetensors.torch.save_file)") from None
    except AdapterFileError as e:
        raise ConfigError(f"cannot load the model: {e}") from None
    except Exception as e:
        if not _file_error(e):
            raise
        vae = f" with --vae {cfg.vae}" if cfg.vae else ""
        if not (Path(source).expanduser().exists() or source.startswith("builtin:")):
            raise ConfigError(f"{MODEL_FLAG} {source} is not a local file or folder, and loading it from the model "
                              f"hub failed ({first_line(e.__cause__ or e, 120)}); check the hub id and the network "
                              "access, or download the model and give its folder") from None
        raise ConfigError(f"cannot load {MODEL_FLAG} {source}{vae} ({first_line(e)}); check that it is a complete "
                          "SD1/SD2/SDXL checkpoint or diffusers folder (download it again if it was cut short)"
                          ) from None
    logger.info("loaded %s: family %s, %s", cfg.pretrained_model_name_or_path, family,
                "v-prediction" if v_prediction else "epsilon prediction")
    if v_prediction and cfg.v_pred_like_loss:
        raise ConfigError(f"--v_pred_like_loss is for epsilon models, but {cfg.pretrained_model_name_or_path} "
                          "predicts v; drop it")
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


def _file_error(error: BaseException) -> bool:
    """Whether loading failed for a reason of the files (missing, damaged, of another kind, not on the hub)
    rather than a bug: the errors diffusers, transformers, safetensors and lycoft's loader raise for those."""
    if isinstance(error, (OSError, ValueError, KeyError)):
        return True
    return type(error).__name__ in ("SafetensorError", "SingleFileComponentError", "EntryNotFoundError",
                                    "RepositoryNotFoundError", "LocalEntryNotFoundError")


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
