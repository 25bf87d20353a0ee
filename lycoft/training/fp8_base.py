"""``--fp8_base``: the frozen base model's Linear and Conv weights stored in float8, upcast per layer at use.

Every Linear/Conv1d/2d/3d weight of the UNet (and, unless ``--fp8_base_unet``, of the text encoders) is
stored as ``torch.float8_e4m3fn``, one byte per weight; each layer upcasts it to its input's dtype for the
call (`lycoft.layers.base_op`), and backward upcasts it again instead of keeping the copy. An adapted
layer does the same (`OFTLayer`), and its activation path rotates the output of the stored weights, so
the adapted model computes exactly what a base whose weights were rounded to float8 computes: the
rounding happens once, at storage, never in the adapter's arithmetic.

What stays in the training dtype: biases and norms, which kohya sd-scripts casts too (0.06% of SDXL's UNet
parameters: the rounding would cost accuracy and save nothing), and the text encoders' embeddings, which
sd-scripts keeps as well. SDXL in bf16: UNet 4.78 GiB -> 2.39 GiB, text encoders 1.52 GiB -> 0.86 GiB.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lycoft.layers import base_op
from lycoft.network import Network
from lycoft.ops.weight_path import is_float8

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
STORED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _stored_forward(self: nn.Module, x: Tensor) -> Tensor:
    return base_op(self, x, self.weight, self.bias)


def store_in_float8(model: nn.Module, dtype: torch.dtype = FP8) -> int:
    """Store every Linear/Conv weight of the frozen `model` in `dtype`, in place; returns how many layers.

    Each such layer's ``forward`` becomes the upcasting one; attach adapters afterwards (a `Network`:
    ``remove()`` before, ``apply()`` after), so that removing them restores that forward.
    """
    count = 0
    for name, m in model.named_modules():
        if not isinstance(m, STORED) or is_float8(m.weight.dtype):
            continue
        if m.weight.requires_grad:
            raise ValueError(f"{name}: only frozen weights can be stored in float8; freeze the model first")
        if "forward" in m.__dict__:
            raise ValueError(f"{name}: its forward is already replaced (an adapter?); store the base in float8 "
                             "before attaching adapters")
        m.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
        m.forward = types.MethodType(_stored_forward, m)
        count += 1
    return count


def parameter_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the parameters and buffers of `modules`."""
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: that of its first floating parameter not stored in float8.

    (diffusers' ``model.dtype`` is the first parameter's, float8 once the first layer is stored so.)
    """
    for p in model.parameters():
        if p.is_floating_point() and not is_float8(p.dtype):
            return p.dtype
    return torch.float32


def store_base_in_float8(unet: nn.Module, text_encoders: list[nn.Module], network: Network) -> None:
    """The UNet and `text_encoders` stored in float8 under the attached `network` (detached and reattached
    around the change); logs the base's parameter bytes before and after."""
    models = [unet, *text_encoders]
    before = parameter_bytes(models)
    attached = network.applied
    network.remove()
    layers = sum(store_in_float8(m) for m in models)
    if attached:
        network.apply()
    after = parameter_bytes(models)
    logger.info("fp8 base: %d layer weights of the UNet%s stored in float8: %.1f MB -> %.1f MB", layers,
                " and text encoders" if text_encoders else "", before / 2**20, after / 2**20)
