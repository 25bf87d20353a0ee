"""`--optimizer_type` -> an optimizer over the adapter's parameter groups.

`resolve_optimizer` imports the class (and fails with the fix) before any model is loaded;
`build_optimizer` instantiates it. Named optimizers and where they come from:

- ``AdamW``: torch. ``AdamW8bit``: bitsandbytes (optional; CUDA). ``Prodigy``: prodigyopt (adapts its own
  step size: use ``--learning_rate 1``). ``Lion``: lion-pytorch (use ~3-10x lower LR than AdamW).
  ``Adafactor``: transformers, with a fixed LR (``relative_step=False``) unless overridden.
- any dotted class path (``torch.optim.SGD``, ``mypkg.opt.MyOpt``) gets the groups, ``lr`` and
  ``--optimizer_args``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig

_NAMED = {
    "AdamW": ("torch.optim", "AdamW", None),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes (pip install bitsandbytes; needs a CUDA GPU)"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt (pip install prodigyopt)"),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch (pip install lion-pytorch)"),
    "Adafactor": ("transformers.optimization", "Adafactor", None),
}
# Adafactor's own defaults derive the LR from the step count; with a given --learning_rate that is
# not what the user asked for.
_DEFAULT_KWARGS = {"Adafactor": {"scale_parameter": False, "relative_step": False, "warmup_init": False}}


def resolve_optimizer(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer class for `name`; a `ConfigError` saying what to install or fix otherwise."""
    if name in _NAMED:
        module_name, attr, package = _NAMED[name]
    else:
        module_name, _, attr = name.rpartition(".")
        package = None
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if package:
            raise ConfigError(f"--optimizer_type {name} needs {package}; install it or use "
                              "--optimizer_type AdamW") from None
        raise ConfigError(f"--optimizer_type {name}: cannot import module {module_name!r} ({e})") from None
    cls = getattr(module, attr, None)
    if cls is None or not callable(cls):
        raise ConfigError(f"--optimizer_type {name}: module {module_name!r} has no class {attr!r}")
    return cls


def build_optimizer(cfg: TrainConfig, groups: Sequence[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer of `cfg` over `groups` (each with its own ``lr``, see `Network.parameter_groups`)."""
    cls = resolve_optimizer(cfg.optimizer_type)
    kwargs = {**_DEFAULT_KWARGS.get(cfg.optimizer_type, {}), **cfg.optimizer_kwargs()}
    try:
        return cls(list(groups), lr=cfg.learning_rate, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--optimizer_type {cfg.optimizer_type} rejected its arguments "
                          f"(lr={cfg.learning_rate}, optimizer_args={kwargs}): {e}") from None
