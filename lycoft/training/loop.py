"""The training recipe, top to bottom: check, load, adapt, train, save.

`train(cfg)` is the whole run (the CLI `train_network.py` is `main()` around it), one function per step:

1. `resolve_resume`: ``--resume auto`` to the newest state folder, and the seed settled (a resumed run's
   own unless ``--seed`` is given, else one drawn now, so that the saved config records it);
2. `accelerator_for`: accelerate for this run (trackers checked, processes, mixed precision), reset after it;
3. `check_before_model`: checks that need no model: flags (done by `parse_args`), the model files' headers
   (`models.check_model_files`), optimizer import, the ``--network_weights`` file, prompts, the dataset
   itself (folders, unreadable images, empty sets), so mistakes surface in seconds;
4. `load_base_model`: the base model (`models.load_models`) with any ``--base_weights`` merged in, class
   images for prior preservation if missing, the dataset and prompts again where their defaults depend on
   the model's family;
5. `build_adapter`: the adapter network (`build_network`: `lycoft.inject`, or the network a
   ``--network_weights`` file describes with ``--dim_from_weights``) and the text conditioner;
6. `fill_caches`: latent and text-embedding caches; `place_adapter`: gradient checkpointing, float8 base,
   dtype, device, compilation;
7. `plan_steps`: this rank's batches of an epoch, and the optimizer steps per epoch and in all;
8. `prepare_training`: parameter groups, the optimizer and the accelerate wrapping (`AdaptedDenoiser`);
9. `resume_state`: the counters and accelerate checkpoint of ``--resume`` (or a fresh start at
   ``--initial_step``/``--initial_epoch``); then the LR schedule at that step;
10. `open_outputs`: the saver and the run's metadata, the output folder and its config file, trackers;
11. `train_epochs` (`step.py`): per optimizer step, `gradient_accumulation_steps` micro-batches of this
    rank's share of the epoch; loss, backward, clip, step; logging, sampling and saving at their intervals;
12. `finish`: the final adapter (and state), and a check that every process ends with the same adapter.

Reproducibility: data order and augmentation are functions of (seed, epoch, slot) (`dataset.py`,
`sampler.py`); noise, timesteps, VAE posterior samples and adapter dropout are drawn from generators
seeded by (seed, step, micro-batch, rank) (`step.step_seed`). Nothing depends on RNG state carried between
steps, so a resumed run continues with exactly the draws of the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from lycoft.checkpoints.families import family_info
from lycoft.network import Network, inject
from lycoft.training import models as base_model
from lycoft.training import tracking
from lycoft.training.caching import LatentCache, TextEmbeddingCache, weights_fingerprint
from lycoft.training.conditioning import TextConditioner
from lycoft.training.config import parse_args
from lycoft.training.config_files import save_config_toml
from lycoft.training.dataset import TrainingDataset, build_dataset
from lycoft.training.errors import USER_ERRORS, ConfigError
from lycoft.training.flags import TrainConfig
from lycoft.training.fp8_base import store_base_in_float8
from lycoft.training.metadata import step_metadata, training_metadata
from lycoft.training.optimizers import build_optimizer, resolve_optimizer, set_train_mode
from lycoft.training.prior import generate_class_images, missing_class_images
from lycoft.training.sampler import derive_seed
from lycoft.training.sampling import SamplePrompt, make_sampler, read_prompt_file
from lycoft.training.saving import SaveError, Saver, TrainState, load_state, newest_state
from lycoft.training.schedulers import build_lr_scheduler, resolve_lr_scheduler
from lycoft.training.start_weights import check_start_files, merge_base_weights, network_from_weights
from lycoft.training.step import (
    AdaptedDenoiser,
    EpochBatches,
    NonFiniteLossError,
    Run,
    StepPlan,
    sample,
    save,
    step_seed,
    train_epochs,
)
from lycoft.training.warm_start import load_network_weights, read_network_weights

__all__ = ["NonFiniteLossError", "TrainResult", "build_network", "check_before_model", "main", "step_seed", "train"]

logger = logging.getLogger("lycoft.train")


@dataclass
class TrainResult:
    """What a run produced. ``adapter`` is None on processes other than the main one."""

    adapter: Path | None
    state: Any  # saving.TrainState
    losses: list[float]  # per optimizer step, mean over processes
    output_dir: Path
    files: list[Path] = field(default_factory=list)
    learning_rates: list[tuple[float, ...]] = field(default_factory=list)  # per optimizer step, per param group
    skipped_images: int = 0
    network: Any = None
    models: Any = None
    validation_losses: list[tuple[int, str, float]] = field(default_factory=list)  # (step, "step"/"epoch", loss)


# ------------------------------------------------------------------------------------------ helpers
def _reset_accelerate() -> None:
    """Let the next `train` call in this process choose its own precision (notebooks, demo, tests)."""
    AcceleratorState._reset_state()
    GradientState._reset_state()


def _patch_scaler_for_fp16_params(accelerator: Any) -> None:
    """--full_fp16 keeps the adapter itself in fp16; torch's GradScaler refuses to unscale fp16
    gradients unless told it may (what kohya does too)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


def build_network(cfg: TrainConfig, models: Any):
    """Inject fresh adapters as `cfg` says (`--network_args`, `--network_train_*_only`), or build the network
    of the ``--network_weights`` file with ``--dim_from_weights``."""
    if cfg.dim_from_weights:
        return network_from_weights(cfg, models)
    try:
        network = inject(
            unet=None if cfg.network_train_text_encoder_only else models.unet,
            text_encoders=[] if cfg.network_train_unet_only else models.text_encoders,
            family=models.family,
            **cfg.network_options().inject_kwargs(),
        )
    except ValueError as e:
        raise ConfigError(f"network_args: {e}") from None
    if cfg.network_weights:
        load_network_weights(network, cfg.network_weights, cfg.pretrained_model_name_or_path)
    return network


def _max_rank_difference(accelerator: Any, network: nn.Module) -> float:
    """Largest difference between any process's adapter parameters and the main process's (collective)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in network.parameters()])
    every = accelerator.gather(flat.unsqueeze(0))
    return float((every - every[:1]).abs().max())


def _trains_text(network: Network) -> bool:
    """Whether the adapter has text-encoder modules (they then need gradients through the encoders)."""
    return any(c.startswith("te") for c in network.components.values())


# ------------------------------------------------------------------------------------------ recipe
def train(cfg: TrainConfig) -> TrainResult:
    """Run the training `cfg` describes: the steps of the module docstring, in order."""
    cfg = resolve_resume(cfg)
    with accelerator_for(cfg) as accelerator:
        started_at = time.time()
        family_guess = base_model.check_model_files(cfg)
        dataset, prompts = check_before_model(cfg, family_guess)
        models, dataset, prompts = load_base_model(cfg, accelerator, dataset, prompts, family_guess)
        network, conditioner = build_adapter(cfg, accelerator, models)
        train_text = _trains_text(network)
        text_cache = fill_caches(cfg, accelerator, dataset, models, conditioner, train_text)
        place_adapter(cfg, accelerator, models, network, train_text)
        batches, steps = plan_steps(cfg, accelerator, dataset)
        cfg = cfg.replace(save_every_n_epochs=cfg.epoch_save_interval(steps.epochs))  # --save_n_epoch_ratio
        model, optimizer, base_lrs = prepare_training(cfg, accelerator, models, network, conditioner, train_text)
        state = resume_state(cfg, accelerator, steps, model, optimizer)
        # Not checkpointed (accelerate would pickle it and unpickle it with code execution allowed): the
        # schedule is a function of the step count, so it is built at the resumed step from this run's rates.
        lr_scheduler = build_lr_scheduler(cfg, optimizer, steps.total, base_lrs=base_lrs, step=state.global_step)
        saver = open_outputs(cfg, accelerator, dataset, models, steps, started_at)
        run = Run(cfg=cfg, accelerator=accelerator, models=models, dataset=dataset, prompts=prompts,
                  network=network, conditioner=conditioner, text_cache=text_cache, model=model,
                  optimizer=optimizer, lr_scheduler=lr_scheduler, batches=batches, steps=steps, state=state,
                  saver=saver)
        train_epochs(run)
        return finish(run)


# 1. ---------------------------------------------------------------------------------------------------
def resolve_resume(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with ``--resume auto`` resolved and a concrete seed: a resumed run's own unless ``--seed`` is
    given, else one drawn now."""
    if cfg.resume == "auto":
        cfg = _resolve_auto_resume(cfg)
    if cfg.resume and cfg.seed is None:
        cfg = cfg.replace(seed=TrainState.read(cfg.resume).seed)  # continue the interrupted run's draws
    return cfg.with_resolved_seed()


def _resolve_auto_resume(cfg: TrainConfig) -> TrainConfig:
    """``--resume auto``: the newest state folder of this ``--output_name`` in ``--output_dir``, or a fresh
    start when there is none (what a crash-restart loop wants). Every rank looks at the same folder before
    anything is written to it, so all agree."""
    found = newest_state(cfg.output_dir, cfg.output_name)
    if found is None:
        logger.info("--resume auto: no training state of %r in %s; starting from scratch", cfg.output_name,
                    cfg.output_dir)
        return cfg.replace(resume=None)
    folder, state = found
    logger.info("--resume auto: the newest training state is %s (step %d)", folder, state.global_step)
    return cfg.replace(resume=str(folder))


# 2. ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def accelerator_for(cfg: TrainConfig) -> Iterator[Accelerator]:
    """The run's `Accelerator` (``--log_with`` trackers checked first); ended and reset when the run ends."""
    tracker_names = tracking.trackers(cfg)
    try:
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cfg.cpu,
            log_with=tracker_names or None,
            project_dir=tracking.log_dir(cfg),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
    except ValueError as e:
        raise ConfigError(f"--mixed_precision {cfg.mixed_precision} cannot run here: {e}") from None
    try:
        yield accelerator
    finally:
        accelerator.end_training()
        _reset_accelerate()


# 3. ---------------------------------------------------------------------------------------------------
def check_before_model(cfg: TrainConfig, family: str | None):
    """Everything that can be checked without loading weights; returns (dataset or None, prompts)."""
    resolve_optimizer(cfg.optimizer_type)
    resolve_lr_scheduler(cfg)
    if cfg.network_weights:
        read_network_weights(cfg.network_weights, family, cfg.pretrained_model_name_or_path)
    prompts = []
    if cfg.sample_prompts:
        w, h = cfg.resolved_resolution(family)
        prompts = read_prompt_file(cfg.sample_prompts, width=w, height=h)
    dataset = None
    if not missing_class_images(cfg):
        dataset = build_dataset(cfg, family=family, seed=cfg.seed)
    check_start_files(cfg)
    return dataset, prompts


# 4. ---------------------------------------------------------------------------------------------------
def load_base_model(cfg: TrainConfig, accelerator: Accelerator, dataset: TrainingDataset | None,
                    prompts: list[SamplePrompt], family_guess: str | None,
                    ) -> tuple[base_model.Models, TrainingDataset, list[SamplePrompt]]:
    """The base model, then what waited for its family: missing class images generated, the dataset and
    the prompts rebuilt where their default size depends on it, the sampler checked."""
    models = base_model.load_models(cfg, accelerator.device)
    merge_base_weights(cfg, models)
    family = models.family
    if dataset is None:  # class images were missing
        generate_class_images(cfg, models.pipe, accelerator, family=family, seed=cfg.seed)
        dataset = build_dataset(cfg, family=family, seed=cfg.seed)
    elif family_guess != family and cfg.resolution is None:
        dataset = build_dataset(cfg, family=family, seed=cfg.seed)  # default resolution depends on the family
    if prompts and family_guess != family:
        prompts = read_prompt_file(cfg.sample_prompts, width=cfg.resolved_resolution(family)[0],
                                   height=cfg.resolved_resolution(family)[1])
    if prompts:
        make_sampler(cfg.sample_sampler, models.pipe.scheduler.config)
    if accelerator.is_main_process:
        logger.info("dataset: %s", dataset.summary())
        if dataset.num_skipped:
            logger.warning("%d unreadable image(s) skipped: %s", dataset.num_skipped,
                           ", ".join(str(p) for p, _ in dataset.skipped_images[:5]))
    return models, dataset, prompts


# 5. ---------------------------------------------------------------------------------------------------
def build_adapter(cfg: TrainConfig, accelerator: Accelerator, models: base_model.Models,
                  ) -> tuple[Network, TextConditioner]:
    """The adapter network injected into the base model, and the text conditioner the loop encodes with."""
    network = build_network(cfg, models)
    if accelerator.is_main_process:
        logger.info("adapter: %s", network.summary())
    conditioner = TextConditioner(models.family, models.text_encoders, models.tokenizers, clip_skip=cfg.clip_skip,
                                  max_token_length=cfg.max_token_length)
    return network, conditioner


# 6. ---------------------------------------------------------------------------------------------------
def fill_caches(cfg: TrainConfig, accelerator: Accelerator, dataset: TrainingDataset, models: base_model.Models,
                conditioner: TextConditioner, train_text: bool) -> TextEmbeddingCache | None:
    """Encode latents (``--cache_latents[_to_disk]``) and text (``--cache_text_encoder_outputs[_to_disk]``)
    once; returns the text cache or None. The main process fills a disk cache first, the others reuse it.
    Without ``--highvram`` the GPU's cached memory is released after every VAE batch."""
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        cache = LatentCache(functools.partial(_latent_means, models, accelerator.device),
                            to_disk=cfg.cache_latents_to_disk)
        release = None if cfg.highvram else lambda done, total: base_model.release_cached_memory(accelerator.device)
        with accelerator.main_process_first():
            encoded = dataset.cache_latents(cache, batch_size=cfg.vae_batch_size, progress=release)
        if accelerator.is_main_process:
            logger.info("latent cache: %d image(s) encoded, %d reused", encoded,
                        len(dataset.latent_requests()) - encoded)
    if not (cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk):
        return None
    if train_text:
        raise ConfigError("--cache_text_encoder_outputs needs frozen text encoders, but the adapter has "
                          "text-encoder modules; add --network_train_unet_only")
    namespace = f"{conditioner.namespace()}/weights={weights_fingerprint(models.text_encoders)}"
    text_cache = TextEmbeddingCache(conditioner.as_tuple, to_disk=cfg.cache_text_encoder_outputs_to_disk,
                                    namespace=namespace)
    pairs = dataset.fixed_caption_images()
    batch_size = cfg.text_encoder_batch_size or max(ds.batch_size for ds in dataset.datasets)
    with torch.no_grad(), accelerator.autocast(), accelerator.main_process_first():
        encoded = text_cache.fill([c for c, _ in pairs], batch_size=batch_size, images=[i for _, i in pairs])
    if accelerator.is_main_process:
        logger.info("text-encoder cache: %d caption(s) encoded, %d reused", encoded,
                    len({c for c, _ in pairs}) - encoded)
    return text_cache


def _latent_means(models: base_model.Models, device: torch.device, pixels: torch.Tensor) -> torch.Tensor:
    """Cached latents are the posterior's mean, not a sample: a cache must be a function of the image alone."""
    dist = models.vae.encode(pixels.to(device, models.vae_dtype)).latent_dist
    return ((dist.mode().float() - models.latent_shift) * models.latent_scale).cpu()


def place_adapter(cfg: TrainConfig, accelerator: Accelerator, models: base_model.Models, network: Network,
                  train_text: bool) -> None:
    """Gradient checkpointing (``--gradient_checkpointing``), float8 base weights (``--fp8_base[_unet]``),
    the adapter's dtype (``--full_fp16/bf16``) and device, training mode, a compiled UNet (``--torch_compile``)."""
    if cfg.gradient_checkpointing:
        base_model.enable_gradient_checkpointing(models, text_encoders=train_text)
    if cfg.fp8_base or cfg.fp8_base_unet:  # after the caches, which encode with the full-precision models
        store_base_in_float8(models.unet, [] if cfg.fp8_base_unet else models.text_encoders, network)
    if cfg.full_fp16 or cfg.full_bf16:
        network.to(torch.float16 if cfg.full_fp16 else torch.bfloat16)
    network.to(accelerator.device)
    network.train()
    if cfg.torch_compile:
        base_model.compile_unet(models, cfg.dynamo_backend)


# 7. ---------------------------------------------------------------------------------------------------
def plan_steps(cfg: TrainConfig, accelerator: Accelerator, dataset: TrainingDataset,
               ) -> tuple[EpochBatches, StepPlan]:
    """This rank's batches of each epoch, and how many optimizer steps they make (``--max_train_epochs``
    counts whole epochs, else ``--max_train_steps``)."""
    batches = EpochBatches(dataset.batch_sampler(seed=cfg.seed), accelerator.process_index,
                           accelerator.num_processes)
    per_epoch = math.ceil(batches.per_rank / cfg.gradient_accumulation_steps)
    total = cfg.max_train_epochs * per_epoch if cfg.max_train_epochs else cfg.max_train_steps
    if accelerator.is_main_process:
        if cfg.max_train_epochs and cfg.max_train_steps != TrainConfig.max_train_steps:
            logger.info("--max_train_epochs %d (%d steps) is used, not --max_train_steps %d (kohya's rule: "
                        "epochs win)", cfg.max_train_epochs, total, cfg.max_train_steps)
        if cfg.lr_scheduler != "constant" and cfg.warmup_steps(total) > total:
            logger.warning("--lr_warmup_steps %s is %d steps, longer than the whole run (%d): the learning rate "
                           "never reaches --learning_rate", cfg.lr_warmup_steps, cfg.warmup_steps(total), total)
    return batches, StepPlan(per_epoch=per_epoch, total=total, epochs=math.ceil(total / per_epoch))


# 8. ---------------------------------------------------------------------------------------------------
def prepare_training(cfg: TrainConfig, accelerator: Accelerator, models: base_model.Models, network: Network,
                     conditioner: TextConditioner, train_text: bool,
                     ) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
    """The optimizer over the adapter's parameter groups (``--unet_lr``, ``--text_encoder_lr``) and the
    denoiser, both prepared by accelerate; returns them and each group's learning rate."""
    te_lrs = cfg.text_encoder_lrs(len(models.text_encoders))
    groups = network.parameter_groups(
        {"unet": cfg.unet_lr, **{f"te{i + 1}": lr for i, lr in enumerate(te_lrs)}}, cfg.learning_rate)
    optimizer = build_optimizer(cfg, groups)
    model = AdaptedDenoiser(network, models.unet, conditioner, train_text=train_text,
                            family=family_info(models.family))
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.full_fp16:
        _patch_scaler_for_fp16_params(accelerator)
    # Read before a resumed optimizer state replaces them with the rates of the step it was saved at.
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    return model, optimizer, base_lrs


# 9. ---------------------------------------------------------------------------------------------------
def resume_state(cfg: TrainConfig, accelerator: Accelerator, steps: StepPlan, model: nn.Module,
                 optimizer: torch.optim.Optimizer) -> TrainState:
    """The step counters: fresh (at ``--initial_step``/``--initial_epoch`` if given), or those of ``--resume``
    with its checkpoint loaded into the adapter, the optimizer and the RNGs."""
    world = accelerator.num_processes
    start = cfg.start_step(steps.per_epoch)
    if not cfg.resume:
        return initial_state(cfg, start, steps, world) if start else TrainState(seed=cfg.seed, num_processes=world)
    if start is not None and accelerator.is_main_process:
        logger.warning("--initial_step/--initial_epoch ignored: --resume %s continues its own step count, so that "
                       "the run goes on exactly as it would have", cfg.resume)
    state = load_state(accelerator, cfg.resume, num_processes=world, model=accelerator.unwrap_model(model),
                       optimizer=optimizer)
    if state.seed != cfg.seed:
        logger.warning("--seed %d differs from the resumed run's seed %d: the remaining steps draw "
                       "different noise and data order than the interrupted run would have", cfg.seed, state.seed)
        state.seed = cfg.seed
    if accelerator.is_main_process:
        logger.info("resumed from %s at step %d (epoch %d, step %d of it)", cfg.resume, state.global_step,
                    state.epoch, state.step_in_epoch)
    return state


def initial_state(cfg: TrainConfig, start: int, steps: StepPlan, world: int) -> TrainState:
    """A fresh run's counters at step `start` (``--initial_step``, or ``--initial_epoch``'s first step): the
    steps before it count as done. The data starts at the beginning of that step's epoch, or with
    ``--skip_until_initial_step`` at the batch that step would have had."""
    if start >= steps.total:
        given = f"--initial_step {cfg.initial_step}" if cfg.initial_step is not None else \
            f"--initial_epoch {cfg.initial_epoch} (step {start})"
        raise ConfigError(f"{given} leaves nothing to train: the run has {steps.total} steps (they count the "
                          "skipped ones too); raise --max_train_steps or --max_train_epochs")
    epoch, in_epoch = divmod(start, steps.per_epoch)
    state = TrainState(global_step=start, epoch=epoch, step_in_epoch=in_epoch if cfg.skip_until_initial_step else 0,
                       seed=cfg.seed, num_processes=world)
    logger.info("starting at step %d of %d (epoch %d, %s)", start + 1, steps.total, epoch + 1,
                f"skipping the data of the first {in_epoch} step(s) of that epoch" if state.step_in_epoch
                else "its data from the beginning")
    return state


# 10. --------------------------------------------------------------------------------------------------
def open_outputs(cfg: TrainConfig, accelerator: Accelerator, dataset: TrainingDataset, models: base_model.Models,
                 steps: StepPlan, started_at: float) -> Saver:
    """The saver (with the run's metadata), the output folder with the run's config file, the trackers."""
    output_dir, world = Path(cfg.output_dir), accelerator.num_processes
    base_md = training_metadata(cfg, dataset=dataset, family=models.family, num_processes=world,
                                batches_per_epoch=len(dataset.batch_sampler()), num_epochs=steps.epochs,
                                total_steps=steps.total, started_at=started_at,
                                session_id=derive_seed(cfg.seed, 3) % 2**31)
    saver = Saver(accelerator, output_dir, cfg.output_name,
                  metadata=lambda step, epoch: step_metadata(base_md, step=step, epoch=epoch),
                  save_precision=cfg.save_precision, v_prediction=models.v_prediction,
                  keep_last_steps=cfg.save_last_n_steps, keep_last_epochs=cfg.save_last_n_epochs,
                  keep_last_steps_state=cfg.save_last_n_steps_state,
                  keep_last_epochs_state=cfg.save_last_n_epochs_state)
    if cfg.resume:
        saver.last_state = Path(cfg.resume)
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_config_toml(cfg, output_dir / f"{cfg.output_name}-config.toml")
            saver.remove_stale()
        except OSError as e:  # a read-only or full --output_dir: say so before any training
            raise ConfigError(f"cannot write to --output_dir {output_dir} ({e.strerror or e}); "
                              "choose a writable folder with free space") from None
        logger.info("training %d steps (%d epoch(s) of %d steps; %d process(es) x batch %s x accumulation %d)",
                    steps.total, steps.epochs, steps.per_epoch, world,
                    "/".join(str(ds.batch_size) for ds in dataset.datasets), cfg.gradient_accumulation_steps)
    if accelerator.log_with:
        tracking.init_trackers(accelerator, cfg)
    return saver


# 12. --------------------------------------------------------------------------------------------------
def finish(run: Run) -> TrainResult:
    """The final adapter (and state) saved, samples of the last step (when sampling is on and the last
    step has none yet), every process's adapter compared with the main one's."""
    cfg, state, world = run.cfg, run.state, run.accelerator.num_processes
    save(run, cfg.output_name, with_state=cfg.save_state or cfg.save_state_on_train_end)
    sampling = cfg.sample_every_n_steps or cfg.sample_every_n_epochs
    if run.prompts and sampling and run.last_sample_step != state.global_step:
        sample(run, f"{state.global_step:06d}")
    set_train_mode(run.optimizer, False)  # the network returned holds what was saved (schedule-free: the average)
    adapter = run.output_dir / f"{cfg.output_name}.safetensors" if run.main else None
    if world > 1:
        diff = _max_rank_difference(run.accelerator, run.network)
        if run.main:
            (logger.info if diff == 0 else logger.warning)(
                "adapter parameters on all %d processes: max difference %.3g", world, diff)
    if state.nonfinite_skipped and run.main:
        logger.warning("%d step(s) were skipped for a non-finite loss", state.nonfinite_skipped)
    if run.main:
        logger.info("done: %d step(s), %d epoch(s); adapter %s", state.global_step, state.epoch, adapter)
    return TrainResult(adapter=adapter, state=state, losses=run.losses, learning_rates=run.learning_rates,
                       output_dir=run.output_dir,
                       files=list(run.saver.written), skipped_images=run.dataset.num_skipped, network=run.network,
                       models=run.models, validation_losses=run.validation_losses)


# --------------------------------------------------------------------------------------------- CLI
def _setup_logging(main_process: bool, cfg: TrainConfig | None = None) -> None:
    """The console log: INFO on the main process, WARNING on the others. Called again once the flags are
    read, to follow ``--console_log_level`` (other processes stay at WARNING or above), ``--console_log_file``
    (the main process logs into it instead of the console) and ``--console_log_simple`` (messages only)."""
    level, fmt, handlers = (logging.INFO if main_process else logging.WARNING), None, None
    if cfg is not None:
        if not (cfg.console_log_level or cfg.console_log_file or cfg.console_log_simple):
            return
        if cfg.console_log_level:
            chosen = getattr(logging, cfg.console_log_level)
            level = chosen if main_process else max(chosen, logging.WARNING)
        fmt = "%(message)s" if cfg.console_log_simple else None
        if cfg.console_log_file and main_process:
            try:
                handlers = [logging.FileHandler(cfg.console_log_file, mode="w", encoding="utf-8")]
            except OSError as e:
                raise ConfigError(f"--console_log_file {cfg.console_log_file}: cannot be written ({e.strerror or e}); "
                                  "choose another file") from None
    logging.basicConfig(level=level, format=fmt or "%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=cfg is not None)
    for noisy in ("transformers", "diffusers", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """``train_network.py``; returns the exit code: 0 done, 1 an internal error (a bug: its traceback is
    printed), 2 a user error (one message naming the value or file and the fix), 3 a non-finite loss
    stopped training, 4 a save failed (disk full, read-only output), 130 interrupted (Ctrl-C)."""
    main_process = os.environ.get("RANK", "0") == "0"
    _setup_logging(main_process)
    cfg = None
    try:
        cfg = parse_args(argv)
        _setup_logging(main_process, cfg)
        train(cfg)
    except (*USER_ERRORS, NonFiniteLossError, SaveError) as e:
        if main_process:  # every rank hits the same error; one copy is enough ...
            print(f"error: {e}", file=sys.stderr)
        elif isinstance(e, SaveError):  # ... except a failed save, whose cause only the failing rank knows
            print(f"error (process {os.environ.get('RANK')}): {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLossError) else 4 if isinstance(e, SaveError) else 2
    except KeyboardInterrupt:
        if main_process:
            print(f"\ninterrupted: {_resume_hint(cfg)}", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("error: internal error, a bug in lycoft rather than in your settings or files; please report it "
              "with the traceback above", file=sys.stderr)
        return 1
    return 0


def _resume_hint(cfg: TrainConfig | None) -> str:
    """Where the newest training state of this run's output name is, and how to continue from it."""
    if cfg is None:
        return "nothing was trained"
    found = newest_state(cfg.output_dir, cfg.output_name)
    if found is None:
        return (f"no training state of {cfg.output_name!r} is in {cfg.output_dir}, so the next run starts from "
                "scratch (--save_state with --save_every_n_steps keeps states to resume from)")
    folder, state = found
    return (f"the newest training state is {folder} (step {state.global_step}); continue with --resume auto "
            f"(or --resume {folder})")
