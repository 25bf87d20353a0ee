"""kohya ``ss_*`` training metadata for adapter files (A1111, Civitai and kohya's tools read these).

`training_metadata` returns the keys that describe the run plus the model-spec fields the user gave
(``--metadata_*``); `lycoft.network_files.save_network` adds the network keys (``ss_network_module``,
``ss_base_model_version``, ``modelspec.*``, ``lycoft.*``) and lets these win, which is how
``ss_network_args`` carries the full training options and ``--metadata_title`` replaces the default title.
With ``--no_metadata`` only the user's fields are returned (kohya's rule: no settings, folders or tags).
"""

from __future__ import annotations

import base64
import json
import mimetypes
import time
from pathlib import Path
from typing import Any

from lycoft.checkpoints.families import family_info
from lycoft.training.flags import TrainConfig


def _model_name(source: str | None) -> str:
    if not source:
        return ""
    if source.startswith("builtin:"):
        return source
    return Path(source).name if Path(source).exists() else source


# --metadata_* flag -> SAI model-spec key (the keys kohya sd-scripts writes for them)
MODELSPEC_FLAGS = {
    "metadata_title": "modelspec.title", "metadata_author": "modelspec.author",
    "metadata_description": "modelspec.description", "metadata_license": "modelspec.license",
    "metadata_tags": "modelspec.tags", "metadata_usage_hint": "modelspec.usage_hint",
    "metadata_thumbnail": "modelspec.thumbnail", "metadata_merged_from": "modelspec.merged_from",
    "metadata_trigger_phrase": "modelspec.trigger_phrase", "metadata_preprocessor": "modelspec.preprocessor",
}


def thumbnail_data_url(value: str) -> str:
    """``--metadata_thumbnail``: a data URL as it is, an image file as a data URL."""
    if value.startswith("data:"):
        return value
    path = Path(value)
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def user_metadata(cfg: TrainConfig) -> dict[str, str]:
    """The model-spec fields and comment the user gave (``--metadata_*``, ``--training_comment``)."""
    md = {key: getattr(cfg, flag) for flag, key in MODELSPEC_FLAGS.items() if getattr(cfg, flag) is not None}
    if "modelspec.thumbnail" in md:
        md["modelspec.thumbnail"] = thumbnail_data_url(md["modelspec.thumbnail"])
    if cfg.training_comment is not None:
        md["ss_training_comment"] = cfg.training_comment
    return md


def training_metadata(cfg: TrainConfig, *, dataset: Any, family: str, num_processes: int,
                      batches_per_epoch: int, num_epochs: int, total_steps: int, started_at: float,
                      session_id: int) -> dict[str, str]:
    """The run's fixed facts and the user's fields; `step_metadata` adds the counters at each save."""
    if cfg.no_metadata:
        return user_metadata(cfg)
    options = cfg.network_options().to_strings()
    options.setdefault("algo", "oft")
    options.setdefault("preset", "full")
    options["algo"] = "diag-oft" if options["algo"] in ("oft", "diag-oft", "diag_oft") else options["algo"]
    resolution = cfg.resolved_resolution(family)
    te_lrs = cfg.text_encoder_lr or [cfg.learning_rate]
    batch_size = max(ds.batch_size for ds in dataset.datasets)  # a dataset TOML may set its own
    md: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_sd_model_name": _model_name(cfg.pretrained_model_name_or_path),
        "ss_vae_name": _model_name(cfg.vae),
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate,
        # one rate as a number (what readers of kohya files parse); SDXL's two as kohya writes its list
        "ss_text_encoder_lr": te_lrs[0] if len(set(te_lrs)) == 1 else te_lrs,
        "ss_num_train_images": dataset.num_train_slots,
        "ss_num_reg_images": dataset.num_reg_slots,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_max_train_steps": total_steps,
        "ss_batch_size_per_device": batch_size,
        "ss_total_batch_size": batch_size * num_processes * cfg.gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_lr_warmup_steps": cfg.warmup_steps(total_steps),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_optimizer": cfg.optimizer_type + (f"({','.join(cfg.optimizer_args)})" if cfg.optimizer_args else ""),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": cfg.full_fp16,
        "ss_full_bf16": cfg.full_bf16,
        "ss_fp8_base": cfg.fp8_base,
        "ss_fp8_base_unet": cfg.fp8_base_unet,
        "ss_lowram": cfg.lowram,
        "ss_v2": family_info(family).ss_v2,
        "ss_clip_skip": cfg.clip_skip if cfg.clip_skip is not None else "None",
        "ss_max_token_length": cfg.max_token_length if cfg.max_token_length is not None else "None",
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_bucket_info": json.dumps({"buckets": {f"{w}x{h}": n for (w, h), n in dataset.bucket_counts().items()}}),
        "ss_cache_latents": cfg.cache_latents or cfg.cache_latents_to_disk,
        "ss_seed": cfg.seed,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma if cfg.min_snr_gamma is not None else "None",
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_c": cfg.huber_c,
        "ss_huber_scale": cfg.huber_scale,
        "ss_debiased_estimation": cfg.debiased_estimation_loss,
        "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma,
        "ss_ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength,
        "ss_zero_terminal_snr": cfg.zero_terminal_snr,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_flip_aug": cfg.flip_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_network_dropout": options.get("dropout", "None"),
        "ss_network_args": json.dumps(options),
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs()),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_num_skipped_images": dataset.num_skipped,
        "ss_num_validation_images": dataset.validation.num_train_slots if dataset.validation is not None else 0,
        "ss_validation_seed": cfg.validation_seed,
        "ss_validation_split": cfg.validation_split,
        "ss_max_validation_steps": cfg.max_validation_steps,
        "ss_validate_every_n_epochs": cfg.validate_every_n_epochs,
        "ss_validate_every_n_steps": cfg.validate_every_n_steps,
    }
    return {k: str(v) for k, v in md.items()} | user_metadata(cfg)


def step_metadata(base: dict[str, str], *, step: int, epoch: int) -> dict[str, str]:
    """`base` plus the counters of a save at `step` (after `epoch` completed epochs); a ``--no_metadata``
    base (no run facts, see `training_metadata`) gets none."""
    if "ss_session_id" not in base:
        return dict(base)
    return {**base, "ss_steps": str(step), "ss_epoch": str(epoch), "ss_training_finished_at": str(time.time())}
