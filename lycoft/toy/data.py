"""Procedural scenes: one small or big coloured shape somewhere on a lightly textured grey background.

A scene is drawn deterministically from its parameters, and random scenes from a seed, so the toy
model's training set, the judge's training set and every evaluation can be rebuilt bit for bit.
Captions name what the judge can check: ``"a big red circle"``. The place (left, right, top, bottom,
middle) varies too but is not captioned: placing things where a prompt says needs the UNet to break
its translation symmetry, which a model this small does not learn in a CPU budget (even SD1.5 follows
"on the left" poorly); size, colour and shape it learns.

The pretrained toy model's denoiser sees `BASE_SHAPES` in `BASE_COLOURS` only; `NEW_SHAPE` (a cross)
and `NEW_COLOUR` (magenta) are kept back as concepts an adapter has to learn. The judge and the VAE (a
general image codec, as SD's is) know all of `SHAPES` and `COLOURS`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NEW_SHAPE = "cross"
SHAPES: tuple[str, ...] = (*BASE_SHAPES, NEW_SHAPE)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (40, 70, 215),
    "yellow": (240, 205, 30),
    "magenta": (220, 40, 200),
}
NEW_COLOUR = "magenta"
BASE_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c != NEW_COLOUR)
SIZES: dict[str, tuple[float, float]] = {"small": (0.145, 0.16), "big": (0.21, 0.23)}  # radius / image side
# Place name -> (centre x, centre y) as fractions of the image.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "middle": (0.5, 0.5),
}
SUPERSAMPLE = 4  # shapes are drawn at 4x and reduced, for smooth (anti-aliased) edges


@dataclass(frozen=True)
class Scene:
    """One picture's content. `radius` (within the range of `size`) and the offsets are fractions of the
    image side; `background` is the grey level (0-255) and `texture` the seed of the background's noise."""

    shape: str
    colour: str
    size: str = "big"
    position: str = "middle"
    radius: float = 0.22
    dx: float = 0.0
    dy: float = 0.0
    background: int = 170
    texture: int = 0

    def caption(self, with_size: bool = True, shape_word: str | None = None, colour_word: str | None = None) -> str:
        """``"a big red circle"``; `shape_word` / `colour_word` replace the shape's / colour's name (e.g.
        with ``"sks"``)."""
        size = f"{self.size} " if with_size else ""
        return f"a {size}{colour_word or self.colour} {shape_word or self.shape}"


def parse_caption(text: str) -> Scene | None:
    """The scene a caption names (``"a big red circle"``, size optional, case and spacing free), or None
    when it is not a caption of the toy world: how a prompt given as text is scored by the judge."""
    words = text.lower().replace(",", " ").split()
    if words[:1] in (["a"], ["an"]):
        words = words[1:]
    size = words.pop(0) if words and words[0] in SIZES else "big"
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        return None
    return Scene(shape=words[1], colour=words[0], size=size)


def random_scene(rng: random.Random, shapes: Sequence[str] = BASE_SHAPES, colours: Sequence[str] | None = None,
                 sizes: Sequence[str] | None = None) -> Scene:
    """A scene with shape, colour and size drawn from the given choices, and random place, radius,
    offset, background level and texture (what the caption does not name)."""
    size = rng.choice(list(sizes or SIZES))
    return Scene(
        shape=rng.choice(list(shapes)),
        colour=rng.choice(list(colours or BASE_COLOURS)),
        size=size,
        position=rng.choice(list(POSITIONS)),
        radius=rng.uniform(*SIZES[size]),
        dx=rng.uniform(-0.03, 0.03),
        dy=rng.uniform(-0.03, 0.03),
        background=rng.randint(120, 200),
        texture=rng.randrange(2**31),
    )


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon corners of `shape` (None for the circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.86  # about the circle's area
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r * 1.1), (cx + r * 1.1, cy + r * 0.8), (cx - r * 1.1, cy + r * 0.8)]
    if shape == NEW_SHAPE:
        a, w = r * 1.05, r * 0.38  # arm length and half-width of a plus sign
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
                (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
                (cx - a, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def _background(level: int, texture: int, size: int) -> Image.Image:
    """A grey field with soft low-frequency noise (about +-6 levels), from the texture seed."""
    noise = np.random.default_rng(texture).normal(0.0, 6.0, size=(8, 8, 1))
    field = np.clip(level + noise, 0, 255).repeat(3, axis=2).astype(np.uint8)
    return Image.fromarray(field, "RGB").resize((size, size), Image.Resampling.BICUBIC)


def render_scene(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a `size` x `size` RGB image (deterministic: same scene, same pixels)."""
    if scene.colour not in COLOURS:
        raise ValueError(f"unknown colour {scene.colour!r}; use one of {', '.join(COLOURS)}")
    if scene.size not in SIZES:
        raise ValueError(f"unknown size {scene.size!r}; use one of {', '.join(SIZES)}")
    if scene.position not in POSITIONS:
        raise ValueError(f"unknown position {scene.position!r}; use one of {', '.join(POSITIONS)}")
    big = size * SUPERSAMPLE
    fx, fy = POSITIONS[scene.position]
    cx, cy, r = (fx + scene.dx) * big, (fy + scene.dy) * big, scene.radius * big
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    corners = _outline(scene.shape, cx, cy, r)
    if corners is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(corners, fill=255)
    mask = mask.resize((size, size), Image.Resampling.BOX).filter(ImageFilter.SMOOTH)
    image = _background(scene.background, scene.texture, size)
    image.paste(Image.new("RGB", (size, size), COLOURS[scene.colour]), (0, 0), mask)
    return image


def random_scenes(n: int, seed: int, shapes: Sequence[str] = BASE_SHAPES, **choices) -> list[Scene]:
    """`n` random scenes from `seed` (see `random_scene` for `choices`)."""
    rng = random.Random(seed)
    return [random_scene(rng, shapes, **choices) for _ in range(n)]


def to_tensor(images: Sequence[Image.Image], size: int = 64) -> torch.Tensor:
    """PIL images -> ``(N, 3, size, size)`` float tensor in [-1, 1] (resized when needed)."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(im, dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def write_scenes(directory: str | Path, scenes: Sequence[Scene], *, size: int = 64, repeats: int = 1,
                 name: str = "scenes", **caption: object) -> Path:
    """Write the scenes as PNGs with ``.txt`` captions into ``directory/<repeats>_<name>/`` (the
    DreamBooth folder layout the trainer reads); `caption` goes to `Scene.caption` (e.g.
    ``shape_word="sks"``). Returns `directory`, ready for ``--train_data_dir directory``."""
    directory = Path(directory)
    folder = directory / f"{repeats}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        render_scene(scene, size).save(folder / f"scene_{i:04d}.png")
        text = scene.caption(**caption)  # type: ignore[arg-type]
        (folder / f"scene_{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    return directory
