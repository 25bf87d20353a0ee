"""Load a Stable Diffusion pipeline from anything a user points at, and save pipelines back.

Sources: ``builtin:tiny-sd1|tiny-sd2|tiny-sdxl`` (random), ``builtin:toy-sd1`` (pretrained on toy scenes,
shipped as a single file beside this module), a diffusers folder, a single-file ``.safetensors``
or ``.ckpt`` LDM checkpoint, or a hub id. Single files never need the hub: diffusers'
``from_single_file`` gets a bundled config folder (``config=..., local_files_only=True``) chosen by the
detected family and model width, and tokenizers built in code; given a ``device``, the same config folder
describes models that are filled tensor by tensor on that device instead (`streamed`). ``.ckpt`` files are read with
``torch.load(weights_only=True)`` (no arbitrary unpickling; ``lycoft.io.load_torch_checkpoint``)
and handed over as a temporary safetensors. Files are written atomically (``lycoft.io``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..io import load_torch_checkpoint, read_safetensors_header, save_safetensors_atomic
from ..io.atomic import atomic_directory, scratch_directory
from .bundled import bundled_config_dir, load_component_config
from .families import (
    CLIP,
    FAMILIES,
    FAMILY_INFO,
    MODELSPEC_VERSION,
    UNET_PREFIX,
    detect_family_from_keys,
    detect_family_from_unet,
    family_info,
    guess_v_prediction,
    modelspec_architecture,
)
from .ldm_keys import pipeline_to_ldm_state_dict
from .streamed import assemble_pipeline, load_models_streamed
from .tiny import build_tiny_pipeline
from .tokenizer import tokenizer_for_config

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# builtin:<name> -> family: each family's tiny model, named after its bundled config
BUILTINS = {info.tiny_config: info.name for info in FAMILY_INFO.values()}
# Builtins shipped as checkpoints (made by tools/pretrain_toy.py); the others are built at random.
BUILTIN_FILES = {name: Path(__file__).resolve().parent / f"{name}.safetensors" for name in ("toy-sd1", "toy-sd1-v")}
BUILTINS.update({"toy-sd1": "sd1", "toy-sd1-v": "sd1"})
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SOURCES_HELP = (
    "give a .safetensors/.ckpt file, a diffusers folder (with model_index.json), a hub id (owner/name) "
    f"or {', '.join(BUILTIN_PREFIX + b for b in BUILTINS)}"
)


# --------------------------------------------------------------------------------------- reading


def read_checkpoint_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, metadata) of a ``.safetensors`` file, reading (and validating) only its header."""
    header, metadata = read_safetensors_header(path)
    return {k: info.shape for k, info in header.items()}, metadata


@contextmanager
def _as_safetensors(path: Path, allow_pickle: bool):
    """Yields (safetensors path, key -> shape, metadata) for a .safetensors or pickle checkpoint."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        shapes, metadata = read_checkpoint_header(path)
        yield path, shapes, metadata
        return
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} has an unknown checkpoint extension {suffix!r}; use .safetensors or .ckpt "
            f"({', '.join(PICKLE_SUFFIXES)} are read as PyTorch pickles)"
        )
    tensors = load_torch_checkpoint(path, allow_pickle=allow_pickle)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    with scratch_directory() as tmp:
        out = Path(tmp) / (path.stem + ".safetensors")
        save_safetensors_atomic(tensors, out)
        del tensors
        yield out, shapes, {}


# ----------------------------------------------------------------------------------- config choice


def _text_vocab_sizes(family: str, shapes: Mapping[str, tuple]) -> list[int | None]:
    info = family_info(family)
    sizes: list[int | None] = []
    for te in info.text_encoders:
        key = te.ldm_prefix + (
            "text_model.embeddings.token_embedding.weight" if te.kind == CLIP else "token_embedding.weight"
        )
        alt = te.ldm_prefix + "embeddings.token_embedding.weight"  # CLIP saved without the text_model. wrapper
        shape = shapes.get(key) or shapes.get(alt)
        sizes.append(int(shape[0]) if shape else None)
    return sizes


def _pick_bundled_config(family: str, shapes: Mapping[str, tuple]) -> Path:
    """The bundled config (real or tiny) whose UNet width matches the checkpoint's ``conv_in``."""
    info = family_info(family)
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ValueError(
            f"checkpoint has no UNet ({UNET_PREFIX}input_blocks.0.0.weight missing); not an SD model file"
        )
    widths = {}
    for name in (info.config, info.tiny_config):
        width = load_component_config(name, "unet")["block_out_channels"][0]
        widths[name] = width
        if width == conv_in[0]:
            return bundled_config_dir(name)
    raise ValueError(
        f"the checkpoint's UNet has {conv_in[0]} base channels; the bundled {family} configs have "
        f"{', '.join(f'{w} ({n})' for n, w in widths.items())}; pass config=<diffusers folder of this model>"
    )


def _has_tokenizer_files(config_dir: Path, component: str) -> bool:
    folder = config_dir / component
    return any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json"))


def _resolve_family(family: str | None, detected: str | None, what: str) -> str:
    if family is not None:
        family_info(family)
        if detected is not None and detected != family:
            logger.warning(
                "%s looks like %s, but family=%r was given; using %s", what, detected, family, family
            )
        return family
    if detected is None:
        raise ValueError(f"cannot tell the model family of {what}; pass family= one of {', '.join(FAMILIES)}")
    return detected


def _set_prediction_type(pipe: Any, v_prediction: bool) -> None:
    wanted = "v_prediction" if v_prediction else "epsilon"
    if pipe.scheduler.config.get("prediction_type", "epsilon") != wanted:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=wanted)


def _is_v_prediction(pipe: Any) -> bool:
    return pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"


# ------------------------------------------------------------------------------------------ loaders


def _load_single_file(
    path: Path, family, v_prediction, dtype, allow_pickle, config, device=None, vae_dtype=None
) -> tuple[Any, str, bool]:
    import diffusers

    with _as_safetensors(path, allow_pickle) as (st_path, shapes, metadata):
        try:
            detected = detect_family_from_keys(shapes)
        except ValueError:
            if family is None:
                raise
            detected = None
        family = _resolve_family(family, detected, str(path))
        info = family_info(family)
        config_dir = Path(config) if config else _pick_bundled_config(family, shapes)
        kwargs: dict[str, Any] = {}
        for i, (te, size) in enumerate(zip(info.text_encoders, _text_vocab_sizes(family, shapes))):
            component = te.tokenizer
            if not _has_tokenizer_files(config_dir, component):
                if size is None:
                    raise ValueError(
                        f"{path} has no text encoder {i + 1} for family {family}; not a full checkpoint"
                    )
                kwargs[component] = tokenizer_for_config(config_dir, component, size)
        if info.pipeline_class == "StableDiffusionPipeline":
            kwargs.update(safety_checker=None, feature_extractor=None)
        if device is not None:
            models = load_models_streamed(
                st_path, info, config_dir, dtype or torch.float32, torch.device(device), vae_dtype
            )
            pipe = assemble_pipeline(info, config_dir, models, kwargs)
        else:
            pipe_cls = getattr(diffusers, info.pipeline_class)
            pipe = pipe_cls.from_single_file(
                str(st_path), config=str(config_dir), local_files_only=True, torch_dtype=dtype, **kwargs
            )
        guess = guess_v_prediction(family, shapes, metadata)
    if v_prediction is None:
        v_prediction = guess
    if v_prediction is None:
        v_prediction = _is_v_prediction(pipe)
        logger.warning(
            "%s: %s files do not say whether they predict v or epsilon; assuming %s. Pass v_prediction=%s "
            "if that is wrong",
            path,
            family,
            "v-prediction" if v_prediction else "epsilon",
            not v_prediction,
        )
    _set_prediction_type(pipe, v_prediction)
    return pipe, family, v_prediction


def _load_diffusers_dir(
    location: str, family, v_prediction, dtype, hub: bool = False
) -> tuple[Any, str, bool]:
    from diffusers import DiffusionPipeline

    path = Path(location)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if hub:
        # Training and merging never need the NSFW checker; skip downloading and loading its ~1 GB.
        kwargs["safety_checker"] = None
    else:
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ValueError(
                f"{path} is a folder but not a diffusers pipeline (no model_index.json); {_SOURCES_HELP}"
            )
        index = json.loads(index_file.read_text())
        kwargs["local_files_only"] = True
        if index.get("safety_checker", [None])[0] is not None:
            kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(location, **kwargs)
    except Exception as err:
        if hub:
            raise OSError(
                f"could not load {location!r} from the model hub ({type(err).__name__}: {err}); check the "
                "id and network access (HF_HUB_OFFLINE), or download it and give the local folder"
            ) from err
        raise
    if not hasattr(pipe, "unet"):
        raise ValueError(f"{path} holds a {type(pipe).__name__}, not an SD1/SD2/SDXL UNet pipeline")
    family = _resolve_family(family, detect_family_from_unet(pipe.unet), str(path))
    if v_prediction is None:
        v_prediction = _is_v_prediction(pipe)
    _set_prediction_type(pipe, v_prediction)
    return pipe, family, v_prediction


def _load_vae(source: str, pipe: Any, dtype: torch.dtype | None, allow_pickle: bool) -> Any:
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        return AutoencoderKL.from_pretrained(
            str(path), subfolder=sub, local_files_only=True, torch_dtype=dtype
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"VAE not found: {path}; give a VAE .safetensors/.ckpt or a diffusers VAE folder"
        )
    with (
        scratch_directory() as tmp,
        _as_safetensors(path, allow_pickle) as (st, *_),
    ):
        # The replacement VAE has the architecture of the pipeline's own: reuse its config.
        pipe.vae.save_config(Path(tmp) / "vae")
        return AutoencoderKL.from_single_file(
            str(st), config=str(tmp), subfolder="vae", local_files_only=True, torch_dtype=dtype
        )


def load_pipeline(
    source: str,
    family: str | None = None,
    v_prediction: bool | None = None,
    vae: str | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    config: str | None = None,
    device: str | torch.device | None = None,
    vae_dtype: torch.dtype | None = None,
) -> tuple[Any, str, bool]:
    """Load a Stable Diffusion pipeline; returns ``(pipeline, family, v_prediction)``.

    Args:
        source: ``builtin:tiny-sd1|tiny-sd2|tiny-sdxl|toy-sd1``, a diffusers folder, a single-file ``.safetensors``
            / ``.ckpt`` checkpoint, or a hub id (``owner/name``; needs network access).
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``; detected when None (wins over detection when given).
        v_prediction: force the scheduler's prediction type; None keeps what the source says
            (single files: metadata or family; SD2 files cannot be told apart and default to v).
        vae: replace the VAE with this folder or single file.
        dtype: weight dtype (default float32).
        allow_pickle: let ``.ckpt`` loading unpickle arbitrary objects (only for files you trust).
        config: diffusers folder describing a single-file checkpoint whose shape no bundled config has.
        device: read a single-file checkpoint tensor by tensor straight onto this device, each cast to
            `dtype` as it is read (lycoft.checkpoints.streamed): the process never holds more of the file
            in RAM than one tensor. None: diffusers' ``from_single_file`` on the CPU. Other sources load
            with diffusers either way.
        vae_dtype: the VAE's weight dtype when it differs from `dtype` (a float32 VAE under half precision).
    """
    if family is not None:
        family_info(family)
    # A VAE wanted in another dtype than the rest loads in float32 and is cast once, never rounded through
    # `dtype` on the way; single files read onto `device` get each model's dtype as they are read.
    load_dtype = dtype if vae_dtype in (None, dtype) else None
    file_dtype = dtype if device is not None else load_dtype
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise ValueError(
                f"unknown builtin model {source!r}; use {', '.join(BUILTIN_PREFIX + b for b in BUILTINS)}"
            )
        family = _resolve_family(family, BUILTINS[name], source)
        if name in BUILTIN_FILES:
            if not BUILTIN_FILES[name].is_file():
                raise FileNotFoundError(
                    f"{source} is missing its file {BUILTIN_FILES[name]}; reinstall lycoft or rebuild it with "
                    "tools/pretrain_toy.py"
                )
            pipe, family, v_prediction = _load_single_file(
                BUILTIN_FILES[name], family, v_prediction, file_dtype, False, None, device, vae_dtype
            )
        else:
            pipe = build_tiny_pipeline(family, dtype=load_dtype or torch.float32)
            if v_prediction is None:
                v_prediction = _is_v_prediction(pipe)
            _set_prediction_type(pipe, v_prediction)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            pipe, family, v_prediction = _load_diffusers_dir(str(path), family, v_prediction, load_dtype)
        elif path.is_file():
            pipe, family, v_prediction = _load_single_file(
                path, family, v_prediction, file_dtype, allow_pickle, config, device, vae_dtype
            )
        elif path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES or not _HUB_ID.match(source):
            raise FileNotFoundError(f"model not found: {source!r} does not exist; {_SOURCES_HELP}")
        else:
            pipe, family, v_prediction = _load_diffusers_dir(source, family, v_prediction, load_dtype, hub=True)
    if vae is not None:
        pipe.vae = _load_vae(vae, pipe, vae_dtype or dtype, allow_pickle)
    if dtype is not None and vae_dtype not in (None, dtype):
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                module.to(dtype=vae_dtype if name == "vae" else dtype)
    return pipe, family, v_prediction


# ------------------------------------------------------------------------------------------ saving


def checkpoint_metadata(pipe: Any, family: str, title: str) -> dict[str, str]:
    """SAI model-spec metadata for a full checkpoint of `pipe` (architecture, prediction type, title)."""
    v_prediction = _is_v_prediction(pipe)
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(family, v_prediction),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.title": title,
    }


def save_single_file(
    pipe: Any,
    path: str | os.PathLike,
    family: str,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `pipe` as an LDM single-file ``.safetensors`` (what A1111/ComfyUI load), atomically.

    Floating tensors are cast to `dtype` when given. Metadata: SAI model-spec keys (including
    ``modelspec.prediction_type``, so :func:`load_pipeline` restores v-prediction), plus `metadata`.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"single-file output {path} must end in .safetensors")
    tensors = pipeline_to_ldm_state_dict(pipe, family)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = checkpoint_metadata(pipe, family, path.stem)
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors_atomic(tensors, path, meta)


def save_diffusers(pipe: Any, directory: str | os.PathLike) -> Path:
    """Save `pipe` as a diffusers folder (safetensors weights). The folder is written beside the target and
    renamed into place, so an existing folder is replaced only once the new one is complete."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; choose another output path")
    with atomic_directory(target) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return target
