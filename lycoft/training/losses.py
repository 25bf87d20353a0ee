"""The denoising loss: target by prediction type, min-SNR weighting, prior-preservation weighting.

`diffusion_loss` returns the batch loss and the per-sample losses (for logging); its weighting is

    loss_i  = mean over pixels of (pred_i - target_i)^2
    w_i     = min(SNR_t, gamma) / SNR_t          epsilon target   (min-SNR, Hang et al. 2023)
            = min(SNR_t, gamma) / (SNR_t + 1)    v target
    w_i    *= prior_loss_weight                  regularization (class) images
    loss    = mean_i(w_i * loss_i)
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    return clipped / (s + 1.0) if v_prediction else clipped / s


def diffusion_loss(pred: Tensor, target: Tensor, timesteps: Tensor, is_reg: Tensor, *, scheduler,
                   v_prediction: bool, min_snr_gamma: float | None = None,
                   prior_loss_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """(weighted batch loss, unweighted per-sample MSE), computed in float32."""
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.dim())))
    weights = torch.ones_like(per_sample)
    if min_snr_gamma is not None:
        weights = weights * min_snr_weights(scheduler, timesteps, min_snr_gamma, v_prediction)
    if prior_loss_weight != 1.0:
        reg = is_reg.to(per_sample.device, torch.bool)
        weights = torch.where(reg, weights * prior_loss_weight, weights)
    return (per_sample * weights).mean(), per_sample.detach()
