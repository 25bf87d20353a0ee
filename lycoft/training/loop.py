"""The training recipe, top to bottom: check, load, adapt, train, save.

`train(cfg)` is the whole run (the CLI `train_network.py` is `main()` around it):

1. checks that need no model: flags (done by `parse_args`), optimizer import, trackers, prompts, the
   dataset itself (folders, unreadable images, empty sets), so mistakes surface in seconds;
2. the base model (`models.load_models`), class images for prior preservation if missing, caches;
3. the adapter network (`lycoft.inject`) and its optimizer, LR schedule and accelerate wrapping;
4. the loop: per optimizer step, `gradient_accumulation_steps` micro-batches of this rank's share of
   the epoch; loss, backward, clip, step; logging, sampling and saving at their intervals;
5. the final adapter (and state), and a check that every process ends with the same adapter.

Reproducibility: data order and augmentation are functions of (seed, epoch, slot) (`dataset.py`,
`sampler.py`); noise, timesteps, VAE posterior samples and adapter dropout are drawn from generators
seeded by (seed, step, micro-batch, rank). Nothing depends on RNG state carried between steps, so a
resumed run continues with exactly the draws of the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig
from lycoft.training.sampler import derive_seed

logger = logging.getLogger("lycoft.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the state before that step was saved (see the message)."""


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


# ------------------------------------------------------------------------------------------ helpers
class EpochBatches:
    """`DataLoader` batch sampler: this rank's batches of one epoch, from a given position.

    Batch ``i`` of the epoch goes to rank ``i % world``; the epoch is padded with its first batches
    so every rank gets the same count (what accelerate does), which keeps collective calls in step.
    """

    def __init__(self, sampler: Any, rank: int, world: int) -> None:
        self.sampler, self.rank, self.world = sampler, rank, world
        self.epoch, self.skip = 0, 0

    @property
    def per_rank(self) -> int:
        return math.ceil(len(self.sampler) / self.world)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _mine(self) -> list:
        self.sampler.set_epoch(self.epoch)
        batches = list(self.sampler)
        need = self.per_rank * self.world
        while len(batches) < need:
            batches += batches[: need - len(batches)]
        return batches[self.rank::self.world]

    def __iter__(self) -> Iterator:
        return iter(self._mine()[self.skip:])

    def __len__(self) -> int:
        return self.per_rank - self.skip


class AdaptedDenoiser(nn.Module):
    """The module accelerate prepares (and DDP wraps): it owns only the adapter network's parameters;
    the frozen UNet and text encoders are referenced, not registered, so they are neither broadcast
    nor checkpointed. Its forward is the whole conditioned UNet call."""

    def __init__(self, network: nn.Module, unet: nn.Module, conditioner: Any, *, train_text: bool,
                 sdxl: bool) -> None:
        super().__init__()
        self.network = network
        self.__dict__["_unet"] = unet
        self.__dict__["_conditioner"] = conditioner
        self.train_text = train_text
        self.sdxl = sdxl

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: Sequence[str],
                cached_text: tuple[torch.Tensor, ...] | None, time_ids: torch.Tensor | None) -> torch.Tensor:
        unet = self.__dict__["_unet"]
        if cached_text is not None:
            hidden = cached_text[0]
            pooled = cached_text[1] if len(cached_text) > 1 else None
        else:
            grad = contextlib.nullcontext() if self.train_text else torch.no_grad()
            with grad:
                text = self.__dict__["_conditioner"].encode(captions)
            hidden, pooled = text.hidden, text.pooled
        dtype = unet.dtype
        added = None
        if self.sdxl:
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        return unet(noisy.to(dtype), timesteps, encoder_hidden_states=hidden.to(dtype),
                    added_cond_kwargs=added).sample


def step_seed(seed: int, kind: int, step: int, micro: int, rank: int) -> int:
    return derive_seed(seed, kind, step, micro, rank) % 2**63


def _make_accelerator(cfg: TrainConfig, tracker_names: list[str]):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    try:
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cfg.cpu,
            log_with=tracker_names or None,
            project_dir=cfg.logging_dir,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
    except ValueError as e:
        raise ConfigError(f"--mixed_precision {cfg.mixed_precision} cannot run here: {e}") from None


def _reset_accelerate() -> None:
    """Let the next `train` call in this process choose its own precision (notebooks, demo, tests)."""
    from accelerate.state import AcceleratorState, GradientState

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
    """Inject fresh adapters as `cfg` says (`--network_args`, `--network_train_*_only`)."""
    import lycoft

    try:
        network = lycoft.inject(
            unet=None if cfg.network_train_text_encoder_only else models.unet,
            text_encoders=[] if cfg.network_train_unet_only else models.text_encoders,
            family=models.family,
            **cfg.network_options().inject_kwargs(),
        )
    except ValueError as e:
        raise ConfigError(f"network_args: {e}") from None
    if cfg.network_weights:
        missing = network.load_file(cfg.network_weights, strict=False)
        logger.info("started from adapter weights %s%s", cfg.network_weights,
                    f" ({len(missing)} of its modules not in this network)" if missing else "")
    return network


def _hparams(cfg: TrainConfig) -> dict[str, Any]:
    out = {}
    for k, v in cfg.to_dict().items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _loss_over_processes(accelerator: Any, loss: torch.Tensor) -> tuple[bool, float]:
    """(finite on every process, mean over processes) in one collective call, so every rank takes
    the same branch when one of them sees NaN/inf."""
    every = accelerator.gather(loss.detach().float().reshape(1))
    finite = bool(torch.isfinite(every).all())
    return finite, float(every.mean()) if finite else float("nan")


def _grads_finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether every gradient is finite (one flag per tensor, then a single sync)."""
    flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


def _max_rank_difference(accelerator: Any, network: nn.Module) -> float:
    """Largest difference between any process's adapter parameters and the main process's (collective)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in network.parameters()])
    every = accelerator.gather(flat.unsqueeze(0))
    return float((every - every[:1]).abs().max())


def _fill_caches(cfg: TrainConfig, accelerator: Any, dataset: Any, models: Any, conditioner: Any,
                 train_text: bool):
    """Encode latents (``--cache_latents[_to_disk]``) and text (``--cache_text_encoder_outputs``) once;
    returns the text cache or None. The main process fills a disk cache first, the others reuse it."""
    from lycoft.training.caching import LatentCache, TextEmbeddingCache

    if cfg.cache_latents or cfg.cache_latents_to_disk:
        vae = models.vae

        def encode_latents(pixels: torch.Tensor) -> torch.Tensor:
            # The posterior's mean: a cache must be a function of the image alone.
            dist = vae.encode(pixels.to(accelerator.device, models.vae_dtype)).latent_dist
            return ((dist.mode().float() - models.latent_shift) * models.latent_scale).cpu()

        cache = LatentCache(encode_latents, to_disk=cfg.cache_latents_to_disk)
        with accelerator.main_process_first():
            encoded = dataset.cache_latents(cache, batch_size=cfg.vae_batch_size)
        if accelerator.is_main_process:
            logger.info("latent cache: %d image(s) encoded, %d reused", encoded,
                        len(dataset.latent_requests()) - encoded)
    if not cfg.cache_text_encoder_outputs:
        return None
    if train_text:
        raise ConfigError("--cache_text_encoder_outputs needs frozen text encoders, but the adapter has "
                          "text-encoder modules; add --network_train_unet_only")
    text_cache = TextEmbeddingCache(conditioner.as_tuple, namespace=conditioner.namespace())
    with torch.no_grad(), accelerator.autocast():
        text_cache.fill(dataset.fixed_captions())
    return text_cache


# --------------------------------------------------------------------------------------------- run
def check_before_model(cfg: TrainConfig, family: str | None):
    """Everything that can be checked without loading weights; returns (dataset or None, prompts)."""
    from lycoft.training.dataset import build_dataset
    from lycoft.training.optimizers import resolve_optimizer
    from lycoft.training.prior import missing_class_images
    from lycoft.training.sampling import read_prompt_file

    resolve_optimizer(cfg.optimizer_type)
    prompts = []
    if cfg.sample_prompts:
        w, h = cfg.resolved_resolution(family)
        prompts = read_prompt_file(cfg.sample_prompts, width=w, height=h)
    dataset = None
    if not missing_class_images(cfg):
        dataset = build_dataset(cfg, family=family, seed=cfg.seed)
    return dataset, prompts


def _resolve_auto_resume(cfg: TrainConfig) -> TrainConfig:
    """``--resume auto``: the newest state folder of this ``--output_name`` in ``--output_dir``, or a fresh
    start when there is none (what a crash-restart loop wants). Every rank looks at the same folder before
    anything is written to it, so all agree."""
    from lycoft.training.saving import newest_state

    found = newest_state(cfg.output_dir, cfg.output_name)
    if found is None:
        logger.info("--resume auto: no training state of %r in %s; starting from scratch", cfg.output_name,
                    cfg.output_dir)
        return cfg.replace(resume=None)
    folder, state = found
    logger.info("--resume auto: the newest training state is %s (step %d)", folder, state.global_step)
    return cfg.replace(resume=str(folder))


def train(cfg: TrainConfig) -> TrainResult:
    """Run the training `cfg` describes; see the module docstring for the order of things."""
    from lycoft.training import tracking

    if cfg.resume == "auto":
        cfg = _resolve_auto_resume(cfg)
    if cfg.resume and cfg.seed is None:
        from lycoft.training.saving import TrainState

        cfg = cfg.replace(seed=TrainState.read(cfg.resume).seed)  # continue the interrupted run's draws
    cfg = cfg.with_resolved_seed()
    tracker_names = tracking.trackers(cfg)
    accelerator = _make_accelerator(cfg, tracker_names)
    try:
        return _train(cfg, accelerator)
    finally:
        accelerator.end_training()
        _reset_accelerate()


def _train(cfg: TrainConfig, accelerator: Any) -> TrainResult:
    from tqdm.auto import tqdm

    from lycoft.training import tracking
    from lycoft.training.conditioning import TextConditioner, sdxl_time_ids
    from lycoft.training.config_files import save_config_toml
    from lycoft.training.dataset import build_dataset
    from lycoft.training.losses import diffusion_loss, target_for
    from lycoft.training.metadata import step_metadata, training_metadata
    from lycoft.training.models import enable_gradient_checkpointing, load_models, peek_family
    from lycoft.training.noise import sample_noise, sample_timesteps
    from lycoft.training.optimizers import build_optimizer
    from lycoft.training.prior import generate_class_images
    from lycoft.training.sampling import make_sampler, read_prompt_file, render, save_images
    from lycoft.training.saving import Saver, TrainState, adapter_stem, load_state
    from lycoft.training.schedulers import build_lr_scheduler

    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    seed = cfg.seed
    output_dir = Path(cfg.output_dir)
    started_at = time.time()

    # 1. checks without a model ------------------------------------------------------------------
    family_guess = peek_family(cfg.pretrained_model_name_or_path, cfg.family_override)
    dataset, prompts = check_before_model(cfg, family_guess)

    # 2. model, class images, dataset, caches ---------------------------------------------------
    models = load_models(cfg, accelerator.device)
    family = models.family
    if dataset is None:  # class images were missing
        generate_class_images(cfg, models.pipe, accelerator, family=family, seed=seed)
        dataset = build_dataset(cfg, family=family, seed=seed)
    elif family_guess != family and cfg.resolution is None:
        dataset = build_dataset(cfg, family=family, seed=seed)  # default resolution depends on the family
    if prompts and family_guess != family:
        prompts = read_prompt_file(cfg.sample_prompts, width=cfg.resolved_resolution(family)[0],
                                   height=cfg.resolved_resolution(family)[1])
    if prompts:
        make_sampler(cfg.sample_sampler, models.pipe.scheduler.config)
    if main:
        logger.info("dataset: %s", dataset.summary())
        if dataset.num_skipped:
            logger.warning("%d unreadable image(s) skipped: %s", dataset.num_skipped,
                           ", ".join(str(p) for p, _ in dataset.skipped_images[:5]))

    network = build_network(cfg, models)
    train_text = any(c.startswith("te") for c in network.components.values())
    if main:
        logger.info("adapter: %s", network.summary())
    conditioner = TextConditioner(family, models.text_encoders, models.tokenizers, clip_skip=cfg.clip_skip,
                                  max_token_length=cfg.max_token_length)

    text_cache = _fill_caches(cfg, accelerator, dataset, models, conditioner, train_text)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(models, text_encoders=train_text)
    if cfg.full_fp16 or cfg.full_bf16:
        network.to(torch.float16 if cfg.full_fp16 else torch.bfloat16)
    network.to(accelerator.device)
    network.train()

    # 3. optimizer, schedule, accelerate ---------------------------------------------------------
    te_lrs = cfg.text_encoder_lrs(len(models.text_encoders))
    groups = network.parameter_groups(
        {"unet": cfg.unet_lr, **{f"te{i + 1}": lr for i, lr in enumerate(te_lrs)}}, cfg.learning_rate)
    optimizer = build_optimizer(cfg, groups)
    batches = EpochBatches(dataset.batch_sampler(seed=seed), rank, world)
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(batches.per_rank / accum)
    if cfg.max_train_epochs:
        total_steps = cfg.max_train_epochs * steps_per_epoch
    else:
        total_steps = cfg.max_train_steps
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    model = AdaptedDenoiser(network, models.unet, conditioner, train_text=train_text, sdxl=family == "sdxl")
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.full_fp16:
        _patch_scaler_for_fp16_params(accelerator)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]

    state = TrainState(seed=seed, num_processes=world)
    if cfg.resume:
        state = load_state(accelerator, cfg.resume, num_processes=world)
        if state.seed != seed:
            logger.warning("--seed %d differs from the resumed run's seed %d: the remaining steps draw "
                           "different noise and data order than the interrupted run would have", seed, state.seed)
            state.seed = seed
        if main:
            logger.info("resumed from %s at step %d (epoch %d, step %d of it)", cfg.resume, state.global_step,
                        state.epoch, state.step_in_epoch)
    # Not checkpointed (accelerate would pickle it and unpickle it with code execution allowed): the schedule
    # is a function of the step count, so it is built at the resumed step from this run's learning rates.
    lr_scheduler = build_lr_scheduler(cfg, optimizer, total_steps, base_lrs=base_lrs, step=state.global_step)

    base_md = training_metadata(cfg, dataset=dataset, family=family, num_processes=world,
                                batches_per_epoch=len(dataset.batch_sampler()), num_epochs=num_epochs,
                                total_steps=total_steps, started_at=started_at,
                                session_id=derive_seed(seed, 3) % 2**31)
    saver = Saver(accelerator, output_dir, cfg.output_name,
                  metadata=lambda step, epoch: step_metadata(base_md, step=step, epoch=epoch),
                  save_precision=cfg.save_precision, v_prediction=models.v_prediction,
                  keep_last_steps=cfg.save_last_n_steps, keep_last_epochs=cfg.save_last_n_epochs)
    if cfg.resume:
        saver.last_state = Path(cfg.resume)
    if main:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_config_toml(cfg, output_dir / f"{cfg.output_name}-config.toml")
            saver.remove_stale()
        except OSError as e:  # a read-only or full --output_dir: say so before any training
            raise ConfigError(f"cannot write to --output_dir {output_dir} ({e.strerror or e}); "
                              "choose a writable folder with free space") from None
        logger.info("training %d steps (%d epoch(s) of %d steps; %d process(es) x batch %s x accumulation %d)",
                    total_steps, num_epochs, steps_per_epoch, world,
                    "/".join(str(ds.batch_size) for ds in dataset.datasets), accum)
    tracking_on = bool(accelerator.log_with)
    if tracking_on:
        accelerator.init_trackers(cfg.output_name, config=_hparams(cfg))

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.data_loader_workers(),
                                         persistent_workers=cfg.data_loader_workers() > 0)
    noise_scheduler = models.noise_scheduler

    def sample(tag: str) -> None:
        """Render the prompts on the main process; the others wait (a failure only warns)."""
        if main:
            network.eval()
            try:
                with accelerator.autocast():
                    images = render(models.pipe, prompts, sampler=cfg.sample_sampler, run_seed=seed,
                                    conditioner=conditioner)
                save_images(images, prompts, output_dir / "sample", cfg.output_name, tag)
            except Exception as e:  # a sampling bug must not cost the run
                logger.warning("sampling at %s failed (%s: %s); training goes on", tag, type(e).__name__, e)
            finally:
                network.train()
        accelerator.wait_for_everyone()

    def save(stem: str, with_state: bool) -> None:
        saver.save_adapter(network, stem, step=state.global_step, epoch=state.epoch)
        if with_state:
            saver.save_state(stem, state)
        if main and tracking_on:
            accelerator.log(tracking.module_logs(network), step=state.global_step)

    def stop_nonfinite(what: str, remedy: str) -> NonFiniteLossError:
        """Save the state from before this step and say where it is (the error to raise)."""
        stem = adapter_stem(cfg.output_name, step=state.global_step)
        save(stem, with_state=True)
        where = output_dir / f"{stem}-state"
        return NonFiniteLossError(
            f"{what} at step {state.global_step + 1} (epoch {state.epoch + 1}); training stopped. The state "
            f"before this step is in {where} (resume with --resume {where}). Lower --learning_rate, {remedy}, "
            "or pass --skip_nonfinite to skip such steps")

    def micro_batch_loss(batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        device = accelerator.device
        if "latents" in batch:
            latents = batch["latents"].to(device, torch.float32)
        else:
            with torch.no_grad():
                pixels = batch["pixel_values"].to(device, models.vae_dtype)
                dist = models.vae.encode(pixels).latent_dist
                latents = (dist.sample(generator=generator).float() - models.latent_shift) * models.latent_scale
        noise = sample_noise(latents, generator, cfg.noise_offset)
        timesteps = sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, generator,
                                     device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = target_for(noise_scheduler, latents, noise, timesteps, models.v_prediction)
        cached = None
        if text_cache is not None:
            cached = tuple(t.to(device) for t in text_cache.get(list(batch["caption"])))
        time_ids = None
        if family == "sdxl":
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
            time_ids = time_ids.to(device)
        pred = model(noisy, timesteps, list(batch["caption"]), cached, time_ids)
        loss, _ = diffusion_loss(pred, target, timesteps, batch["is_reg"], scheduler=noise_scheduler,
                                 v_prediction=models.v_prediction, min_snr_gamma=cfg.min_snr_gamma,
                                 prior_loss_weight=cfg.prior_loss_weight)
        return loss

    # 4. the loop --------------------------------------------------------------------------------
    if cfg.sample_at_first and prompts and state.global_step == 0:
        sample(f"{0:06d}")
    losses: list[float] = []
    learning_rates: list[tuple[float, ...]] = []
    epoch_loss: list[float] = []
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not main, desc="steps",
                    dynamic_ncols=True, smoothing=0.1)
    while state.global_step < total_steps:
        per_rank = batches.per_rank
        skip = state.step_in_epoch * accum
        batches.set_epoch(state.epoch, skip)
        step_loss, bad_step = 0.0, False
        for offset, batch in enumerate(loader, start=skip):
            first = offset - offset % accum
            in_step = min(accum, per_rank - first)
            micro = offset - first
            last = micro == in_step - 1
            if not bad_step:
                generator = torch.Generator().manual_seed(step_seed(seed, 1, state.global_step, micro, rank))
                torch.manual_seed(step_seed(seed, 2, state.global_step, micro, rank))  # adapter dropout
                sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
                with sync:
                    loss = micro_batch_loss(batch, generator)
                    finite, mean_loss = _loss_over_processes(accelerator, loss)
                    if finite:
                        accelerator.backward(loss / in_step)
                        step_loss += mean_loss / in_step
                    elif cfg.skip_nonfinite:
                        bad_step = True
                        optimizer.zero_grad(set_to_none=True)
                        state.nonfinite_skipped += 1
                        logger.warning("non-finite loss at step %d (epoch %d); step skipped (%d so far)",
                                       state.global_step + 1, state.epoch + 1, state.nonfinite_skipped)
                    else:
                        raise stop_nonfinite(f"the loss is {float(loss.detach())}",
                                             "use --mixed_precision bf16 or no")
            if not last:
                continue
            # one optimizer step -------------------------------------------------------------------
            # A finite loss can still give NaN/inf gradients; one such step would poison every
            # parameter. (With fp16 mixed precision the grad scaler already skips those steps.)
            if not bad_step and accelerator.scaler is None and not _grads_finite(params):
                if cfg.skip_nonfinite:
                    bad_step = True
                    state.nonfinite_skipped += 1
                    logger.warning("non-finite gradient at step %d (epoch %d); step skipped (%d so far)",
                                   state.global_step + 1, state.epoch + 1, state.nonfinite_skipped)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    raise stop_nonfinite(f"the gradient is NaN or inf (the loss {step_loss:.4g} is finite)",
                                         "set --max_grad_norm")
            learning_rates.append(tuple(g["lr"] for g in optimizer.param_groups))
            if not bad_step:
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.step_in_epoch += 1
            if not bad_step:
                losses.append(step_loss)
                epoch_loss.append(step_loss)
            step_loss, bad_step = 0.0, False
            progress.update(1)
            if epoch_loss:
                progress.set_postfix(loss=f"{sum(epoch_loss) / len(epoch_loss):.4f}", epoch=state.epoch + 1)
            if main and tracking_on and losses:
                accelerator.log(tracking.step_logs(losses[-1], sum(epoch_loss) / max(len(epoch_loss), 1),
                                                   optimizer, network), step=state.global_step)
            epoch_done = state.step_in_epoch == steps_per_epoch
            if epoch_done:
                state.epoch += 1
                state.step_in_epoch = 0
                epoch_loss = []
            final = state.global_step >= total_steps
            if cfg.save_every_n_steps and state.global_step % cfg.save_every_n_steps == 0 and not final:
                save(adapter_stem(cfg.output_name, step=state.global_step), with_state=cfg.save_state)
                saver.prune_steps(state.global_step)
            if epoch_done and cfg.save_every_n_epochs and state.epoch % cfg.save_every_n_epochs == 0 and not final:
                save(adapter_stem(cfg.output_name, epoch=state.epoch), with_state=cfg.save_state)
                saver.prune_epochs(state.epoch)
            if prompts and ((cfg.sample_every_n_steps and state.global_step % cfg.sample_every_n_steps == 0)
                            or (epoch_done and cfg.sample_every_n_epochs
                                and state.epoch % cfg.sample_every_n_epochs == 0)):
                sample(f"{state.global_step:06d}" if not epoch_done or cfg.sample_every_n_steps
                       else f"e{state.epoch:06d}")
            if epoch_done or final:
                break
    progress.close()

    # 5. the end ---------------------------------------------------------------------------------
    save(cfg.output_name, with_state=cfg.save_state)
    adapter = output_dir / f"{cfg.output_name}.safetensors" if main else None
    if world > 1:
        diff = _max_rank_difference(accelerator, network)
        if main:
            (logger.info if diff == 0 else logger.warning)(
                "adapter parameters on all %d processes: max difference %.3g", world, diff)
    if state.nonfinite_skipped and main:
        logger.warning("%d step(s) were skipped for a non-finite loss", state.nonfinite_skipped)
    if main:
        logger.info("done: %d step(s), %d epoch(s); adapter %s", state.global_step, state.epoch, adapter)
    return TrainResult(adapter=adapter, state=state, losses=losses, learning_rates=learning_rates,
                       output_dir=output_dir,
                       files=list(saver.written), skipped_images=dataset.num_skipped, network=network,
                       models=models)


# --------------------------------------------------------------------------------------------- CLI
def _setup_logging(main_process: bool) -> None:
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "diffusers", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """``train_network.py``: exit code 0 on success, 2 for a configuration error, 3 for a non-finite loss,
    4 for a save that failed (disk full, read-only output)."""
    import os

    from lycoft.training.config import parse_args
    from lycoft.training.saving import SaveError

    main_process = os.environ.get("RANK", "0") == "0"
    _setup_logging(main_process)
    try:
        cfg = parse_args(argv)
        train(cfg)
    except (ConfigError, NonFiniteLossError, SaveError) as e:
        if main_process:  # every rank hits the same error; one copy is enough ...
            print(f"error: {e}", file=sys.stderr)
        elif isinstance(e, SaveError):  # ... except a failed save, whose cause only the failing rank knows
            print(f"error (process {os.environ.get('RANK')}): {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 3 if isinstance(e, NonFiniteLossError) else 4
    return 0
