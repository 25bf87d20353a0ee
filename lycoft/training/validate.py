"""Cross-field rules of a training configuration: the checks that involve several flags or the file
system, all reported at once so that a user fixes a config in one go."""

from __future__ import annotations

import logging
from pathlib import Path

from lycoft.checkpoints.families import SD2, SDXL
from lycoft.training.config_files import read_tracker_config
from lycoft.training.dataset_config import datasets_from_config
from lycoft.training.errors import ConfigError, did_you_mean
from lycoft.training.flags import TrainConfig

logger = logging.getLogger(__name__)

class _Problems(list):
    """The problems found so far, with the two checks most rules share."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def positive(self, name: str, allow_none: bool = True) -> None:
        v = getattr(self.cfg, name)
        if (v is None and not allow_none) or (v is not None and v < 1):
            self.append(f"--{name} must be a positive integer, got {v}")

    def in_range(self, name: str, lo: float, hi: float, hi_open: bool = False) -> None:
        v = getattr(self.cfg, name)
        if v is not None and (not lo <= v <= hi or (hi_open and v == hi)):
            bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
            self.append(f"--{name} must be in {bound}, got {v}")


def _model(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of model."""
    if not cfg.pretrained_model_name_or_path:
        p.append("--pretrained_model_name_or_path is required (a .safetensors file, a diffusers folder, "
                 "a hub id, or builtin:tiny-sd1)")


def _model_family(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of model family."""
    if cfg.v2 and cfg.sdxl:
        p.append("--v2 and --sdxl contradict each other; give one (or --model_family)")
    elif cfg.model_family:
        for name, family, on in (("--v2", SD2, cfg.v2), ("--sdxl", SDXL, cfg.sdxl)):
            if on and family != cfg.model_family:
                p.append(f"{name} contradicts --model_family {cfg.model_family}; drop one")
    if cfg.clip_skip is not None and cfg.clip_skip < 1:
        p.append(f"--clip_skip must be >= 1 (1 = the last layer), got {cfg.clip_skip}")


def _data_source(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of data source."""
    if cfg.dataset_config and (cfg.train_data_dir or cfg.reg_data_dir):
        p.append("--dataset_config and --train_data_dir/--reg_data_dir both given; put the folders in "
                 "the dataset TOML as subsets (is_reg = true for regularization) or drop --dataset_config")
    if not cfg.dataset_config and not cfg.train_data_dir:
        p.append("no training data: give --train_data_dir (folders named '<repeats>_<tokens>') or "
                 "--dataset_config (a kohya dataset TOML)")
    for name in ("train_data_dir", "reg_data_dir"):
        d = getattr(cfg, name)
        generating = name == "reg_data_dir" and cfg.num_class_images > 0
        if d and not generating and not Path(d).is_dir():
            p.append(f"--{name} {d!r} is not a folder (resolved from {Path.cwd()})")


def _buckets_and_sizes(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of buckets and sizes."""
    if cfg.resolution is not None and any(s % 8 for s in cfg.resolution):
        p.append(f"--resolution {cfg.resolution[0]},{cfg.resolution[1]}: both sides must be multiples of 8 "
                 "(the VAE downsamples by 8)")
    if cfg.bucket_reso_steps < 8 or cfg.bucket_reso_steps % 8:
        p.append(f"--bucket_reso_steps must be a positive multiple of 8, got {cfg.bucket_reso_steps}; "
                 "64 is usual")
    elif cfg.enable_bucket:
        for name in ("min_bucket_reso", "max_bucket_reso"):
            v = getattr(cfg, name)
            if v < cfg.bucket_reso_steps or v % cfg.bucket_reso_steps:
                ok = max(cfg.bucket_reso_steps, v // cfg.bucket_reso_steps * cfg.bucket_reso_steps)
                p.append(f"--{name} {v} is not a multiple of --bucket_reso_steps {cfg.bucket_reso_steps}; "
                         f"use {ok}")
        if cfg.min_bucket_reso > cfg.max_bucket_reso:
            p.append(f"--min_bucket_reso {cfg.min_bucket_reso} is larger than --max_bucket_reso "
                     f"{cfg.max_bucket_reso}")
        res = cfg.resolved_resolution()
        if not cfg.bucket_no_upscale and cfg.min_bucket_reso > min(res):
            p.append(f"--min_bucket_reso {cfg.min_bucket_reso} is larger than the resolution "
                     f"{res[0]},{res[1]}: no bucket fits; set --min_bucket_reso <= {min(res)}")


def _captions(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of captions."""
    if cfg.keep_tokens < 0:
        p.append(f"--keep_tokens must be >= 0, got {cfg.keep_tokens}")
    p.in_range("caption_dropout_rate", 0.0, 1.0)
    p.in_range("caption_tag_dropout_rate", 0.0, 1.0)
    if cfg.caption_dropout_every_n_epochs < 0:
        p.append(f"--caption_dropout_every_n_epochs must be >= 0 (0 = off), got {cfg.caption_dropout_every_n_epochs}")
    if not cfg.caption_separator.strip():
        p.append(f"--caption_separator must be a visible character such as ',', got {cfg.caption_separator!r}")


def _caching(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of caching."""
    if (cfg.cache_latents or cfg.cache_latents_to_disk) and cfg.random_crop:
        p.append("--random_crop cannot be used with --cache_latents: a cached latent has one fixed crop; "
                 "drop one of them")
    if cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk:
        if not cfg.network_train_unet_only:
            p.append("--cache_text_encoder_outputs needs a frozen text encoder: add "
                     "--network_train_unet_only")
        varying = [n for n in ("shuffle_caption", "enable_wildcard") if getattr(cfg, n)]
        varying += [n for n in ("caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs")
                    if getattr(cfg, n) > 0]
        if varying:
            names = ", ".join("--" + v for v in varying)
            p.append(f"--cache_text_encoder_outputs needs fixed captions, but {names} change them every "
                     "step; drop those or the caching")
    p.positive("vae_batch_size")


def _memory_and_speed(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of float8 storage, memory release, compilation and text-encoder batches."""
    p.positive("text_encoder_batch_size")
    if not (cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk):
        _warn_unused(cfg, ("text_encoder_batch_size",), "--cache_text_encoder_outputs unset")
    if not (cfg.cache_latents or cfg.cache_latents_to_disk):
        _warn_unused(cfg, ("highvram",), "--cache_latents unset (it only changes latent caching)")
    if not cfg.torch_compile:
        if cfg.dynamo_backend != "no":  # 'no' is what the kohya_ss GUI writes when nothing is compiled
            _warn_unused(cfg, ("dynamo_backend",), "--torch_compile unset")
        return
    if cfg.dynamo_backend == "no":
        p.append("--torch_compile with --dynamo_backend no: pick a backend (inductor, aot_eager, eager) or drop "
                 "--torch_compile")
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if cfg.dynamo_backend not in backends:
        usual = [b for b in ("inductor", "aot_eager", "eager", "cudagraphs") if b in backends]
        p.append(f"--dynamo_backend {cfg.dynamo_backend!r} is not a torch.compile backend of this PyTorch; use "
                 f"{', '.join(usual)}{did_you_mean(cfg.dynamo_backend, backends)}")


def _steps_and_batches(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of steps and batches."""
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps"):
        p.positive(name, allow_none=False)
    p.positive("max_train_epochs")
    if cfg.max_data_loader_n_workers < 0:
        p.append(f"--max_data_loader_n_workers must be >= 0, got {cfg.max_data_loader_n_workers}")


def _precision(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of precision."""
    if cfg.full_fp16 and cfg.full_bf16:
        p.append("--full_fp16 and --full_bf16 both given; pick one")
    if cfg.full_fp16 and cfg.mixed_precision != "fp16":
        p.append(f"--full_fp16 needs --mixed_precision fp16 (got {cfg.mixed_precision!r})")
    if cfg.full_bf16 and cfg.mixed_precision != "bf16":
        p.append(f"--full_bf16 needs --mixed_precision bf16 (got {cfg.mixed_precision!r})")
    if cfg.xformers and cfg.sdpa:
        p.append("--xformers and --sdpa both given; pick one attention implementation")


def _optimizer_and_schedule(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of optimizer and schedule."""
    if not cfg.learning_rate > 0:
        p.append(f"--learning_rate must be > 0, got {cfg.learning_rate}")
    if cfg.unet_lr is not None and cfg.unet_lr < 0:
        p.append(f"--unet_lr must be >= 0, got {cfg.unet_lr}")
    if any(v < 0 for v in cfg.text_encoder_lr or ()):
        p.append(f"--text_encoder_lr must be >= 0, got {' '.join(map(str, cfg.text_encoder_lr or ()))}")
    if cfg.max_grad_norm < 0:
        p.append(f"--max_grad_norm must be >= 0 (0 = no clipping), got {cfg.max_grad_norm}")
    try:
        cfg.optimizer_kwargs()
    except ConfigError as e:
        p.append(str(e))
    else:
        _optimizer_owns_schedule(cfg, p)
    p.positive("lr_scheduler_num_cycles", allow_none=False)
    if not cfg.lr_scheduler_power > 0:
        p.append(f"--lr_scheduler_power must be > 0, got {cfg.lr_scheduler_power}")
    _schedule(cfg, p)


def _optimizer_owns_schedule(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of optimizers that bring their own schedule (schedule-free, Adafactor's relative step), and of
    --lr_warmup_steps where no warm-up would happen."""
    if cfg.schedule_free:
        if cfg.lr_scheduler != "constant" or cfg.lr_warmup_steps or cfg.lr_scheduler_type:
            logger.warning("--optimizer_type %s needs no LR schedule, so --lr_scheduler, --lr_scheduler_type and "
                           "--lr_warmup_steps are ignored (as in sd-scripts); give a warm-up as --optimizer_args "
                           "warmup_steps=N", cfg.optimizer_type)
    elif cfg.lr_scheduler_type:
        if cfg.lr_warmup_steps:
            p.append(f"--lr_warmup_steps {cfg.lr_warmup_steps} has no effect with --lr_scheduler_type "
                     f"{cfg.lr_scheduler_type}; give its arguments in --lr_scheduler_args or drop it")
        if cfg.lr_scheduler != "constant":
            logger.warning("--lr_scheduler %s is ignored: --lr_scheduler_type %s replaces it", cfg.lr_scheduler,
                           cfg.lr_scheduler_type)
    elif cfg.adafactor_relative_step:
        if cfg.lr_warmup_steps:
            p.append(f"--lr_warmup_steps {cfg.lr_warmup_steps} has no effect while Adafactor computes its own rate "
                     "(relative_step); use --optimizer_args warmup_init=True, or relative_step=False "
                     "scale_parameter=False warmup_init=False for a schedule")
        if cfg.lr_scheduler not in ("constant", "adafactor"):
            logger.warning("--lr_scheduler %s is ignored: Adafactor computes its own rate (relative_step; as in "
                           "sd-scripts); --optimizer_args relative_step=False scale_parameter=False "
                           "warmup_init=False makes it follow the schedule", cfg.lr_scheduler)
        if cfg.unet_lr is not None or cfg.text_encoder_lr:
            logger.warning("--unet_lr and --text_encoder_lr are ignored: Adafactor computes its own rate "
                           "(relative_step; as in sd-scripts)")
    elif cfg.lr_scheduler == "adafactor":
        p.append("--lr_scheduler adafactor is the rate Adafactor computes itself: it needs --optimizer_type "
                 "Adafactor without optimizer_args relative_step=False; choose another schedule")
    elif cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps:
        p.append(f"--lr_warmup_steps {cfg.lr_warmup_steps} has no effect with --lr_scheduler constant; "
                 "use constant_with_warmup (or another schedule)")


def _schedule(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of the named schedules' own flags: what each needs, and flags that its schedule does not read."""
    try:
        extra = cfg.lr_scheduler_kwargs()
    except ConfigError as e:
        p.append(str(e))
        extra = {}
    if "last_epoch" in extra:
        p.append("--lr_scheduler_args last_epoch: the trainer sets it (on --resume); drop it")
    p.in_range("lr_scheduler_min_lr_ratio", 0.0, 1.0)
    if cfg.lr_scheduler_timescale is not None and cfg.lr_scheduler_timescale < 0:
        p.append(f"--lr_scheduler_timescale must be a positive number of steps, got {cfg.lr_scheduler_timescale}")
    try:
        optimizer_schedule = cfg.schedule_free or cfg.adafactor_relative_step
    except ConfigError:  # bad --optimizer_args, reported already
        optimizer_schedule = False
    named = None if cfg.lr_scheduler_type or optimizer_schedule else cfg.lr_scheduler
    if named == "cosine_with_min_lr" and cfg.lr_scheduler_min_lr_ratio is None and "min_lr" not in extra:
        p.append("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1: the rate ends at "
                 "a tenth of --learning_rate)")
    if named == "piecewise_constant" and "step_rules" not in extra:
        p.append("--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules=<m1>:<step1>,<m2>:<step2>,"
                 "...,<m_last> (e.g. step_rules=1:100,0.1:200,0.01: multiplier 1 before step 100, 0.1 before 200, "
                 "then 0.01)")
    if named == "warmup_stable_decay" and not cfg.lr_decay_steps:
        logger.warning("--lr_scheduler warmup_stable_decay without --lr_decay_steps never decays; set it (e.g. "
                       "0.2 = the last fifth of the steps)")
    readers = {"lr_decay_steps": ("warmup_stable_decay",),
               "lr_scheduler_min_lr_ratio": ("cosine_with_min_lr", "warmup_stable_decay"),
               "lr_scheduler_timescale": ("inverse_sqrt",)}
    for name, schedules in readers.items():
        if getattr(cfg, name) and named not in schedules:
            logger.warning("--%s %s is ignored: only --lr_scheduler %s use%s it", name, getattr(cfg, name),
                           " and ".join(schedules), "s" if len(schedules) == 1 else "")


def _loss(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of loss."""
    if cfg.noise_offset < 0:
        p.append(f"--noise_offset must be >= 0, got {cfg.noise_offset}")
    if cfg.min_snr_gamma is not None and not cfg.min_snr_gamma > 0:
        p.append(f"--min_snr_gamma must be > 0 (leave it unset to turn it off), got {cfg.min_snr_gamma}")
    if cfg.prior_loss_weight < 0:
        p.append(f"--prior_loss_weight must be >= 0, got {cfg.prior_loss_weight}")
    if not cfg.huber_c > 0:
        p.append(f"--huber_c must be > 0, got {cfg.huber_c}; 0.1 is usual")
    if not cfg.huber_scale > 0:
        p.append(f"--huber_scale must be > 0, got {cfg.huber_scale}")
    if cfg.loss_type not in ("huber", "smooth_l1"):
        _warn_unused(cfg, ("huber_schedule", "huber_c", "huber_scale"), f"--loss_type {cfg.loss_type}")
    if cfg.v_pred_like_loss is not None and cfg.v_pred_like_loss < 0:
        p.append(f"--v_pred_like_loss must be >= 0 (leave it unset to turn it off), got {cfg.v_pred_like_loss}")
    # kohya sd-scripts' rules for the v-prediction options
    if cfg.scale_v_pred_loss_like_noise_pred and not cfg.v_parameterization:
        p.append("--scale_v_pred_loss_like_noise_pred is for v-prediction models: add --v_parameterization, "
                 "or drop it")
    if cfg.v_pred_like_loss and cfg.v_parameterization:
        p.append("--v_pred_like_loss is for epsilon models and cannot be used with --v_parameterization; drop one")
    if cfg.zero_terminal_snr and not cfg.v_parameterization:
        # An epsilon target at SNR 0 is the input itself; the 1/SNR-type weights are infinite there.
        infinite = [n for n in ("debiased_estimation_loss", "v_pred_like_loss") if getattr(cfg, n)]
        if infinite:
            p.append(f"--zero_terminal_snr without --v_parameterization makes the weight of --{infinite[0]} "
                     "infinite at the last timestep (its SNR is 0); add --v_parameterization or drop one")
        else:
            logger.warning("--zero_terminal_snr is meant for v-prediction (--v_parameterization); an epsilon "
                           "model learns nothing at the last timestep and may train unexpectedly")


def _noise(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of noise and timesteps."""
    if cfg.adaptive_noise_scale is not None and not cfg.noise_offset > 0:
        p.append(f"--adaptive_noise_scale {cfg.adaptive_noise_scale} adds to the offset noise: it needs "
                 "--noise_offset > 0 (e.g. 0.05)")
    if not cfg.noise_offset:
        _warn_unused(cfg, ("noise_offset_random_strength",), "--noise_offset unset")
    p.positive("multires_noise_iterations")
    if cfg.multires_noise_discount < 0:
        p.append(f"--multires_noise_discount must be >= 0, got {cfg.multires_noise_discount}; 0.3 is usual")
    if not cfg.multires_noise_iterations:
        _warn_unused(cfg, ("multires_noise_discount",), "--multires_noise_iterations unset")
    if cfg.ip_noise_gamma is not None and cfg.ip_noise_gamma < 0:
        p.append(f"--ip_noise_gamma must be >= 0 (leave it unset to turn it off), got {cfg.ip_noise_gamma}")
    if not cfg.ip_noise_gamma:
        _warn_unused(cfg, ("ip_noise_gamma_random_strength",), "--ip_noise_gamma unset")
    p.in_range("min_timestep", 0, 999)
    p.in_range("max_timestep", 0, 1000)
    low = 0 if cfg.min_timestep is None else cfg.min_timestep
    high = 1000 if cfg.max_timestep is None else cfg.max_timestep
    if low > high:
        p.append(f"--min_timestep {low} is above --max_timestep {high}: no timestep is left to train on; "
                 "the range is [min, max), or min = max for one timestep")


def _masked_loss(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of masked loss (the rules that need the dataset are in `dataset_config`)."""
    folder = cfg.conditioning_data_dir
    if folder and cfg.dataset_config:
        p.append("--conditioning_data_dir is for --train_data_dir; with --dataset_config set conditioning_data_dir "
                 "in each [[datasets.subsets]] whose images have masks")
    elif folder and not Path(folder).is_dir():
        p.append(f"--conditioning_data_dir {folder!r} is not a folder (resolved from {Path.cwd()})")


def _validation(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of validation."""
    p.in_range("validation_split", 0.0, 1.0, hi_open=True)
    for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        p.positive(name)


def _warn_unused(cfg: TrainConfig, names: tuple[str, ...], because: str) -> None:
    """Warn about each of `names` set away from its default although it does nothing (kohya ignores it)."""
    defaults = TrainConfig()
    for name in names:
        if getattr(cfg, name) != getattr(defaults, name):
            logger.warning("--%s %s has no effect with %s", name, getattr(cfg, name), because)


def _network(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of network."""
    if cfg.network_train_unet_only and cfg.network_train_text_encoder_only:
        p.append("--network_train_unet_only and --network_train_text_encoder_only both given: nothing "
                 "would train; drop one")
    p.positive("network_dim")
    if cfg.network_alpha is not None:
        logger.warning("--network_alpha %s is ignored: OFT/BOFT have no alpha; set a constraint with "
                       "--network_args constraint=...", cfg.network_alpha)
    p.in_range("network_dropout", 0.0, 1.0, hi_open=True)
    try:
        for note in cfg.network_options().notes:
            logger.warning("%s", note)
    except ConfigError as e:
        p.append(str(e))
    if cfg.network_weights and not Path(cfg.network_weights).is_file():
        p.append(f"--network_weights {cfg.network_weights!r} is not a file")


def _prior_preservation(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of prior preservation."""
    if cfg.num_class_images < 0:
        p.append(f"--num_class_images must be >= 0, got {cfg.num_class_images}")
    if cfg.num_class_images > 0 and not (cfg.class_prompt and cfg.reg_data_dir):
        p.append("--num_class_images needs --class_prompt (what to generate) and --reg_data_dir (where)")
    if cfg.prior_loss_weight != 1.0 and not cfg.reg_data_dir and not cfg.dataset_config:
        p.append(f"--prior_loss_weight {cfg.prior_loss_weight} has no effect without regularization images "
                 "(--reg_data_dir)")


def _saving_and_sampling(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of saving and sampling."""
    for name in ("save_every_n_steps", "save_every_n_epochs", "save_last_n_steps", "save_last_n_epochs",
                 "sample_every_n_steps", "sample_every_n_epochs"):
        p.positive(name)
    if cfg.save_last_n_steps and not cfg.save_every_n_steps:
        p.append("--save_last_n_steps needs --save_every_n_steps (there are no step saves to prune)")
    if cfg.save_last_n_epochs and not (cfg.save_every_n_epochs or cfg.save_n_epoch_ratio):
        p.append("--save_last_n_epochs needs --save_every_n_epochs (there are no epoch saves to prune)")
    if not cfg.output_name or any(c in cfg.output_name for c in "/\\"):
        p.append(f"--output_name {cfg.output_name!r} must be a plain file name; put folders in --output_dir")
    if cfg.resume and cfg.resume != "auto" and not Path(cfg.resume).is_dir():
        p.append(f"--resume {cfg.resume!r} is not a folder; give a state folder written by --save_state, or "
                 "'auto' for the newest one in --output_dir")
    wants_samples = cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_first
    if wants_samples and not cfg.sample_prompts:
        p.append("sampling is requested (--sample_every_n_* or --sample_at_first) but --sample_prompts "
                 "is not set")
    if cfg.sample_prompts and not Path(cfg.sample_prompts).is_file():
        p.append(f"--sample_prompts {cfg.sample_prompts!r} is not a file")
    thumbnail = cfg.metadata_thumbnail
    if thumbnail and not thumbnail.startswith("data:") and not Path(thumbnail).is_file():
        p.append(f"--metadata_thumbnail {thumbnail!r} is neither an image file nor a data URL")
    if cfg.log_with and not cfg.logging_dir and cfg.log_with != "wandb":
        p.append(f"--log_with {cfg.log_with} needs --logging_dir (where tensorboard writes)")


def _states_and_start(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of state pruning, the epoch save ratio, the end-of-training state and the starting step."""
    for name in ("save_n_epoch_ratio", "save_last_n_steps_state", "save_last_n_epochs_state", "initial_epoch"):
        p.positive(name)
    if cfg.save_last_n_steps_state and not (cfg.save_every_n_steps and cfg.save_state):
        p.append("--save_last_n_steps_state needs --save_every_n_steps and --save_state (there are no step states "
                 "to prune)")
    if cfg.save_last_n_epochs_state and not ((cfg.save_every_n_epochs or cfg.save_n_epoch_ratio) and cfg.save_state):
        p.append("--save_last_n_epochs_state needs --save_every_n_epochs (or --save_n_epoch_ratio) and --save_state "
                 "(there are no epoch states to prune)")
    if cfg.save_n_epoch_ratio and cfg.save_every_n_epochs:
        logger.info("--save_n_epoch_ratio %d replaces --save_every_n_epochs %d (kohya's rule)", cfg.save_n_epoch_ratio,
                    cfg.save_every_n_epochs)
    if cfg.initial_step is not None and cfg.initial_step < 0:
        p.append(f"--initial_step must be >= 0 (0 = the first step), got {cfg.initial_step}")
    elif cfg.initial_step is not None and not cfg.max_train_epochs and cfg.initial_step >= cfg.max_train_steps:
        p.append(f"--initial_step {cfg.initial_step} leaves nothing to train: --max_train_steps is "
                 f"{cfg.max_train_steps} (it counts the skipped steps too); raise it")
    if cfg.skip_until_initial_step and cfg.initial_step is None and cfg.initial_epoch is None:
        logger.warning("--skip_until_initial_step has no effect without --initial_step or --initial_epoch (--resume "
                       "always continues with the data of the next step)")


def _start_files(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of the adapter files a run starts from (--base_weights, --dim_from_weights)."""
    for path in cfg.base_weights:
        if not Path(path).is_file():
            p.append(f"--base_weights {path!r} is not a file")
    multipliers = cfg.base_weights_multiplier or []
    if len(multipliers) > len(cfg.base_weights):
        logger.warning("--base_weights_multiplier has %d values for %d --base_weights file(s); the extra ones are "
                       "ignored", len(multipliers), len(cfg.base_weights))
    if cfg.dim_from_weights and not cfg.network_weights:
        p.append("--dim_from_weights reads the network from --network_weights; give the adapter file")


def _logging(cfg: TrainConfig, p: _Problems) -> None:
    """Rules of trackers and the console log."""
    if cfg.log_with is None and cfg.logging_dir is None:
        _warn_unused(cfg, ("log_prefix", "log_tracker_name", "log_tracker_config", "wandb_run_name", "log_config"),
                     "no tracker (set --logging_dir or --log_with)")
    else:
        if not cfg.logging_dir:
            _warn_unused(cfg, ("log_prefix",), "no --logging_dir")
        if cfg.log_with not in ("wandb", "all"):
            _warn_unused(cfg, ("wandb_run_name",), f"--log_with {cfg.log_with or 'tensorboard'}")
    if cfg.log_tracker_config:
        try:
            read_tracker_config(cfg.log_tracker_config)
        except ConfigError as e:
            p.append(str(e))
    if cfg.console_log_file and not Path(cfg.console_log_file).resolve().parent.is_dir():
        p.append(f"--console_log_file {cfg.console_log_file!r}: its folder does not exist; create it or choose "
                 "another file")


def validate(cfg: TrainConfig) -> None:
    """Check the rules that involve several flags or the file system; raise one `ConfigError`
    listing every problem, so a user fixes a config in one go."""
    p = _Problems(cfg)
    _model(cfg, p)
    _model_family(cfg, p)
    _data_source(cfg, p)
    _buckets_and_sizes(cfg, p)
    _captions(cfg, p)
    _caching(cfg, p)
    _memory_and_speed(cfg, p)
    _steps_and_batches(cfg, p)
    _precision(cfg, p)
    _optimizer_and_schedule(cfg, p)
    _loss(cfg, p)
    _noise(cfg, p)
    _masked_loss(cfg, p)
    _validation(cfg, p)
    _network(cfg, p)
    _prior_preservation(cfg, p)
    _saving_and_sampling(cfg, p)
    _states_and_start(cfg, p)
    _start_files(cfg, p)
    _logging(cfg, p)
    # The dataset TOML is checked now too, so its typos surface before any model loads.
    if cfg.dataset_config and not p:
        try:
            datasets_from_config(cfg)
        except ConfigError as e:
            p.append(str(e))

    if p:
        head = "1 problem" if len(p) == 1 else f"{len(p)} problems"
        raise ConfigError(f"{head} in the training configuration:\n" + "\n".join(f"  - {m}" for m in p))
