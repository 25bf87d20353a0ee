"""Training TOML files in and out: reading one (flat, or kohya-style sections) into checked flag values,
and writing a resolved `TrainConfig` back so that ``--config`` reproduces it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lycoft.training.errors import ConfigError, did_you_mean
from lycoft.training.flags import TrainConfig, check_value, flag_table

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


def load_config_toml(path: str | Path) -> dict[str, Any]:
    """A training TOML (flat, or kohya-style sections that are flattened) -> checked flag values."""
    path = Path(path)
    doc = read_toml(path)
    table = flag_table()
    # Keys whose value may itself be a table, so that `network_args = {...}` is a value, not a section.
    table_valued = {n for n, f in table.items() if f.kind == "list"}
    found: dict[str, tuple[Any, str]] = {}
    problems: list[str] = []

    def take(key: str, value: Any, section: str) -> None:
        if key == "config":
            problems.append(f"key 'config' in {section} of {path}: a config file cannot name another one")
        elif key not in table:
            problems.append(f"unknown key {key!r} in {section} of {path}{did_you_mean(key, table)}")
        elif key in found:
            problems.append(
                f"key {key!r} is set twice in {path}: in {found[key][1]} and in {section}; keep one"
            )
        else:
            found[key] = (value, section)

    for key, value in doc.items():
        if isinstance(value, dict) and key not in table_valued:
            for sub_key, sub_value in value.items():
                take(sub_key, sub_value, f"[{key}]")
        else:
            take(key, value, "the top level")
    if problems:
        raise ConfigError("\n".join(problems))
    return {
        key: check_value(table[key], value, f"key {key!r} in {section} of {path}")
        for key, (value, section) in found.items()
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
