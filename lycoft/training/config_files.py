"""Training TOML files in and out: reading one (flat, or kohya-style sections) into checked flag values,
writing a resolved `TrainConfig` back so that ``--config`` reproduces it, writing the command line's flags
(``--output_config``), and reading a tracker config (``--log_tracker_config``)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from lycoft.training.errors import ConfigError, did_you_mean
from lycoft.training.flag_values import check_value
from lycoft.training.flags import TrainConfig, flag_table
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
        elif name == "output_config":
            if value is not False:
                problems.append(f"key {key!r} in {section} of {path}: --output_config works on the command line "
                                "only (it writes the file that --config names)")
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


def _settings_toml(values: Mapping[str, Any], header: str) -> str:
    """Flag values as TOML, grouped in sections like `--help`. Unset values are left out (TOML has no null),
    and so are the flags about the config file itself."""
    import toml

    sections: dict[str, dict[str, Any]] = {}
    for name, f in flag_table().items():
        value = values.get(name)
        if value is None or f.group == "config":
            continue
        if f.kind == "resolution":
            value = value[0] if value[0] == value[1] else f"{value[0]},{value[1]}"
        sections.setdefault(f.group, {})[name] = value
    return header + toml.dumps(sections)


def config_to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML; `parse_args(['--config', f])` reads it back to an equal config."""
    return _settings_toml(cfg.to_dict(), "# resolved lycoft training config; reuse with --config\n")


def save_config_toml(cfg: TrainConfig, path: str | Path) -> Path:
    """Write `config_to_toml(cfg)` to `path` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_toml(cfg), encoding="utf-8")
    return path


def write_command_line_config(values: Mapping[str, Any], target: str | None) -> Path:
    """kohya's ``--output_config``: the flags given on the command line that are not at their defaults, as a
    new TOML file at `target` (the ``--config`` path; ``.toml`` is added when missing, as kohya does). An
    existing file is refused, never overwritten."""
    if not target:
        raise ConfigError("--output_config writes the command line's flags to the file --config names (kohya: "
                          "--config_file); add --config my.toml")
    path = Path(target if target.endswith(".toml") else target + ".toml")
    table = flag_table()
    given = {name: value for name, value in values.items() if value != table[name].default}
    text = _settings_toml(given, "# lycoft training flags written by --output_config; train with --config\n")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise ConfigError(f"--output_config: {path} already exists and is not overwritten; give --config a new "
                          "file name, or delete that file") from None
    except OSError as e:
        raise ConfigError(f"--output_config: cannot write {path} ({e.strerror or e}); choose another --config "
                          "path") from None
    return path


def read_tracker_config(path: str | Path) -> dict[str, dict[str, Any]]:
    """``--log_tracker_config``: a TOML file of tracker keyword arguments, one table per tracker
    (``[wandb]``, ``[tensorboard]``) -> {tracker: kwargs}."""
    doc = read_toml(Path(path), "--log_tracker_config file")
    loose = [key for key, value in doc.items() if not isinstance(value, dict)]
    if loose:
        raise ConfigError(f"--log_tracker_config {path}: {', '.join(map(repr, loose))} must be inside a table "
                          "named after its tracker, e.g. [wandb] (keyword arguments of that tracker)")
    return doc
