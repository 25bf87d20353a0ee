"""Caption files and caption augmentation (kohya semantics: comma-separated tags)."""

from __future__ import annotations

import random
import re
from pathlib import Path

from lycoft.training.errors import ConfigError


def caption_path(image_path: Path, extension: str) -> Path:
    """``<image stem><extension>`` next to the image (``a.png`` + ``.txt`` -> ``a.txt``)."""
    return image_path.with_name(image_path.stem + extension)


def read_caption(image_path: Path, extension: str, all_lines: bool = False) -> str | None:
    """The caption for an image: the first non-empty line of its caption file (every non-empty line,
    joined by newlines, with ``all_lines``: wildcard captions pick one per step), or None when there is
    no such file or it is empty (the caller then uses the class tokens, as kohya does)."""
    path = caption_path(Path(image_path), extension)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows prepend a BOM
    except UnicodeDecodeError:
        raise ConfigError(f"caption file {path} is not UTF-8 text; re-save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    return "\n".join(lines) if all_lines else lines[0]


def split_tags(text: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


_WILDCARD = re.compile(r"\{([^{}]+)\}")


def resolve_wildcards(caption: str, rng: random.Random) -> str:
    """kohya's ``enable_wildcard``: a caption of several lines becomes one of them, then every
    ``{a|b|c}`` becomes one of its options; ``{{`` and ``}}`` stand for literal braces."""
    lines = caption.split("\n")
    if len(lines) > 1:
        caption = lines[rng.randrange(len(lines))]
    # literal braces: private-use characters that a caption file does not contain, put back at the end
    caption = caption.replace("{{", "\ue000").replace("}}", "\ue001")

    def choose(match: re.Match) -> str:
        options = match.group(1).split("|")
        return options[rng.randrange(len(options))]

    return _WILDCARD.sub(choose, caption).replace("\ue000", "{").replace("\ue001", "}")


def transform_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    keep_tokens_separator: str = "",
    dropout_rate: float = 0.0,
    tag_dropout_rate: float = 0.0,
    drop: bool = False,
    prefix: str = "",
    suffix: str = "",
    wildcard: bool = False,
    separator: str = ",",
    secondary_separator: str = "",
) -> str:
    """One step's version of a caption, in kohya's order.

    - ``prefix`` / ``suffix`` are joined to the caption with a space.
    - ``drop`` (this epoch drops every caption: ``caption_dropout_every_n_epochs``) or, with probability
      ``dropout_rate``, the whole caption becomes ``""``.
    - ``wildcard``: one line of a multi-line caption, and one option of each ``{a|b}`` (`resolve_wildcards`);
      without it a multi-line caption is its first line.
    - The first ``keep_tokens`` tags (split on ``separator``) stay fixed; or, when
      ``keep_tokens_separator`` occurs in the caption, the part before it is fixed (and a part after a
      second separator is a fixed suffix). Only the rest is augmented:
    - ``tag_dropout_rate``: each free tag is dropped with this probability;
    - ``shuffle``: the free tags are shuffled.
    - ``secondary_separator`` (which keeps several words one tag through shuffle and dropout) becomes
      ``separator`` at the end.

    A caption with no tag augmentation to apply keeps its text (sentences keep their punctuation);
    otherwise tags are re-joined with ``separator`` and a space. Randomness comes only from ``rng``.
    """
    if prefix:
        caption = f"{prefix} {caption}"
    if suffix:
        caption = f"{caption} {suffix}"
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if drop:
        return ""
    caption = resolve_wildcards(caption, rng) if wildcard else caption.split("\n")[0]
    if keep_tokens_separator and keep_tokens_separator in caption:
        parts = caption.split(keep_tokens_separator)
        head, free = split_tags(parts[0], separator), split_tags(parts[1], separator)
        tail = split_tags(separator.join(parts[2:]), separator)
    elif shuffle or tag_dropout_rate > 0:
        tags = split_tags(caption, separator)
        head, free, tail = tags[:keep_tokens], tags[keep_tokens:], []
    else:
        head = None
    if head is not None:
        if tag_dropout_rate > 0:
            free = [t for t in free if rng.random() >= tag_dropout_rate]
        if shuffle:
            rng.shuffle(free)
        caption = f"{separator} ".join(head + free + tail)
    if secondary_separator:
        caption = caption.replace(secondary_separator, separator)
    return caption
