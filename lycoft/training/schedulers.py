"""`--lr_scheduler` -> a LambdaLR over the optimizer, stepped once per optimizer step.

The schedule is a pure function of the step count, so restoring its ``last_epoch`` (accelerate
checkpoints it) continues the exact learning rate after ``--resume``.
"""

from __future__ import annotations

import torch

from lycoft.training.config import TrainConfig


def build_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """diffusers' schedule of that name with ``--lr_warmup_steps`` (steps or a fraction of `total_steps`)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps(total_steps),
        num_training_steps=total_steps,
        num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power,
    )
