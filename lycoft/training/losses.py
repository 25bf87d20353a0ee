"""The denoising loss: target by prediction type, the per-element loss, and the per-sample weights.

`diffusion_loss` returns the batch loss and the per-sample losses (for logging). With kohya sd-scripts'
flag names and formulas (``train_util.conditional_loss``, ``custom_train_functions``), ``d = pred - target``:

    per element     l2: d^2    l1: |d|
                    huber:     2 c (sqrt(d^2 + c^2) - c)    (~ d^2 for |d| << c, ~ 2 c |d| for |d| >> c)
                    smooth_l1: 2 (sqrt(d^2 + c^2) - c)      (~ d^2 / c, ~ 2 |d|)
    c by timestep   constant: huber_c * huber_scale
                    exponential: huber_scale * huber_c ** (t / T)
                    snr: (1 - huber_c) / (1 + sigma_t)^2 + huber_c,  sigma_t = sqrt((1 - abar_t) / abar_t)
    loss_i  = mean over pixels of the per-element loss, times the sample's loss mask when it has one
              (the mask resized to the latent grid by area averaging; masked-out pixels still count in the
              mean, as in kohya's ``apply_masked_loss``)
    w_i     = min(SNR_t, gamma) / SNR_t          epsilon target   (min-SNR, Hang et al. 2023)
            = min(SNR_t, gamma) / (SNR_t + 1)    v target
    w_i    *= prior_loss_weight                  regularization (class) images
    w_i    *= S / (S + 1)                        scale_v_pred_loss_like_noise_pred, S = min(SNR_t, 1000)
    w_i    *= 1 + v_pred_like_loss (S + 1) / S   v_pred_like_loss (adds that much of a v-like loss)
    w_i    *= 1 / sqrt(S)  (epsilon), 1 / (S + 1)  (v)      debiased_estimation_loss
    loss    = mean_i(w_i * loss_i)

SNR is that of the schedule being trained (after ``--zero_terminal_snr``, whose last SNR is 0; there the
min-SNR weight of an epsilon target is its limit, 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lycoft.training.flags import HUBER_SCHEDULES, LOSS_TYPES

# kohya caps the SNR at 1000 in its scale_v / v_pred_like / debiased weights (SNR_0 of SD is ~1175).
_SNR_CAP = 1000.0


def target_for(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor, v_prediction: bool) -> Tensor:
    """What the UNet should predict: the noise (epsilon models) or ``v = sqrt(abar) eps - sqrt(1-abar) x0``."""
    if v_prediction:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def snr(scheduler, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` of each timestep, float32."""
    abar = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return abar / (1.0 - abar)


def min_snr_weights(scheduler, timesteps: Tensor, gamma: float, v_prediction: bool) -> Tensor:
    """Per-sample min-SNR-gamma weights (see the module docstring)."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if v_prediction:
        return clipped / (s + 1.0)
    return torch.where(s > 0, clipped / s, torch.ones_like(s))


def huber_threshold(scheduler, timesteps: Tensor, schedule: str, c: float, scale: float) -> Tensor:
    """Per-sample Huber threshold ``(b,)`` of `schedule` (see the module docstring). The snr schedule
    ignores `scale`, as in kohya sd-scripts."""
    t = timesteps.to(torch.float32)
    if schedule == "constant":
        return torch.full_like(t, c * scale)
    if schedule == "exponential":
        total = scheduler.config.num_train_timesteps
        return torch.exp(t * (math.log(c) / total)) * scale
    if schedule == "snr":
        abar = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
        sigma = ((1.0 - abar) / abar).sqrt()
        return (1.0 - c) / (1.0 + sigma) ** 2 + c
    raise ValueError(f"huber schedule {schedule!r}; use one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(pred: Tensor, target: Tensor, loss_type: str = "l2", c: Tensor | None = None) -> Tensor:
    """The per-element loss of `loss_type` between float32 tensors ``(b, ...)``; `c` is the per-sample
    Huber threshold ``(b,)`` that huber and smooth_l1 need."""
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if c is None:
            raise ValueError(f"loss type {loss_type} needs the Huber threshold c")
        c = c.to(pred.device, pred.dtype).reshape(-1, *([1] * (pred.dim() - 1)))
        # sqrt(d^2 + c^2) - c written without the cancellation that loses small errors (or a large c)
        squared = (pred - target) ** 2
        soft = squared / (torch.sqrt(squared + c * c) + c)
        return 2 * c * soft if loss_type == "huber" else 2 * soft
    raise ValueError(f"loss type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A ``(b, 1, H, W)`` loss mask at ``size`` ``(h, w)`` by area averaging (kohya's interpolation for
    loss masks: each latent cell gets the mean of the pixels it covers)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return torch.nn.functional.interpolate(mask, size=tuple(size), mode="area")


def snr_weights(scheduler, timesteps: Tensor, v_prediction: bool, *, scale_v_pred_loss_like_noise_pred: bool = False,
                v_pred_like_loss: float | None = None, debiased_estimation_loss: bool = False) -> Tensor | None:
    """The product of the per-sample weights of kohya's three SNR-based options (module docstring), or
    None when all are off."""
    if not (scale_v_pred_loss_like_noise_pred or v_pred_like_loss or debiased_estimation_loss):
        return None
    s = torch.clamp(snr(scheduler, timesteps), max=_SNR_CAP)
    w = torch.ones_like(s)
    if scale_v_pred_loss_like_noise_pred:
        w = w * (s / (s + 1.0))
    if v_pred_like_loss:
        w = w * (1.0 + v_pred_like_loss * (s + 1.0) / s)
    if debiased_estimation_loss:
        w = w * (1.0 / (s + 1.0) if v_prediction else 1.0 / s.sqrt())
    return w


def diffusion_loss(pred: Tensor, target: Tensor, timesteps: Tensor, is_reg: Tensor, *, scheduler,
                   v_prediction: bool, min_snr_gamma: float | None = None,
                   prior_loss_weight: float = 1.0, loss_type: str = "l2", huber_schedule: str = "snr",
                   huber_c: float = 0.1, huber_scale: float = 1.0,
                   scale_v_pred_loss_like_noise_pred: bool = False, v_pred_like_loss: float | None = None,
                   debiased_estimation_loss: bool = False, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(weighted batch loss, unweighted per-sample loss of `loss_type`), computed in float32. `mask` is the
    ``(b, 1, h, w)`` loss mask in [0, 1] (any size; see `resize_mask`), or None."""
    c = None
    if loss_type in ("huber", "smooth_l1"):
        c = huber_threshold(scheduler, timesteps, huber_schedule, huber_c, huber_scale)
    per_sample = elementwise_loss(pred.float(), target.float(), loss_type, c)
    if mask is not None:
        per_sample = per_sample * resize_mask(mask.to(per_sample.device, torch.float32), per_sample.shape[-2:])
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.dim())))
    weights = torch.ones_like(per_sample)
    if min_snr_gamma is not None:
        weights = weights * min_snr_weights(scheduler, timesteps, min_snr_gamma, v_prediction)
    if prior_loss_weight != 1.0:
        reg = is_reg.to(per_sample.device, torch.bool)
        weights = torch.where(reg, weights * prior_loss_weight, weights)
    extra = snr_weights(scheduler, timesteps, v_prediction,
                        scale_v_pred_loss_like_noise_pred=scale_v_pred_loss_like_noise_pred,
                        v_pred_like_loss=v_pred_like_loss, debiased_estimation_loss=debiased_estimation_loss)
    if extra is not None:
        weights = weights * extra.to(weights.device)
    return (per_sample * weights).mean(), per_sample.detach()
