"""Teach ``builtin:toy-sd1`` a shape it never saw, and measure what was learnt and what was forgotten.

The concept is `data.NEW_SHAPE` (a cross) under a new word (`CONCEPT`, "sks"). The measures, all at
fixed seeds and scored by the toy judge:

* concept: how often "a big red sks"-style prompts show a cross (and the prompted colour and size);
* retention: how often the old prompts ("a small green square") still show what they name;
* drift: how far the old prompts' images moved from the base model's (pixels, judge features).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .data import NEW_SHAPE, random_scenes, write_scenes
from .judge import Judge
from .scoring import Prompted, drift, judge_accuracy, prompt_grid, prompted, sample

CONCEPT = "sks"


def concept_data(folder: str | Path, n: int = 8, seed: int = 7) -> Path:
    """`n` pictures of the new shape in random colours, sizes and places, captioned with `CONCEPT`
    ("a big blue sks"), in the DreamBooth folder layout; returns `folder`."""
    return write_scenes(folder, random_scenes(n, seed, [NEW_SHAPE]), token=CONCEPT)


def concept_prompts(seeds: Sequence[int] = (0, 1)) -> list[Prompted]:
    """"sks" in every colour and size, at each seed."""
    return prompted(prompt_grid([NEW_SHAPE]), seeds=seeds, shape_word=CONCEPT)


def old_prompts(seeds: Sequence[int] = (0,)) -> list[Prompted]:
    """Every old shape in every colour and size, at each seed."""
    return prompted(prompt_grid(), seeds=seeds)


@dataclass
class Comparison:
    """Base vs adapted model on the same prompts and seeds: images and judge scores."""

    images: dict[str, dict[str, list[Image.Image]]]  # "base"/"adapted" -> "concept"/"old" -> images
    concept: dict[str, dict[str, float]] = field(default_factory=dict)  # "base"/"adapted" -> accuracy
    retention: dict[str, dict[str, float]] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)


def compare(pipe: Any, network: Any, judge: Judge, concept: Sequence[Prompted], old: Sequence[Prompted],
            **sampling: Any) -> Comparison:
    """Sample `pipe` with `network` off (multiplier 0) and on (multiplier 1), score both with `judge`.

    `sampling` goes to `scoring.sample` (steps, guidance, ...). The network is left at multiplier 1.
    """
    images: dict[str, dict[str, list[Image.Image]]] = {}
    for name, multiplier in (("base", 0.0), ("adapted", 1.0)):
        network.set_multiplier(multiplier)
        images[name] = {"concept": sample(pipe, concept, **sampling), "old": sample(pipe, old, **sampling)}
    result = Comparison(images)
    for name in images:
        result.concept[name] = judge_accuracy(judge, images[name]["concept"], concept)
        result.retention[name] = judge_accuracy(judge, images[name]["old"], old)
    result.drift = drift(judge, images["base"]["old"], images["adapted"]["old"])
    return result
