"""Pure tensor math for OFT/BOFT (docs/spec.md). Nothing here holds parameters or imports upward."""

from .apply import rotate, rotate_weight
from .blockdiag import blockdiag_apply
from .butterfly import butterfly_apply, butterfly_stage
from .cayley import (
    cayley,
    cayley_of_raw,
    compute_dtype,
    constrain,
    constraint_scale,
    eye_like,
    interpolate,
    inverse_cayley,
    orthogonality_error,
    skew,
)
from .merge import adapter_rotation, check_multiplier, merged_weight

__all__ = [
    "adapter_rotation",
    "blockdiag_apply",
    "butterfly_apply",
    "butterfly_stage",
    "cayley",
    "cayley_of_raw",
    "check_multiplier",
    "compute_dtype",
    "constrain",
    "constraint_scale",
    "eye_like",
    "interpolate",
    "inverse_cayley",
    "merged_weight",
    "orthogonality_error",
    "rotate",
    "rotate_weight",
    "skew",
]
