"""Stand-ins for modules a UI imports at module level for code a test never runs (GUI, video, audio, other
model families), installed only while the UI's own modules are imported and removed again afterwards.

A stand-in module answers every attribute with a dummy class (`any_names`), or has no attribute and no
submodule at all, so that the UI's `try: import x ... except ImportError` fallbacks run (`empty_names`);
`modules` may be given explicitly (name -> module object).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Iterator


class Dummy:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> Dummy:
        return Dummy()

    def __getattr__(self, name: str) -> Dummy:
        return Dummy()


class _AnyAttribute(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return Dummy


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, any_names: tuple[str, ...], empty_names: tuple[str, ...]) -> None:
        self.any_names, self.empty_names = any_names, empty_names

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.any_names or name in self.empty_names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name) if spec.name in self.empty_names else _AnyAttribute(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def stand_ins(any_names: tuple[str, ...] = (), empty_names: tuple[str, ...] = (),
              modules: dict[str, types.ModuleType] | None = None) -> Iterator[None]:
    finder = _Finder(any_names, empty_names)
    sys.meta_path.insert(0, finder)
    sys.modules.update(modules or {})
    tops = set(any_names) | set(empty_names) | {m.split(".")[0] for m in modules or {}}
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in list(sys.modules):
            if name.split(".")[0] in tops and (name in (modules or {}) or isinstance(sys.modules[name], _AnyAttribute)
                                               or name in empty_names):
                del sys.modules[name]
