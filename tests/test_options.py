"""The one adapter-option schema: every spelling, one meaning, in the trainer and in `lycoft.kohya`."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import lycoft
from lycoft import kohya
from lycoft.config import OPTION_BY_NAME, OPTIONS, NetworkOptions, parse_network_args
from lycoft.errors import ConfigError
from lycoft.training.config import parse_args
from lycoft.training.config_files import config_to_toml
from lycoft.training.loop import build_network

ROOT = Path(__file__).resolve().parents[1]

# Each case: (network_args items, network_dim, network_dropout) as a user would write them.
CASES = [
    (["algo=boft", "block_size=4", "butterfly_factors=2", "constraint=1e-3", "rescale=true"], None, None),
    (["algo=diag-oft", "constrain=1e-4", "rescaled=True", "conv_dim=4", "preset=attn-mlp"], 8, None),
    (["module_dropout=0.1", "side=input", "path=weight", "exclude=conv_out$"], 4, None),
    (["block_num=4", "include=proj_in", "preset=attn-only"], 8, None),  # block_num beats network_dim
    (["dropout=0.1", "neumann_terms=3"], 8, None),  # neuron dropout: reported, not block dropout
    (["boft_m=2", "algo=boft", "dim=4"], None, 0.2),
    (['overrides={"attn1": {"block_size": 4}}', "block_size=8", "preset=attn-only"], None, None),
]


def _trainer_options(items, dim, dropout, data_dir) -> NetworkOptions:
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data_dir)]
    if items:
        argv += ["--network_args", *items]
    if dim is not None:
        argv += ["--network_dim", str(dim)]
    if dropout is not None:
        argv += ["--network_dropout", str(dropout)]
    return parse_args(argv).network_options()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "train"
    (d / "1_sks toy").mkdir(parents=True)
    return d


@pytest.mark.parametrize("items,dim,dropout", CASES)
def test_trainer_and_kohya_module_read_the_same_options(items, dim, dropout, data_dir):
    trainer = _trainer_options(items, dim, dropout, data_dir)
    strings = dict(item.split("=", 1) for item in items)  # sd-scripts passes string kwargs
    module = kohya.network_options(dim, strings, dropout)
    assert trainer.adapter == module.adapter
    assert trainer.inject_kwargs() == module.inject_kwargs()
    # the same notes, each naming where the user wrote the key (the trainer's flag has its dashes)
    assert [n.removeprefix("--") for n in trainer.notes] == [n.removeprefix("--") for n in module.notes]


def test_the_same_keys_build_the_same_network_in_both(tiny_pipes, data_dir):
    items = ["algo=boft", "block_size=4", "butterfly_factors=2", "module_dropout=0.1", "preset=attn-mlp",
             "exclude=mlp"]
    pipe = tiny_pipes("sd1")
    cfg = parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data_dir),
                      "--network_args", *items])

    class Models:
        unet, text_encoders, family = pipe.unet, [pipe.text_encoder], "sd1"

    trained = build_network(cfg, Models)
    trained.remove()
    module = kohya.create_network(1.0, None, None, None, pipe.text_encoder, pipe.unet,
                                  **dict(i.split("=", 1) for i in items))
    assert set(trained.adapters) == set(module.adapters) and len(module.adapters) > 0
    for key, layer in module.adapters.items():
        assert layer.layout == trained.adapters[key].layout
        assert layer.config == trained.adapters[key].config
        assert layer.config.dropout == 0.1


def test_neuron_dropout_is_reported_not_applied(caplog, tiny_pipes):
    pipe = tiny_pipes("sd1")
    with caplog.at_level(logging.WARNING, logger="lycoft"):
        net = kohya.create_network(1.0, 8, None, None, pipe.text_encoder, pipe.unet, neuron_dropout=0.1,
                                   preset="attn-only")
    assert {layer.config.dropout for layer in net.adapters.values()} == {0.0}
    assert any("--network_dropout 0.1 is ignored" in r.getMessage() and "module_dropout" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.aliases], ids=lambda o: o.key)
def test_every_alias_means_its_key(option):
    value = {"int": "4", "float": "0.5", "bool": "true", "str": "oft"}[option.kind]
    canonical = parse_network_args(["algo=boft", f"{option.key}={value}"])
    for alias in option.aliases:
        spelled = parse_network_args(["algo=boft", f"{alias}={value}"])
        assert spelled.to_dict() == canonical.to_dict() and spelled.inject_kwargs() == canonical.inject_kwargs()


def test_writer_round_trips_every_option():
    items = ["algo=boft", "block_size=4", "butterfly_factors=2", "constraint=0.001", "rescale=true",
             "module_dropout=0.1", "side=output", "path=activation", "neumann_terms=2", "preset=attn-mlp",
             "include=proj_in", "exclude=conv_out$", "conv_block_size=4", 'overrides={"conv":{"block_size":2}}',
             "dropout=0.2", "rank_dropout=0.1", "conv_alpha=1.0", "use_tucker=false", "use_scalar=false",
             "train_norm=false"]
    assert {i.split("=")[0] for i in items} == {o.key for o in OPTIONS} - {"block_num"}  # block_size's rival
    for case in (items, ["block_num=4", "algo=oft"]):
        options = parse_network_args(case)
        assert options.to_args() == case
        assert parse_network_args(options.to_args()) == options


def test_saved_toml_holds_the_canonical_spelling(data_dir, tmp_path):
    cfg = parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data_dir),
                      "--network_args", "constrain=1e-3", "rescaled=True", "boft_m=2", "algo=boft"])
    assert cfg.network_args == ["constraint=0.001", "rescale=true", "butterfly_factors=2", "algo=boft"]
    saved = tmp_path / "saved.toml"
    saved.write_text(config_to_toml(cfg), encoding="utf-8")
    again = parse_args(["--config", str(saved)])
    assert again.network_options() == cfg.network_options()


@pytest.mark.parametrize("items,kwargs,message", [
    (["constraint=1e-3", "constrain=1e-2"], {},
     "constraint is given twice with different values: network_args constraint=1e-3 and network_args "
     "constrain=1e-2; keep one"),
    (["dropout=0.2"], {"network_dropout": 0.1},
     "dropout is given twice with different values: network_args dropout=0.2 and --network_dropout 0.1"),
    (["blocksize=4"], {}, "unknown network_args key 'blocksize'; did you mean 'block_size'?"),
    (["block_size=four"], {}, "network_args block_size must be an integer, got 'four'"),
    (["rescale=maybe"], {}, "network_args rescale must be true or false, got 'maybe'"),
    (["overrides=[1]"], {}, "network_args overrides must be a JSON object"),
    (['overrides={"conv": {"preset": "full"}}'], {}, "key 'preset' cannot be set per layer"),
    (["algo=lora"], {}, "algo 'lora' is not known"),
    (["block_size"], {}, "item 'block_size' is not key=value"),
])
def test_bad_options_name_the_key_and_the_fix(items, kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_network_args(items, **kwargs)


def test_an_overridden_network_dim_is_noted():
    options = parse_network_args(["block_size=4"], network_dim=8)
    assert options.adapter.block_size == 4
    assert options.notes == ("network_args block_size=4 is used; --network_dim 8 (the block size) is not",)
    assert parse_network_args(["block_size=8"], network_dim=8).notes == ()


def test_inject_takes_the_options_as_they_are(tiny_pipes):
    pipe = tiny_pipes("sd1")
    options = parse_network_args(["block_size=4", 'overrides={"to_q": {"block_size": 2}}', "preset=attn-only"])
    net = lycoft.inject(pipe=pipe, **options.inject_kwargs())
    sizes = {k: layer.layout.block_size for k, layer in net.adapters.items()}
    assert {s for k, s in sizes.items() if k.endswith("to_q")} == {2}
    assert {s for k, s in sizes.items() if not k.endswith("to_q")} == {4}


def _table_rows(text: str, header: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_readme_network_args_table_is_the_schema():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    expected = []
    for o in OPTIONS:
        if o.ignored:
            continue
        aliases = f" ({', '.join(f'`{a}`' for a in o.aliases)})" if o.aliases else ""
        expected.append(f"| `{o.key}`{aliases} | {o.help} |")
    assert _table_rows(readme, "| arg (aliases) | meaning |") == expected
    ignored_sentence = readme[readme.index("reported as ignored when set"):][:300]
    for o in OPTIONS:
        if o.ignored:
            assert f"`{o.key}`" in ignored_sentence


def test_training_guide_table_uses_schema_keys():
    guide = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    keys = [re.match(r"\| `([a-z_]+)`", row).group(1)
            for row in _table_rows(guide, "| option | what it does | starting point |")]
    assert keys and all(k in OPTION_BY_NAME and not OPTION_BY_NAME[k].ignored for k in keys)
