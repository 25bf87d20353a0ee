"""`--lr_scheduler` -> a LambdaLR over the optimizer, stepped once per optimizer step.

The schedule is a pure function of the step count, so it is not checkpointed: on ``--resume`` it is
built directly at the resumed step and continues with exactly the learning rate of the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lycoft.training.flags import TrainConfig


def build_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, *,
                       base_lrs: Sequence[float] | None = None, step: int = 0):
    """diffusers' schedule of that name with ``--lr_warmup_steps`` (steps or a fraction of `total_steps`).

    Each param group's learning rate is set to the schedule's value after `step` optimizer steps (> 0 for a
    resumed run) from `base_lrs` (the run's configured rates, one per group; default: the groups' current
    ``lr``), as if the schedule had been stepped `step` times."""
    from diffusers.optimization import get_scheduler

    # torch's schedulers start from each group's `initial_lr` if it has one, which a resumed optimizer state
    # brings along (even at step 0): this run's rates must win over those of the run that saved it
    for group, lr in zip(optimizer.param_groups, base_lrs or [g["lr"] for g in optimizer.param_groups],
                         strict=True):
        group["initial_lr"] = lr
    return get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps(total_steps),
        num_training_steps=total_steps,
        num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power,
        last_epoch=step - 1,
    )
