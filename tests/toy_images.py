"""A generated subject dataset for the tests (a yellow disc with eyes, any image size): DreamBooth folders
with captions, for data loading, bucketing and training runs that need pictures but no pretrained model."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw


def draw_toy(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """One picture of the toy: a yellow disc with two eyes at a random place and scale, on a random
    background colour. The subject stays recognisable while everything around it varies, which is
    what a subject adapter has to learn."""
    w, h = size
    background = tuple(rng.randint(40, 220) for _ in range(3))
    im = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(im)
    r = rng.uniform(0.18, 0.32) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(245, 200, 40), outline=(120, 90, 10))
    eye = max(1.0, r * 0.14)
    for dx in (-0.35, 0.35):
        ex, ey = cx + dx * r, cy - 0.2 * r
        draw.ellipse((ex - eye, ey - eye, ex + eye, ey + eye), fill=(20, 20, 20))
    return im


def make_toy_dataset(directory: str | Path, n: int = 8, size: int | tuple[int, int] = 64, seed: int = 0,
                     token: str = "sks toy", *, repeats: int = 1, caption: str | None = None) -> Path:
    """Write ``n`` toy PNGs with ``.txt`` captions into ``directory/<repeats>_<token>/``.

    Returns ``directory``, ready for ``--train_data_dir directory --caption_extension .txt``.
    ``size`` is a side or (width, height); ``caption`` defaults to ``"a photo of <token>"``.
    """
    directory = Path(directory)
    folder = directory / f"{repeats}_{token}"
    folder.mkdir(parents=True, exist_ok=True)
    dims = (size, size) if isinstance(size, int) else tuple(size)
    rng = random.Random(seed)
    text = caption if caption is not None else f"a photo of {token}"
    for i in range(n):
        draw_toy(dims, rng).save(folder / f"toy_{i:03d}.png")
        (folder / f"toy_{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return directory
