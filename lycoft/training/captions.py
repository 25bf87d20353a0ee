"""Caption files and caption augmentation (kohya semantics: comma-separated tags)."""

from __future__ import annotations

import random
from pathlib import Path

from lycoft.training.errors import ConfigError


def caption_path(image_path: Path, extension: str) -> Path:
    """``<image stem><extension>`` next to the image (``a.png`` + ``.txt`` -> ``a.txt``)."""
    return image_path.with_name(image_path.stem + extension)


def read_caption(image_path: Path, extension: str) -> str | None:
    """The caption for an image: the first non-empty line of its caption file, or None when there is
    no such file or it is empty (the caller then uses the class tokens, as kohya does)."""
    path = caption_path(Path(image_path), extension)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows prepend a BOM
    except UnicodeDecodeError:
        raise ConfigError(f"caption file {path} is not UTF-8 text; re-save it as UTF-8") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def transform_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    keep_tokens_separator: str = "",
    dropout_rate: float = 0.0,
    tag_dropout_rate: float = 0.0,
) -> str:
    """One step's version of a caption.

    - ``dropout_rate``: the whole caption becomes ``""`` with this probability.
    - The first ``keep_tokens`` comma-separated tags stay fixed; or, when ``keep_tokens_separator``
      occurs in the caption, the part before it is fixed (and a part after a second separator is a
      fixed suffix). Only the rest is augmented:
    - ``tag_dropout_rate``: each free tag is dropped with this probability;
    - ``shuffle``: the free tags are shuffled.

    A caption with no augmentation to apply is returned unchanged (sentences keep their punctuation);
    otherwise tags are re-joined with ``", "``. Randomness comes only from ``rng``.
    """
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if keep_tokens_separator and keep_tokens_separator in caption:
        parts = caption.split(keep_tokens_separator)
        head, free = split_tags(parts[0]), split_tags(parts[1])
        tail = split_tags(",".join(parts[2:]))
    elif shuffle or tag_dropout_rate > 0:
        tags = split_tags(caption)
        head, free, tail = tags[:keep_tokens], tags[keep_tokens:], []
    else:
        return caption
    if tag_dropout_rate > 0:
        free = [t for t in free if rng.random() >= tag_dropout_rate]
    if shuffle:
        rng.shuffle(free)
    return ", ".join(head + free + tail)
