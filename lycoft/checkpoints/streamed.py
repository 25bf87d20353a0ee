"""Build a pipeline's models from a single-file checkpoint one tensor at a time, straight onto a device.

diffusers' ``from_single_file`` reads the whole file as one state dict, converts it, then builds the models;
a half-precision file loaded for float32 weights is held twice (the file's tensors and the upcast copies)
before anything reaches the GPU. Here the models are built without storage (``accelerate``'s
``init_empty_weights``), and every tensor of the file is read with a plain read
(`lycoft.io.streaming.SafetensorsInput`), cast to its model's dtype, moved to the device and set in place
before the next one is read: the process holds the models' weights on the device plus one tensor of the
file. The LDM -> diffusers names are the inverse of the ones the single-file writer uses
(`ldm_keys`), so a file written by `save_single_file` loads back bit for bit; the rest of the pipeline
(scheduler, tokenizers, pipeline options) comes from the same config folder ``from_single_file`` reads.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..io.streaming import SafetensorsInput
from ..naming import text_encoder_path
from .families import VAE_PREFIX, FamilyInfo
from .ldm_keys import ModuleTarget, UNetLayout, ldm_key_to_modules, vae_module_path_to_ldm

logger = logging.getLogger(__name__)


def _empty_models(info: FamilyInfo, config_dir: Path) -> dict[str, torch.nn.Module]:
    """The family's UNet, VAE and text encoders built from `config_dir` with parameters on the meta device."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    models: dict[str, torch.nn.Module] = {}
    with init_empty_weights():  # parameters only: buffers (CLIP's position ids) keep their computed values
        for component, cls in (("unet", getattr(diffusers, info.denoiser_class)), ("vae", diffusers.AutoencoderKL)):
            models[component] = cls.from_config(cls.load_config(str(config_dir), subfolder=component))
        for te in info.text_encoders:
            cls = getattr(transformers, te.model_class)
            config = transformers.CLIPTextConfig.from_pretrained(str(config_dir), subfolder=te.component)
            models[te.component] = cls(config)
    return models


def _vae_names(vae: torch.nn.Module) -> dict[str, str]:
    """LDM key (with ``first_stage_model.``) -> diffusers state-dict key, for every tensor of `vae`."""
    n_levels = len(vae.config.block_out_channels)
    names = {}
    for key in vae.state_dict(keep_vars=True):
        module, _, param = key.rpartition(".")
        names[f"{VAE_PREFIX}{vae_module_path_to_ldm(module, n_levels)}.{param}"] = key
    return names


def _encoder_names(encoder: torch.nn.Module) -> dict[str, str]:
    """``text_model.``-wrapped name -> the encoder's own state-dict key (transformers >= 5.6 drops the wrapper)."""
    return {text_encoder_path(key): key for key in encoder.state_dict(keep_vars=True)}


def _set_tensor(model: torch.nn.Module, key: str, value: torch.Tensor, what: str) -> None:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    old = module._parameters.get(name)
    if old is None:
        old = module._buffers[name]
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"{what} has shape {tuple(value.shape)}, but the model's {key} is {tuple(old.shape)}; "
                         "the config does not describe this checkpoint (pass config=<its diffusers folder>)")
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value


def _place(
    value: torch.Tensor, target: ModuleTarget | None, shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The part of a file tensor that `target` names, shaped as the model's tensor, in `dtype` on `device`."""
    if target is not None:
        value = value[target.rows(value.shape[0])]
        if target.transposed:
            value = value.T
    if value.shape != shape and value.numel() == shape.numel():
        value = value.reshape(shape)  # the VAE's attention: 1x1 convs in LDM files, Linear in diffusers
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype).contiguous()
    return value.to(device=device).contiguous()


def load_models_streamed(
    path: str | Path,
    info: FamilyInfo,
    config_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    vae_dtype: torch.dtype | None = None,
) -> dict[str, torch.nn.Module]:
    """The UNet (``"unet"``), VAE (``"vae"``) and text encoders (by pipeline component) of the single-file
    `.safetensors` at `path`, read tensor by tensor onto `device` in `dtype` (the VAE in `vae_dtype`).

    Tensors the models have no place for (EMA copies, OpenCLIP's ``logit_scale``, SD2's unused last text
    layer) are skipped; a model weight the file lacks is a ValueError naming it.
    """
    models = _empty_models(info, config_dir)
    layout = UNetLayout.from_config(models["unet"].config)
    vae_names = _vae_names(models["vae"])
    encoders = {te.name: te.component for te in info.text_encoders}
    encoder_names = {te.component: _encoder_names(models[te.component]) for te in info.text_encoders}
    dtypes = {name: dtype for name in models}
    dtypes["vae"] = vae_dtype or dtype
    skipped = 0
    with SafetensorsInput(path) as f:
        for key in sorted(f.keys(), key=lambda k: f.info(k).data_offsets):  # one pass through the file
            if key in vae_names:
                places: list[tuple[str, str, ModuleTarget | None]] = [("vae", vae_names[key], None)]
            else:
                places = []
                for target in ldm_key_to_modules(key, info.name, layout):
                    component = encoders.get(target.component, target.component)
                    name = f"{target.module}.{target.param}"
                    if component != "unet":
                        name = encoder_names[component].get(name, "")
                    places.append((component, name, target))
            places = [p for p in places if p[1] and _has(models[p[0]], p[1])]
            if not places:
                skipped += 1
                continue
            value = f.read(key)
            for component, name, target in places:
                model = models[component]
                shape = _shape(model, name)
                _set_tensor(model, name, _place(value, target, shape, dtypes[component], device), key)
            del value
    missing = [f"{c}.{n}" for c, m in models.items() for n, p in m.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} weight(s) of the model its config describes (first: "
                         f"{missing[0]}); give a complete checkpoint, or config=<the diffusers folder of this model>")
    for model in models.values():
        for buffer in model.buffers():  # computed buffers (position ids) follow the weights to the device
            if buffer.device != device:
                model.to(device)
                break
        model.eval()
    logger.debug("%s: read onto %s tensor by tensor; %d tensor(s) without a place skipped", path, device, skipped)
    return models


def _has(model: torch.nn.Module, key: str) -> bool:
    module_path, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return False
    return name in module._parameters or name in module._buffers


def _shape(model: torch.nn.Module, key: str) -> torch.Size:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    tensor = module._parameters.get(name)
    return (tensor if tensor is not None else module._buffers[name]).shape


def assemble_pipeline(
    info: FamilyInfo, config_dir: Path, models: Mapping[str, torch.nn.Module], tokenizers: Mapping[str, Any]
) -> Any:
    """The family's pipeline around `models`, with the scheduler and pipeline options of `config_dir` (its
    ``model_index.json``) and `tokenizers` (any the folder holds files for are read from it), as
    ``from_single_file`` assembles it."""
    import diffusers
    import transformers

    index = json.loads((config_dir / "model_index.json").read_text())
    pipe_cls = getattr(diffusers, info.pipeline_class)
    parts: dict[str, Any] = dict(models)
    sched_cls = getattr(diffusers, index["scheduler"][1])
    parts["scheduler"] = sched_cls.from_pretrained(str(config_dir), subfolder="scheduler")
    for te in info.text_encoders:
        tokenizer = tokenizers.get(te.tokenizer)
        if tokenizer is None:
            tokenizer = transformers.CLIPTokenizer.from_pretrained(str(config_dir), subfolder=te.tokenizer)
        parts[te.tokenizer] = tokenizer
    for name, parameter in inspect.signature(pipe_cls.__init__).parameters.items():
        if name in parts or name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        value = index.get(name, parameter.default)
        if isinstance(value, list):  # a component the folder names: only null ones (safety checker) are left
            value = None
        if value is not inspect.Parameter.empty:
            parts[name] = value
    return pipe_cls(**parts)
