"""The rotations of a whole network, built together: one batched Cayley per block size, once per step.

A UNet calls hundreds of adapted layers per step, and each needs its rotation `R = C(Q)`. Built layer by
layer that is hundreds of small inverses (about 15 % of a CPU training step of a mid-size UNet, and
hundreds of tiny kernel launches on a GPU). `RotationCache` builds them all at the first layer call of a
forward, as one `cayley` over the concatenated blocks of every layer that shares a block size, and hands
each layer its slice; the values are the per-layer ones to float32 rounding.

When a cached rotation is still valid:
- every parameter version is the one it was built from (an optimizer step, `load_state_dict`, or any
  in-place change of a layer's blocks makes it stale; each layer checks only its own blocks, and the first
  stale layer rebuilds them all);
- the layer's rotation settings (constraint, dropout while training, grad requirement) are unchanged;
- with autograd: no backward has gone through it yet. A backward frees the graph, so the next forward
  (the next micro-batch of a gradient accumulation) builds again; two forwards before one backward (two
  calls of one module, a summed loss) share one rotation and its gradient adds up. Layers inside a
  gradient-checkpointed region compute their own rotation (see `shared_graph_allowed`).
Without autograd (sampling, inference, merging) the rotations are kept until a parameter changes, so a
sampler's 30 steps x 2 guidance passes compute them once.
Dropout masks are drawn for every layer at each build: one mask per layer per step, as before.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .ops import cayley, cayley_of_raw

if TYPE_CHECKING:
    from .layers import OFTLayer


def shared_graph_allowed() -> bool:
    """Whether a layer may take its rotation from a shared, batched graph: only in a plain forward.

    Not inside a checkpointed region (saved-tensor hooks are active: its recomputation must save exactly
    what its forward saved, so both compute their own rotation), nor inside a backward (reentrant
    checkpointing recomputes and backpropagates a region on its own, which would free the shared graph
    before the rest of the model reaches it). Both probes are private torch functions: without them, no
    sharing (the per-layer computation is always correct).
    """
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    if top_hooks is None or graph_task is None:
        return False
    return top_hooks(False) is None and graph_task() == -1


class _Built:
    """The rotations of one build (one autograd graph when built with grad)."""

    __slots__ = ("consumed", "slices")

    def __init__(self) -> None:
        self.consumed = False
        # id(layer) -> (layer, its blocks, R slice, version key, settings); holding the blocks keeps their
        # id and memory from being reused by a replacement parameter (load_state_dict(assign=True))
        self.slices: dict[int, tuple[OFTLayer, Tensor, Tensor, tuple, tuple]] = {}

    def mark_consumed(self, grad: Tensor) -> None:
        self.consumed = True


class RotationCache:
    """Batched, reused rotations for the layers of `adapters` (a `Network`'s ModuleDict).

    `components` (key -> "unet", "te1"...) splits the builds: a component's rotations are built when one of
    its layers is first called, so a text encoder run without autograd (cached or frozen conditioning)
    never joins the UNet's graph, and its adapters keep a `None` gradient as they would without the cache.
    """

    def __init__(self, adapters: nn.ModuleDict, components: dict[str, str] | None = None) -> None:
        self.adapters = adapters
        self.components = components if components is not None else {}
        self._grad: dict[str, _Built] = {}
        self._plain: dict[str, _Built] = {}
        self.builds = 0  # number of batched builds so far (tests and benches)

    # never copy or pickle live rotations (a non-leaf tensor cannot be deep-copied)
    def __deepcopy__(self, memo: dict) -> RotationCache:
        return RotationCache(copy.deepcopy(self.adapters, memo), copy.deepcopy(self.components, memo))

    def __getstate__(self) -> dict[str, Any]:
        return {"adapters": self.adapters, "components": self.components, "_grad": {}, "_plain": {}, "builds": 0}

    def clear(self) -> None:
        self._grad, self._plain = {}, {}

    # -- lookup ---------------------------------------------------------------------------------------
    def get(self, layer: OFTLayer) -> Tensor | None:
        """`layer`'s rotation at strength 1 (None: the layer computes its own, e.g. Neumann layers)."""
        if not layer.batchable_rotation():
            return None
        with_grad = torch.is_grad_enabled() and layer.oft_blocks.requires_grad
        if with_grad and not shared_graph_allowed():
            return None
        store = self._grad if with_grad else self._plain
        component = self.components.get(layer.name, "")
        hit = self._lookup(store.get(component), layer)
        if hit is not None:
            return hit
        store[component] = built = self._build(with_grad, component)
        return self._lookup(built, layer)

    @staticmethod
    def _lookup(built: _Built | None, layer: OFTLayer) -> Tensor | None:
        if built is None or built.consumed:
            return None
        entry = built.slices.get(id(layer))
        if entry is None or entry[0] is not layer or entry[1] is not layer.oft_blocks:
            return None
        _, _, R, version, settings = entry
        if version != layer.rotation_version() or settings != layer.rotation_settings():
            return None
        return R

    # -- building -------------------------------------------------------------------------------------
    def _build(self, with_grad: bool, component: str) -> _Built:
        built = _Built()
        groups: dict[tuple, list[OFTLayer]] = {}
        for key, layer in self.adapters.items():
            if self.components.get(key, "") != component or not layer.batchable_rotation():
                continue
            blocks = layer.oft_blocks
            if with_grad and not blocks.requires_grad:
                continue  # frozen layers get graph-free rotations (the other store)
            key = (blocks.shape[-1], blocks.dtype, blocks.device, layer.rotation_is_raw())
            groups.setdefault(key, []).append(layer)
        with torch.set_grad_enabled(with_grad):
            for (b, _, _, raw), layers in groups.items():
                parts = [layer.rotation_input() for layer in layers]
                flat = [p.reshape(-1, b, b) for p in parts]
                X = flat[0] if len(flat) == 1 else torch.cat(flat)
                R = cayley_of_raw(X) if raw else cayley(X)
                if with_grad and R.requires_grad:
                    R.register_hook(built.mark_consumed)
                for layer, piece in zip(layers, R.split([f.shape[0] for f in flat])):
                    built.slices[id(layer)] = (layer, layer.oft_blocks, piece.view(layer.oft_blocks.shape),
                                               layer.rotation_version(), layer.rotation_settings())
        self.builds += 1
        return built
