"""kohya's saving, starting-step, logging and start-file flags, each shown by what it does: state pruning apart
from the adapters, saves spread over the run, a final state, a step count that starts later (with or without
the data of the skipped steps), the command line written as a config, tracker folders, names and settings, the
console log, data loader workers kept or restarted, adapters merged into the base model and a network built as
a file describes it."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import randomise_network
from safetensors.torch import load_file, save_file
from toy_images import make_toy_dataset

import lycoft
from lycoft.formats.lycoris import read_adapter
from lycoft.merge import apply_spec
from lycoft.training import loop, tracking
from lycoft.training.config import parse_args
from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig
from lycoft.training.saving import Saver
from lycoft.training.start_weights import merge_base_weights
from lycoft.training.step import data_loader


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n=4, size=64)


def flags(toy: Path, out: Path, **extra) -> list[str]:
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(toy), "--caption_extension",
            ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0", "--seed", "3", "--output_dir", str(out),
            "--learning_rate", "1e-3", "--max_train_steps", "2", "--network_args", "preset=attn-only"]
    for key, value in extra.items():
        argv.append(f"--{key}")
        argv += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return argv


def run(toy: Path, out: Path, **extra) -> loop.TrainResult:
    return loop.train(parse_args(flags(toy, out, **extra)))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("last"))


# -- saving ---------------------------------------------------------------------------------------------------
def test_states_are_pruned_apart_from_adapters_and_epoch_saves_count_saves(tmp_path):
    saver = Saver(SimpleNamespace(is_main_process=True), tmp_path, "x", metadata=lambda s, e: {},
                  keep_last_steps=20, keep_last_steps_state=10, keep_last_epochs=2, keep_last_epochs_state=1)
    for step in (10, 20, 30, 40):
        (tmp_path / f"x-step{step:08d}.safetensors").touch()
        (tmp_path / f"x-step{step:08d}-state").mkdir()
    for epoch in (2, 4, 6):  # saved every 2 epochs
        (tmp_path / f"x-{epoch:06d}.safetensors").touch()
        (tmp_path / f"x-{epoch:06d}-state").mkdir()
    saver.prune_steps(40)
    saver.prune_epochs(6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x-000004.safetensors", "x-000006-state", "x-000006.safetensors",  # the last 2 saves, the last state
        "x-step00000020.safetensors", "x-step00000030-state", "x-step00000030.safetensors",
        "x-step00000040-state", "x-step00000040.safetensors"]


def test_save_ratio_spreads_epoch_saves_and_start_step_counts_epochs():
    assert TrainConfig(save_n_epoch_ratio=3, save_every_n_epochs=5).epoch_save_interval(10) == 3  # floor(10 / 3)
    assert TrainConfig(save_n_epoch_ratio=20).epoch_save_interval(10) == 1
    assert TrainConfig(save_every_n_epochs=5).epoch_save_interval(10) == 5
    assert TrainConfig(initial_epoch=3).start_step(4) == 8
    assert TrainConfig(initial_epoch=3, initial_step=5).start_step(4) == 5
    assert TrainConfig().start_step(4) is None


def test_epoch_ratio_and_state_pruning_in_a_run(toy, tmp_path):
    # one step of all 4 images per epoch; 6 epochs with about 3 saves -> every 2 epochs (the 6th is the final one)
    out = tmp_path / "out"
    run(toy, out, train_batch_size=4, max_train_epochs=6, save_n_epoch_ratio=3, save_state="true",
        save_last_n_epochs=2, save_last_n_epochs_state=1)
    # both epoch adapters kept, only the newest epoch state
    assert names(out) == ["last-000002.safetensors", "last-000004-state", "last-000004.safetensors", "last-config.toml",
                          "last-state", "last.safetensors"]


# -- the starting step ----------------------------------------------------------------------------------------
def test_initial_step_counts_on_skips_data_on_request_and_yields_to_resume(toy, tmp_path, caplog):
    # 2 steps per epoch, 4 steps; LR warm-up + cosine so that the schedule's position shows
    common = dict(train_batch_size=2, max_train_steps=4, lr_scheduler="cosine", lr_warmup_steps=2)
    full = run(toy, tmp_path / "full", save_every_n_steps=1, save_state="true", save_last_n_steps_state=1, **common)
    # every adapter kept, states only from 1 step back (apart from the final one)
    assert names(tmp_path / "full") == ["last-config.toml", "last-state", "last-step00000001.safetensors",
                                        "last-step00000002-state", "last-step00000002.safetensors",
                                        "last-step00000003-state", "last-step00000003.safetensors", "last.safetensors"]
    start = dict(network_weights=tmp_path / "full" / "last-step00000003.safetensors", initial_step=3, **common)
    skip = run(toy, tmp_path / "skip", skip_until_initial_step="true", save_state_on_train_end="true", **start)
    # the count, the LR schedule and (with the skip) the data continue where step 3 was: from the step-3 adapter,
    # the loss of step 4 is the uninterrupted run's
    assert len(skip.losses) == 1 and skip.learning_rates == full.learning_rates[3:]
    assert skip.losses[0] == pytest.approx(full.losses[3], rel=1e-6)
    assert (skip.state.global_step, skip.state.epoch, skip.state.step_in_epoch) == (4, 2, 0)
    # a state at the end although --save_state is off, and none before
    assert names(tmp_path / "skip") == ["last-config.toml", "last-state", "last.safetensors"]
    assert json.loads((tmp_path / "skip" / "last-state" / "train_state.json").read_text())["global_step"] == 4
    # without the skip, the epoch's data starts from its first batch: another loss, the epoch not yet done
    noskip = run(toy, tmp_path / "noskip", **start)
    assert noskip.losses[0] != pytest.approx(skip.losses[0], rel=1e-4)
    assert (noskip.state.global_step, noskip.state.epoch, noskip.state.step_in_epoch) == (4, 1, 1)
    # --resume keeps its own count: --initial_step is ignored, with a warning
    with caplog.at_level(logging.WARNING):
        resumed = run(toy, tmp_path / "resumed", resume=tmp_path / "skip" / "last-state", initial_step=1,
                      **{**common, "max_train_steps": 5})
    assert resumed.state.global_step == 5 and len(resumed.losses) == 1
    assert "--initial_step/--initial_epoch ignored" in caplog.text


def test_initial_step_must_leave_steps_to_train(toy, tmp_path):
    with pytest.raises(ConfigError, match="--initial_step 2 leaves nothing to train"):
        parse_args(flags(toy, tmp_path, initial_step=2))


# -- the command line as a config file ------------------------------------------------------------------------
def test_output_config_writes_the_command_line_and_never_overwrites(toy, tmp_path):
    target = tmp_path / "made"
    argv = flags(toy, tmp_path / "out", learning_rate=2e-4, max_data_loader_n_workers=8)  # 8 is the default
    with pytest.raises(SystemExit) as done:
        parse_args([*argv, "--output_config", "--config_file", str(target)])
    assert done.value.code == 0
    written = target.with_suffix(".toml")  # kohya adds the extension
    text = written.read_text()
    assert "learning_rate = 0.0002" in text and "max_data_loader_n_workers" not in text
    assert "output_config =" not in text
    # the file trains as the command line would
    assert parse_args(["--config", str(written)]).replace(config=None) == parse_args(argv)
    with pytest.raises(ConfigError, match="already exists and is not overwritten"):
        parse_args([*argv, "--output_config", "--config_file", str(written)])
    with pytest.raises(ConfigError, match="add --config my.toml"):
        parse_args([*argv, "--output_config"])
    (tmp_path / "in.toml").write_text("output_config = true\n")
    with pytest.raises(ConfigError, match="works on the command line only"):
        parse_args([*argv, "--config", str(tmp_path / "in.toml")])


# -- trackers and the console log -----------------------------------------------------------------------------
class _Trackers:
    def init_trackers(self, project, config=None, init_kwargs=None):
        self.project, self.config, self.init_kwargs = project, config, init_kwargs


def test_tracker_name_kwargs_and_settings(tmp_path):
    kwargs = tmp_path / "trackers.toml"
    kwargs.write_text('[wandb]\nentity = "me"\n[tensorboard]\nflush_secs = 30\n')
    acc = _Trackers()
    tracking.init_trackers(acc, TrainConfig(output_name="dog"))
    assert (acc.project, acc.config, acc.init_kwargs) == ("dog", None, {})  # settings only with --log_config
    cfg = TrainConfig(log_tracker_name="proj", wandb_run_name="run-1", log_tracker_config=str(kwargs), log_config=True,
                      pretrained_model_name_or_path="/home/me/model.safetensors", train_data_dir="/home/me/data")
    tracking.init_trackers(acc, cfg)
    assert acc.project == "proj"
    assert acc.init_kwargs == {"wandb": {"entity": "me", "name": "run-1"}, "tensorboard": {"flush_secs": 30}}
    assert acc.config["learning_rate"] == cfg.learning_rate and acc.config["log_config"] is True
    assert not any("/home/me" in str(v) for v in acc.config.values())  # no paths
    kwargs.write_text('entity = "me"\n')
    with pytest.raises(ConfigError, match="must be inside a table named after its tracker"):
        parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", str(tmp_path), "--logging_dir", "l",
                    "--log_tracker_config", str(kwargs)])


@pytest.fixture
def root_logging():
    """The root logger as it was: `_setup_logging` replaces its handlers the way the command line does."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


def test_log_folder_prefix_settings_and_console_log_file(toy, tmp_path, root_logging):
    trackers = tmp_path / "trackers.toml"
    trackers.write_text('[tensorboard]\nfilename_suffix = ".lycoft"\n')
    log = tmp_path / "train.log"
    assert loop.main(flags(toy, tmp_path / "out", max_train_steps=1, logging_dir=tmp_path / "logs", log_prefix="dog-",
                           log_tracker_name="proj", log_tracker_config=trackers, log_config="true",
                           console_log_file=log, console_log_level="INFO", console_log_simple="true")) == 0
    run_dir, = (tmp_path / "logs").iterdir()
    assert re.fullmatch(r"dog-\d{14}", run_dir.name)  # kohya's per-run folder
    assert list((run_dir / "proj").glob("events.out.tfevents.*.lycoft"))  # the tracker's keyword argument
    hparams = next((run_dir / "proj").rglob("hparams.yml")).read_text()
    assert "learning_rate" in hparams and str(toy) not in hparams
    lines = log.read_text().splitlines()
    assert any(line.startswith("done: 1 step(s)") for line in lines)  # message only, in the file
    loop._setup_logging(True, TrainConfig(console_log_level="WARNING", console_log_file=str(log)))
    logging.getLogger("lycoft.train").info("not shown")
    logging.getLogger("lycoft.train").warning("shown")
    text = log.read_text()  # overwritten, with the default line format
    assert "not shown" not in text and re.search(r"\d\d:\d\d:\d\d WARNING lycoft.train: shown", text)


# -- data loader workers ----------------------------------------------------------------------------------------
class _Pids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return os.getpid()


@pytest.mark.parametrize("persistent", [True, False])
def test_data_loader_workers_live_across_epochs_unless_told(persistent):
    loader = data_loader(TrainConfig(max_data_loader_n_workers=1, persistent_data_loader_workers=persistent), _Pids(),
                         [[0], [1]])
    epochs = [{int(pid) for batch in loader for pid in batch} for _ in range(2)]
    assert (epochs[0] == epochs[1]) is persistent and os.getpid() not in epochs[0]


# -- adapter files to start from --------------------------------------------------------------------------------
def test_base_weights_merge_and_dim_from_weights_builds_the_files_network(toy, tmp_path, tiny_pipes, caplog):
    pipe = tiny_pipes("sd1")
    base_file, start_file = tmp_path / "base.safetensors", tmp_path / "start.safetensors"
    net = lycoft.inject(unet=pipe.unet, text_encoders=[pipe.text_encoder], preset="attn-only",
                        config=lycoft.AdapterConfig(block_size=8))
    randomise_network(net, std=0.05, seed=1).save(str(base_file))
    net.remove()
    net = lycoft.inject(unet=pipe.unet, preset="attn-only",
                        config=lycoft.AdapterConfig(algo="boft", block_size=4, butterfly_factors=2))
    randomise_network(net, std=0.02, seed=2).save(str(start_file))
    with caplog.at_level(logging.WARNING):
        result = run(toy, tmp_path / "out", base_weights=[base_file], base_weights_multiplier=0.5,
                     network_weights=start_file, dim_from_weights="true", network_dim=16, learning_rate=1e-12,
                     max_train_steps=1)
    assert re.search(r"network_args .*block_size not used", caplog.text)
    # the network is the file's (its layers, boft 4x4 blocks in 2 stages), started from its values
    layouts = {(layer.layout.algo, layer.layout.block_size, layer.layout.stages) for _, layer in result.network.items()}
    assert layouts == {("boft", 4, 2)} and set(result.network.adapters) == set(read_adapter(str(start_file))[0])
    start, trained = load_file(str(start_file)), load_file(str(result.adapter))
    assert all(torch.allclose(start[k], trained[k], atol=1e-6) for k in start if k.endswith(".oft_blocks"))
    # the base file is merged into the frozen weights at strength 0.5
    specs, _ = read_adapter(str(base_file))
    fresh = tiny_pipes("sd1")
    for key, spec in list(specs.items())[:3]:
        layer = next(m for k, m in _layers(fresh) if k == key)
        merged = dict(_layers(result.models.pipe))[key]
        assert torch.allclose(merged.weight, apply_spec(layer.weight, spec, 0.5), atol=1e-6)
        assert not torch.allclose(merged.weight, layer.weight, atol=1e-4)


def _layers(pipe):
    index = lycoft.network.candidate_index(pipe.unet, [pipe.text_encoder], "sd1")
    return [(key, module) for key, (_, _, module) in index.items()]


def test_base_weights_refuse_other_adapter_kinds(tmp_path, tiny_pipes):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 1), "lora_unet_x.lora_down.weight": torch.zeros(1, 4)},
              str(lora))
    pipe = tiny_pipes("sd1")
    models = SimpleNamespace(unet=pipe.unet, text_encoders=[pipe.text_encoder], family="sd1")
    with pytest.raises(ConfigError, match=r"--base_weights .*lora.safetensors.*a LoRA/LoHa/LoKr file, not OFT"):
        merge_base_weights(TrainConfig(base_weights=[str(lora)]), models)
