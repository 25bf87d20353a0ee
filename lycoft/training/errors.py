"""The errors of training setup: the trainer's modules import them from here.

`USER_ERRORS` are the mistakes of a user (options, flags, config files, dataset folders, and model, adapter
or state files that are missing, damaged or of another kind): the trainer reports them in one message
naming the value or file and the fix, and exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from lycoft.errors import ConfigError, did_you_mean
from lycoft.io.errors import AdapterFileError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, AdapterFileError)

__all__ = ["USER_ERRORS", "AdapterFileError", "ConfigError", "did_you_mean", "first_line"]


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, cut to `limit` characters: the cause quoted inside a one-line
    message, where libraries' own messages can run to pages."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[:limit] + " ..."
