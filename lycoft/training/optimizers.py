"""`--optimizer_type` -> an optimizer over the adapter's parameter groups, and its training/evaluation switch.

`resolve_optimizer` imports the class (and fails with the `pip install` that fixes it) before any model is
loaded; `build_optimizer` instantiates it as sd-scripts does (`get_optimizer`). The names are sd-scripts' own
(`_NAMED` says where each comes from); any other name is a class path (``torch.optim.SGD``,
``mypkg.opt.MyOpt``) that gets the groups, ``lr`` and ``--optimizer_args``. As in sd-scripts:

- ``SGDNesterov``/``SGDNesterov8bit`` always pass ``nesterov=True``, with ``momentum=0.9`` unless given;
- D-Adaptation and Prodigy estimate their own step size: ``--learning_rate`` multiplies it (use 1.0), and they
  take one rate for all parameter groups;
- ``Adafactor`` computes its own rate (``relative_step``, its default) unless ``--optimizer_args
  relative_step=False``: the groups' rates are then dropped and the LR schedule is Adafactor's own;
- schedule-free optimizers (and any optimizer with ``train()``/``eval()`` methods) keep a training point and
  an evaluation point of the weights: training runs at the training point; samples and saved adapters show
  the evaluation point (`evaluation_point`); a training state holds the training point, so a resumed run goes
  on exactly.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Named:
    """Where a named optimizer comes from and what sd-scripts passes it besides ``--optimizer_args``."""

    path: str  # module.Class
    package: str | None = None  # the pip package that provides it; None: one lycoft depends on
    fixed: Mapping[str, Any] = field(default_factory=dict)  # always passed
    defaults: Mapping[str, Any] = field(default_factory=dict)  # passed unless --optimizer_args sets them
    adapts_lr: bool = False  # estimates its own step size; --learning_rate scales it
    one_lr: bool = False  # refuses parameter groups with different (non-zero) rates


_BNB = "bitsandbytes"
_NESTEROV = {"nesterov": True}
_MOMENTUM = {"momentum": 0.9}

_NAMED: dict[str, _Named] = {
    "AdamW": _Named("torch.optim.AdamW"),
    "AdamW8bit": _Named("bitsandbytes.optim.AdamW8bit", _BNB),
    "PagedAdamW": _Named("bitsandbytes.optim.PagedAdamW", _BNB),
    "PagedAdamW8bit": _Named("bitsandbytes.optim.PagedAdamW8bit", _BNB),
    "PagedAdamW32bit": _Named("bitsandbytes.optim.PagedAdamW32bit", _BNB),
    "Lion": _Named("lion_pytorch.Lion", "lion-pytorch"),
    "Lion8bit": _Named("bitsandbytes.optim.Lion8bit", _BNB),
    "PagedLion8bit": _Named("bitsandbytes.optim.PagedLion8bit", _BNB),
    "SGDNesterov": _Named("torch.optim.SGD", fixed=_NESTEROV, defaults=_MOMENTUM),
    "SGDNesterov8bit": _Named("bitsandbytes.optim.SGD8bit", _BNB, fixed=_NESTEROV, defaults=_MOMENTUM),
    "DAdaptation": _Named("dadaptation.experimental.DAdaptAdamPreprint", "dadaptation", adapts_lr=True,
                          one_lr=True),
    "DAdaptAdamPreprint": _Named("dadaptation.experimental.DAdaptAdamPreprint", "dadaptation", adapts_lr=True,
                                 one_lr=True),
    "DAdaptAdaGrad": _Named("dadaptation.DAdaptAdaGrad", "dadaptation", adapts_lr=True),
    "DAdaptAdam": _Named("dadaptation.DAdaptAdam", "dadaptation", adapts_lr=True, one_lr=True),
    "DAdaptAdan": _Named("dadaptation.DAdaptAdan", "dadaptation", adapts_lr=True),
    "DAdaptAdanIP": _Named("dadaptation.experimental.DAdaptAdanIP", "dadaptation", adapts_lr=True),
    "DAdaptLion": _Named("dadaptation.DAdaptLion", "dadaptation", adapts_lr=True, one_lr=True),
    "DAdaptSGD": _Named("dadaptation.DAdaptSGD", "dadaptation", adapts_lr=True, one_lr=True),
    "Prodigy": _Named("prodigyopt.Prodigy", "prodigyopt", adapts_lr=True, one_lr=True),
    "Adafactor": _Named("transformers.optimization.Adafactor"),
    "AdamWScheduleFree": _Named("schedulefree.AdamWScheduleFree", "schedulefree"),
    "RAdamScheduleFree": _Named("schedulefree.RAdamScheduleFree", "schedulefree"),
    "SGDScheduleFree": _Named("schedulefree.SGDScheduleFree", "schedulefree"),
}


def resolve_optimizer(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer class for `name`; a `ConfigError` saying what to install or fix otherwise."""
    named = _NAMED.get(name)
    module_name, _, attr = (named.path if named else name).rpartition(".")
    package = named.package if named else None
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if package:
            raise ConfigError(f"--optimizer_type {name} needs {package}: pip install {package} (or use "
                              "--optimizer_type AdamW)") from None
        raise ConfigError(f"--optimizer_type {name}: cannot import module {module_name!r} ({e})") from None
    cls = getattr(module, attr, None)
    if cls is None or not callable(cls):
        if package:
            raise ConfigError(f"--optimizer_type {name}: the installed {package} has no {attr}; upgrade it: "
                              f"pip install -U {package}")
        raise ConfigError(f"--optimizer_type {name}: module {module_name!r} has no class {attr!r}")
    return cls


def build_optimizer(cfg: TrainConfig, groups: Sequence[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer of `cfg` over `groups` (each with its own ``lr``, see `Network.parameter_groups`), in
    train mode."""
    name = cfg.optimizer_type
    named = _NAMED.get(name, _Named(name))
    cls = resolve_optimizer(name)
    given = cfg.optimizer_kwargs()
    clash = sorted(set(given) & set(named.fixed))
    if clash:
        fixed = ", ".join(f"{k}={named.fixed[k]}" for k in clash)
        raise ConfigError(f"--optimizer_type {name} always uses {fixed}; drop it from --optimizer_args (or give "
                          f"--optimizer_type {named.path} to choose it yourself)")
    kwargs = {**named.defaults, **given, **named.fixed}
    groups = [dict(g) for g in groups]
    lr: float | None = cfg.learning_rate
    if cfg.adafactor_relative_step:
        kwargs["relative_step"] = True  # warmup_init=True implies it
        lr = None  # Adafactor refuses a given rate in this mode; --learning_rate seeds the logged rate only
        for g in groups:
            g.pop("lr", None)
        logger.info("Adafactor computes its own learning rate (relative_step); --learning_rate %g is only the "
                    "rate logged before the first step", cfg.learning_rate)
    elif named.adapts_lr:
        _check_adaptive_rates(name, named, groups, cfg.learning_rate)
    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--optimizer_type {name} rejected its arguments "
                          f"(lr={lr}, optimizer_args={kwargs}): {e}") from None
    set_train_mode(optimizer, True)
    return optimizer


def _check_adaptive_rates(name: str, named: _Named, groups: Sequence[dict[str, Any]], lr: float) -> None:
    """D-Adaptation and Prodigy: a rate far below 1 only slows their own estimate down (a warning, as in
    sd-scripts); different rates per group are refused by most of them at the first step (an error now)."""
    rates = {g.get("lr", lr) for g in groups} - {0.0}
    if max(rates, default=lr) <= 0.1:
        logger.warning("--optimizer_type %s estimates its own step size and multiplies it by the learning rate "
                       "%g: use --learning_rate 1 (and --unet_lr/--text_encoder_lr 1 or unset)",
                       name, max(rates, default=lr))
    if named.one_lr and len(rates) > 1:
        raise ConfigError(f"--optimizer_type {name} takes one learning rate for all parameters, got "
                          f"{', '.join(f'{r:g}' for r in sorted(rates))} (--learning_rate, --unet_lr, "
                          "--text_encoder_lr); give them one value (0 freezes a part)")


def _two_point(optimizer: Any) -> Any:
    """The optimizer (unwrapped from accelerate's) if it keeps a training and an evaluation point of the
    weights, switched by its ``train()``/``eval()`` methods (schedule-free optimizers); else None."""
    from accelerate.optimizer import AcceleratedOptimizer

    inner = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
    if callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None)):
        return inner
    return None


def set_train_mode(optimizer: Any, train: bool) -> None:
    """Put the weights at the optimizer's training point (`train`) or its evaluation point; a no-op for
    optimizers with one point. Every process calls it at the same place, so the weights stay equal."""
    inner = _two_point(optimizer)
    if inner is not None and train:
        inner.train()
    elif inner is not None:
        inner.eval()


@contextlib.contextmanager
def evaluation_point(optimizer: Any) -> Iterator[None]:
    """Inside the block the weights are the optimizer's evaluation point (what samples and saved adapters show);
    after it they are again exactly the training point they were (restored, not recomputed, so that switching
    changes nothing in training and a resumed run matches the uninterrupted one bit for bit)."""
    inner = _two_point(optimizer)
    if inner is None:
        yield
        return
    params = [p for g in inner.param_groups for p in g["params"]]
    training_point = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        inner.train()
        with torch.no_grad():
            for p, saved in zip(params, training_point, strict=True):
                p.copy_(saved)
