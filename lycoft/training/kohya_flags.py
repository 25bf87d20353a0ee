"""kohya sd-scripts' training flags that lycoft's trainer does not take as they are.

Every flag of sd-scripts' ``train_network.py`` and ``sdxl_train_network.py`` (the list, with the commit it
was read from, is ``tests/data/sd_scripts_flags.json``) is one of: a lycoft flag with kohya's meaning (the
`flags.TrainConfig` table), an alias of one (`ALIASES`), or an entry of `UNSUPPORTED` saying why lycoft
does not take it and what to use instead. A test keeps the three in step with the list.

A kohya config file often holds such a flag at kohya's default (the kohya_ss GUI writes every field): at
its default it changes nothing in sd-scripts either, so it is accepted and reported in one note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SD_SCRIPTS_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"

# kohya spellings of lycoft flags (kohya keeps an old misspelling for backward compatibility).
ALIASES: dict[str, str] = {"caption_extention": "caption_extension", "config_file": "config"}
# kohya flags lycoft takes with a meaning of its own, and how it differs from sd-scripts'.
DIFFERS: dict[str, str] = {
    "network_module": "only `lycoft` or `lycoft.kohya` (the same OFT/BOFT network); LoRA modules are sd-scripts' own",
    "network_dim": "the OFT block size (LyCORIS' meaning), not a LoRA rank",
    "network_alpha": "accepted and ignored: a rotation has no alpha (bound it with network_args constraint=)",
    "network_dropout": "kohya's neuron dropout has no meaning for a rotation: reported and ignored; block "
                       "dropout is network_args module_dropout=",
    "network_args": "lycoft's option keys (README, 'Network args'); the same in both trainers",
    "save_model_as": "safetensors only",
    "persistent_data_loader_workers": "on by default (lycoft keeps the loader's workers between epochs); false "
                                      "restarts them every epoch, what sd-scripts does without the flag",
    "initial_step": "the count starts there with or without --skip_until_initial_step (sd-scripts then only "
                    "numbers the epochs), the LR schedule follows the count (sd-scripts restarts it), and a "
                    "state found by --resume wins, so that a resume stays exact (sd-scripts lets the flag win)",
    "initial_epoch": "as --initial_step at the epoch's first step",
    "conditioning_data_dir": "the mask folder of the --train_data_dir images (sd-scripts reads mask folders only "
                             "from a dataset TOML's subsets, as lycoft does there too)",
}


# Keys the kohya_ss GUI writes into the TOML it hands to sd-scripts although train_network.py and
# sdxl_train_network.py define no such flag (most belong to its FLUX/SD3 trainers); sd-scripts ignores them.
# Source: bmaltais/kohya_ss kohya_gui/lora_gui.py (`config_toml_data`) at 45088f04; `LoRA_type` is from the
# GUI's own saved settings, which users paste into these files (it is one letter from `loss_type`).
GUI_KEYS: frozenset[str] = frozenset((
    "LoRA_type",
    "ae", "apply_t5_attn_mask", "attn_mode", "blocks_to_swap", "byt5", "clip_g", "clip_g_dropout_rate", "clip_l",
    "clip_l_dropout_rate", "compile", "compile_backend", "compile_cache_size_limit", "compile_dynamic",
    "compile_fullgraph", "compile_mode", "discrete_flow_shift", "double_blocks_to_swap", "enable_scaled_pos_embed",
    "epoch", "fp8_scaled", "fp8_vl", "gemma2", "gemma2_max_token_length", "guidance_scale", "llm_adapter_path",
    "logit_mean", "logit_std", "mem_eff_save", "mode_scale", "model_prediction_type", "model_type",
    "noise_offset_type", "pos_emb_random_crop_rate", "qwen3", "qwen3_max_token_length", "qwen_image_vae_2d",
    "save_clip", "save_t5xxl", "show_timesteps", "show_timesteps_resolution", "sigmoid_scale",
    "single_blocks_to_swap", "split_attn", "split_mode", "stop_text_encoder_training", "system_prompt",
    "t5_dropout_rate", "t5_max_token_length", "t5_tokenizer_path", "t5xxl", "t5xxl_device", "t5xxl_dtype",
    "t5xxl_max_token_length", "text_encoder", "text_encoder_cpu", "timestep_sampling",
    "train_inpainting", "unsloth_offload_checkpointing", "use_flash_attn", "use_sage_attn", "vae_chunk_size",
    "vae_disable_cache", "weighting_scheme",
))


@dataclass(frozen=True)
class Unsupported:
    """A kohya flag lycoft does not take. reason: why, and what to use instead. default: kohya's default
    (a value equal to it, or an empty one, does nothing in sd-scripts and is accepted)."""

    reason: str
    default: Any = None


_NOT_YET = "not supported by lycoft's trainer yet"
_HUB = "lycoft does not upload or download; copy the files with huggingface-cli yourself"
_DEEPSPEED = "lycoft runs DeepSpeed through accelerate: configure it with `accelerate config`, not trainer flags"
_FINETUNE = ("a fine-tuning (metadata JSON) dataset; lycoft trains from DreamBooth folders (--train_data_dir) "
             "or a kohya dataset TOML (--dataset_config)")

UNSUPPORTED: dict[str, Unsupported] = {
    # models and memory
    "tokenizer_cache_dir": Unsupported("lycoft bundles the CLIP tokenizers and never downloads them; drop it"),
    "mem_eff_attn": Unsupported("lycoft always uses PyTorch's memory-efficient attention (SDPA); drop it", False),
    "disable_mmap_load_safetensors": Unsupported(_NOT_YET, False),
    "cpu_offload_checkpointing": Unsupported(f"{_NOT_YET}; use --gradient_checkpointing", False),
    "fused_backward_pass": Unsupported("it fuses the optimizer step into backward for full fine-tuning with "
                                       "Adafactor; OFT adapters are small enough not to need it", False),
    "ddp_timeout": Unsupported(f"{_NOT_YET}; accelerate's default timeout applies"),
    "ddp_gradient_as_bucket_view": Unsupported(_NOT_YET, False),
    "ddp_static_graph": Unsupported(_NOT_YET, False),
    # DeepSpeed
    "deepspeed": Unsupported(_DEEPSPEED, False),
    "zero_stage": Unsupported(_DEEPSPEED, 2),
    "offload_optimizer_device": Unsupported(_DEEPSPEED),
    "offload_optimizer_nvme_path": Unsupported(_DEEPSPEED),
    "offload_param_device": Unsupported(_DEEPSPEED),
    "offload_param_nvme_path": Unsupported(_DEEPSPEED),
    "zero3_init_flag": Unsupported(_DEEPSPEED, False),
    "zero3_save_16bit_model": Unsupported(_DEEPSPEED, False),
    "fp16_master_weights_and_gradients": Unsupported(_DEEPSPEED, False),
    # Hugging Face Hub
    "huggingface_repo_id": Unsupported(_HUB),
    "huggingface_repo_type": Unsupported(_HUB),
    "huggingface_path_in_repo": Unsupported(_HUB),
    "huggingface_token": Unsupported(_HUB),
    "huggingface_repo_visibility": Unsupported(_HUB),
    "save_state_to_huggingface": Unsupported(_HUB, False),
    "resume_from_huggingface": Unsupported(_HUB, False),
    "async_upload": Unsupported(_HUB, False),
    # datasets and augmentation
    "in_json": Unsupported(_FINETUNE),
    "dataset_repeats": Unsupported(f"{_FINETUNE}; set repeats in the folder name ('10_sks dog')", 1),
    "dataset_class": Unsupported("custom dataset classes are not loaded; use DreamBooth folders or a dataset TOML"),
    "cache_info": Unsupported(_NOT_YET, False),
    "color_aug": Unsupported(_NOT_YET, False),
    "face_crop_aug_range": Unsupported(_NOT_YET),
    "debug_dataset": Unsupported(_NOT_YET, False),
    "skip_cache_check": Unsupported(_NOT_YET, False),
    "resize_interpolation": Unsupported(f"{_NOT_YET}; lycoft resizes with Lanczos"),
    "token_warmup_min": Unsupported(_NOT_YET, 1),
    "token_warmup_step": Unsupported(_NOT_YET, 0),
    "weighted_captions": Unsupported(_NOT_YET, False),
    # optimizer and schedule
    "use_8bit_adam": Unsupported("kohya's old spelling; use --optimizer_type AdamW8bit", False),
    "use_lion_optimizer": Unsupported("kohya's old spelling; use --optimizer_type Lion", False),
    # saving, resuming, metadata
    "metadata_is_negative_embedding": Unsupported("lycoft trains OFT adapters, not embeddings"),
    # logging and trackers
    "wandb_api_key": Unsupported("log in with `wandb login` or the WANDB_API_KEY environment variable"),
    # the network
    "scale_weight_norms": Unsupported("a rotation keeps every weight norm, so there is nothing to scale; bound "
                                      "the rotation with --network_args constraint=<c> instead"),
}


def at_default(name: str, value: Any) -> bool:
    """Whether `value` of the unsupported kohya flag `name` is its default (or empty): a no-op in sd-scripts."""
    if value in (None, "", [], {}, False):
        return True
    default = UNSUPPORTED[name].default
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    return value == default


def refusal(name: str, where: str) -> str:
    """The one-line error for an unsupported kohya flag given with an effect."""
    return f"{where} is a kohya sd-scripts flag that lycoft does not take: {UNSUPPORTED[name].reason}"
