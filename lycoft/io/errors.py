"""Errors raised when an adapter or checkpoint file cannot be trusted or read.

Both are `ValueError`s: the file's *content* is wrong, not the program. Each message says which file,
which key (when one is to blame), what is wrong with which value, and what the user can do about it.
"""

from __future__ import annotations

import os


class AdapterFileError(ValueError):
    """A `.safetensors` / `.ckpt` file is missing, not of the expected format, damaged or inconsistent.

    Attributes:
        path: the file, as given by the caller.
        key: the tensor (or metadata) key to blame, or ``None`` when the whole file is at fault.
        problem: what is wrong, with the offending value.
        fix: what to do about it.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str | None = None, fix: str | None = None,
                 key: str | None = None):
        if problem is None:  # a complete message already composed by the caller
            self.path, self.key, self.problem, self.fix = "", key, os.fspath(path), ""
            super().__init__(os.fspath(path))
            return
        self.path = os.fspath(path)
        self.key = key
        self.problem = problem
        self.fix = fix or ""
        where = self.path if key is None else f"{self.path}: key {key!r}"
        super().__init__(f"{where}: {problem}; {fix}" if fix else f"{where}: {problem}")


class UnsafeCheckpointError(AdapterFileError):
    """A pickle checkpoint needs arbitrary Python objects to load, i.e. it could run code when loaded.

    Raised instead of loading it; the user converts it to safetensors from a trusted environment, or
    says explicitly that they trust it (``allow_pickle=True``, ``--allow-pickle`` on command lines).
    """
