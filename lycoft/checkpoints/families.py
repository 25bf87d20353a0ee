"""Model families (sd1, sd2, sdxl): per-family facts and detection from checkpoints or UNets.

A family fixes the checkpoint layout (LDM prefixes, text-encoder kinds), the metadata strings that
kohya/SAI tools write, and which bundled diffusers configs describe its real and tiny models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"
FAMILIES: tuple[str, ...] = (SD1, SD2, SDXL)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Text encoders come in two on-disk layouts: "clip" keeps the transformers names under the prefix
# (`<prefix>text_model.encoder.layers...`), "open_clip" uses OpenCLIP names with q/k/v fused.
CLIP = "clip"
OPEN_CLIP = "open_clip"

# The SAI model-spec architecture strings, as kohya sd-scripts writes them.
ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
ARCH_SDXL_V1_BASE = "stable-diffusion-xl-v1-base"
MODELSPEC_VERSION = "1.0.0"


@dataclass(frozen=True)
class FamilyInfo:
    """Facts about one model family.

    Fields:
        name: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        text_prefixes: LDM single-file prefix of each text encoder, in pipeline order
            (``text_encoder``, then ``text_encoder_2``).
        text_kinds: ``"clip"`` or ``"open_clip"`` for each text encoder (see module constants).
        ss_base_model_version: kohya ``ss_base_model_version`` (without the ``_v`` suffix).
        pipeline_class: diffusers pipeline class name.
        config: bundled diffusers config folder of the real model (under ``checkpoints/configs``).
        tiny_config: bundled config folder of the builtin tiny model.
    """

    name: str
    text_prefixes: tuple[str, ...]
    text_kinds: tuple[str, ...]
    ss_base_model_version: str
    pipeline_class: str
    config: str
    tiny_config: str

    @property
    def text_components(self) -> tuple[str, ...]:
        """Names used for the text encoders across lycoft: ``("te1",)`` or ``("te1", "te2")``."""
        return tuple(f"te{i + 1}" for i in range(len(self.text_prefixes)))


FAMILY_INFO: dict[str, FamilyInfo] = {
    SD1: FamilyInfo(
        name=SD1,
        text_prefixes=("cond_stage_model.transformer.",),
        text_kinds=(CLIP,),
        ss_base_model_version="sd_v1",
        pipeline_class="StableDiffusionPipeline",
        config="sd15",
        tiny_config="tiny-sd1",
    ),
    SD2: FamilyInfo(
        name=SD2,
        text_prefixes=("cond_stage_model.model.",),
        text_kinds=(OPEN_CLIP,),
        ss_base_model_version="sd_v2",
        pipeline_class="StableDiffusionPipeline",
        config="sd21",
        tiny_config="tiny-sd2",
    ),
    SDXL: FamilyInfo(
        name=SDXL,
        text_prefixes=("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
        text_kinds=(CLIP, OPEN_CLIP),
        ss_base_model_version="sdxl_base_v1-0",
        pipeline_class="StableDiffusionXLPipeline",
        config="sdxl-base-1.0",
        tiny_config="tiny-sdxl",
    ),
}


def family_info(family: str) -> FamilyInfo:
    """The facts of `family`; raises ValueError naming the valid families otherwise."""
    try:
        return FAMILY_INFO[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; use one of {', '.join(FAMILIES)}") from None


def ss_base_model_version(family: str, v_prediction: bool = False) -> str:
    """kohya's ``ss_base_model_version``: ``sd_v1``, ``sd_v2`` (``_v`` added for v-prediction) or
    ``sdxl_base_v1-0``."""
    base = family_info(family).ss_base_model_version
    return base + "_v" if v_prediction and family != SDXL else base


def modelspec_architecture(family: str, v_prediction: bool = False, adapter: str | None = None) -> str:
    """SAI ``modelspec.architecture``; with `adapter` (e.g. ``"lora"``) the ``<arch>/<adapter>`` form."""
    family_info(family)
    if family == SD1:
        arch = ARCH_SD_V1
    elif family == SD2:
        arch = ARCH_SD_V2_768_V if v_prediction else ARCH_SD_V2_512
    else:
        arch = ARCH_SDXL_V1_BASE
    return f"{arch}/{adapter}" if adapter else arch


def _any_prefix(keys: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_family_from_keys(keys_and_shapes: Mapping[str, tuple]) -> str:
    """Family of a single-file LDM state dict, from its keys (and shapes for UNet-only files).

    `keys_and_shapes` maps every tensor key to its shape (values are only read for UNet-only files).
    The text encoders decide: SDXL has ``conditioner.embedders.1.model.``, SD2 ``cond_stage_model.model.``
    (OpenCLIP), SD1 ``cond_stage_model.transformer.``. Without text encoders the UNet decides:
    ``label_emb`` -> sdxl, linear ``proj_in`` (2-D weight) -> sd2, 1x1-conv ``proj_in`` -> sd1.
    """
    keys = keys_and_shapes
    if _any_prefix(keys, "conditioner.embedders.1.model."):
        return SDXL
    if _any_prefix(keys, "conditioner.embedders.0.model."):
        raise ValueError(
            "this looks like an SDXL refiner checkpoint (OpenCLIP under conditioner.embedders.0.model.); "
            "lycoft supports sd1, sd2 and sdxl base models"
        )
    if _any_prefix(keys, "cond_stage_model.model."):
        return SD2
    if _any_prefix(keys, "cond_stage_model.transformer."):
        return SD1
    if _any_prefix(keys, UNET_PREFIX):
        if _any_prefix(keys, UNET_PREFIX + "label_emb."):
            return SDXL
        proj_in = [k for k in keys if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")]
        if proj_in:
            return SD2 if len(tuple(keys[proj_in[0]])) == 2 else SD1
    sample = ", ".join(list(keys)[:3]) or "no keys"
    raise ValueError(
        f"cannot tell the model family from these keys ({sample}, ...): not an LDM single-file SD1/SD2/SDXL "
        "checkpoint; pass family='sd1', 'sd2' or 'sdxl' if it is one"
    )


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def detect_family_from_unet(unet: Any) -> str:
    """Family of a diffusers ``UNet2DConditionModel`` (or its config dict / FrozenDict).

    ``addition_embed_type == "text_time"`` -> sdxl; linear projection or 1024-wide cross-attention -> sd2;
    anything else -> sd1.
    """
    config = getattr(unet, "config", unet)
    if _config_get(config, "addition_embed_type") == "text_time":
        return SDXL
    if (
        _config_get(config, "use_linear_projection", False)
        or _config_get(config, "cross_attention_dim") == 1024
    ):
        return SD2
    return SD1


def guess_v_prediction(
    family: str, keys: Mapping[str, Any] | None = None, metadata: Mapping[str, str] | None = None
) -> bool | None:
    """Best guess whether a single-file checkpoint predicts v; None when it cannot be told.

    Evidence, strongest first: safetensors metadata ``modelspec.prediction_type`` (``"v"``/``"epsilon"``),
    a ``v_pred`` marker tensor (written by some trainers for v-prediction models), then the family:
    sd1 and sdxl are epsilon models, but SD2 768-v and 512-base files have identical keys, so sd2 -> None
    (the caller decides, e.g. from a ``--v_prediction`` flag).
    """
    family_info(family)
    prediction = (metadata or {}).get("modelspec.prediction_type")
    if prediction in ("v", "v_prediction"):
        return True
    if prediction == "epsilon":
        return False
    if keys is not None and "v_pred" in keys:
        return True
    return None if family == SD2 else False
