"""Model families (sd1, sd2, sdxl): the one table of per-family facts, and detection from checkpoints,
UNets and live models.

A family fixes the denoiser and text encoders (under each name they go by: diffusers components,
transformers classes, LDM single-file prefixes, lycoft components, adapter key prefixes), how the denoiser
is conditioned, the metadata strings that kohya/SAI tools write, the presets and native resolution, and
which bundled diffusers configs describe its real and tiny models. Code that differs by family reads
these fields; a new family is an entry in `FAMILY_INFO` plus its key map and bundled configs
(docs/adding-a-family.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Text encoders come in two on-disk layouts: "clip" keeps the transformers names under the prefix
# (`<prefix>text_model.encoder.layers...`), "open_clip" uses OpenCLIP names with q/k/v fused.
CLIP = "clip"
OPEN_CLIP = "open_clip"

# The SAI model-spec architecture strings, as kohya sd-scripts writes them (library/sai_model_spec.py).
ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
ARCH_SDXL_V1_BASE = "stable-diffusion-xl-v1-base"
MODELSPEC_VERSION = "1.0.0"
# kohya's modelspec.implementation of adapter files: SAI's repository for SDXL, "diffusers" otherwise.
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"

# Every preset of lycoft.targets.PRESETS; a denoiser without convolutions would list fewer.
UNET_PRESETS = ("attn-only", "attn-mlp", "full", "full-lin", "unet-only")


@dataclass(frozen=True)
class TextEncoderInfo:
    """One text encoder of a family, under each name it goes by.

    Fields:
        name: lycoft's component name (``"te1"``, ``"te2"``), used by networks, learning-rate groups and
            key maps.
        component: diffusers pipeline attribute and folder (``"text_encoder"``, ``"text_encoder_2"``).
        tokenizer: diffusers attribute and folder of its tokenizer (``"tokenizer"``, ``"tokenizer_2"``).
        model_class: transformers class (``"CLIPTextModel"``, ``"CLIPTextModelWithProjection"``).
        ldm_prefix: prefix of its tensors in an LDM single-file checkpoint.
        kind: layout under that prefix, ``"clip"`` or ``"open_clip"`` (see the module constants).
        key_prefix: adapter-file key prefix (``"lora_te"`` for a family's only encoder, ``"lora_te1"``,
            ``"lora_te2"`` when it has two, as kohya names them).
    """

    name: str
    component: str
    tokenizer: str
    model_class: str
    ldm_prefix: str
    kind: str
    key_prefix: str


@dataclass(frozen=True)
class FamilyInfo:
    """Facts about one model family.

    Fields:
        name: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        denoiser_class: diffusers class of the denoiser (``"UNet2DConditionModel"``).
        pipeline_class: diffusers pipeline class name.
        text_encoders: the text encoders, in pipeline order.
        unet_key_prefix: adapter-file key prefix of denoiser layers (``"lora_unet"``).
        unet_key_names: which module names follow that prefix in the files lycoft writes:
            ``"diffusers"`` (``down_blocks_0_...``) or ``"ldm"`` (``input_blocks_1_...``, kohya's SDXL
            convention). Readers accept both.
        linear_projection: the UNet's transformer ``proj_in``/``proj_out`` are Linear (else 1x1 convs);
            detection tells sd1 from sd2 by it.
        uses_time_ids: the UNet takes SDXL's size/crop conditioning (``added_cond_kwargs["time_ids"]``,
            LDM ``label_emb``).
        pooled_text_embeds: the UNet takes the last text encoder's pooled projection
            (``added_cond_kwargs["text_embeds"]``).
        text_hidden_state: which text-encoder output conditions the UNet: ``"last"`` (the last hidden
            state; clip skip goes earlier through the final layer norm, as the SD1/SD2 pipelines do) or
            ``"penultimate"`` (``hidden_states[-2]`` of every encoder without the final norm,
            concatenated along features, as SDXL does).
        resolution: native training size in pixels (square); the default of ``--resolution``.
        presets: the ``lycoft.targets.PRESETS`` this family's networks may use.
        file_prediction: what a single-file checkpoint of the family predicts when its metadata does not
            say: ``"epsilon"``, or None when its keys cannot tell (SD2 512-base and 768-v files share them).
        ss_base_model_version: kohya ``ss_base_model_version`` of an epsilon-prediction model.
        ss_base_model_version_v: the same for a v-prediction model.
        ss_v2: kohya's ``ss_v2`` flag (an SD2.x model).
        modelspec_architecture: SAI ``modelspec.architecture`` of an epsilon-prediction model.
        modelspec_architecture_v: the same for a v-prediction model.
        modelspec_implementation: ``modelspec.implementation`` that kohya writes in adapter files.
        metadata_prefixes: prefixes of ``ss_base_model_version`` and ``modelspec.architecture`` values
            that mark a file (written by any tool) as made for this family.
        config: bundled diffusers config folder of the real model (under ``checkpoints/configs``).
        tiny_config: bundled config folder of the builtin tiny model.
    """

    name: str
    denoiser_class: str
    pipeline_class: str
    text_encoders: tuple[TextEncoderInfo, ...]
    unet_key_prefix: str
    unet_key_names: str
    linear_projection: bool
    uses_time_ids: bool
    pooled_text_embeds: bool
    text_hidden_state: str
    resolution: int
    presets: tuple[str, ...]
    file_prediction: str | None
    ss_base_model_version: str
    ss_base_model_version_v: str
    ss_v2: bool
    modelspec_architecture: str
    modelspec_architecture_v: str
    modelspec_implementation: str
    metadata_prefixes: tuple[str, ...]
    config: str
    tiny_config: str

    @property
    def text_components(self) -> tuple[str, ...]:
        """lycoft names of the text encoders: ``("te1",)`` or ``("te1", "te2")``."""
        return tuple(te.name for te in self.text_encoders)

    @property
    def text_prefixes(self) -> tuple[str, ...]:
        """LDM single-file prefix of each text encoder, in pipeline order."""
        return tuple(te.ldm_prefix for te in self.text_encoders)

    @property
    def text_kinds(self) -> tuple[str, ...]:
        """``"clip"`` or ``"open_clip"`` for each text encoder."""
        return tuple(te.kind for te in self.text_encoders)

    def text_encoder(self, name: str) -> TextEncoderInfo:
        """The text encoder lycoft calls `name` (``"te1"``, ``"te2"``)."""
        for te in self.text_encoders:
            if te.name == name:
                return te
        raise ValueError(f"{self.name} has no text encoder {name!r}; it has {', '.join(self.text_components)}")


FAMILY_INFO: dict[str, FamilyInfo] = {
    SD1: FamilyInfo(
        name=SD1,
        denoiser_class="UNet2DConditionModel",
        pipeline_class="StableDiffusionPipeline",
        text_encoders=(
            TextEncoderInfo(
                name="te1", component="text_encoder", tokenizer="tokenizer", model_class="CLIPTextModel",
                ldm_prefix="cond_stage_model.transformer.", kind=CLIP, key_prefix="lora_te",
            ),
        ),
        unet_key_prefix="lora_unet",
        unet_key_names="diffusers",
        linear_projection=False,
        uses_time_ids=False,
        pooled_text_embeds=False,
        text_hidden_state="last",
        resolution=512,
        presets=UNET_PRESETS,
        file_prediction="epsilon",
        ss_base_model_version="sd_v1",
        ss_base_model_version_v="sd_v1_v",
        ss_v2=False,
        modelspec_architecture=ARCH_SD_V1,
        modelspec_architecture_v=ARCH_SD_V1,
        modelspec_implementation=IMPL_DIFFUSERS,
        metadata_prefixes=("sd_v1", "stable-diffusion-v1"),
        config="sd15",
        tiny_config="tiny-sd1",
    ),
    SD2: FamilyInfo(
        name=SD2,
        denoiser_class="UNet2DConditionModel",
        pipeline_class="StableDiffusionPipeline",
        text_encoders=(
            TextEncoderInfo(
                name="te1", component="text_encoder", tokenizer="tokenizer", model_class="CLIPTextModel",
                ldm_prefix="cond_stage_model.model.", kind=OPEN_CLIP, key_prefix="lora_te",
            ),
        ),
        unet_key_prefix="lora_unet",
        unet_key_names="diffusers",
        linear_projection=True,
        uses_time_ids=False,
        pooled_text_embeds=False,
        text_hidden_state="last",
        resolution=512,
        presets=UNET_PRESETS,
        file_prediction=None,
        ss_base_model_version="sd_v2",
        ss_base_model_version_v="sd_v2_v",
        ss_v2=True,
        modelspec_architecture=ARCH_SD_V2_512,
        modelspec_architecture_v=ARCH_SD_V2_768_V,
        modelspec_implementation=IMPL_DIFFUSERS,
        metadata_prefixes=("sd_v2", "stable-diffusion-v2"),
        config="sd21",
        tiny_config="tiny-sd2",
    ),
    SDXL: FamilyInfo(
        name=SDXL,
        denoiser_class="UNet2DConditionModel",
        pipeline_class="StableDiffusionXLPipeline",
        text_encoders=(
            TextEncoderInfo(
                name="te1", component="text_encoder", tokenizer="tokenizer", model_class="CLIPTextModel",
                ldm_prefix="conditioner.embedders.0.transformer.", kind=CLIP, key_prefix="lora_te1",
            ),
            TextEncoderInfo(
                name="te2", component="text_encoder_2", tokenizer="tokenizer_2",
                model_class="CLIPTextModelWithProjection", ldm_prefix="conditioner.embedders.1.model.",
                kind=OPEN_CLIP, key_prefix="lora_te2",
            ),
        ),
        unet_key_prefix="lora_unet",
        unet_key_names="ldm",
        linear_projection=True,
        uses_time_ids=True,
        pooled_text_embeds=True,
        text_hidden_state="penultimate",
        resolution=1024,
        presets=UNET_PRESETS,
        file_prediction="epsilon",
        ss_base_model_version="sdxl_base_v1-0",
        ss_base_model_version_v="sdxl_base_v1-0",
        ss_v2=False,
        modelspec_architecture=ARCH_SDXL_V1_BASE,
        modelspec_architecture_v=ARCH_SDXL_V1_BASE,
        modelspec_implementation=IMPL_STABILITY_AI,
        metadata_prefixes=("sdxl", "stable-diffusion-xl"),
        config="sdxl-base-1.0",
        tiny_config="tiny-sdxl",
    ),
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_INFO)

# diffusers pipeline component -> lycoft component name, over every family's text encoders
TEXT_ENCODER_COMPONENTS: dict[str, str] = {
    te.component: te.name for info in FAMILY_INFO.values() for te in info.text_encoders
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
    info = family_info(family)
    return info.ss_base_model_version_v if v_prediction else info.ss_base_model_version


def modelspec_architecture(family: str, v_prediction: bool = False, adapter: str | None = None) -> str:
    """SAI ``modelspec.architecture``; with `adapter` (e.g. ``"lora"``) the ``<arch>/<adapter>`` form."""
    info = family_info(family)
    arch = info.modelspec_architecture_v if v_prediction else info.modelspec_architecture
    return f"{arch}/{adapter}" if adapter else arch


def pipeline_text_encoders(pipe: Any, family: str) -> tuple[list[Any], list[Any]]:
    """(text encoders, tokenizers) of a diffusers pipeline of `family`, in the family's order, read from
    the components `TextEncoderInfo` names; components the pipeline lacks (None) are left out."""
    info = family_info(family)
    encoders = [getattr(pipe, te.component, None) for te in info.text_encoders]
    tokenizers = [getattr(pipe, te.tokenizer, None) for te in info.text_encoders]
    return [m for m in encoders if m is not None], [t for t in tokenizers if t is not None]


def family_of_metadata(version: str = "", architecture: str = "") -> str | None:
    """The family an ``ss_base_model_version`` (checked first) or ``modelspec.architecture`` value names,
    by `FamilyInfo.metadata_prefixes`; None when neither does."""
    for text in (version, architecture):
        for info in FAMILY_INFO.values():
            if text and text.startswith(info.metadata_prefixes):
                return info.name
    return None


def _family_by_unet(time_ids: bool, linear: bool) -> str:
    """The family whose UNet has these traits: time-id conditioning decides, then the projection."""
    found = [info for info in FAMILY_INFO.values() if info.uses_time_ids == time_ids]
    if len(found) > 1:
        found = [info for info in found if info.linear_projection == linear] or found
    return found[0].name


def _any_prefix(keys: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_family_from_keys(keys_and_shapes: Mapping[str, tuple]) -> str:
    """Family of a single-file LDM state dict, from its keys (and shapes for UNet-only files).

    `keys_and_shapes` maps every tensor key to its shape (values are only read for UNet-only files).
    The text encoders decide: the family one of whose `TextEncoderInfo.ldm_prefix` the keys use (SDXL
    ``conditioner.embedders.1.model.``, SD2 ``cond_stage_model.model.`` (OpenCLIP), SD1
    ``cond_stage_model.transformer.``). Without text encoders the UNet decides: ``label_emb`` -> the
    family with time ids (sdxl), linear ``proj_in`` (2-D weight) -> sd2, 1x1-conv ``proj_in`` -> sd1.
    """
    keys = keys_and_shapes
    for info in FAMILY_INFO.values():
        if any(_any_prefix(keys, te.ldm_prefix) for te in info.text_encoders):
            return info.name
    if _any_prefix(keys, "conditioner.embedders.0.model."):
        raise ValueError(
            "this looks like an SDXL refiner checkpoint (OpenCLIP under conditioner.embedders.0.model.); "
            f"lycoft supports {', '.join(FAMILIES)} base models"
        )
    if _any_prefix(keys, UNET_PREFIX):
        time_ids = _any_prefix(keys, UNET_PREFIX + "label_emb.")
        proj_in = [k for k in keys if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")]
        if time_ids or proj_in:
            return _family_by_unet(time_ids, bool(proj_in) and len(tuple(keys[proj_in[0]])) == 2)
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

    ``addition_embed_type == "text_time"`` -> the family with time ids (sdxl); linear projection or
    1024-wide cross-attention (SD2's OpenCLIP-H) -> sd2; anything else -> sd1.
    """
    config = getattr(unet, "config", unet)
    time_ids = _config_get(config, "addition_embed_type") == "text_time"
    linear = bool(_config_get(config, "use_linear_projection", False)) or (
        _config_get(config, "cross_attention_dim") == 1024
    )
    return _family_by_unet(time_ids, linear)


def detect_family_from_models(unet: Any, text_encoders: Sequence[Any]) -> str:
    """Family of live models: the number of text encoders when only one family has that many (two ->
    sdxl), else the UNet's config (`detect_family_from_unet`; sd1 when there is no UNet or config)."""
    by_count = [info.name for info in FAMILY_INFO.values() if len(info.text_encoders) == len(text_encoders)]
    if len(by_count) == 1:
        return by_count[0]
    return detect_family_from_unet(getattr(unet, "config", None))


def guess_v_prediction(
    family: str, keys: Mapping[str, Any] | None = None, metadata: Mapping[str, str] | None = None
) -> bool | None:
    """Best guess whether a single-file checkpoint predicts v; None when it cannot be told.

    Evidence, strongest first: safetensors metadata ``modelspec.prediction_type`` (``"v"``/``"epsilon"``),
    a ``v_pred`` marker tensor (written by some trainers for v-prediction models), then the family's
    `FamilyInfo.file_prediction`: sd1 and sdxl are epsilon models, but SD2 768-v and 512-base files have
    identical keys, so sd2 -> None (the caller decides, e.g. from a ``--v_prediction`` flag).
    """
    info = family_info(family)
    prediction = (metadata or {}).get("modelspec.prediction_type")
    if prediction in ("v", "v_prediction"):
        return True
    if prediction == "epsilon":
        return False
    if keys is not None and "v_pred" in keys:
        return True
    return None if info.file_prediction is None else info.file_prediction == "v"
