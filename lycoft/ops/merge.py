"""The merged weight of one adapted layer: the single formula every merge path evaluates.

The adapted layer (`OFTLayer.merged_weight`, hence `Network.merge` and the layer's weight path), the
streaming merge into checkpoints, full-difference exports and the inspection of a file against a base all
call `merged_weight`, so they agree bit for bit on the same inputs.

Semantics (lycoft's strength, the LyCORIS formula):
- `Q = A - A^T`, scaled so that `||Q||_F <= constraint * dim` over all blocks and stages (COFT; 0 = none);
- `R = (I + Q)(I - Q)^-1` per block, then the strength `m R + (1 - m) I` per block (per stage for boft):
  oft `W' = (m (R - I) + I)^T W` blockwise, boft every stage `m R_i + (1 - m) I`;
- `W' = rescale * M W` (output side) or `rescale * W M^T` (input side): rescale after the rotation;
- `m = 0` is the base weight itself, rescale included (the adapted layer's forward at strength 0 is the
  plain layer, so every path gives the base model exactly).
"""

from __future__ import annotations

import math

from torch import Tensor

from .apply import rotate_weight
from .cayley import cayley, cayley_of_raw, compute_dtype, constrain, interpolate, skew


def check_multiplier(multiplier: object, what: str = "multiplier") -> float:
    """`multiplier` as a float, or a ValueError naming it (`what` says where it came from) when it is not a
    finite number: NaN or an infinite strength would make every weight it touches NaN."""
    fix = "use a number such as 1 (the adapter as trained), 0.5, or 0 (the base model)"
    try:
        value = float(multiplier)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} {multiplier!r} is not a number; {fix}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} {value} is not a finite number and would make every adapted weight NaN; {fix}")
    return value


def adapter_rotation(blocks: Tensor, *, constraint: float = 0.0, multiplier: float = 1.0) -> Tensor:
    """Raw blocks `A` -> the operator's blocks `R` at strength `multiplier` (float32; float64 stays float64).

    blocks `(nb, b, b)` (oft) or `(m, nb, b, b)` (boft) -> `R` of the same shape.
    constraint: COFT bound per rotated channel, `||A - A^T||_F <= constraint * nb * b` (0 disables it).
    """
    if constraint == 0:
        R = cayley_of_raw(blocks)
    else:
        dim = blocks.shape[-3] * blocks.shape[-1]
        R = cayley(constrain(skew(blocks.to(compute_dtype(blocks))), constraint * dim))
    return interpolate(R, multiplier)


def merged_weight(
    weight: Tensor,
    blocks: Tensor,
    *,
    side: str = "output",
    constraint: float = 0.0,
    multiplier: float = 1.0,
    rescale: Tensor | None = None,
    rotation: Tensor | None = None,
) -> Tensor:
    """`W' = rescale * M W` (output side) or `rescale * W M^T` (input side), in `weight`'s dtype.

    weight: `(out, in)` (Linear) or `(out, in, *k)` (Conv); a conv weight is rotated as `out` rows of
        length `in * prod(k)`.
    blocks: raw blocks `A`, `(nb, b, b)` for oft (`M = blockdiag(R_k^T)`) or `(m, nb, b, b)` for boft
        (`M` = the butterfly `S_{m-1} ... S_0`); the algorithm is the tensor's rank, as in adapter files.
        `nb * b` is `out` (output side) or `in * prod(k)` (input side).
    side: ``"output"`` or ``"input"``.
    constraint, multiplier: see `adapter_rotation` (multiplier 1: the adapter as trained, 0: the base
        weight, unscaled: a copy of `weight`).
    rescale: `(out,)` or `(out, 1, ...)`: per-output-channel scale, applied after the rotation.
    rotation: `adapter_rotation(blocks, ...)` already built by the caller (a layer reusing the rotations its
        network builds in one batch); `constraint` and `multiplier` are then not applied again, except that
        multiplier 0 still returns the base weight.
    Computed in the rotation's dtype: float32 (float64 for float64 blocks), whatever `weight`'s dtype.
    """
    if multiplier == 0:
        return weight.clone()
    R = adapter_rotation(blocks, constraint=constraint, multiplier=multiplier) if rotation is None else rotation
    if R.shape != blocks.shape:
        raise ValueError(f"rotation of shape {tuple(R.shape)} does not belong to blocks of shape {tuple(blocks.shape)}")
    Wr = rotate_weight(R, weight, side)
    if rescale is not None:
        Wr = Wr * rescale.reshape((weight.shape[0],) + (1,) * (weight.dim() - 1)).to(Wr.dtype)
    return Wr.to(weight.dtype)
