"""The errors of training setup: the trainer's modules import them from here."""

from __future__ import annotations

from lycoft.errors import ConfigError, did_you_mean

__all__ = ["ConfigError", "did_you_mean"]
