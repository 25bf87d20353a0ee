"""Sample a model at fixed seeds and score the images with the toy judge.

Every comparison in the toy world goes through here: how often a model draws what its prompt names
(per attribute), and how far two models' images of the same prompt and seed are apart (drift), in
pixels and in the judge's features.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .data import BASE_COLOURS, BASE_SHAPES, SIZES, Scene, to_tensor
from .judge import PROMPTED, Judge, image_features, read_images

SAMPLER = "euler_a"
SAMPLE_STEPS = 20
GUIDANCE = 4.0


def prompt_grid(shapes: Sequence[str] = BASE_SHAPES, colours: Sequence[str] | None = None,
                sizes: Sequence[str] | None = None) -> list[Scene]:
    """One scene per (shape, colour, size) combination, in a fixed order."""
    return [Scene(shape=s, colour=c, size=z)
            for s, c, z in itertools.product(shapes, colours or list(BASE_COLOURS), sizes or list(SIZES))]


@dataclass(frozen=True)
class Prompted:
    """What to render: a scene's caption (with `shape_word` / `colour_word` for its shape / colour, e.g.
    "sks") and a seed."""

    scene: Scene
    seed: int
    shape_word: str | None = None
    colour_word: str | None = None

    @property
    def prompt(self) -> str:
        return self.scene.caption(shape_word=self.shape_word, colour_word=self.colour_word)


def prompted(scenes: Sequence[Scene], seeds: Sequence[int] = (0,), **words: str) -> list[Prompted]:
    """Every scene at every seed (`words`: ``shape_word=`` / ``colour_word=``)."""
    return [Prompted(s, seed, **words) for s in scenes for seed in seeds]


def sample(pipe: Any, items: Sequence[Prompted], *, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
           sampler: str = SAMPLER, size: int = 64, batch: int = 32) -> list[Image.Image]:
    """Render each item with the pipeline as it is now (adapters applied or not), from its own seed.

    Prompts are encoded as training encodes them, and rendered `batch` at a time, each image from its
    own generator, so an image depends on its prompt and seed, not on its neighbours in the batch (up
    to float rounding).
    """
    import torch

    from lycoft.training.sampling import default_conditioner, make_sampler

    conditioner = default_conditioner(pipe)
    pipe.set_progress_bar_config(disable=True)
    original = pipe.scheduler
    pipe.scheduler = make_sampler(sampler, original.config)
    images: list[Image.Image] = []
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch):
                chunk = items[start:start + batch]
                positive = conditioner.encode([it.prompt for it in chunk]).hidden
                negative = conditioner.encode([""] * len(chunk)).hidden
                generators = [torch.Generator("cpu").manual_seed(it.seed) for it in chunk]
                dtype = pipe.unet.dtype
                out = pipe(prompt_embeds=positive.to(dtype), negative_prompt_embeds=negative.to(dtype),
                           width=size, height=size, num_inference_steps=steps, guidance_scale=guidance,
                           generator=generators, output_type="pil")
                images.extend(out.images)
    finally:
        pipe.scheduler = original
    return images


def judge_accuracy(judge: Judge, images: Sequence[Image.Image], items: Sequence[Prompted]) -> dict[str, float]:
    """Fraction of images in which the judge reads the prompted shape / colour / size, and all three."""
    seen = read_images(judge, images)
    hits = {k: [s[k] == getattr(it.scene, k) for s, it in zip(seen, items)] for k in PROMPTED}
    hits["all"] = [all(h) for h in zip(*hits.values())]
    return {k: round(sum(v) / max(len(v), 1), 4) for k, v in hits.items()}


def drift(judge: Judge, before: Sequence[Image.Image], after: Sequence[Image.Image]) -> dict[str, float]:
    """How far images moved, pairwise (same prompt, same seed): root-mean-square pixel difference on
    the [0, 1] scale, and mean distance of the judge's features relative to their mean norm."""
    a, b = to_tensor(before), to_tensor(after)
    pixel = ((a - b) / 2).pow(2).mean(dim=(1, 2, 3)).sqrt().mean()
    fa, fb = image_features(judge, a), image_features(judge, b)
    features = (fa - fb).norm(dim=1).mean() / fa.norm(dim=1).mean().clamp(min=1e-8)
    return {"pixel_rms": round(float(pixel), 4), "features": round(float(features), 4)}

