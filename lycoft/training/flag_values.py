"""What a flag's value may be: command-line text and TOML values turned into the value a `TrainConfig`
field holds (`value_from_text`, `check_value`), or a `ConfigError` naming the flag, the value and what it
must be. The flags themselves are the table in `flags`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lycoft.config import parse_network_args
from lycoft.training.errors import ConfigError, did_you_mean
from lycoft.training.flags import OPTIMIZERS, Flag

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


_EXPECTED = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list": "a list of strings",
    "floats": "one number, or two for SDXL's two text encoders",
    "numbers": "one or more numbers",
    "files": "a list of file paths",
    "resolution": "a size like 512 or '512,768'",
    "warmup": "an integer step count, a fraction < 1 or a percentage like '5%'",
}


def _type_error(f: Flag, value: Any, where: str) -> ConfigError:
    return ConfigError(f"{where} must be {_EXPECTED[f.kind]}, got {value!r} ({type(value).__name__})")


def value_from_text(f: Flag, text: str | list[str], where: str) -> Any:
    """Turn command-line text into the Python value a TOML file would have given."""
    if f.kind in ("list", "files"):
        return list(text)
    if f.kind in ("floats", "numbers"):
        try:
            return [float(t) for t in text]
        except ValueError:
            raise ConfigError(f"{where} must be {_EXPECTED[f.kind]}, got {' '.join(text)!r}") from None
    assert isinstance(text, str)
    try:
        if f.kind == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if f.kind == "int":
            return int(text)
        if f.kind == "float":
            return float(text)
        if f.kind == "warmup":
            if text.strip().endswith("%"):  # kohya also takes a percentage of the steps
                share = float(text.strip()[:-1]) / 100
                if not 0 <= share < 1:
                    raise ValueError
                return share
            return int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise ConfigError(f"{where} must be {_EXPECTED[f.kind]}, got {text!r}") from None
    return text


def check_value(f: Flag, value: Any, where: str) -> Any:
    """Check a value's type against the flag, normalizing what has one obvious meaning."""
    kind = f.kind
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool" and not isinstance(value, bool):
        raise _type_error(f, value, where)
    if kind == "int" and not (is_number and isinstance(value, int)):
        raise _type_error(f, value, where)
    if kind == "str" and not isinstance(value, str):
        raise _type_error(f, value, where)
    if kind in ("float", "floats", "numbers", "warmup"):
        # No flag has a use for NaN or infinity, and a NaN rate, offset or scale trains a NaN model.
        items = value if isinstance(value, list) else [value]
        bad = next((v for v in items if isinstance(v, float) and not math.isfinite(v)), None)
        if bad is not None:
            raise ConfigError(f"{where} must be a finite number, got {bad}")
    if kind == "float":
        if not is_number:
            raise _type_error(f, value, where)
        value = float(value)
    elif kind in ("list", "files"):
        if isinstance(value, str):
            value = [value]
        elif kind == "list" and isinstance(value, Mapping):  # `network_args = {algo = "oft"}` reads naturally in TOML
            value = [f"{k}={_toml_scalar_text(v)}" for k, v in value.items()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _type_error(f, value, where)
    elif kind == "floats":
        items = value if isinstance(value, list) else [value]
        if not items or len(items) > 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            raise _type_error(f, value, where)
        value = [float(v) for v in items]
    elif kind == "numbers":
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            raise _type_error(f, value, where)
        value = [float(v) for v in items]
    elif kind == "resolution":
        value = parse_resolution(value, where)
    elif kind == "warmup":
        if isinstance(value, str) and value.strip().endswith("%"):
            value = value_from_text(f, value, where)
            is_number = True
        if not is_number or value < 0:
            raise _type_error(f, value, where)
        if isinstance(value, float) and value >= 1:
            if value != int(value):
                raise ConfigError(f"{where} is {value}: give a whole number of steps or a fraction < 1")
            value = int(value)
    if f.choices is not None:
        chosen = _choose(f, str(value), where)
        value = int(chosen) if kind == "int" else chosen
    if f.name == "optimizer_type":
        value = _optimizer_name(value, where)
    if f.name == "network_args":  # checked and written in the schema's canonical spelling
        value = parse_network_args(value, source=where).to_args()
    if f.name == "caption_extension" and value and not value.startswith("."):
        value = "." + value  # 'txt' can only mean '.txt'
    return value


def _toml_scalar_text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _choose(f: Flag, value: str, where: str) -> str:
    choices = f.choices or ()
    for c in choices:
        if value.lower() == c.lower():
            return c
    raise ConfigError(
        f"{where} is {value!r}; choose one of {', '.join(choices)}{did_you_mean(value, choices)}"
    )


def _optimizer_name(value: str, where: str) -> str:
    if not value.strip():
        return "AdamW"  # sd-scripts' default for an empty --optimizer_type
    for name in OPTIMIZERS:
        if value.lower() == name.lower():
            return name
    if "." in value.strip("."):
        return value  # a class path, imported by the training loop
    if value.isidentifier():
        # sd-scripts reads any other bare name as a torch.optim class; only this rare case imports torch here
        import torch.optim

        if isinstance(getattr(torch.optim, value, None), type):
            return f"torch.optim.{value}"
    raise ConfigError(
        f"{where} is {value!r}; use {', '.join(OPTIMIZERS)}, a torch.optim class or a dotted class path like "
        f"mypkg.MyOptimizer{did_you_mean(value, OPTIMIZERS)}"
    )


def parse_resolution(value: Any, where: str = "resolution") -> tuple[int, int]:
    """512, '512', '512,768' or [512, 768] -> (width, height)."""
    sides: list[Any]
    if isinstance(value, bool):
        sides = []
    elif isinstance(value, int):
        sides = [value, value]
    elif isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",")]
        sides = [int(p) if p.isdigit() else p for p in parts]
        if len(sides) == 1:
            sides = sides * 2
    elif isinstance(value, (list, tuple)):
        sides = list(value)
    else:
        sides = []
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise ConfigError(f"{where} must be a size like 512 or '512,768' (width,height), got {value!r}")
    return (sides[0], sides[1])
