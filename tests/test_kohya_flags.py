"""Every flag of kohya sd-scripts' train_network.py / sdxl_train_network.py is known to the trainer: it works
with kohya's meaning, is a kohya spelling of a lycoft flag, or is refused by name with the reason."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lycoft.training.config import parse_args
from lycoft.training.errors import ConfigError
from lycoft.training.flags import flag_table
from lycoft.training.kohya_flags import ALIASES, SD_SCRIPTS_COMMIT, UNSUPPORTED

DATA = json.loads((Path(__file__).parent / "data" / "sd_scripts_flags.json").read_text(encoding="utf-8"))
KOHYA = DATA["flags"]


@pytest.fixture
def base(tmp_path: Path) -> list[str]:
    d = tmp_path / "train"
    (d / "1_sks toy").mkdir(parents=True)
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(d)]


def test_every_kohya_flag_is_known_one_way():
    assert DATA["commit"] == SD_SCRIPTS_COMMIT
    table = flag_table()
    for name in KOHYA:
        ways = [name in table, name in ALIASES, name in UNSUPPORTED]
        assert sum(ways) == 1, f"{name}: works={ways[0]} alias={ways[1]} refused={ways[2]}"
    assert set(UNSUPPORTED) <= set(KOHYA) and set(ALIASES) <= set(KOHYA)
    assert all(target in table for target in ALIASES.values())


# Flags whose argparse default is None in sd-scripts but which it then treats as this value.
EFFECTIVE_DEFAULTS = {"min_timestep": 0, "max_timestep": 1000}


def test_refused_flags_state_kohyas_defaults():
    for name, entry in UNSUPPORTED.items():
        kohya_default = EFFECTIVE_DEFAULTS.get(name, KOHYA[name]["default"])
        assert entry.default == kohya_default or (entry.default is None and kohya_default in (None, "", [])), name


def _effective_value(name: str):
    """A value of the kohya flag that does something (not its default)."""
    if KOHYA[name]["store_true"]:
        return True
    default = KOHYA[name]["default"]
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return default + 1
    return "x"


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_refused_flag_names_itself_and_the_reason(name, base, tmp_path):
    value = _effective_value(name)
    argv = [f"--{name}"] if value is True else [f"--{name}", str(value)]
    with pytest.raises(ConfigError) as cli:
        parse_args([*base, *argv])
    assert f"--{name} is a kohya sd-scripts flag that lycoft does not take: {UNSUPPORTED[name].reason}" in str(cli.value)
    toml = tmp_path / "c.toml"
    toml.write_text(f"[kohya]\n{name} = {json.dumps(value)}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as from_file:
        parse_args([*base, "--config", str(toml)])
    assert f"key {name!r}" in str(from_file.value) and UNSUPPORTED[name].reason in str(from_file.value)


def test_kohya_gui_config_loads_with_defaults_and_foreign_keys_noted(base, tmp_path, caplog):
    # what the kohya_ss GUI writes beside the real settings: unsupported flags at kohya's defaults and
    # keys sd-scripts itself ignores
    toml = tmp_path / "gui.toml"
    toml.write_text("""
learning_rate = 2e-4
max_timestep = 1000
huber_c = 0.1
loss_type = "l2"
lr_scheduler_args = []
fp8_base = false
epoch = 4
noise_offset_type = "Original"
LoRA_type = "Standard"
caption_extention = ".txt"
""", encoding="utf-8")
    with caplog.at_level(logging.INFO):
        cfg = parse_args([*base, "--config", str(toml)])
    assert cfg.learning_rate == 2e-4 and cfg.caption_extension == ".txt"
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "kohya keys at their defaults, which change nothing here: max_timestep, huber_c, loss_type, " \
           "fp8_base" in messages
    assert "ignored (as sd-scripts ignores them): epoch, noise_offset_type, LoRA_type" in messages


def test_a_near_miss_of_a_real_flag_is_still_an_error(base, tmp_path):
    toml = tmp_path / "typo.toml"
    toml.write_text("learning_rat = 1e-4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        parse_args([*base, "--config", str(toml)])


def test_kohya_spelling_works_on_the_command_line(base):
    assert parse_args([*base, "--caption_extention", ".txt"]).caption_extension == ".txt"


def test_command_line_steps_beat_config_file_epochs(base, tmp_path, caplog):
    toml = tmp_path / "epochs.toml"
    toml.write_text("max_train_epochs = 3\n", encoding="utf-8")
    assert parse_args([*base, "--config", str(toml)]).max_train_epochs == 3
    with caplog.at_level(logging.INFO):
        cfg = parse_args([*base, "--config", str(toml), "--max_train_steps", "5"])
    assert (cfg.max_train_steps, cfg.max_train_epochs) == (5, None)
    assert any("--max_train_steps on the command line beats max_train_epochs = 3" in r.getMessage()
               for r in caplog.records)
    both = parse_args([*base, "--config", str(toml), "--max_train_steps", "5", "--max_train_epochs", "2"])
    assert (both.max_train_steps, both.max_train_epochs) == (5, 2)  # both on the command line: kohya's rule
