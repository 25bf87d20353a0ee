"""Model families, diffusers <-> LDM key maps, CLIP tokenizers, tiny builtin models, loading and saving.

Import cost: families, ldm_keys and tokenizer need only torch; tiny and loading import diffusers lazily.
"""

from .bundled import bundled_config_dir, bundled_config_names, load_component_config
from .families import (
    FAMILIES,
    FAMILY_INFO,
    SD1,
    SD2,
    SDXL,
    UNET_PREFIX,
    VAE_PREFIX,
    FamilyInfo,
    detect_family_from_keys,
    detect_family_from_unet,
    family_info,
    guess_v_prediction,
    modelspec_architecture,
    ss_base_model_version,
)
from .ldm_keys import (
    ModuleTarget,
    UNetLayout,
    clip_state_dict_to_ldm,
    ldm_key_to_modules,
    open_clip_state_dict_to_ldm,
    pipeline_to_ldm_state_dict,
    text_encoder_module_path,
    unet_ldm_module_path_to_diffusers,
    unet_module_path_to_ldm,
    unet_state_dict_to_ldm,
    vae_module_path_to_ldm,
    vae_state_dict_to_ldm,
)
from .loading import (
    BUILTINS,
    checkpoint_metadata,
    load_pipeline,
    read_checkpoint_header,
    save_diffusers,
    save_single_file,
)
from .tiny import build_tiny_pipeline
from .tokenizer import build_clip_tokenizer, real_vocab, tiny_vocab

__all__ = [
    "BUILTINS",
    "FAMILIES",
    "FAMILY_INFO",
    "SD1",
    "SD2",
    "SDXL",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "FamilyInfo",
    "ModuleTarget",
    "UNetLayout",
    "build_clip_tokenizer",
    "build_tiny_pipeline",
    "bundled_config_dir",
    "bundled_config_names",
    "checkpoint_metadata",
    "clip_state_dict_to_ldm",
    "detect_family_from_keys",
    "detect_family_from_unet",
    "family_info",
    "guess_v_prediction",
    "ldm_key_to_modules",
    "load_component_config",
    "load_pipeline",
    "modelspec_architecture",
    "open_clip_state_dict_to_ldm",
    "pipeline_to_ldm_state_dict",
    "read_checkpoint_header",
    "real_vocab",
    "save_diffusers",
    "save_single_file",
    "ss_base_model_version",
    "text_encoder_module_path",
    "tiny_vocab",
    "unet_ldm_module_path_to_diffusers",
    "unet_module_path_to_ldm",
    "unet_state_dict_to_ldm",
    "vae_module_path_to_ldm",
    "vae_state_dict_to_ldm",
]
