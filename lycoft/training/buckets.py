"""Aspect-ratio buckets: which size each image trains at, and how it is resized and cropped to it.

Pure arithmetic on (width, height) pairs; no images, no torch. Sizes are (width, height) here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from lycoft.training.errors import ConfigError


def make_buckets(
    resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int
) -> list[tuple[int, int]]:
    """kohya's bucket set: sides are multiples of ``steps`` in [min_reso, max_reso] and every bucket's
    area is at most ``resolution``'s area; for each width the tallest such height is used (and its
    transpose), plus the largest square."""
    max_area = resolution[0] * resolution[1]
    buckets: set[tuple[int, int]] = set()
    square = min(math.isqrt(max_area) // steps * steps, max_reso // steps * steps)
    if square >= max(steps, min_reso):
        buckets.add((square, square))
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, max_area // width // steps * steps)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes a training sample: resize to ``resized`` (covering ``target``), then cut
    ``target`` out at ``left_top``. All (x, y) / (width, height)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    left_top: tuple[int, int]
    target: tuple[int, int]


class Bucketer:
    """Assigns each image size its training size.

    - bucketing off: every image trains at ``resolution``;
    - bucketing on: the bucket of `make_buckets` nearest in aspect ratio (compared as log ratios,
      so a portrait image and its landscape transpose get transposed buckets);
    - ``no_upscale``: the image's own size, shrunk (aspect kept) to the resolution's area if larger,
      and cut down to multiples of ``steps``; an image is never enlarged unless a side is below
      ``steps``.
    """

    def __init__(self, resolution: tuple[int, int], *, enable: bool = False, min_reso: int = 256,
                 max_reso: int = 1024, steps: int = 64, no_upscale: bool = False) -> None:
        self.resolution = resolution
        self.enable = enable
        self.steps = steps
        self.max_reso = max_reso
        self.no_upscale = enable and no_upscale
        self.max_area = resolution[0] * resolution[1]
        fixed = enable and not no_upscale
        self.buckets = make_buckets(resolution, min_reso, max_reso, steps) if fixed else []
        if fixed and not self.buckets:
            raise ConfigError(f"no bucket fits resolution {resolution} with sides in [{min_reso}, {max_reso}] "
                             f"in steps of {steps}; lower min_bucket_reso")
        self._log_ratios = [math.log(w / h) for w, h in self.buckets]

    def bucket_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) an image of ``size`` trains at."""
        if not self.enable:
            return self.resolution
        w, h = size
        if self.no_upscale:
            scale = min(1.0, math.sqrt(self.max_area / (w * h)))
            limit = self.max_reso // self.steps * self.steps
            side = [max(self.steps, min(limit, int(s * scale) // self.steps * self.steps)) for s in (w, h)]
            return (side[0], side[1])
        target = math.log(w / h)
        best = min(range(len(self.buckets)), key=lambda i: abs(self._log_ratios[i] - target))
        return self.buckets[best]


def plan_crop(
    original: tuple[int, int], target: tuple[int, int], rng: random.Random | None = None
) -> CropPlan:
    """Resize ``original`` by one factor so that it just covers ``target``, then crop: centered, or at
    a random offset drawn from ``rng`` when one is given."""
    (w, h), (tw, th) = original, target
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    if rng is None:
        left, top = (rw - tw) // 2, (rh - th) // 2
    else:
        left, top = rng.randint(0, rw - tw), rng.randint(0, rh - th)
    return CropPlan(original=original, resized=(rw, rh), left_top=(left, top), target=target)
