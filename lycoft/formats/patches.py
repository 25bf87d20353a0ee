"""One layer of any OFT file in the wild, as a patch that UIs apply with lycoft's semantics.

The UI extensions (ComfyUI custom nodes, the Forge/reForge/A1111 extension) find a layer's tensors through
their own key maps and hand them here, with the file's metadata:

    patch = read_layer(key, {"oft_blocks": A, "alpha": a, "rescale": s}, metadata)
    W2 = patch.merged(W, multiplier)              # the weight `tools/merge.py --adapter file:m` writes
    y2 = patch.forward(layer_forward, x, m, ...)  # the same on activations (bias untouched)

Layouts (docs/spec.md, "The adapter file" and "Other layouts"):
- ``lycoris``: ``oft_blocks`` 3-D (OFT) / 4-D (BOFT) with ``alpha`` and ``rescale``, LyCORIS files without
  ``alpha``, kohya legacy ``oft_unet_`` files and LyCORIS 2.0 ``oft_diag`` (read by `lycoris`); output side;
- ``peft-oft``: ``oft_R.weight`` in PEFT, kohya ``oft_v2`` and OneTrainer spellings and lycoft's input side,
  read with the Cayley parametrisation it was trained with (exact, or PEFT's truncated series);
- ``peft-boft``: ``boft_R`` + ``boft_s`` (PEFT and kohya ``boft``).

Strength `m` is lycoft's everywhere: every rotation block (every stage) becomes `m R + (1 - m) I`, the
scale (``rescale`` / ``boft_s``) applies after it unchanged, and `m = 0` is the base layer exactly.

A patch is its tensors plus a `Reading` of plain values, so a UI that moves or re-creates patch objects
(ComfyUI rebuilds them from `(tensors, reading)` when it moves weights between devices) keeps it whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io.errors import AdapterFileError
from ..ops import adapter_rotation, interpolate, merged_weight, rotate
from .lycoris import _parse_module
from .peft import block_size_of, butterfly_permutation, neumann_rotation, peft_config_for

# Every tensor suffix that belongs to an OFT/BOFT layer, in any layout.
SUFFIXES = ("oft_blocks", "alpha", "rescale", "oft_diag", "oft_R.weight", "boft_R", "boft_s")
# The suffixes that alone make a layer: a UI looks for `<prefix>.<one of these>` to find OFT layers.
MAIN_SUFFIXES = ("oft_blocks", "oft_diag", "oft_R.weight", "boft_R")
PEFT_DEFAULT_NEUMANN_TERMS = 5  # PEFT's and kohya oft_v2's default (use_cayley_neumann=True, 5 terms)


@dataclass(frozen=True)
class Reading:
    """How to read a layer's tensors (plain values only).

    layout: ``lycoris``, ``peft-oft`` or ``peft-boft`` (see the module docstring).
    constraint: ``lycoris``: COFT bound per rotated channel (`||Q|| <= constraint * out`), 0 = none.
    neumann_terms: ``peft-oft``: 0 = exact Cayley `(I - S)(I + S)^-1`; n > 0 = PEFT's n-term series.
    assumed: the parametrisation was not recorded in the file (no PEFT config, no lycoft metadata):
        PEFT's default (5-term series) was taken; a UI should say so once.
    source: where the layout came from (``lycoris``, ``kohya-legacy``, ``lycoris-2.0``, ``peft``,
        ``kohya-oft_v2``, ``lycoft-input``, ...), for messages.
    """

    layout: str
    constraint: float = 0.0
    neumann_terms: int = 0
    assumed: bool = False
    source: str = ""


class LayerPatch:
    """One adapted layer: `tensors` (`(blocks, scale)`, scale may be None) and its `Reading`.

    blocks: ``lycoris``: raw `A` `(nb, b, b)` / `(m, nb, b, b)`; ``peft-oft``: PEFT's upper-triangle vectors
    `(r, b(b-1)/2)` (one row when shared); ``peft-boft``: PEFT's `(N, nb, b, b)`.
    scale: ``rescale`` `(out, 1, ...)` / ``boft_s`` (any shape with `out` entries), applied per output row.
    """

    def __init__(self, tensors: tuple[Tensor, Tensor | None], reading: Reading) -> None:
        self.tensors = tensors
        self.reading = reading

    @property
    def blocks(self) -> Tensor:
        return self.tensors[0]

    @property
    def scale(self) -> Tensor | None:
        return self.tensors[1]

    @property
    def side(self) -> str:
        return "output" if self.reading.layout == "lycoris" else "input"

    # -- rotations -------------------------------------------------------------------------------------
    def rotation(self, multiplier: float, fan_in: int | None = None, device: torch.device | None = None
                 ) -> Tensor:
        """lycoft's rotation blocks `R` at strength `multiplier`, float32, on `device`.

        ``lycoris``: `ops.adapter_rotation` (output side, `M = blockdiag(R_k^T)` or the butterfly).
        PEFT kinds (input side, `W'_flat = W_flat M^T`, `M^T = blockdiag(R_k)`): `R_k` is PEFT's block
        transposed, so that PEFT's own merge is reproduced at strength 1. ``peft-boft`` returns the
        `(N, nb, b, b)` stack of interpolated blocks (its permutations are applied by `merged`).
        """
        blocks = self.blocks.to(device=device, dtype=torch.float32)
        if self.reading.layout == "lycoris":
            return adapter_rotation(blocks, constraint=self.reading.constraint, multiplier=multiplier)
        if self.reading.layout == "peft-oft":
            b = block_size_of(blocks.shape[-1])
            rows, cols = torch.triu_indices(b, b, 1, device=blocks.device)
            S = torch.zeros(blocks.shape[0], b, b, dtype=torch.float32, device=blocks.device)
            S[:, rows, cols] = blocks
            S = S - S.transpose(-1, -2)
            if self.reading.neumann_terms:
                R = neumann_rotation(S, self.reading.neumann_terms)
            else:
                I = torch.eye(b, dtype=S.dtype, device=S.device).expand_as(S)
                R = torch.linalg.solve(I + S, I - S, left=False)
            R = R.transpose(-1, -2)
            if R.shape[0] == 1 and fan_in is not None and fan_in // b > 1:  # block_share: one block for all
                R = R.expand(fan_in // b, b, b)
            return interpolate(R, multiplier)
        S = 0.5 * (blocks - blocks.transpose(-1, -2))
        I = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
        return interpolate(torch.linalg.solve(I + S, I - S, left=False).transpose(-1, -2), multiplier)

    # -- weights ---------------------------------------------------------------------------------------
    def merged(self, weight: Tensor, multiplier: float = 1.0) -> Tensor:
        """The layer's weight with this adapter at strength `multiplier`, float32 (a new tensor).

        Equal to what `tools/merge.py --adapter file:m` writes for every layout lycoft merges, and to PEFT's
        own merged weight (kohya's for ``oft_v2`` / ``boft``) at strength 1 for the PEFT layouts.
        """
        W = weight.float()
        if multiplier == 0:
            return W.clone()
        scale = None if self.scale is None else self.scale.to(device=W.device, dtype=torch.float32).reshape(-1)
        if self.reading.layout == "lycoris":
            return merged_weight(W, self.blocks.to(W.device), constraint=self.reading.constraint,
                                 multiplier=multiplier, rescale=scale)
        R = self.rotation(multiplier, W[0].numel(), W.device)
        if self.reading.layout == "peft-boft" and R.shape[0] > 1:
            out = _peft_butterfly(W.reshape(W.shape[0], -1), R).reshape(W.shape)
            return out if scale is None else out * scale.reshape((-1,) + (1,) * (W.dim() - 1))
        if self.reading.layout == "peft-boft":
            R = R[0]
        return merged_weight(W, R, side=self.side, multiplier=multiplier, rescale=scale, rotation=R)

    # -- activations -----------------------------------------------------------------------------------
    def on_activations(self, kernel_numel: int) -> bool:
        """Whether `forward` can run without the layer's weight (output side, or an input rotation that lines
        up with the layer input: Linear and 1-element kernels, block-diagonal)."""
        if self.side == "output":
            return True
        return kernel_numel == 1 and not (self.reading.layout == "peft-boft" and self.blocks.shape[0] > 1)

    def forward(self, layer: Callable[[Tensor], Tensor], x: Tensor, multiplier: float, *, channel_dim: int,
                bias: Tensor | None = None, fan_in: int | None = None) -> Tensor:
        """The adapted layer's output from the base layer's forward `layer` (bias included), exactly the layer
        run with `merged(W, multiplier)` and its own bias: the bias is never rotated or scaled.

        channel_dim: the channel dimension of `x` and of the output (-1 for Linear, 1 for Conv).
        Requires `on_activations(kernel_numel)`; `fan_in` is the layer's input size (shared PEFT blocks).
        The rotation runs in float32 whatever the activations' dtype (a half-precision layer output keeps
        only its own rounding), and the result comes back in the layer's output dtype.
        """
        if multiplier == 0:
            return layer(x)
        if self.side == "input":
            R = self.rotation(multiplier, fan_in or x.shape[channel_dim], x.device)
            if self.reading.layout == "peft-boft":
                R = R[0]
            y = layer(rotate(R, _lifted(x), dim=channel_dim, transpose=True).to(x.dtype))
            if self.scale is None:
                return y
            return _scaled(_lifted(y), self.scale, channel_dim, bias).to(y.dtype)
        y = layer(x)
        out = _lifted(y)
        b = None if bias is None else _per_channel(bias.to(device=y.device, dtype=out.dtype), y.dim(), channel_dim)
        if b is not None:
            out = out - b
        out = rotate(self.rotation(multiplier, device=y.device).to(out.dtype), out, dim=channel_dim)
        if self.scale is not None:
            out = out * _per_channel(self.scale.to(device=y.device, dtype=out.dtype).reshape(-1), y.dim(), channel_dim)
        return (out if b is None else out + b).to(y.dtype)


def _lifted(t: Tensor) -> Tensor:
    """float32 for half-precision tensors (float32 / float64 stay as they are)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _per_channel(t: Tensor, ndim: int, channel_dim: int) -> Tensor:
    shape = [1] * ndim
    shape[channel_dim] = -1
    return t.reshape(shape)


def _scaled(y: Tensor, scale: Tensor, channel_dim: int, bias: Tensor | None) -> Tensor:
    """`scale * (y - bias) + bias` per channel."""
    s = _per_channel(scale.to(device=y.device, dtype=y.dtype).reshape(-1), y.dim(), channel_dim)
    if bias is None:
        return y * s
    b = _per_channel(bias.to(device=y.device, dtype=y.dtype), y.dim(), channel_dim)
    return (y - b) * s + b


def _peft_butterfly(W: Tensor, R: Tensor) -> Tensor:
    """`W_flat M^T` for PEFT's multi-factor butterfly `M = prod_i P_i D_i P_i^T` (stage 0 first); `R` holds
    lycoft-convention blocks (PEFT's transposed), so `D_i^T = blockdiag(R_i)`."""
    N, nb, b, _ = R.shape
    n = W.shape[1]
    X = W
    for i in range(N):
        perm = butterfly_permutation(n, nb // 2**i, b // 2, N - 1).to(W.device)
        Y = torch.empty_like(X)
        Y[:, perm] = X  # X P_i
        Z = torch.einsum("otb,tbc->otc", Y.reshape(-1, nb, b), R[i]).reshape(X.shape)  # (X P_i) D_i^T
        X = Z[:, perm]  # ... P_i^T
    return X


# ---------------------------------------------------------------------------------------------- reading
def read_layer(key: str, parts: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
               path: str = "adapter") -> LayerPatch | None:
    """The patch of one layer from its tensors (`{suffix: tensor}`, suffixes of `SUFFIXES`), or None when
    they hold no OFT/BOFT layer. Raises `AdapterFileError` (naming `path` and `key`) for damaged or unknown
    shapes."""
    metadata = metadata or {}
    if "oft_R.weight" in parts:
        vec = parts["oft_R.weight"]
        if vec.dim() != 2:
            raise AdapterFileError(path, f"oft_R.weight has shape {tuple(vec.shape)}; expected (blocks, b(b-1)/2)",
                                   "the file is damaged", key=key)
        try:
            block_size_of(vec.shape[-1])
        except ValueError as e:
            raise AdapterFileError(path, f"oft_R.weight: {e}", "the file is damaged", key=key) from None
        terms, assumed, source = _peft_oft_parametrisation(path, key, metadata)
        return LayerPatch((_finite(path, key, "oft_R.weight", vec), None),
                          Reading("peft-oft", neumann_terms=terms, assumed=assumed, source=source))
    if "boft_R" in parts:
        A, s = parts["boft_R"], parts.get("boft_s")
        if A.dim() != 4 or A.shape[-1] != A.shape[-2] or s is None:
            raise AdapterFileError(path, f"a BOFT layer needs boft_R (N, blocks, b, b) and boft_s; found boft_R "
                                   f"{tuple(A.shape)} and {'no boft_s' if s is None else 'boft_s'}",
                                   "the file is damaged", key=key)
        source = "kohya-boft" if key.startswith(("lora_unet_", "lora_te")) else "peft"
        return LayerPatch((_finite(path, key, "boft_R", A), s.float()), Reading("peft-boft", source=source))
    if "oft_blocks" not in parts and "oft_diag" not in parts:
        return None
    spec = _parse_module(path, key, key, dict(parts), metadata)
    return LayerPatch((spec.blocks, spec.rescale), Reading("lycoris", constraint=spec.constraint, source=spec.source))


def _finite(path: str, key: str, suffix: str, t: Tensor) -> Tensor:
    t = t.float()
    if not torch.isfinite(t).all():
        raise AdapterFileError(path, f"{suffix} contains NaN or inf", "the file is damaged", key=key)
    return t


def _peft_oft_parametrisation(path: str, key: str, metadata: Mapping[str, str]) -> tuple[int, bool, str]:
    """`(neumann_terms, assumed, source)` of an ``oft_R.weight`` layer, from what the file records."""
    if metadata.get("lycoft.side") == "input":
        if metadata.get("lycoft.cayley", "exact") != "exact":
            raise AdapterFileError(path, f"lycoft.cayley is {metadata['lycoft.cayley']!r}, not a known "
                                   "parametrisation", "re-save the adapter with lycoft", key="lycoft.cayley")
        return 0, False, "lycoft-input"
    config = peft_config_for(key, metadata)
    if config is not None:
        if not config.get("use_cayley_neumann", True):
            return 0, False, "peft"
        return int(config.get("num_cayley_neumann_terms", PEFT_DEFAULT_NEUMANN_TERMS)), False, "peft"
    if metadata.get("ss_network_module", "").endswith("oft_v2"):  # kohya's oft_v2 always trains the series
        return PEFT_DEFAULT_NEUMANN_TERMS, False, "kohya-oft_v2"
    return PEFT_DEFAULT_NEUMANN_TERMS, True, "peft"


def layer_prefixes(keys: list[str] | set[str]) -> set[str]:
    """The layer prefixes (`<prefix>.<suffix>`) of a file's keys that hold an OFT/BOFT layer."""
    out = set()
    for k in keys:
        for suffix in MAIN_SUFFIXES:
            if k.endswith("." + suffix):
                out.add(k[: -len(suffix) - 1])
    return out


def layer_parts(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """`{suffix: tensor}` of the layer `prefix` in a file's tensors."""
    return {s: tensors[f"{prefix}.{s}"] for s in SUFFIXES if f"{prefix}.{s}" in tensors}


def conv_forward(weight: Tensor, bias: Tensor | None, x: Tensor, module: object) -> Tensor:
    """A Linear / ConvNd forward with `weight` and `module`'s geometry (stride, padding, ...): the weight path
    of `LayerPatch` for layers whose input rotation does not line up with the input."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    return conv(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
