"""`AdapterConfig`: what one OFT/BOFT adapter looks like, validated once, with errors that say the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

ALGO_ALIASES = {"oft": "oft", "diag-oft": "oft", "diag_oft": "oft", "boft": "boft", "butterfly": "boft"}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _two_adic(n: int) -> int:
    """Largest e with 2**e dividing n (n > 0)."""
    e = 0
    while n % 2 == 0:
        n //= 2
        e += 1
    return e


@dataclass(frozen=True)
class BlockLayout:
    """The resolved shape of one adapter on a layer with `dim` rotated channels.

    oft: `stages == 1` and the tensor is `(block_num, block_size, block_size)`;
    boft: the tensor is `(stages, block_num, block_size, block_size)`.
    """

    algo: str
    dim: int
    block_size: int
    block_num: int
    stages: int

    @property
    def shape(self) -> tuple[int, ...]:
        b, nb = self.block_size, self.block_num
        return (nb, b, b) if self.algo == "oft" else (self.stages, nb, b, b)


@dataclass(frozen=True)
class AdapterConfig:
    """How to build an orthogonal adapter for one layer (or, as a network default, for every layer).

    Fields:
        algo: ``"oft"`` (block-diagonal rotation, the LyCORIS ``diag-oft``) or ``"boft"`` (butterfly:
            a product of ``butterfly_factors`` sparse rotations; more expressive per parameter, costlier).
        block_size: rows per rotation block. Bigger blocks rotate more channels together: more
            expressive, more parameters (``dim * block_size``), more compute. Must divide the layer's
            rotated dimension. Give ``block_size`` or ``block_num``, not both (default: block_size 32 for
            oft, 8 for boft).
        block_num: number of blocks instead of their size (kohya ``networks.oft`` counts blocks).
        butterfly_factors: boft only: number of butterfly stages ``m``; ``2**(m-1)`` must divide the
            block count. ``None`` takes the largest valid ``m`` (the full butterfly when the block count is
            a power of two). Each stage costs as much as one oft rotation.
        constraint: COFT bound on ``||Q||_F <= constraint * dim`` over the whole adapter; 0 disables it.
            Small values (1e-4 .. 1e-2) keep the model close to the base: less drift, slower learning.
        rescale: also train a per-output-channel scale (init 1). Breaks norm preservation; ComfyUI
            ignores it for oft files (export a ``.diff`` for those users).
        side: ``"output"`` rotates output channels (LyCORIS/ComfyUI/A1111 convention, the default and
            the only side those UIs read); ``"input"`` rotates the input dimension (the paper/PEFT form).
        dropout: module dropout during training: each block is replaced by the identity with this
            probability (multiplicative, so the adapter stays orthogonal).
        neumann_terms: 0 = exact Cayley (default). ``n > 0`` uses a truncated Neumann series of ``n``
            terms for ``(I - Q)^-1``: an approximation, faster on some GPUs, NOT orthogonal at large Q.
        path: execution path of the forward: ``"auto"`` picks the cheaper exact path per call;
            ``"weight"`` rebuilds the rotated weight; ``"activation"`` rotates the layer's output.
    """

    algo: str = "oft"
    block_size: int | None = None
    block_num: int | None = None
    butterfly_factors: int | None = None
    constraint: float = 0.0
    rescale: bool = False
    side: Literal["output", "input"] = "output"
    dropout: float = 0.0
    neumann_terms: int = 0
    path: Literal["auto", "weight", "activation"] = "auto"

    def __post_init__(self) -> None:
        algo = ALGO_ALIASES.get(str(self.algo).lower())
        if algo is None:
            raise ValueError(f"algo {self.algo!r} is not known; use 'oft' (alias 'diag-oft') or 'boft'")
        object.__setattr__(self, "algo", algo)
        if self.block_size is not None and self.block_num is not None:
            raise ValueError(
                f"give block_size ({self.block_size}) or block_num ({self.block_num}), not both"
            )
        for name in ("block_size", "block_num", "butterfly_factors"):
            v = getattr(self, name)
            if v is not None and (int(v) != v or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.algo == "oft" and self.butterfly_factors not in (None, 1):
            raise ValueError(
                f"butterfly_factors={self.butterfly_factors} only applies to algo='boft'; drop it or use boft"
            )
        if self.algo == "boft" and self.block_size is not None and self.block_size % 2:
            raise ValueError(f"boft needs an even block_size, got {self.block_size}; use e.g. 8 or 16")
        if not (self.constraint >= 0):
            raise ValueError(f"constraint must be >= 0 (0 disables it), got {self.constraint!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.side not in ("output", "input"):
            raise ValueError(f"side must be 'output' or 'input', got {self.side!r}")
        if self.path not in ("auto", "weight", "activation"):
            raise ValueError(f"path must be 'auto', 'weight' or 'activation', got {self.path!r}")
        if self.neumann_terms < 0:
            raise ValueError(f"neumann_terms must be >= 0 (0 = exact Cayley), got {self.neumann_terms}")

    def replace(self, **changes: Any) -> AdapterConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown adapter option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def layout(self, dim: int, where: str = "layer") -> BlockLayout:
        """Resolve block size, count and stages for `dim` rotated channels, or raise with the fix."""
        default_b = 32 if self.algo == "oft" else 8
        if self.block_num is not None:
            if dim % self.block_num:
                ok = [d for d in _divisors(dim) if d <= 512][-8:]
                raise ValueError(
                    f"block_num {self.block_num} does not divide {dim} channels of {where}; use one of {ok}"
                )
            b, nb = dim // self.block_num, self.block_num
        else:
            b = self.block_size or default_b
            if dim % b:
                ok = [d for d in _divisors(dim) if d <= 128 and (self.algo == "oft" or d % 2 == 0)][-6:]
                raise ValueError(
                    f"block_size {b} does not divide {dim} channels of {where}; use one of {ok}"
                )
            nb = dim // b
        if self.algo == "oft":
            return BlockLayout("oft", dim, b, nb, 1)
        if b % 2:
            raise ValueError(f"boft needs an even block size, got {b} on {where} ({dim} channels)")
        max_m = 1 + _two_adic(nb)
        m = self.butterfly_factors or max_m
        if m > max_m:
            raise ValueError(
                f"butterfly_factors {m} is impossible on {where}: {dim} channels in {nb} blocks of {b}, "
                f"and 2**(m-1) must divide {nb}; use butterfly_factors <= {max_m}"
            )
        return BlockLayout("boft", dim, b, nb, m)
