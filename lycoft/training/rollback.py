"""The adapter's state before the last optimizer step, kept in memory so that a step can be undone.

A learning rate far too high does not always fail loudly at the step that does the damage: its update can
leave parameters that are infinite (caught right after the step), or finite but so large that only the next
forward pass turns NaN. A state saved *after* such an update is already poisoned: resuming from it fails at
the same step whatever the learning rate. The state from before the update is known to be good: its forward
pass gave a finite loss and finite gradients. `StepUndo` keeps a copy of it (the adapter parameters, the
optimizer's per-parameter state and group settings, the step counters), refreshed before every optimizer
step, so the loop can restore it: to skip the step (``--skip_nonfinite``) or to save it before stopping.

The copy costs one adapter's parameters and optimizer state in memory (the adapter is small next to the
frozen model) and a device-side copy per step; buffers are allocated once and reused.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lycoft.training.saving import TrainState


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point value of `tensors` is finite (one flag per tensor, then a single sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def optimizer_tensors(optimizer: Any, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of the optimizer's per-parameter state (moments, step counts ...)."""
    state = optimizer.state
    return [v for p in params for v in state.get(p, {}).values() if isinstance(v, torch.Tensor)]


class StepUndo:
    """A copy of the parameters, optimizer state and counters from before the last optimizer step."""

    def __init__(self, optimizer: Any, params: Sequence[torch.Tensor]) -> None:
        self.optimizer = optimizer
        self.params = list(params)
        self._params: list[torch.Tensor] | None = None
        self._state: dict[int, dict[str, Any]] = {}
        self._groups: list[dict[str, Any]] = []
        self.counters: TrainState | None = None  # None until a step was taken in this process

    def keep(self, counters: TrainState) -> None:
        """Remember the current state (call right before ``optimizer.step()``)."""
        with torch.no_grad():
            if self._params is None:
                self._params = [p.detach().clone() for p in self.params]
            else:
                for saved, p in zip(self._params, self.params):
                    saved.copy_(p)
            live = self.optimizer.state
            for i, p in enumerate(self.params):
                self._state[i] = self._copy_state(live.get(p, {}), self._state.get(i, {}))
        self._groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                        for g in self.optimizer.param_groups]
        self.counters = dataclasses.replace(counters)

    @staticmethod
    def _copy_state(live: dict[str, Any], buffers: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in live.items():
            old = buffers.get(k)
            if isinstance(v, torch.Tensor):
                if isinstance(old, torch.Tensor) and old.shape == v.shape and old.dtype == v.dtype:
                    out[k] = old.copy_(v)
                else:
                    out[k] = v.detach().clone()
            else:
                out[k] = copy.deepcopy(v)
        return out

    def restore(self, counters: TrainState | None = None) -> None:
        """Put the remembered parameters and optimizer state back; also the counters into `counters`."""
        if self.counters is None or self._params is None:
            raise RuntimeError("no optimizer step was taken yet: nothing to restore")
        with torch.no_grad():
            for saved, p in zip(self._params, self.params):
                p.copy_(saved)
            live = self.optimizer.state
            for i, p in enumerate(self.params):
                saved = self._state.get(i, {})
                if not saved:
                    live.pop(p, None)
                    continue
                current = live.setdefault(p, {})
                for k in list(current):
                    if k not in saved:
                        del current[k]
                for k, v in saved.items():
                    cur = current.get(k)
                    if isinstance(v, torch.Tensor) and isinstance(cur, torch.Tensor) and cur.shape == v.shape:
                        cur.copy_(v)
                    else:
                        current[k] = v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for group, saved in zip(self.optimizer.param_groups, self._groups):
            group.update(copy.deepcopy(saved))
        if counters is not None:
            for f in dataclasses.fields(TrainState):
                setattr(counters, f.name, getattr(self.counters, f.name))
