"""The adapted layer: OFT/BOFT parameters on one Linear/Conv1d/Conv2d/Conv3d, with an exact forward.

The forward always equals the base layer evaluated with the merged weight `W'` (bias untouched), and
picks per call the cheaper of two exact paths:
- weight path: build `W' = rescale * M W` and run the layer with it;
- activation path: run the layer without bias, rotate its output channels by `M`, rescale, add bias
  (output side), or rotate the input features by `M^T` (input side, Linear and 1x1 convs).

A base weight stored in float8 (a frozen base kept small) is upcast to the input's dtype at each use and
never rounded back: the activation path runs the stored weight as it is, so the adapted layer equals the
layer with the float8 values exactly, and the weight path builds `W'` in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import AdapterConfig, BlockLayout
from .ops import cayley, cayley_of_raw, constrain, interpolate, rotate, skew
from .ops.apply import butterfly_fuses, operator_blocks, operator_width
from .ops.blockdiag import blockdiag_apply, blockdiag_apply_bias
from .ops.cayley import is_compiling
from .ops.weight_path import ConvSpec, is_float8, rotated_weight_op, stored_weight_op

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class UnsupportedLayerError(ValueError):
    """The layer kind cannot carry an exact orthogonal adapter (e.g. a grouped convolution)."""


def layer_dims(base: nn.Module) -> tuple[int, int, int]:
    """`(out, fan_in, kernel_numel)` of a supported layer; raises UnsupportedLayerError otherwise."""
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features, 1
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if base.groups != 1:
            raise UnsupportedLayerError(
                f"grouped convolution (groups={base.groups}) cannot be rotated exactly: an output rotation "
                "mixes channels across groups; exclude this layer"
            )
        if base.transposed:
            raise UnsupportedLayerError("transposed convolutions are not supported; exclude this layer")
        k = math.prod(base.kernel_size)
        return base.out_channels, base.in_channels * k, k
    raise UnsupportedLayerError(
        f"{type(base).__name__} is not supported; lycoft adapts Linear and Conv1d/2d/3d layers"
    )


def conv_spec(base: nn.Module, x: Tensor) -> tuple[Tensor, ConvSpec | None]:
    """`x` padded as a non-zero `padding_mode` asks, and `base`'s integer conv geometry (None for Linear)."""
    if isinstance(base, nn.Linear):
        return x, None
    padding = base.padding
    if base.padding_mode != "zeros":
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = (0,) * len(base.stride)
    return x, ConvSpec(tuple(base.stride), tuple(padding), tuple(base.dilation), base.groups)


def base_op(base: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`base`'s linear map or convolution of `x` with `weight` and `bias`.

    A `weight` stored in float8 is upcast to `x`'s dtype for this call only (`ops.stored_weight_op`, which
    keeps the float8 tensor, not the copy, for backward).
    """
    if is_float8(weight.dtype):
        if isinstance(base, nn.Linear):
            return stored_weight_op(x, weight, bias)
        if not isinstance(base.padding, str):
            xin, conv = conv_spec(base, x)
            return stored_weight_op(xin, weight, bias, conv)
        weight = weight.to(x.dtype)  # 'same'/'valid' paddings: plain upcast
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias)
    return base._conv_forward(x, weight, bias)


class OFTLayer(nn.Module):
    """Orthogonal adapter of one layer.

    Parameters: `oft_blocks` `(nb, b, b)` (oft) or `(m, nb, b, b)` (boft), raw blocks `A`, init zeros so
    the adapter starts as the identity; optional `rescale` `(out, 1[, 1...])`, init ones.
    `register_base=False` keeps the base layer out of this module's parameters (used by `Network`, which
    patches the base layer's `forward` instead of replacing the module, so the model's state dict keeps
    its names).
    """

    def __init__(
        self,
        base: nn.Module,
        config: AdapterConfig,
        name: str = "layer",
        register_base: bool = True,
        layout: BlockLayout | None = None,
    ) -> None:
        super().__init__()
        out, fan_in, kernel = layer_dims(base)
        self.name = name
        self.config = config
        self.side = config.side
        self.kernel_numel = kernel
        self.out_dim = out
        self.fan_in = fan_in
        dim = out if config.side == "output" else fan_in
        self.layout = layout or config.layout(dim, where=name)
        if self.layout.dim != dim:
            raise ValueError(f"{name}: adapter covers {self.layout.dim} channels, the layer has {dim}")
        if register_base:
            self.base_layer = base
        else:
            object.__setattr__(self, "_base_ref", base)
        weight = base.weight
        zeros = torch.zeros(self.layout.shape, dtype=torch.float32, device=weight.device)
        self.oft_blocks = nn.Parameter(zeros)
        if config.rescale:
            rshape = (out,) + (1,) * (weight.dim() - 1)
            self.rescale = nn.Parameter(torch.ones(rshape, dtype=torch.float32, device=weight.device))
        else:
            self.rescale = None
        self.constraint = float(config.constraint)
        self.dropout = float(config.dropout)
        self.neumann_terms = int(config.neumann_terms)
        self.path = config.path
        self.multiplier = 1.0
        self.enabled = True
        self.last_path = ""  # path of the last forward ("weight" / "activation"), for tests and benches

    # -- the base layer -------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self.base_layer if "base_layer" in self._modules else self._base_ref

    def _run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return base_op(self.base, x, weight, bias)

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The base weight; one stored in float8 is upcast to `dtype` (default float32) for this use."""
        W = self.base.weight
        return W.to(dtype or torch.float32) if is_float8(W.dtype) else W

    def base_forward(self, x: Tensor) -> Tensor:
        base = self.base
        return self._run(x, base.weight, base.bias)

    # -- the rotation ---------------------------------------------------------------------------------
    @property
    def is_boft(self) -> bool:
        return self.layout.algo == "boft"

    def skew_blocks(self) -> Tensor:
        """`Q = A - A^T` in float32 with the constraint applied (whole tensor, bound `constraint * dim`)."""
        A = self.oft_blocks
        Q = skew(A.to(torch.float64 if A.dtype == torch.float64 else torch.float32))
        return constrain(Q, self.constraint * self.layout.dim)

    def rotation(self, multiplier: float | None = None) -> Tensor:
        """The operator's blocks `R` (float32; float64 if the parameters are float64), strength applied.

        Inside a `Network` the rotations of all its layers are built together and reused while valid
        (`lycoft.rotations`); a standalone layer builds its own at every call.
        """
        m = self.multiplier if multiplier is None else multiplier
        # Traced by torch.compile, each layer builds its own: the cache's validity checks (parameter versions,
        # data pointers, autograd state) are what a compiled graph cannot express.
        cache = None if is_compiling() else self.__dict__.get("rotation_cache")
        R = cache.get(self) if cache is not None else None
        if R is None:
            # No warm start from the previous step's rotation: R must be a pure function of the parameters,
            # so that a resumed run, every DDP rank and a repeated call compute bit-identical rotations.
            X = self.rotation_input()
            R = cayley_of_raw(X) if self.rotation_is_raw() else cayley(X, self.neumann_terms)
        return interpolate(R, m)

    # The pieces of `rotation`, shared with the batched build of `lycoft.rotations.RotationCache`.
    def rotation_is_raw(self) -> bool:
        """The Cayley input is the raw block `A` (skew taken inside the transform: no constraint)."""
        return self.constraint == 0 and not self.neumann_terms

    def rotation_input(self) -> Tensor:
        """`A` (raw) or the constrained skew `Q`, with this step's dropout mask applied to whole blocks."""
        X = self.oft_blocks if self.rotation_is_raw() else self.skew_blocks()
        if self.training and self.dropout > 0:
            # dropping block k zeroes A_k, hence Q_k
            keep = (torch.rand(X.shape[:-2], device=X.device) >= self.dropout).to(X.dtype)
            X = X * keep[..., None, None]
        return X

    def batchable_rotation(self) -> bool:
        return not self.neumann_terms

    def rotation_version(self) -> tuple[int, int]:
        blocks = self.oft_blocks
        return blocks._version, blocks.data_ptr()

    def rotation_settings(self) -> tuple:
        return (self.constraint, self.neumann_terms, self.training and self.dropout > 0,
                self.oft_blocks.requires_grad, self.oft_blocks.dtype, self.oft_blocks.device)

    def merged_weight(self, multiplier: float | None = None, R: Tensor | None = None,
                      dtype: torch.dtype | None = None) -> Tensor:
        """`W' = rescale * M W` (output side) or `rescale * W M^T` (input side), in the base weight dtype
        (a float8 base: in `dtype`, default float32).

        `ops.merged_weight` with this layer's rotation (`R`: one already built at the layer's strength).
        """
        m = self.multiplier if multiplier is None else multiplier
        if R is None:
            R = self.rotation(m)
        W = self.base_weight(dtype)
        return ops.merged_weight(W, self.oft_blocks, side=self.side, rescale=self.rescale, rotation=R, multiplier=m)

    def delta_weight(self, multiplier: float | None = None) -> Tensor:
        """`W' - W` in float32 (for full-difference exports)."""
        W = self.base_weight()
        return self.merged_weight(multiplier).float() - W.float()

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.oft_blocks, self.rescale) if p is not None]

    # -- path choice ----------------------------------------------------------------------------------
    def _tokens(self, x: Tensor) -> int:
        """Output positions of this call (batch * spatial), estimated from the input shape."""
        base = self.base
        if isinstance(base, nn.Linear):
            return x.numel() // max(x.shape[-1], 1)
        stride = math.prod(base.stride) if isinstance(base.stride, tuple) else base.stride
        return max(x.numel() // max(base.in_channels, 1) // max(stride, 1), 1)

    def choose_path(self, x: Tensor) -> str:
        """Pick the exact path with fewer extra multiply-adds for this call.

        `w` = multiply-adds per rotated entry (`b` for oft, the chunk size of a fused butterfly, or `m b`),
        `T` = output positions, `d` = rotated size. Extra cost over the frozen layer:
        - activation path: `T d w` (forward), `3 T d w` when training (rotate, rotate back, gradient);
        - weight path: `out fan_in w` to build `W'`; when training, with the exact output-gradient trick of
          `ops/weight_path.py`, `2 out fan_in w + T d w`; otherwise autograd also pays the weight gradient
          `T out fan_in` that a frozen layer never computes.
        """
        if self.path != "auto":
            if self.path == "activation" and not self.activation_path_possible:
                return "weight"
            return self.path
        if not self.activation_path_possible:
            return "weight"
        T = self._tokens(x)
        lay = self.layout
        w = operator_width(lay.stages, lay.block_size, lay.algo == "boft")
        d = lay.dim
        if torch.is_grad_enabled() and self.oft_blocks.requires_grad:
            build = self.out_dim * self.fan_in * w
            if self._output_gradient_trick_applies():
                weight_cost = 2 * build + T * d * w
            else:
                weight_cost = 2 * build + T * self.out_dim * self.fan_in
            act_cost = 3 * T * d * w
        else:
            weight_cost = self.out_dim * self.fan_in * w
            act_cost = T * d * w
        return "activation" if act_cost < weight_cost else "weight"

    def _output_gradient_trick_applies(self) -> bool:
        """The weight path's backward may use `ops.weight_path` (operator orthogonal, base frozen)."""
        base = self.base
        lay = self.layout
        return (
            self.side == "output"
            and (lay.algo == "oft" or butterfly_fuses(lay.stages, lay.block_size))
            and self.rescale is None
            and self.multiplier == 1.0
            and not base.weight.requires_grad
            and (not isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not isinstance(base.padding, str))
        )

    def _conv_spec(self, x: Tensor) -> tuple[Tensor, ConvSpec | None]:
        return conv_spec(self.base, x)

    @property
    def activation_path_possible(self) -> bool:
        # Input side rotates the layer input, which only lines up with the fan-in for 1-element kernels.
        return self.side == "output" or self.kernel_numel == 1

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # Extra args (e.g. diffusers' legacy `scale`) are accepted and ignored, like the base layers do.
        if not self.enabled or self.multiplier == 0.0:
            self.last_path = "base"
            return self.base_forward(x)
        path = self.choose_path(x)
        self.last_path = path
        base = self.base
        R = self.rotation()
        if path == "weight":
            if torch.is_grad_enabled() and self.oft_blocks.requires_grad and self._output_gradient_trick_applies():
                blocks = operator_blocks(R)
                if blocks is not None:
                    xin, conv = self._conv_spec(x)
                    return rotated_weight_op(xin, blocks, base.weight, base.bias, conv)
            return self._run(x, self.merged_weight(R=R, dtype=x.dtype), base.bias)
        channel_dim = -1 if isinstance(base, nn.Linear) else 1
        if self.side == "output":
            y = self._run(x, base.weight, None)
            blocks = operator_blocks(R)
            if blocks is not None and self.rescale is None:  # rotation and bias in one pass
                return blockdiag_apply_bias(blocks, y, channel_dim, False, base.bias)
            if blocks is None:
                y = rotate(R.to(y.dtype), y, dim=channel_dim)
            else:
                y = blockdiag_apply(blocks, y, dim=channel_dim)
        else:
            y = self._run(rotate(R.to(x.dtype), x, dim=channel_dim, transpose=True), base.weight, None)
        return self._rescale_and_bias(y, channel_dim % y.dim())

    def _rescale_and_bias(self, y: Tensor, channel_dim: int) -> Tensor:
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        if self.rescale is not None:
            y = y * self.rescale.to(y.dtype).reshape(shape)
        bias = self.base.bias
        if bias is not None:
            y = y + bias.to(y.dtype).reshape(shape)
        return y

    def extra_repr(self) -> str:
        lay = self.layout
        s = f"{self.name}: {lay.algo} {lay.shape} side={self.side}"
        if self.constraint:
            s += f" constraint={self.constraint}"
        return s + (" rescale" if self.rescale is not None else "")


def wrap(layer: nn.Module, config: AdapterConfig | None = None, name: str = "layer") -> OFTLayer:
    """Adapt a single torch layer: returns an `OFTLayer` that holds `layer` and computes its adapted output.

    ``wrap(nn.Linear(320, 320), AdapterConfig(algo="boft", block_size=8, butterfly_factors=2))``
    """
    return OFTLayer(layer, config or AdapterConfig(), name=name, register_base=True)
