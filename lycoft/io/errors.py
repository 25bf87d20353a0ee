"""Errors raised when an adapter or checkpoint file cannot be trusted or read.

Both are `ValueError`s: the file's *content* is wrong, not the program. Each message says which file,
which key (when one is to blame), what is wrong with which value, and what the user can do about it.
"""

from __future__ import annotations

import errno
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

    Raised instead of loading it; the user converts it to safetensors from a trusted environment, or,
    from Python, says explicitly that they trust it (``allow_pickle=True``).
    """


class DiskFullError(OSError):
    """The disk ran out of space (or quota) while an output was written; the partial output is removed.

    The message names the folder, the space left and about how much the output needs, instead of the
    bare ``[Errno 28]``. ``errno`` stays ENOSPC / EDQUOT, so code that checks it keeps working.
    """

    def __init__(self, folder: str | os.PathLike[str], free: int, needed: int | None, written: int | None = None,
                 code: int = errno.ENOSPC):
        self.folder, self.free, self.needed, self.written = os.fspath(folder), free, needed, written
        if written is not None and (needed is None or written > needed):
            need = f"more than {_mb(written)} needed (that much was written when it filled up)"
        else:
            need = f"about {_mb(needed or 0)} needed"
        self.message = (f"the disk holding {self.folder} is full: {_mb(free)} free, {need}; free some space "
                        "or write the output to another disk")
        super().__init__(code, self.message)

    def __str__(self) -> str:
        return self.message


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 10e6 else f"{n / 1e6:.1f} MB"
