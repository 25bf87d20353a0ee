"""Every flag of the trainer given a bad value: a wrong type, an out-of-range number, NaN/inf, an empty string
and a path that does not exist, on top of a valid command line. Only parsing and validation run (no model
loads): each case either parses or raises `ConfigError` with a short message naming the flag, never another
exception, so the command line reports it as a user error (exit 2, no traceback)."""

from __future__ import annotations

import math
import time

import pytest

from lycoft.training import config as config_module
from lycoft.training.config import parse_args
from lycoft.training.errors import ConfigError
from lycoft.training.flags import flag_table
from lycoft.training.kohya_flags import ALIASES

BAD_VALUES = ("abc", "-1", "0", "1e30", "nan", "inf", "-inf", "", "{missing}")
# Non-finite numbers that parse must never reach training: a NaN rate or offset makes a NaN model.
NON_FINITE = ("nan", "inf", "-inf")


def flag_names(name: str) -> list[str]:
    return [f"--{name}"] + [f"--{kohya}" for kohya, ours in ALIASES.items() if ours == name]


def non_finite_number_in(cfg, name: str) -> bool:
    value = getattr(cfg, name)
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, float) and not math.isfinite(v) for v in values)


def test_every_trainer_flag_with_bad_values_parses_or_names_the_flag(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "1_x").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    missing = str(tmp_path / "no-such-folder" / "x.safetensors")
    base = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data)]
    parse_args(base)  # the base command line is valid on its own
    # `--output_config` writes the command line to a file instead of training: not part of this check.
    monkeypatch.setattr(config_module, "write_command_line_config", lambda *a, **k: work / "written.toml")

    table = flag_table()
    assert len(table) > 100
    problems = []
    cases = 0
    t0 = time.perf_counter()
    for name in table:
        for raw in BAD_VALUES:
            value = raw.format(missing=missing)
            argv = [*base, f"--{name}", value]
            cases += 1
            try:
                cfg = parse_args(argv)
            except ConfigError as e:
                message = str(e)
                # Or the message names the bad value itself: `--config x` says "config file 'x' does not
                # exist", and `--flag -inf` after a flag whose value is optional is taken for a flag by argparse.
                names_value = bool(value) and repr(value) in message
                if not any(n in message for n in flag_names(name)) and not names_value:
                    problems.append(f"--{name} {value!r}: the message does not name the flag: {message}")
                elif len(message.splitlines()) > 8:
                    problems.append(f"--{name} {value!r}: a {len(message.splitlines())}-line message: {message}")
                continue
            except SystemExit as e:
                if not (name == "output_config" and e.code == 0):
                    problems.append(f"--{name} {value!r}: SystemExit({e.code!r})")
                continue
            except Exception as e:  # noqa: BLE001 - any other exception is the bug this test looks for
                problems.append(f"--{name} {value!r}: {type(e).__name__}: {e}")
                continue
            if raw in NON_FINITE and non_finite_number_in(cfg, name):
                problems.append(f"--{name} {value!r}: accepted a non-finite number")
    elapsed = time.perf_counter() - t0
    assert not problems, f"{len(problems)} of {cases} cases:\n" + "\n".join(problems)
    assert list(work.iterdir()) == [], "parsing and validating wrote files"
    print(f"{cases} bad trainer flag values in {elapsed:.1f} s")


@pytest.mark.parametrize("flag", ["--learning_rate", "--noise_offset", "--max_grad_norm", "--unet_lr"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_number_is_refused_naming_the_flag(tmp_path, flag, value):
    data = tmp_path / "data"
    (data / "1_x").mkdir(parents=True)
    with pytest.raises(ConfigError, match=flag):
        parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data),
                    flag, value])
