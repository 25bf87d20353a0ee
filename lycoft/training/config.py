"""How a command line plus a TOML file become a checked `TrainConfig`.

Precedence: command line > ``--config`` TOML > defaults. The flags are the table in `flags`; TOML
reading and writing live in `config_files`, the cross-field rules in `validate`. Nothing here imports
torch or touches a model: parsing and validation are fast and happen before anything heavy is loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lycoft.training.config_files import load_config_toml, write_command_line_config
from lycoft.training.errors import ConfigError, did_you_mean
from lycoft.training.flag_values import check_value, value_from_text
from lycoft.training.flags import TrainConfig, flag_table
from lycoft.training.kohya_flags import ALIASES, UNSUPPORTED, refusal
from lycoft.training.validate import validate

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # A library function must not exit the interpreter on a typo; the CLI decides what to do.
        raise ConfigError(f"{message}; run with --help to see every flag")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser behind `parse_args`; every default is suppressed so that only flags
    actually typed show up, which is what lets the TOML sit between defaults and command line."""
    parser = _Parser(
        prog="train_network.py",
        usage="%(prog)s [--config x.toml] [--flag value ...]",
        description="Train an OFT/BOFT adapter (lycoft). Every flag can also be a key in the --config "
        "TOML; the command line wins.",
        allow_abbrev=False,  # a prefix must not silently match another flag
        argument_default=argparse.SUPPRESS,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in flag_table().values():
        group = groups.get(f.group) or groups.setdefault(f.group, parser.add_argument_group(f.group))
        default = "unset" if f.default is None else f.default
        if f.kind == "resolution" and f.default is not None:
            default = ",".join(map(str, f.default))
        help_text = f"{f.help} (default: {default})".replace("%", "%%")
        names = [f"--{f.name}"] + [f"--{kohya}" for kohya, ours in ALIASES.items() if ours == f.name]
        kwargs: dict[str, Any] = {"help": help_text, "dest": f.name}
        if f.kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="true|false")
        elif f.kind in ("list", "files"):
            kwargs.update(nargs="*", metavar="KEY=VALUE" if f.kind == "list" else "FILE")
        elif f.kind in ("floats", "numbers"):
            kwargs.update(nargs="+", metavar="X")
        elif f.choices:
            kwargs.update(metavar="{" + "|".join(f.choices) + "}")
        else:
            kwargs.update(metavar={"int": "N", "float": "X", "resolution": "W[,H]", "warmup": "N|RATIO"}
                          .get(f.kind, "VALUE"))
        group.add_argument(*names, **kwargs)
    return parser


def _unknown_flags_error(extra: list[str]) -> ConfigError:
    known = [f"--{n}" for n in flag_table()]
    lines = []
    after_unknown_flag = False
    for token in extra:
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            if name.lstrip("-") in UNSUPPORTED:
                lines.append(refusal(name.lstrip("-"), name))
            else:
                lines.append(f"unknown flag {name!r}{did_you_mean(name, known)}")
            after_unknown_flag = True
        elif not after_unknown_flag:  # words right after an unknown flag are its values, not news
            lines.append(f"unexpected argument {token!r}: flags take the form --name value")
    return ConfigError("\n".join(lines) + "\nrun with --help to see every flag")


# Flags of which kohya uses one when both are given; the command line beats the TOML for the pair as a whole.
_RIVALS = (("max_train_steps", "max_train_epochs"),)


def _command_line_wins(from_toml: dict[str, Any], from_cli: Mapping[str, Any]) -> None:
    """Drop from the TOML the rival of a flag the command line gives (`--max_train_steps` on the command
    line beats a ``max_train_epochs`` in the TOML, which would otherwise override it)."""
    for pair in _RIVALS:
        for cli_name in pair:
            for rival in pair:
                if rival != cli_name and cli_name in from_cli and rival in from_toml and rival not in from_cli:
                    logger.info("--%s on the command line beats %s = %s in the config file", cli_name, rival,
                                from_toml.pop(rival))


def parse_args(argv: Sequence[str] | None = None, *, check: bool = True) -> TrainConfig:
    """Command line (+ the ``--config`` TOML it names) -> a checked `TrainConfig`.

    Precedence: command line > TOML > defaults. ``check=False`` skips `validate` (cross-field rules
    and path checks); types and names are always checked. ``--help`` prints and exits; so does
    ``--output_config``, after writing the command line's flags to the ``--config`` path.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    namespace, extra = parser.parse_known_args(argv)
    if extra:
        raise _unknown_flags_error(extra)
    table = flag_table()
    from_cli = {
        name: check_value(table[name], value_from_text(table[name], text, f"--{name}"), f"--{name}")
        for name, text in vars(namespace).items()
    }
    if from_cli.get("output_config"):  # kohya: write the command line to the config path instead of training
        written = write_command_line_config(from_cli, from_cli.get("config"))
        logger.info("wrote the command line's flags to %s; not training (--output_config)", written)
        raise SystemExit(0)
    values = {name: f.default for name, f in table.items()}
    config_path = from_cli.get("config")
    if config_path:
        from_toml = load_config_toml(config_path, overridden=from_cli.keys())
        _command_line_wins(from_toml, from_cli)
        values.update(from_toml)
    values.update(from_cli)
    cfg = TrainConfig(**values)
    if check:
        validate(cfg)
    return cfg


def config_from_dict(values: Mapping[str, Any], *, where: str = "config", check: bool = True) -> TrainConfig:
    """Build a config from Python values (tests, notebooks), with the same checks as a TOML file."""
    table = flag_table()
    unknown = [k for k in values if k not in table]
    if unknown:
        raise ConfigError(
            "\n".join(f"unknown key {k!r} in {where}{did_you_mean(k, table)}" for k in unknown)
        )
    merged = {name: f.default for name, f in table.items()}
    merged.update({k: check_value(table[k], v, f"key {k!r} in {where}") for k, v in values.items()})
    cfg = TrainConfig(**merged)
    if check:
        validate(cfg)
    return cfg
