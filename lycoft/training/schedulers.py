"""`--lr_scheduler` / `--lr_scheduler_type` -> the LR schedule over the optimizer, stepped once per optimizer step.

The schedule is a function of the step count, so it is not checkpointed: on ``--resume`` it is rebuilt at the
resumed step and continues with exactly the learning rates of the uninterrupted run. A named schedule is a
LambdaLR built directly at that step; a scheduler class (``--lr_scheduler_type``) is built at step 0 and stepped
forward to it, which replays any schedule whose rate depends only on how often it was stepped.

The named schedules and their arguments are sd-scripts' (`get_scheduler_fix`): transformers' schedule functions
(diffusers' for ``piecewise_constant``), with ``--lr_scheduler_args`` passed on as extra keyword arguments.
Schedule-free optimizers get a constant schedule (they need none), Adafactor in its relative-step mode its own.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig

# name -> (module, function); the functions differ only in the arguments `_named_kwargs` gives them.
_NAMED: dict[str, tuple[str, str]] = {
    "constant": ("diffusers.optimization", "get_constant_schedule"),
    "constant_with_warmup": ("diffusers.optimization", "get_constant_schedule_with_warmup"),
    "linear": ("diffusers.optimization", "get_linear_schedule_with_warmup"),
    "cosine": ("diffusers.optimization", "get_cosine_schedule_with_warmup"),
    "cosine_with_restarts": ("diffusers.optimization", "get_cosine_with_hard_restarts_schedule_with_warmup"),
    "polynomial": ("diffusers.optimization", "get_polynomial_decay_schedule_with_warmup"),
    "piecewise_constant": ("diffusers.optimization", "get_piecewise_constant_schedule"),
    "cosine_with_min_lr": ("transformers.optimization", "get_cosine_with_min_lr_schedule_with_warmup"),
    "warmup_stable_decay": ("transformers.optimization", "get_wsd_schedule"),
    "inverse_sqrt": ("transformers.optimization", "get_inverse_sqrt_schedule"),
}


def _named_kwargs(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    """The arguments sd-scripts gives the schedule `cfg.lr_scheduler`, from the trainer's flags."""
    warmup = cfg.warmup_steps(total_steps)
    span = {"num_warmup_steps": warmup, "num_training_steps": total_steps}
    # sd-scripts counts these two schedules' cycles in half cosine waves: 1 = from the peak down to the floor
    half_waves = cfg.lr_scheduler_num_cycles / 2
    name = cfg.lr_scheduler
    if name in ("constant", "piecewise_constant"):  # piecewise_constant: step_rules from --lr_scheduler_args
        return {}
    if name == "constant_with_warmup":
        return {"num_warmup_steps": warmup}
    if name in ("linear", "cosine"):
        return span
    if name == "cosine_with_restarts":
        return {**span, "num_cycles": cfg.lr_scheduler_num_cycles}
    if name == "polynomial":
        return {**span, "power": cfg.lr_scheduler_power}
    if name == "cosine_with_min_lr":
        return {**span, "num_cycles": half_waves, "min_lr_rate": cfg.lr_scheduler_min_lr_ratio}
    if name == "warmup_stable_decay":
        decay = cfg.decay_steps(total_steps)
        stable = total_steps - warmup - decay
        if stable < 0:
            raise ConfigError(f"--lr_warmup_steps ({warmup}) and --lr_decay_steps ({decay}) add up to more than "
                              f"the {total_steps} training steps; shorten them")
        return {"num_warmup_steps": warmup, "num_stable_steps": stable, "num_decay_steps": decay,
                "num_cycles": half_waves, "min_lr_ratio": cfg.lr_scheduler_min_lr_ratio or 0.0}
    if name == "inverse_sqrt":
        return {"num_warmup_steps": warmup, "timescale": cfg.lr_scheduler_timescale or None}
    raise AssertionError(name)  # `resolve_lr_scheduler` refused it


def resolve_lr_scheduler(cfg: TrainConfig) -> Callable[..., Any] | None:
    """The schedule function or class `cfg` names (None where the optimizer brings its own schedule), imported
    now so that a missing one fails before any model is loaded."""
    if cfg.schedule_free or (cfg.adafactor_relative_step and not cfg.lr_scheduler_type):
        return None
    if cfg.lr_scheduler_type:
        path = cfg.lr_scheduler_type
        if "." not in path:  # sd-scripts: a bare name is one of torch's
            path = f"torch.optim.lr_scheduler.{path}"
        module_name, _, attr = path.rpartition(".")
        where = f"--lr_scheduler_type {cfg.lr_scheduler_type}"
    elif cfg.lr_scheduler not in _NAMED:  # 'adafactor'
        raise ConfigError(f"--lr_scheduler {cfg.lr_scheduler} is the rate Adafactor computes itself: it needs "
                          "--optimizer_type Adafactor without optimizer_args relative_step=False")
    else:
        module_name, attr = _NAMED[cfg.lr_scheduler]
        where = f"--lr_scheduler {cfg.lr_scheduler}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({e})") from None
    found = getattr(module, attr, None)
    if not callable(found):
        if not cfg.lr_scheduler_type:
            package = module_name.split(".")[0]
            raise ConfigError(f"{where} needs a newer {package} (it has no {attr}): pip install -U {package}")
        raise ConfigError(f"{where}: module {module_name!r} has no class {attr!r}")
    return found


def build_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, *,
                       base_lrs: Sequence[float] | None = None, step: int = 0):
    """The schedule of `cfg` over `total_steps` (``--lr_warmup_steps``/``--lr_decay_steps`` in steps or as
    fractions of it).

    `step` > 0 (a resumed run) sets each param group's learning rate to the schedule's value after `step`
    optimizer steps from `base_lrs` (the run's configured rates, one per group; default: the groups'
    current ``lr``), as if the schedule had been stepped `step` times."""
    found = resolve_lr_scheduler(cfg)
    base_lrs = list(base_lrs or [g["lr"] for g in optimizer.param_groups])
    if found is None and cfg.adafactor_relative_step:
        from transformers.optimization import AdafactorSchedule

        # It only reports the rate Adafactor computes (for logs): nothing to rebuild at a step. It reads the
        # optimizer's own state, so it gets the optimizer itself, not accelerate's wrapper.
        return AdafactorSchedule(getattr(optimizer, "optimizer", optimizer), initial_lr=cfg.learning_rate)
    # torch's schedulers start from each group's `initial_lr` if it has one, which a resumed optimizer state
    # brings along (even at step 0): this run's rates must win over those of the run that saved it
    for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["initial_lr"] = lr
    extra = cfg.lr_scheduler_kwargs()
    if found is None:  # schedule-free: the optimizer's own warm-up (optimizer_args warmup_steps=N) is its schedule
        from diffusers.optimization import get_constant_schedule

        return get_constant_schedule(optimizer, last_epoch=step - 1)
    if cfg.lr_scheduler_type:
        return _replayed(cfg, found, optimizer, extra, base_lrs, step)
    kwargs = _named_kwargs(cfg, total_steps)
    taken = sorted(set(extra) & (set(kwargs) | {"last_epoch"}))
    if taken:
        raise ConfigError(f"--lr_scheduler_args {', '.join(taken)}: the trainer sets these for --lr_scheduler "
                          f"{cfg.lr_scheduler} from its own flags (--lr_warmup_steps, --lr_scheduler_num_cycles, "
                          "...); drop them from --lr_scheduler_args")
    try:
        return found(optimizer, **kwargs, **extra, last_epoch=step - 1)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--lr_scheduler {cfg.lr_scheduler} rejected its arguments ({_shown(kwargs, extra)}): "
                          f"{e}") from None


def _replayed(cfg: TrainConfig, cls: Callable[..., Any], optimizer: torch.optim.Optimizer, kwargs: dict[str, Any],
              base_lrs: Sequence[float], step: int):
    """``--lr_scheduler_type``: built at step 0 from the configured rates, then stepped `step` times."""
    if "last_epoch" in kwargs:
        raise ConfigError("--lr_scheduler_args last_epoch: the trainer sets it (on --resume); drop it")
    for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = group["initial_lr"] = lr
    try:
        scheduler = cls(optimizer, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--lr_scheduler_type {cfg.lr_scheduler_type} rejected its arguments "
                          f"({_shown({}, kwargs)}): {e}") from None
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) or not callable(
            getattr(scheduler, "step", None)):
        raise ConfigError(f"--lr_scheduler_type {cfg.lr_scheduler_type} is not stepped once per optimizer step "
                          "without arguments (it waits for a metric); choose a schedule of the step count")
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended while replaying
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()
    return scheduler


def _shown(kwargs: dict[str, Any], extra: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in {**kwargs, **extra}.items()) or "none"
