"""The forward diffusion of one training step: noise, timesteps and the noised latents.

Every random draw comes from a `torch.Generator` the caller seeds per step (see `step.step_seed`),
so a resumed run draws exactly what the uninterrupted run drew. Draws happen on the CPU and are then
moved, which keeps them identical on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_noise(latents: Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> Tensor:
    """Gaussian noise shaped like `latents`; ``noise_offset > 0`` adds a per-image, per-channel constant
    ``noise_offset * N(0, 1)`` (offset noise), which lets the model learn overall brightness changes."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise.to(latents.device, latents.dtype)


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device) -> Tensor:
    """``(batch,)`` int64 timesteps, uniform over ``[0, num_train_timesteps)``."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator).to(device)

