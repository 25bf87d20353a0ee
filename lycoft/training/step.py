"""The training loop: epochs of optimizer steps, with the saves and samples that fall between them.

`train_epochs(run)` goes from `run.state` to the last step. Each epoch hands this rank its share of the
batches (`EpochBatches`); each optimizer step takes `gradient_accumulation_steps` of them:

1. `accumulate`, per micro-batch: seed its draws, `micro_batch_loss` (latents, noise, timesteps, the
   adapted UNet's prediction, the loss), then backward; a non-finite loss stops the run or skips the step;
2. `optimizer_step`: check the gradients, clip, step the optimizer (keeping the state before the step in
   memory, `rollback.StepUndo`) and the LR schedule, check the adapter stayed finite, count the step;
3. `after_step`: progress and tracker logs, `validate_due` (the held-out loss), the epoch's end, `save` and
   `sample` at their intervals.

The shared pieces travel in a `Run`, built by the setup steps of `loop.train`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from lycoft import Network
from lycoft.checkpoints.families import FamilyInfo, family_info
from lycoft.training import losses, tracking
from lycoft.training.caching import TextEmbeddingCache
from lycoft.training.conditioning import TextConditioner, sdxl_time_ids
from lycoft.training.dataset import TrainingDataset
from lycoft.training.flags import TrainConfig
from lycoft.training.fp8_base import compute_dtype
from lycoft.training.models import Models
from lycoft.training.noise import perturb_input_noise, sample_noise, sample_timesteps, validation_timesteps
from lycoft.training.optimizers import evaluation_point
from lycoft.training.rollback import StepUndo, all_finite, optimizer_tensors
from lycoft.training.sampler import derive_seed
from lycoft.training.sampling import SamplePrompt, render, save_images
from lycoft.training.saving import Saver, TrainState, adapter_stem

logger = logging.getLogger("lycoft.train")


class NonFiniteLossError(RuntimeError):
    """The loss, the gradients or the adapter became NaN/inf; the message names the usable state saved
    (or says there is none)."""


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
                 family: FamilyInfo) -> None:
        super().__init__()
        self.network = network
        self.__dict__["_unet"] = unet
        self.__dict__["_conditioner"] = conditioner
        self.train_text = train_text
        self.family = family

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
        dtype = compute_dtype(unet)  # not unet.dtype: a float8 base reports float8
        added = {}
        if self.family.pooled_text_embeds:
            added["text_embeds"] = pooled.to(dtype)
        if self.family.uses_time_ids:
            added["time_ids"] = time_ids.to(dtype)
        return unet(noisy.to(dtype), timesteps, encoder_hidden_states=hidden.to(dtype),
                    added_cond_kwargs=added or None).sample


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps per epoch (this rank's batches over the accumulation), in all, and the epochs
    that takes (the last one may be partial)."""

    per_epoch: int
    total: int
    epochs: int


@dataclass
class Run:
    """Everything the loop touches, built by the setup steps of `loop.train`; the loop records its
    per-step losses and learning rates here."""

    cfg: TrainConfig
    accelerator: Accelerator
    models: Models
    dataset: TrainingDataset
    prompts: list[SamplePrompt]
    network: Network
    conditioner: TextConditioner
    text_cache: TextEmbeddingCache | None
    model: nn.Module  # the `AdaptedDenoiser` as accelerate prepared it
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    batches: EpochBatches
    steps: StepPlan
    state: TrainState
    saver: Saver
    losses: list[float] = field(default_factory=list)  # per optimizer step taken, mean over processes
    learning_rates: list[tuple[float, ...]] = field(default_factory=list)  # per optimizer step, per group
    last_sample_step: int | None = None  # the step the last samples were rendered at
    validation_losses: list[tuple[int, str, float]] = field(default_factory=list)  # (step, "step"/"epoch", loss)
    params: list[torch.Tensor] = field(init=False)
    undo: StepUndo = field(init=False)  # the state before the last optimizer step

    def __post_init__(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.undo = StepUndo(self.optimizer, self.params)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def tracking_on(self) -> bool:
        return bool(self.accelerator.log_with)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def step_seed(seed: int, kind: int, step: int, micro: int, rank: int) -> int:
    """The seed of one micro-batch's draws: kind 1 seeds its generator (VAE posterior, noise, timesteps),
    kind 2 the global torch RNG (adapter dropout)."""
    return derive_seed(seed, kind, step, micro, rank) % 2**63


# ------------------------------------------------------------------------------------------ epochs
def train_epochs(run: Run) -> None:
    """Train from `run.state` to the last step (a sample first with ``--sample_at_first``)."""
    cfg = run.cfg
    loader = data_loader(cfg, run.dataset, run.batches)
    if cfg.sample_at_first and run.prompts and run.state.global_step == 0:
        sample(run, f"{0:06d}")
    progress = tqdm(total=run.steps.total, initial=run.state.global_step, disable=not run.main, desc="steps",
                    dynamic_ncols=True, smoothing=0.1)
    while run.state.global_step < run.steps.total:
        train_epoch(run, loader, progress)
    progress.close()


def data_loader(cfg: TrainConfig, dataset: Any, batches: Any) -> torch.utils.data.DataLoader:
    """The loader of `batches` (a batch sampler) from `dataset`: ``--max_data_loader_n_workers`` worker
    processes, kept alive between epochs unless ``--persistent_data_loader_workers false``."""
    workers = cfg.data_loader_workers()
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       persistent_workers=cfg.persistent_data_loader_workers and workers > 0)


def train_epoch(run: Run, loader: torch.utils.data.DataLoader, progress: tqdm) -> None:
    """The rest of the epoch `run.state` is in (all of it unless resumed mid-epoch), or up to the last step."""
    state, accum = run.state, run.cfg.gradient_accumulation_steps
    per_rank = run.batches.per_rank
    skip = state.step_in_epoch * accum
    run.batches.set_epoch(state.epoch, skip)
    epoch_loss: list[float] = []
    step_loss, skipped = 0.0, False
    for offset, batch in enumerate(loader, start=skip):
        first = offset - offset % accum  # the step's first micro-batch
        in_step = min(accum, per_rank - first)  # the epoch's last step may have fewer
        micro = offset - first
        if not skipped:
            part = accumulate(run, batch, micro, in_step)
            if part is None:
                skipped = True
            else:
                step_loss += part
        if micro < in_step - 1:
            continue
        if optimizer_step(run, step_loss, skipped):
            epoch_loss.append(step_loss)
        step_loss, skipped = 0.0, False
        if after_step(run, epoch_loss, progress):
            return


# -------------------------------------------------------------------------------------------- step
def accumulate(run: Run, batch: dict[str, Any], micro: int, in_step: int) -> float | None:
    """Forward and backward one micro-batch; returns its share of the step's loss (mean over processes),
    or None when its loss was non-finite and ``--skip_nonfinite`` drops the step."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    rank = accelerator.process_index
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, 1, state.global_step, micro, rank))
    torch.manual_seed(step_seed(cfg.seed, 2, state.global_step, micro, rank))  # adapter dropout draws from it
    last = micro == in_step - 1
    sync = contextlib.nullcontext() if last else accelerator.no_sync(run.model)
    with sync:
        loss = micro_batch_loss(run, batch, generator)
        finite, mean_loss = _loss_over_processes(accelerator, loss)
        if finite:
            accelerator.backward(loss / in_step)
            return mean_loss / in_step
        if cfg.skip_nonfinite:
            run.optimizer.zero_grad(set_to_none=True)
            state.nonfinite_skipped += 1
            logger.warning("non-finite loss at step %d (epoch %d); step skipped (%d so far)",
                           state.global_step + 1, state.epoch + 1, state.nonfinite_skipped)
            return None
        raise stop_nonfinite_loss(run, float(loss.detach()), batch)


def micro_batch_loss(run: Run, batch: dict[str, Any], generator: torch.Generator,
                     timestep: int | None = None) -> torch.Tensor:
    """The diffusion loss of one micro-batch: latents (cached, or encoded with a posterior sample), noise
    and timesteps from ``generator`` (or every sample at `timestep`), the adapted UNet's prediction
    against its target, weighted by the batch's loss masks if it has them."""
    models, device = run.models, run.accelerator.device
    noise_scheduler = models.noise_scheduler
    if "latents" in batch:
        latents = batch["latents"].to(device, torch.float32)
    else:
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, models.vae_dtype)
            dist = models.vae.encode(pixels).latent_dist
            latents = (dist.sample(generator=generator).float() - models.latent_shift) * models.latent_scale
    cfg = run.cfg
    noise = sample_noise(latents, generator, cfg.noise_offset,
                         offset_random_strength=cfg.noise_offset_random_strength,
                         adaptive_noise_scale=cfg.adaptive_noise_scale,
                         multires_iterations=cfg.multires_noise_iterations,
                         multires_discount=cfg.multires_noise_discount)
    if timestep is None:
        timesteps = sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, generator, device,
                                     cfg.min_timestep or 0, cfg.max_timestep)
    else:
        timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.int64, device=device)
    input_noise = perturb_input_noise(noise, generator, cfg.ip_noise_gamma, cfg.ip_noise_gamma_random_strength)
    noisy = noise_scheduler.add_noise(latents, input_noise, timesteps)
    target = losses.target_for(noise_scheduler, latents, noise, timesteps, models.v_prediction)
    cached = None
    if run.text_cache is not None:
        cached = tuple(t.to(device) for t in run.text_cache.get(list(batch["caption"])))
    time_ids = None
    if family_info(models.family).uses_time_ids:
        time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        time_ids = time_ids.to(device)
    pred = run.model(noisy, timesteps, list(batch["caption"]), cached, time_ids)
    loss, _ = losses.diffusion_loss(pred, target, timesteps, batch["is_reg"], scheduler=noise_scheduler,
                                    v_prediction=models.v_prediction, min_snr_gamma=run.cfg.min_snr_gamma,
                                    prior_loss_weight=run.cfg.prior_loss_weight, loss_type=cfg.loss_type,
                                    huber_schedule=cfg.huber_schedule, huber_c=cfg.huber_c, huber_scale=cfg.huber_scale,
                                    scale_v_pred_loss_like_noise_pred=cfg.scale_v_pred_loss_like_noise_pred,
                                    v_pred_like_loss=cfg.v_pred_like_loss,
                                    debiased_estimation_loss=cfg.debiased_estimation_loss, mask=batch.get("mask"))
    return loss


def optimizer_step(run: Run, step_loss: float, skipped: bool) -> bool:
    """Check the gradients, clip, step the optimizer (unless the step is skipped) and the LR schedule,
    count the step; returns whether the parameters were updated."""
    cfg, optimizer, state = run.cfg, run.optimizer, run.state
    # A finite loss can still give NaN/inf gradients; one such step would poison every
    # parameter. (With fp16 mixed precision the grad scaler already skips those steps.)
    if not skipped and run.accelerator.scaler is None and not _grads_finite(run.params):
        if cfg.skip_nonfinite:
            skipped = True
            state.nonfinite_skipped += 1
            logger.warning("non-finite gradient at step %d (epoch %d); step skipped (%d so far)",
                           state.global_step + 1, state.epoch + 1, state.nonfinite_skipped)
        else:
            optimizer.zero_grad(set_to_none=True)
            raise stop_nonfinite(run, f"the gradient is NaN or inf (the loss {step_loss:.4g} is finite)")
    run.learning_rates.append(tuple(g["lr"] for g in optimizer.param_groups))
    if not skipped:
        if cfg.max_grad_norm:
            run.accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
        run.undo.keep(state)
        optimizer.step()
        # An update can overflow the parameters (or the optimizer's moments) even from finite gradients;
        # a save after it would offer a poisoned state, so the step is undone here.
        if not all_finite([*run.params, *optimizer_tensors(optimizer, run.params)]):
            optimizer.zero_grad(set_to_none=True)
            if not cfg.skip_nonfinite:
                raise stop_nonfinite(run, "the adapter's parameters or optimizer state became NaN or inf in the update",
                                     roll_back=True)
            run.undo.restore()
            skipped = True
            state.nonfinite_skipped += 1
            logger.warning("the update at step %d (epoch %d) made the adapter NaN or inf; step undone (%d so far)",
                           state.global_step + 1, state.epoch + 1, state.nonfinite_skipped)
    run.lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    state.step_in_epoch += 1
    if not skipped:
        run.losses.append(step_loss)
    return not skipped


def after_step(run: Run, epoch_loss: list[float], progress: tqdm) -> bool:
    """Progress and tracker logs, the epoch's end, saves and samples at their intervals; returns whether
    the epoch (or the run) is over."""
    cfg, state = run.cfg, run.state
    progress.update(1)
    if epoch_loss:
        progress.set_postfix(_postfix(run, epoch_loss))
    if run.main and run.tracking_on and run.losses:
        run.accelerator.log(tracking.step_logs(run.losses[-1], sum(epoch_loss) / max(len(epoch_loss), 1),
                                               run.optimizer, run.network), step=state.global_step)
    if run.dataset.validation is not None:
        validate_due(run, epoch_loss, progress)
    epoch_done = state.step_in_epoch == run.steps.per_epoch
    if epoch_done:
        state.epoch += 1
        state.step_in_epoch = 0
    final = state.global_step >= run.steps.total
    if cfg.save_every_n_steps and state.global_step % cfg.save_every_n_steps == 0 and not final:
        save(run, adapter_stem(cfg.output_name, step=state.global_step), with_state=cfg.save_state)
        run.saver.prune_steps(state.global_step)
    if epoch_done and cfg.save_every_n_epochs and state.epoch % cfg.save_every_n_epochs == 0 and not final:
        save(run, adapter_stem(cfg.output_name, epoch=state.epoch), with_state=cfg.save_state)
        run.saver.prune_epochs(state.epoch)
    if run.prompts and ((cfg.sample_every_n_steps and state.global_step % cfg.sample_every_n_steps == 0)
                        or (epoch_done and cfg.sample_every_n_epochs
                            and state.epoch % cfg.sample_every_n_epochs == 0)):
        sample(run, f"{state.global_step:06d}" if not epoch_done or cfg.sample_every_n_steps
               else f"e{state.epoch:06d}")
    return epoch_done or final


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


# ------------------------------------------------------------------------------ saving and sampling
def save(run: Run, stem: str, with_state: bool) -> None:
    """The adapter as ``<stem>.safetensors`` (at the optimizer's evaluation point) and the training state beside
    it (at its training point, to resume from), on every rank's call."""
    with evaluation_point(run.optimizer):
        run.saver.save_adapter(run.network, stem, step=run.state.global_step, epoch=run.state.epoch)
    if with_state:
        run.saver.save_state(stem, run.state)
    if run.main and run.tracking_on:
        run.accelerator.log(tracking.module_logs(run.network), step=run.state.global_step)


_REMEDY = ("Lower --learning_rate, set --max_grad_norm, use --mixed_precision bf16 or no, or pass --skip_nonfinite "
           "to skip such steps")


def stop_nonfinite_loss(run: Run, loss: float, batch: dict[str, Any]) -> NonFiniteLossError:
    """The error for a non-finite loss at the coming step, with a usable state saved (see `stop_nonfinite`).

    The batch decides which state that is: NaN latents (a damaged cache file, an fp16 VAE overflow) are
    not the adapter's fault, so the current state is fine; otherwise the adapter's last update gave
    parameters whose forward pass is not finite, and the state before that update is the one to offer."""
    here, everywhere = _latents_finite(run, batch)
    if not everywhere:
        paths = ", ".join(str(p) for p in batch.get("image_path", [])[:2]) or "its images"
        which = "a batch of another process" if here else f"the batch of {paths}"
        return stop_nonfinite(run, f"the latents of {which} are NaN or inf, so the loss is {loss}",
                              "Delete that image's latent cache file or re-save the image, use --no_half_vae, or "
                              "pass --skip_nonfinite to skip such steps")
    if run.undo.counters is None:  # no update in this process yet: its starting state is all there is
        return stop_nonfinite(run, f"the loss is {loss}", _REMEDY)
    return stop_nonfinite(run, f"the adapter diverged: the loss is {loss} at step {run.state.global_step + 1}, "
                               "after the update", _REMEDY, roll_back=True)


def stop_nonfinite(run: Run, what: str, remedy: str = _REMEDY, *, roll_back: bool = False) -> NonFiniteLossError:
    """Save a usable state and say where it is (the error to raise), or say that there is none.

    `roll_back`: the adapter's last update is to blame (NaN/inf parameters, or a forward pass that is no
    longer finite), so the state before it (`rollback.StepUndo`) is restored and saved: it gave a finite
    loss and gradients, so its next step can succeed at a sane learning rate. Otherwise the current state
    is saved. Either way it is checked to be finite first."""
    state = run.state
    if roll_back:
        run.undo.restore(state)
    what = f"{what} at step {state.global_step + 1} (epoch {state.epoch + 1}); training stopped."
    if not all_finite([*run.params, *optimizer_tensors(run.optimizer, run.params)]):
        started = f" (from --resume {run.cfg.resume})" if run.cfg.resume else ""
        return NonFiniteLossError(
            f"{what} No usable state to resume from: the adapter's parameters or optimizer state were already NaN "
            f"or inf when this run started{started}. Start over, or resume from an older state, with a lower "
            "--learning_rate")
    stem = adapter_stem(run.cfg.output_name, step=state.global_step)
    save(run, stem, with_state=True)
    where = run.output_dir / f"{stem}-state"
    return NonFiniteLossError(f"{what} The state before this step is in {where} (resume with --resume {where}). "
                              f"{remedy}")


def _latents_finite(run: Run, batch: dict[str, Any]) -> tuple[bool, bool]:
    """Whether this micro-batch's latents are finite (cached ones as read, or encoded again from the
    pixels) here and on every process: every rank takes the same branch of the stop that follows."""
    models, device = run.models, run.accelerator.device
    with torch.no_grad():
        if "latents" in batch:
            latents = batch["latents"]
        else:
            latents = models.vae.encode(batch["pixel_values"].to(device, models.vae_dtype)).latent_dist.mean
        ok = torch.isfinite(latents.float()).all().reshape(1).to(device, torch.float32)
    return bool(ok.item() > 0), bool(run.accelerator.gather(ok).min() > 0)


def sample(run: Run, tag: str) -> None:
    """Render the prompts on the main process, one log line before and after (the progress bar stands
    still meanwhile), PNGs in ``<output_dir>/sample`` and the images in the trackers; the other
    processes wait (a failure only warns)."""
    if run.main:
        run.network.eval()
        cfg, folder = run.cfg, run.output_dir / "sample"
        try:
            logger.info("rendering %d sample(s) at %s", len(run.prompts), tag)
            started = time.perf_counter()
            with run.accelerator.autocast(), evaluation_point(run.optimizer):
                images = render(run.models.pipe, run.prompts, sampler=cfg.sample_sampler, run_seed=cfg.seed,
                                conditioner=run.conditioner)
            paths = save_images(images, run.prompts, folder, cfg.output_name, tag, sampler=cfg.sample_sampler,
                                run_seed=cfg.seed)
            tracking.log_samples(run.accelerator, images, run.prompts, step=run.state.global_step)
            logger.info("%d sample(s) at %s in %s (%.1f s)", len(paths), tag, folder, time.perf_counter() - started)
            run.last_sample_step = run.state.global_step
        except Exception as e:  # a sampling bug must not cost the run
            logger.warning("sampling at %s failed (%s: %s); training goes on", tag, type(e).__name__, e)
        finally:
            run.network.train()
    run.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------ validation
def _postfix(run: Run, epoch_loss: list[float]) -> dict[str, Any]:
    """The progress line: the epoch's mean loss, the epoch, and the last validation loss once there is one."""
    shown: dict[str, Any] = {"loss": f"{sum(epoch_loss) / max(len(epoch_loss), 1):.4f}", "epoch": run.state.epoch + 1}
    if run.validation_losses:
        shown["val_loss"] = f"{run.validation_losses[-1][2]:.4f}"
    return shown


def validate_due(run: Run, epoch_loss: list[float], progress: tqdm) -> None:
    """The validation loss at kohya's points, logged: every ``--validate_every_n_steps`` steps, and at the
    end of every ``--validate_every_n_epochs``-th epoch (every epoch when unset; the last, partial epoch
    counts). Trackers get kohya's ``loss/validation/{step,epoch}_average`` and ``..._divergence`` (the
    validation loss minus the epoch's mean training loss)."""
    cfg, state = run.cfg, run.state
    kinds = []
    if cfg.validate_every_n_steps and state.global_step % cfg.validate_every_n_steps == 0:
        kinds.append("step")
    epoch_end = state.step_in_epoch == run.steps.per_epoch or state.global_step >= run.steps.total
    every = cfg.validate_every_n_epochs
    if epoch_end and (every is None or (state.epoch + 1) % every == 0):
        kinds.append("epoch")
    if not kinds:
        return
    value = validation_loss(run)  # a function of the adapter alone: one computation serves both kinds
    train = sum(epoch_loss) / len(epoch_loss) if epoch_loss else None
    for kind in kinds:
        run.validation_losses.append((state.global_step, kind, value))
        if run.main and run.tracking_on:
            logs = {f"loss/validation/{kind}_average": value}
            if train is not None:
                logs[f"loss/validation/{kind}_divergence"] = value - train
            run.accelerator.log(logs, step=state.global_step)
    if run.main:
        logger.info("validation loss at step %d (epoch %d): %.4f%s", state.global_step, state.epoch + 1, value,
                    f" (training loss of the epoch: {train:.4f})" if train is not None else "")
    progress.set_postfix(_postfix(run, epoch_loss))


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """The mean loss over the held-out batches (the first ``--max_validation_steps``, in a fixed order)
    at each of kohya's fixed timesteps (`validation_timesteps`), with noise seeded by (``--validation_seed``
    or ``--seed``, batch, timestep): the same draws every time, so successive values differ only by what
    the adapter learned. The adapter runs in eval mode at the optimizer's evaluation point (what samples and
    saved adapters show), and the global RNG state is put back afterwards,
    so training draws exactly what it would have without validation. The batches are shared out over the
    processes (the mean does not depend on their number)."""
    cfg, accelerator, held_out = run.cfg, run.accelerator, run.dataset.validation
    assert held_out is not None
    seed = cfg.validation_seed if cfg.validation_seed is not None else cfg.seed
    num_timesteps = run.models.noise_scheduler.config.num_train_timesteps
    timesteps = validation_timesteps(cfg.min_timestep or 0,
                                     num_timesteps if cfg.max_timestep is None else cfg.max_timestep)
    batches = held_out.batch_sampler(shuffle=False).batches(0)[:cfg.max_validation_steps]
    world, rank = accelerator.num_processes, accelerator.process_index
    # Every process makes the same number of forward calls (collectives inside them stay in step); the
    # padding repeats batch 0 and is not counted.
    padded = math.ceil(len(batches) / world) * world
    mine = [(i if i < len(batches) else None, batches[i % len(batches)]) for i in range(rank, padded, world)]
    totals = torch.zeros(2, dtype=torch.float64)
    rng_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    run.network.eval()
    try:
        with evaluation_point(run.optimizer):  # schedule-free optimizers: the weights samples and saves show
            for index, keys in mine:
                batch = torch.utils.data.default_collate([held_out[key] for key in keys])
                for j, t in enumerate(timesteps):
                    generator = torch.Generator().manual_seed(derive_seed(seed, 5, index or 0, j) % 2**63)
                    loss = float(micro_batch_loss(run, batch, generator, timestep=t))
                    if index is not None:
                        totals += torch.tensor([loss, 1.0], dtype=torch.float64)
    finally:
        run.network.train()
        torch.set_rng_state(rng_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
    totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
    return float(totals[0] / totals[1])
