"""Loading pickle-based PyTorch checkpoints (`.ckpt`, `.pt`, `.bin`) without running code from the file.

A pickle can call any Python function while it loads, so a checkpoint from a stranger is a program.
We load with torch's restricted unpickler (``weights_only=True``), which builds tensors, containers and
numbers only. A file that needs more is refused with `UnsafeCheckpointError`, unless the caller says
explicitly, from Python, that they trust it (``allow_pickle=True``); the command lines never unpickle
code.

Two kinds of harmless object are common in real Stable Diffusion checkpoints and would otherwise force
users onto ``allow_pickle`` (which is far worse): numpy scalars (training statistics) and PyTorch
Lightning's ``ModelCheckpoint`` callback state (the original SD 1.x ``.ckpt`` files). We let the
restricted unpickler build numpy scalars/dtypes, and a do-nothing placeholder class in place of
``ModelCheckpoint``, whose state is a plain dict; none of them can run code.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from lycoft.io.errors import AdapterFileError, UnsafeCheckpointError
from lycoft.io.safe_io import FIX_TRUNCATED, read_safetensors, require_regular_file

logger = logging.getLogger(__name__)

_FIX_UNSAFE = (
    "only if you trust its source: convert it to .safetensors and use that file (in Python: torch.load(path, "
    "weights_only=False), then safetensors.torch.save_file with its tensors), or from Python pass "
    "allow_pickle=True"
)
# Keys under which training frameworks nest the weights: Lightning/CompVis `{"state_dict": {...}}`,
# various trainers `{"model": {...}}`.
_WRAPPER_KEYS = ("state_dict", "model")


class _LightningModelCheckpoint:
    """Stands in for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` while unpickling.

    SD 1.x checkpoints carry that callback's state (monitor name, best score). Only its attributes are
    restored into this empty class; nothing of Lightning is imported or run.
    """


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())  # type: ignore[union-attr]


def _harmless_globals() -> list[Any]:
    """Globals added to torch's weights-only allowlist; see the module docstring for why each is safe."""
    import numpy as np

    allowed: list[Any] = []
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    # numpy 1.x pickles name `numpy.core`, numpy 2.x `numpy._core`: accept both spellings.
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    # numpy >= 1.25 pickles dtypes by their class; object dtype is left out (it wraps arbitrary objects).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType"]
    for module in ("pytorch_lightning", "lightning.pytorch"):
        allowed.append((_LightningModelCheckpoint, f"{module}.callbacks.model_checkpoint.ModelCheckpoint"))
    return allowed


def _allowlist() -> AbstractContextManager[Any]:
    # (object, "dotted.name") entries arrived in torch 2.6; older versions just get the bare allowlist.
    if _torch_version() < (2, 6) or not hasattr(torch.serialization, "safe_globals"):
        return nullcontext()
    return torch.serialization.safe_globals(_harmless_globals())


def _unsafe_names(path: str, error: Exception, is_zip: bool) -> list[str]:
    """The non-allowlisted globals the file asks for; empty if the failure is not about unsafe objects."""
    message = str(error)
    names = re.findall(r"GLOBAL ([\w.]+)", message)
    names += re.findall(r"Can only build .*? but got <class '([\w.]+)'>", message)
    if names and is_zip and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        # The error names only the first offender; list them all so the user sees what the file needs.
        try:
            allowed = _harmless_globals()
            harmless = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in allowed}
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            full = [n for n in unsafe if n not in harmless]
            names = full or names
        except Exception:  # best effort: the first offender is already known
            pass
    return list(dict.fromkeys(names))


def _names_missing_object(name: str) -> bool:
    """Whether `name` points into an already-imported module at an attribute that does not exist.

    A pickle cut in the middle of `collections.OrderedDict` asks for `collections.Order`: that is damage,
    not an unsafe object. Only modules already in `sys.modules` are consulted; nothing is imported.
    ``__main__`` is the script that saved the file, not this program: its classes are unsafe, not missing.
    """
    parts = name.split(".")
    if parts[0] == "__main__":
        return False
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        obj: Any = module
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return True
            obj = getattr(obj, attr)
        return False
    return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _state_dict_of(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """Unwrap `{"state_dict": ...}` / `{"model": ...}` nesting (and modules) down to the tensors."""
    for _ in range(4):
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        inner = None
        if isinstance(obj, Mapping):
            inner = next(
                (obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, torch.nn.Module))), None
            )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise AdapterFileError(
            path, f"holds a {type(obj).__name__}, not a dict of tensors",
            "pass a checkpoint saved from a state dict (torch.save(model.state_dict(), path))",
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        fix = "pass a model checkpoint, not a training log or config"
        raise AdapterFileError(path, "contains no tensors", fix)
    skipped = [k for k in obj if k not in tensors]
    if skipped:
        logger.debug("%s: ignored %d non-tensor entries, e.g. %s", path, len(skipped), skipped[:5])
    return tensors


def load_torch_checkpoint(
    path: str | os.PathLike[str], allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Load the tensors of a PyTorch checkpoint, refusing files that would run code while loading.

    Reads with ``torch.load(weights_only=True, map_location="cpu")``, memory-mapped for zip-format files
    (the default since torch 1.6) so a 7 GB checkpoint is paged in as it is used. Unwraps the
    ``{"state_dict": {...}}`` / ``{"model": {...}}`` nesting of SD training checkpoints and drops
    non-tensor entries (step counters, configs). A ``.safetensors`` path is read with `read_safetensors`.

    Args:
        path: the checkpoint.
        allow_pickle: the user trusts the file: load with full unpickling (``weights_only=False``),
            which can execute arbitrary code from it. Logs a warning.

    Raises:
        UnsafeCheckpointError: the file needs arbitrary Python objects and ``allow_pickle`` is False.
        AdapterFileError: the file is missing, empty, damaged or not a checkpoint.
    """
    p = os.fspath(path)
    st = require_regular_file(p)
    if p.lower().endswith(".safetensors"):
        return read_safetensors(p)[0]
    if st.st_size == 0:
        raise AdapterFileError(p, "the file is empty", FIX_TRUNCATED)
    # mmap needs the zip format; legacy (torch < 1.6) pickles are read into memory.
    try:
        is_zip = zipfile.is_zipfile(p)
    except zipfile.BadZipFile as e:  # is_zipfile itself raises on some damaged end records (found by fuzzing)
        raise AdapterFileError(p, f"is not a readable PyTorch checkpoint ({_first_line(e)})", FIX_TRUNCATED) from e
    if allow_pickle:
        logger.warning(
            "%s: loading with full unpickling (allow_pickle): this runs any code stored in the file; "
            "do it only for files from a source you trust, and convert them to .safetensors", p,
        )
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False, mmap=is_zip)
        except Exception as e:
            problem = f"is not a readable PyTorch checkpoint ({_first_line(e)})"
            raise AdapterFileError(p, problem, FIX_TRUNCATED) from e
        return _state_dict_of(obj, p)
    try:
        with _allowlist():
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        names = _unsafe_names(p, e, is_zip)
        if names and all(_names_missing_object(n) for n in names):
            problem = f"refers to Python objects that do not exist ({', '.join(names[:3])})"
            raise AdapterFileError(p, problem, FIX_TRUNCATED) from e
        if names:
            raise UnsafeCheckpointError(
                p, f"needs arbitrary Python objects to load ({', '.join(names[:8])}), which could run code",
                _FIX_UNSAFE,
            ) from None
        problem = f"is not a readable PyTorch checkpoint ({_first_line(e)})"
        raise AdapterFileError(p, problem, FIX_TRUNCATED) from e
    except Exception as e:
        # The restricted unpickler reports damaged and foreign files with assorted exception types
        # (RuntimeError from the zip reader, EOFError, KeyError on a bad opcode...).
        raise AdapterFileError(
            p, f"is not a readable PyTorch checkpoint ({_first_line(e)})",
            f"{FIX_TRUNCATED}; if it is a .safetensors file, give it that extension",
        ) from e
    return _state_dict_of(obj, p)
