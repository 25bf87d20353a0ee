"""Trainer flags: precedence, TOML flattening, typo and type errors, cross-field rules, write-back."""

from __future__ import annotations

from pathlib import Path

import pytest

from lycoft.training.config import config_from_dict, parse_args
from lycoft.training.config_files import config_to_toml, save_config_toml
from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig, flag_table

MODEL = ["--pretrained_model_name_or_path", "builtin:tiny-sd1"]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "train"
    (d / "1_sks toy").mkdir(parents=True)
    return d


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def base_args(data_dir: Path) -> list[str]:
    return [*MODEL, "--train_data_dir", str(data_dir)]


def test_defaults_follow_kohya(data_dir):
    cfg = parse_args(base_args(data_dir))
    assert cfg.caption_extension == ".caption"
    assert cfg.network_module == "lycoft"
    assert cfg.optimizer_type == "AdamW" and cfg.lr_scheduler == "constant"
    assert cfg.bucket_reso_steps == 64 and cfg.min_bucket_reso == 256 and cfg.max_bucket_reso == 1024
    assert cfg.resolution is None and cfg.resolved_resolution() == (512, 512)
    assert cfg.replace(sdxl=True).resolved_resolution() == (1024, 1024)


def test_command_line_beats_toml_beats_defaults(tmp_path, data_dir):
    toml = write(tmp_path / "x.toml", f"""
pretrained_model_name_or_path = "builtin:tiny-sd1"
train_data_dir = "{data_dir}"
learning_rate = 1e-3
train_batch_size = 4
flip_aug = true
""")
    cfg = parse_args(["--config", str(toml), "--learning_rate", "5e-4", "--flip_aug", "false"])
    assert cfg.learning_rate == 5e-4  # command line
    assert cfg.train_batch_size == 4  # toml
    assert cfg.flip_aug is False  # a TOML true can be turned off from the command line
    assert cfg.max_train_steps == 1600  # default
    assert cfg.config == str(toml)


def test_sectioned_toml_is_flattened_like_kohya(tmp_path, data_dir):
    flat = write(tmp_path / "flat.toml", f"""
pretrained_model_name_or_path = "builtin:tiny-sd1"
train_data_dir = "{data_dir}"
learning_rate = 2e-4
network_args = ["algo=boft", "block_size=8"]
""")
    sectioned = write(tmp_path / "sections.toml", f"""
[model_arguments]
pretrained_model_name_or_path = "builtin:tiny-sd1"
[dataset_arguments]
train_data_dir = "{data_dir}"
[optimizer_arguments]
learning_rate = 2e-4
[additional_network_arguments]
network_args = {{ algo = "boft", block_size = 8 }}
""")
    a = parse_args(["--config", str(flat)])
    b = parse_args(["--config", str(sectioned)])
    assert a.replace(config=None) == b.replace(config=None)
    assert b.network_options().to_dict() == {"algo": "boft", "block_size": 8}


def test_key_set_in_two_sections_is_an_error(tmp_path):
    toml = write(tmp_path / "dup.toml", "[a]\nlearning_rate = 1e-4\n[b]\nlearning_rate = 2e-4\n")
    with pytest.raises(ConfigError, match=r"'learning_rate' is set twice .*\[a\] and in \[b\]"):
        parse_args(["--config", str(toml)])


def test_typo_in_toml_names_key_section_file_and_suggestion(tmp_path):
    toml = write(tmp_path / "typo.toml", "[optimizer]\nlearning_rat = 1e-4\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(toml)])
    msg = str(e.value)
    assert "unknown key 'learning_rat' in [optimizer]" in msg
    assert str(toml) in msg
    assert "did you mean 'learning_rate'?" in msg


def test_unknown_command_line_flag_and_no_prefix_matching(data_dir):
    with pytest.raises(ConfigError, match=r"unknown flag '--learning_rat'; did you mean '--learning_rate'\?"):
        parse_args([*base_args(data_dir), "--learning_rat", "1e-4"])
    # argparse would otherwise accept an unambiguous prefix and silently set another flag
    with pytest.raises(ConfigError, match="unknown flag '--max_train_ep'"):
        parse_args([*base_args(data_dir), "--max_train_ep", "3"])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse_args([*base_args(data_dir), "stray"])


@pytest.mark.parametrize(
    ("toml_line", "expected"),
    [
        ('train_batch_size = "4"', r"'train_batch_size' .* must be an integer, got '4' \(str\)"),
        ("train_batch_size = 1.5", r"'train_batch_size' .* must be an integer"),
        ('flip_aug = "yes"', r"'flip_aug' .* must be true or false"),
        ("learning_rate = true", r"'learning_rate' .* must be a number"),
        ("network_args = 3", r"'network_args' .* must be a list of strings"),
        ('resolution = "512,abc"', r"'resolution' .* must be a size like 512"),
    ],
)
def test_toml_type_errors_name_key_and_expected_type(tmp_path, toml_line, expected):
    toml = write(tmp_path / "types.toml", toml_line + "\n")
    with pytest.raises(ConfigError, match=expected):
        parse_args(["--config", str(toml)])


def test_command_line_type_errors(data_dir):
    with pytest.raises(ConfigError, match=r"--max_train_steps must be an integer, got 'ten'"):
        parse_args([*base_args(data_dir), "--max_train_steps", "ten"])
    with pytest.raises(ConfigError, match=r"--flip_aug must be true or false, got 'maybe'"):
        parse_args([*base_args(data_dir), "--flip_aug", "maybe"])


def test_integers_are_accepted_for_float_flags(tmp_path, data_dir):
    toml = write(tmp_path / "x.toml", "learning_rate = 1\nnoise_offset = 0\n")
    cfg = parse_args([*base_args(data_dir), "--config", str(toml)])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


def test_choices_are_case_insensitive_and_suggest(data_dir):
    cfg = parse_args([*base_args(data_dir), "--optimizer_type", "adamw8bit", "--mixed_precision", "BF16"])
    assert cfg.optimizer_type == "AdamW8bit" and cfg.mixed_precision == "bf16"
    assert parse_args([*base_args(data_dir), "--optimizer_type", "torch.optim.SGD"]).optimizer_type == "torch.optim.SGD"
    with pytest.raises(ConfigError, match=r"did you mean 'cosine'\?"):
        parse_args([*base_args(data_dir), "--lr_scheduler", "cosin"])
    with pytest.raises(ConfigError, match=r"did you mean 'Prodigy'\?"):
        parse_args([*base_args(data_dir), "--optimizer_type", "prodigi"])


def test_resolution_forms(tmp_path, data_dir):
    assert parse_args([*base_args(data_dir), "--resolution", "512,768"]).resolution == (512, 768)
    assert parse_args([*base_args(data_dir), "--resolution", "640"]).resolution == (640, 640)
    toml = write(tmp_path / "r.toml", "resolution = [768, 512]\n")
    assert parse_args([*base_args(data_dir), "--config", str(toml)]).resolution == (768, 512)


def test_lists_and_their_typed_views(data_dir):
    cfg = parse_args([*base_args(data_dir), "--network_args", "algo=boft", "block_size=8", "rescale=true",
                      "--optimizer_args", "weight_decay=0.01", "betas=(0.9,0.99)", "--network_dim", "8"])
    assert cfg.network_options().to_dict() == {"algo": "boft", "block_size": 8, "rescale": True}
    assert cfg.optimizer_kwargs() == {"weight_decay": 0.01, "betas": (0.9, 0.99)}
    only_dim = parse_args([*base_args(data_dir), "--network_dim", "16", "--network_dropout", "0.1"])
    assert only_dim.network_options().to_dict() == {"block_size": 16, "dropout": 0.1}
    # kohya's network_dropout is neuron dropout: reported, not applied as block dropout
    assert only_dim.network_options().adapter.dropout == 0.0


def test_warmup_as_steps_or_ratio(data_dir):
    args = [*base_args(data_dir), "--lr_scheduler", "cosine"]
    assert parse_args([*args, "--lr_warmup_steps", "0.1"]).warmup_steps(1000) == 100
    assert parse_args([*args, "--lr_warmup_steps", "50"]).warmup_steps(1000) == 50
    with pytest.raises(ConfigError, match="whole number of steps or a fraction < 1"):
        parse_args([*args, "--lr_warmup_steps", "2.5"])


def test_help_lists_every_flag_with_its_help(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name, f in flag_table().items():
        assert f"--{name}" in out
        assert " ".join(f.help.split())[:40] in out
    assert "Ignored for OFT/BOFT" in out  # network_alpha says it is accepted but unused


CROSS_FIELD_CASES = [
    ([*MODEL], "no training data"),
    (["--train_data_dir", "DATA"], "--pretrained_model_name_or_path is required"),
    ([*MODEL, "--train_data_dir", "DATA", "--save_every_n_steps", "0"], "--save_every_n_steps must be a positive"),
    ([*MODEL, "--train_data_dir", "DATA", "--full_fp16"], "--full_fp16 needs --mixed_precision fp16"),
    ([*MODEL, "--train_data_dir", "DATA", "--lr_warmup_steps", "10"], "no effect with --lr_scheduler constant"),
    ([*MODEL, "--train_data_dir", "DATA", "--cache_latents", "--random_crop"], "--random_crop cannot be used"),
    ([*MODEL, "--train_data_dir", "DATA", "--cache_text_encoder_outputs"], "add --network_train_unet_only"),
    ([*MODEL, "--train_data_dir", "DATA", "--cache_text_encoder_outputs", "--network_train_unet_only",
      "--shuffle_caption"], "needs fixed captions"),
    ([*MODEL, "--train_data_dir", "DATA", "--xformers", "--sdpa"], "pick one attention"),
    ([*MODEL, "--train_data_dir", "DATA", "--v2", "--sdxl"], "contradict"),
    ([*MODEL, "--train_data_dir", "DATA", "--sdxl", "--model_family", "sd1"], "--sdxl contradicts"),
    ([*MODEL, "--train_data_dir", "DATA", "--save_last_n_epochs", "2"], "needs --save_every_n_epochs"),
    ([*MODEL, "--train_data_dir", "DATA", "--sample_every_n_steps", "10"], "--sample_prompts is not set"),
    ([*MODEL, "--train_data_dir", "DATA", "--network_args", "constraint=1e-3", "constrain=1e-2"],
     "constraint is given twice with different values: --network_args constraint=1e-3 and "
     "--network_args constrain=1e-2"),
    ([*MODEL, "--train_data_dir", "DATA", "--network_dropout", "0.1", "--network_args", "dropout=0.2"],
     "dropout is given twice"),
    ([*MODEL, "--train_data_dir", "DATA", "--network_args", "blocksize=16"], "did you mean 'block_size'"),
    ([*MODEL, "--train_data_dir", "DATA", "--network_args", "algo=lora"], "algo 'lora' is not known"),
    ([*MODEL, "--train_data_dir", "DATA", "--enable_bucket", "--resolution", "128"],
     "set --min_bucket_reso <= 128"),
    ([*MODEL, "--train_data_dir", "DATA", "--enable_bucket", "--min_bucket_reso", "250"],
     "not a multiple of --bucket_reso_steps 64; use 192"),
    ([*MODEL, "--train_data_dir", "DATA", "--num_class_images", "10"], "needs --class_prompt"),
    ([*MODEL, "--train_data_dir", "nowhere/at/all"], "--train_data_dir 'nowhere/at/all' is not a folder"),
]


@pytest.mark.parametrize(("argv", "expected"), CROSS_FIELD_CASES)
def test_cross_field_rules(data_dir, argv, expected):
    argv = [str(data_dir) if a == "DATA" else a for a in argv]
    with pytest.raises(ConfigError, match=expected.replace("?", r"\?")):
        parse_args(argv)


def test_all_problems_are_reported_at_once(data_dir):
    with pytest.raises(ConfigError) as e:
        parse_args([*base_args(data_dir), "--train_batch_size", "0", "--xformers", "--sdpa", "--full_bf16"])
    msg = str(e.value)
    assert msg.startswith("3 problems")
    assert "--train_batch_size must be a positive" in msg and "pick one attention" in msg and "--full_bf16" in msg


def test_check_false_skips_cross_field_rules_but_not_types():
    cfg = parse_args(["--max_train_steps", "5"], check=False)
    assert cfg.pretrained_model_name_or_path is None and cfg.max_train_steps == 5
    with pytest.raises(ConfigError):
        parse_args(["--max_train_steps", "five"], check=False)


def test_config_cannot_name_another_config(tmp_path):
    toml = write(tmp_path / "x.toml", 'config = "other.toml"\n')
    with pytest.raises(ConfigError, match="cannot name another one"):
        parse_args(["--config", str(toml)])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "absent.toml")])
    bad = write(tmp_path / "bad.toml", "learning_rate = = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        parse_args(["--config", str(bad)])


def test_dataset_toml_typos_surface_when_parsing_flags(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    data = write(tmp_path / "data.toml", f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{img}"\nnum_repeat = 3\n')
    expected = r"unknown key 'num_repeat' in \[\[datasets.subsets\]\].*did you mean 'num_repeats'"
    with pytest.raises(ConfigError, match=expected):
        parse_args([*MODEL, "--dataset_config", str(data)])


def test_written_config_reads_back_equal(tmp_path, data_dir):
    cfg = parse_args([*base_args(data_dir), "--resolution", "512,768", "--network_args", "algo=boft",
                      "block_size=8", "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.05", "--seed", "7",
                      "--flip_aug", "--min_snr_gamma", "5"])
    path = save_config_toml(cfg, tmp_path / "out" / "config.toml")
    again = parse_args(["--config", str(path)])
    assert again.replace(config=None) == cfg
    assert "[optimizer]" in config_to_toml(cfg)  # grouped like --help


def test_config_from_dict_checks_like_a_file(data_dir):
    cfg = config_from_dict({"pretrained_model_name_or_path": "x", "train_data_dir": str(data_dir), "seed": 3})
    assert isinstance(cfg, TrainConfig) and cfg.seed == 3
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        config_from_dict({"sed": 3}, check=False)


def test_unset_seed_is_drawn_once_and_kept(data_dir):
    cfg = parse_args(base_args(data_dir))
    assert cfg.seed is None
    resolved = cfg.with_resolved_seed()
    assert isinstance(resolved.seed, int) and resolved.with_resolved_seed() is resolved
    assert parse_args([*base_args(data_dir), "--seed", "3"]).with_resolved_seed().seed == 3


def test_network_alpha_is_accepted_but_reported_as_ignored(data_dir, caplog):
    cfg = parse_args([*base_args(data_dir), "--network_alpha", "1"])
    assert cfg.network_alpha == 1.0 and "network_alpha" not in str(cfg.network_options().to_dict())
    assert any("--network_alpha 1.0 is ignored" in r.getMessage() for r in caplog.records)


def test_text_encoder_lr_takes_one_value_or_one_per_sdxl_text_encoder(data_dir, tmp_path, caplog):
    cfg = parse_args([*base_args(data_dir), "--text_encoder_lr", "1e-5", "2e-5"])
    assert cfg.text_encoder_lr == [1e-5, 2e-5]
    assert cfg.text_encoder_lrs(2) == [1e-5, 2e-5]
    # the kohya_ss GUI writes two rates for SD1 too: the first serves, with a warning
    assert cfg.text_encoder_lrs(1) == [1e-5]
    assert "--text_encoder_lr has 2 values (1e-05 2e-05) but this model has 1 text encoder: using 1e-05" \
        in caplog.text
    one = parse_args([*base_args(data_dir), "--text_encoder_lr", "5e-5"])
    assert one.text_encoder_lr == [5e-5] and one.text_encoder_lrs(2) == [5e-5, 5e-5]
    assert parse_args(base_args(data_dir)).text_encoder_lrs(2) == [None, None]  # = --learning_rate
    # TOML: a number (the kohya configs' form) or a list; both come back from the written config
    for text, expected in (("text_encoder_lr = 5e-5", [5e-5]), ("text_encoder_lr = [1e-5, 3]", [1e-5, 3.0])):
        cfg = parse_args([*base_args(data_dir), "--config", str(write(tmp_path / "c.toml", text))])
        assert cfg.text_encoder_lr == expected
        again = parse_args([*base_args(data_dir), "--config",
                            str(write(tmp_path / "again.toml", config_to_toml(cfg)))])
        assert again.text_encoder_lr == expected
    with pytest.raises(ConfigError, match=r"--text_encoder_lr must be one number, or two for SDXL's two text "
                                          r"encoders, got '1e-5 fast'"):
        parse_args([*base_args(data_dir), "--text_encoder_lr", "1e-5", "fast"])
    with pytest.raises(ConfigError, match=r"--text_encoder_lr must be one number, or two .*got \[1e-05, 1e-05, "
                                          r"1e-05\]"):
        parse_args([*base_args(data_dir), "--text_encoder_lr", "1e-5", "1e-5", "1e-5"])
    with pytest.raises(ConfigError, match=r"--text_encoder_lr must be >= 0, got 1e-05 -0.001"):
        parse_args([*base_args(data_dir), "--text_encoder_lr", "1e-5", "-0.001"])
