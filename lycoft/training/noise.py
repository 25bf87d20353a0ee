"""The forward diffusion of one training step: noise, timesteps and the noised latents.

Every random draw comes from a `torch.Generator` the caller seeds per step (see `step.step_seed`),
so a resumed run draws exactly what the uninterrupted run drew. Draws happen on the CPU and are then
moved, which keeps them identical on every device. An option that is off draws nothing, so turning
options on never changes what the others draw before them. The options and their order follow kohya
sd-scripts (`train_util.get_noise_noisy_latents_and_timesteps`): noise, offset noise, multi-resolution
noise, timesteps, input perturbation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_noise(latents: Tensor, generator: torch.Generator, noise_offset: float = 0.0, *,
                 offset_random_strength: bool = False, adaptive_noise_scale: float | None = None,
                 multires_iterations: int | None = None, multires_discount: float = 0.3) -> Tensor:
    """Gaussian noise shaped like `latents` ``(b, c, h, w)``, plus (each off by default):

    - ``noise_offset > 0``: a per-image, per-channel constant ``noise_offset * N(0, 1)`` (offset noise),
      which lets the model learn overall brightness changes; with `offset_random_strength` the strength
      is drawn from ``[0, noise_offset)`` per micro-batch; `adaptive_noise_scale` adds
      ``adaptive_noise_scale * |channel mean of the latent|`` to it (clamped at 0), so images far from
      mid-grey get more offset;
    - `multires_iterations`: multi-resolution noise on top (`pyramid_noise`).
    """
    shape = latents.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        strength: float | Tensor = noise_offset
        if offset_random_strength:
            strength = torch.rand(1, generator=generator) * noise_offset
        if adaptive_noise_scale is not None:
            channel_mean = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().cpu()
            strength = torch.clamp(strength + adaptive_noise_scale * channel_mean, min=0.0)
        noise = noise + strength * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    if multires_iterations:
        noise = pyramid_noise(noise, generator, multires_iterations, multires_discount)
    return noise.to(latents.device, latents.dtype)


def pyramid_noise(noise: Tensor, generator: torch.Generator, iterations: int, discount: float) -> Tensor:
    """Multi-resolution noise ``(b, c, h, w)``: ``noise + sum_i discount**i * up(N(0, 1) at (h, w) / r**i)``
    with ``r ~ U[2, 4)`` per level, bilinearly upsampled; stops after the 1-pixel level, then divides by
    the std of the whole batch. (Whitaker's multi-resolution noise, as kohya sd-scripts applies it.)"""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = 2.0 + 2.0 * float(torch.rand((), generator=generator))
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hn, wn), generator=generator)
        out += F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device, min_timestep: int = 0, max_timestep: int | None = None) -> Tensor:
    """``(batch,)`` int64 timesteps, uniform over ``[min_timestep, max_timestep)`` (unset max = all
    ``num_train_timesteps``); equal bounds give that one timestep and draw nothing."""
    high = num_train_timesteps if max_timestep is None else max_timestep
    if min_timestep >= high:
        return torch.full((batch,), high, dtype=torch.int64, device=device)
    return torch.randint(min_timestep, high, (batch,), generator=generator).to(device)


def validation_timesteps(low: int, high: int, count: int = 4) -> list[int]:
    """kohya's fixed validation timesteps: `count` evenly spaced points strictly inside ``[low, high]``,
    rounded down (200, 400, 600 and 800 for the full range 0..1000)."""
    return [low + (high - low) * i // (count + 1) for i in range(1, count + 1)]


def perturb_input_noise(noise: Tensor, generator: torch.Generator, gamma: float | None,
                        random_strength: bool = False) -> Tensor:
    """The noise that goes into the noised latents with input perturbation (``--ip_noise_gamma``,
    Ning et al. 2023): ``noise + gamma * N(0, 1)``, with the strength drawn from ``[0, gamma)`` when
    `random_strength`. The training target keeps the unperturbed `noise`. Unset or 0 = `noise` itself."""
    if not gamma:
        return noise
    strength: float | Tensor = gamma
    if random_strength:
        strength = torch.rand(1, generator=generator) * gamma
    extra = strength * torch.randn(noise.shape, generator=generator, dtype=torch.float32)
    return noise + extra.to(noise.device, noise.dtype)
