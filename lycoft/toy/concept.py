"""Teach ``builtin:toy-sd1`` something it never saw, and measure what was learnt and what was forgotten.

A concept is a new shape (`data.NEW_SHAPE`, a cross) or a new colour (`data.NEW_COLOUR`, magenta) under
a new word, "sks". The measures, all at fixed seeds and scored by the toy judge:

* concept: how often the concept's prompts ("a big red sks" / "a big sks circle") show it;
* retention: how often the old prompts ("a small green square") still show what they name;
* drift: how far the old prompts' images moved from the base model's (pixels, judge features).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .data import BASE_SHAPES, NEW_COLOUR, NEW_SHAPE, random_scenes, write_scenes
from .judge import Judge
from .scoring import Prompted, drift, judge_accuracy, prompt_grid, prompted, sample


@dataclass(frozen=True)
class Concept:
    """What is new (`attribute` = "shape" or "colour", `value`), and the word that names it."""

    attribute: str
    value: str
    word: str = "sks"

    @property
    def _words(self) -> dict[str, str]:
        return {f"{self.attribute}_word": self.word}

    def scenes(self, n: int, seed: int) -> list:
        """`n` random scenes showing the concept (the other attributes drawn from the old ones)."""
        if self.attribute == "shape":
            return random_scenes(n, seed, [self.value])
        return random_scenes(n, seed, BASE_SHAPES, colours=[self.value])

    def prompts(self, seeds: Sequence[int] = (0, 1)) -> list[Prompted]:
        """The concept with every old value of the other attributes, at each seed."""
        grid = prompt_grid([self.value]) if self.attribute == "shape" else prompt_grid(colours=[self.value])
        return prompted(grid, seeds, **self._words)

    def data(self, folder: str | Path, n: int = 8, seed: int = 7) -> Path:
        """`n` pictures of the concept captioned with its word ("a big blue sks"), in the DreamBooth folder
        layout; returns `folder`."""
        return write_scenes(folder, self.scenes(n, seed), name=self.word, **self._words)


def prior_data(folder: str | Path, n: int = 16, seed: int = 11) -> Path:
    """`n` pictures of the old shapes and colours with their own captions ("a small green square"): the
    regularization images of DreamBooth's prior preservation, which remind the model of what it could draw
    while it learns the new word. Written in the DreamBooth folder layout; returns `folder`."""
    return write_scenes(folder, random_scenes(n, seed), name="old")


def demo_data(folder: str | Path, concept: str = "colour") -> tuple[Path, Path]:
    """The demo's data: pictures of the concept (``folder/sks``) and prior-preservation pictures of the old
    shapes (``folder/prior``); returns the two folders, for ``--train_data_dir`` and ``--reg_data_dir``."""
    folder = Path(folder)
    return CONCEPTS[concept].data(folder / "sks"), prior_data(folder / "prior")


NEW_SHAPE_CONCEPT = Concept("shape", NEW_SHAPE)
NEW_COLOUR_CONCEPT = Concept("colour", NEW_COLOUR)
CONCEPTS = {"shape": NEW_SHAPE_CONCEPT, "colour": NEW_COLOUR_CONCEPT}


def old_prompts(seeds: Sequence[int] = (0,)) -> list[Prompted]:
    """Every old shape in every old colour and size, at each seed."""
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
