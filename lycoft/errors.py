"""The error type of a user's mistake in options, flags or config files, and the did-you-mean helper its
messages use. Floor 1: the option schema (`lycoft.config`) and the trainer both raise it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A user mistake in options, flags, config files or dataset folders; the message says what to change."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""`` when nothing is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""
