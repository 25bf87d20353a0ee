"""What a UI's adapter needs beyond one layer's tensors: the file's metadata, and the formula chosen.

The UIs hand their LoRA loaders a file's tensors only. Its safetensors metadata (PEFT config, kohya network
module, lycoft's keys) says how PEFT-style layers were parametrised, so the extensions attach it to the
tensor dict when the UI reads an OFT file (`TensorsWithMetadata`). ComfyUI's "Load OFT (lycoft)" node
chooses the formula for the loads it makes (`formula`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping

from ..formats.patches import layer_prefixes
from ..io.safe_io import read_safetensors_header

log = logging.getLogger("lycoft")

_STOCK = contextvars.ContextVar("lycoft_stock_formula", default=False)
_WARNED: set[tuple[str, str]] = set()


class TensorsWithMetadata(dict):
    """A file's tensors (a plain dict to ComfyUI) carrying the file's metadata and name."""

    metadata: dict[str, str]
    source: str

    def __init__(self, tensors: Mapping, metadata: Mapping[str, str] | None, source: str) -> None:
        super().__init__(tensors)
        self.metadata = dict(metadata or {})
        self.source = source


def metadata_of(tensors: Mapping) -> dict[str, str]:
    return getattr(tensors, "metadata", None) or {}


def source_of(tensors: Mapping) -> str:
    return getattr(tensors, "source", None) or "adapter"


def with_metadata(tensors: object, path: str, metadata: Mapping[str, str] | None = None) -> object:
    """`tensors` as `TensorsWithMetadata` when it is a plain dict holding an OFT layer (other files, and
    anything that is not a plain dict, are returned as they are). `metadata` is read from `path` if not given."""
    if type(tensors) is not dict or not layer_prefixes(tensors.keys()):
        return tensors
    return TensorsWithMetadata(tensors, metadata if metadata is not None else safetensors_metadata(path), str(path))


def safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (the header only; empty for other files)."""
    try:
        return read_safetensors_header(path)[1]
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def formula(stock: bool) -> Iterator[None]:
    """Inside: OFT layers are loaded by ComfyUI's own adapters (`stock=True`) or by lycoft's."""
    token = _STOCK.set(stock)
    try:
        yield
    finally:
        _STOCK.reset(token)


def stock_formula() -> bool:
    return _STOCK.get()


def warn_once(source: str, message: str) -> None:
    if (source, message) not in _WARNED:
        _WARNED.add((source, message))
        log.warning("lycoft: %s %s", source, message)
