"""Training TOML files in and out: reading one (flat, or kohya-style sections) into checked flag values,
and writing a resolved `TrainConfig` back so that ``--config`` reproduces it."""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

from lycoft.training.errors import ConfigError, did_you_mean
from lycoft.training.flags import TrainConfig, check_value, flag_table
from lycoft.training.kohya_flags import ALIASES, GUI_KEYS, UNSUPPORTED, at_default, refusal

logger = logging.getLogger(__name__)

try:  # Python 3.11+; the `toml` package (a dependency anyway, it also writes) covers 3.10.
    import tomllib as _toml_reader
except ModuleNotFoundError:  # pragma: no cover - exercised on 3.10 only
    _toml_reader = None


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file; a missing file or bad syntax is a `ConfigError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist (resolved from {Path.cwd()})") from None
    try:
        if _toml_reader is not None:
            return _toml_reader.loads(text)
        import toml

        return toml.loads(text)
    except Exception as e:  # both parsers raise their own exception types
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def load_config_toml(path: str | Path, overridden: Collection[str] = ()) -> dict[str, Any]:
    """A training TOML (flat, or kohya-style sections that are flattened) -> checked flag values.

    ``overridden``: flags the command line gives; the file's values for them are never used, so they are
    left out unchecked (a kohya file's ``network_module = "networks.lora"`` beside ``--network_module lycoft``).

    A kohya config loads as sd-scripts reads it: kohya's spellings (`kohya_flags.ALIASES`) are taken, a
    kohya flag lycoft does not take is accepted at its default (it does nothing there either) and refused
    with the reason otherwise, and a key that no trainer knows is ignored as sd-scripts ignores it, with
    one warning listing them; a near miss of a real flag is still a "did you mean" error.
    """
    path = Path(path)
    if not path.suffix and not path.exists() and path.with_suffix(".toml").exists():
        path = path.with_suffix(".toml")  # sd-scripts adds the extension to --config_file too
    doc = read_toml(path)
    table = flag_table()
    # Keys whose value may itself be a table, so that `network_args = {...}` is a value, not a section.
    table_valued = {n for n, f in table.items() if f.kind == "list"}
    found: dict[str, tuple[Any, str]] = {}
    problems: list[str] = []
    at_defaults: list[str] = []
    ignored: list[str] = []

    def take(key: str, value: Any, section: str) -> None:
        name = ALIASES.get(key, key)
        if name == "config":
            problems.append(f"key {key!r} in {section} of {path}: a config file cannot name another one")
        elif name in table:
            if name in found:
                problems.append(f"key {name!r} is set twice in {path}: in {found[name][1]} and in {section}; "
                                "keep one")
            else:
                found[name] = (value, section)
        elif key in UNSUPPORTED:
            if at_default(key, value):
                at_defaults.append(key)
            else:
                problems.append(refusal(key, f"key {key!r} = {value!r} in {section} of {path}"))
        elif did_you_mean(key, table) and key not in GUI_KEYS:
            problems.append(f"unknown key {key!r} in {section} of {path}{did_you_mean(key, table)}")
        else:
            ignored.append(key)

    for key, value in doc.items():
        if isinstance(value, dict) and key not in table_valued:
            for sub_key, sub_value in value.items():
                take(sub_key, sub_value, f"[{key}]")
        else:
            take(key, value, "the top level")
    if problems:
        raise ConfigError("\n".join(problems))
    if at_defaults:
        logger.info("%s: kohya keys at their defaults, which change nothing here: %s", path, ", ".join(at_defaults))
    if ignored:
        logger.warning("%s: keys neither lycoft nor sd-scripts trains with, ignored (as sd-scripts ignores "
                       "them): %s", path, ", ".join(ignored))
    return {
        key: check_value(table[key], value, f"key {key!r} in {section} of {path}")
        for key, (value, section) in found.items() if key not in overridden
    }


def config_to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML, grouped in sections like `--help`; `parse_args(['--config', f])`
    reads it back to an equal config. Unset values are left out (TOML has no null)."""
    import toml

    sections: dict[str, dict[str, Any]] = {}
    for name, f in flag_table().items():
        value = getattr(cfg, name)
        if value is None or name == "config":
            continue
        if f.kind == "resolution":
            value = value[0] if value[0] == value[1] else f"{value[0]},{value[1]}"
        sections.setdefault(f.group, {})[name] = value
    return "# resolved lycoft training config; reuse with --config\n" + toml.dumps(sections)


def save_config_toml(cfg: TrainConfig, path: str | Path) -> Path:
    """Write `config_to_toml(cfg)` to `path` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_toml(cfg), encoding="utf-8")
    return path
