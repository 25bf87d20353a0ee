"""lycoft adapters in diffusers pipelines: what `lycoft.load(path, pipe=...)` returns and how to undo a fuse.

    net = lycoft.load("a.safetensors", pipe=pipe, multiplier=0.8)   # on the fly, any SD1/SD2/SDXL pipeline
    net.set_multiplier(0.5)                                         # strength; 0 gives the base model
    net.remove()                                                    # unload: the pipeline is the base again
    fused = fuse(net)                                               # bake into the weights (fast inference)
    fused.unfuse()                                                  # base weights back, bit for bit, adapter on the fly

(``from lycoft.diffusers_loading import fuse``.) diffusers' own ``fuse_lora`` / ``unfuse_lora`` subtract
what they added, which leaves rounding behind; a rotation would have to be inverted. `fuse` instead keeps
a copy of each adapted layer's original weight (on the CPU by default: the adapted layers' size, not the
model's), so `unfuse` restores them exactly.
"""

from __future__ import annotations

import torch

from .network import Network


class FusedAdapter:
    """An adapter baked into its model's weights by `fuse`; `unfuse` undoes it exactly."""

    def __init__(self, net: Network, originals: dict[str, torch.Tensor], multiplier: float | None):
        self.net = net
        self.multiplier = multiplier
        self._originals = originals

    @property
    def fused(self) -> bool:
        return bool(self._originals)

    @torch.no_grad()
    def unfuse(self) -> Network:
        """Put the original weights back and attach the adapter on the fly again; returns the network."""
        if not self._originals:
            raise RuntimeError("this adapter is not fused (unfuse was already called)")
        for key, original in self._originals.items():
            weight = self.net.adapters[key].base.weight
            weight.copy_(original.to(device=weight.device, dtype=weight.dtype))
        self._originals = {}
        return self.net.apply()


@torch.no_grad()
def fuse(net: Network, multiplier: float | None = None, keep_on: str | torch.device = "cpu") -> FusedAdapter:
    """Bake `net` into its model's weights (at `multiplier`; None: each layer's current strength).

    The adapted layers' original weights are kept on `keep_on` so that `FusedAdapter.unfuse` can restore
    them bit for bit. Inference then costs exactly what the base model costs.
    """
    originals = {key: layer.base.weight.detach().to(keep_on, copy=True) for key, layer in net.adapters.items()}
    net.merge(multiplier)
    return FusedAdapter(net, originals, multiplier)
