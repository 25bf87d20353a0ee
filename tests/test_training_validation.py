"""Validation (kohya's ``validation_split``, ``validation_seed``, ``validate_every_n_steps/epochs``,
``max_validation_steps``): which images are held out, the fixed timesteps, and runs that show the validation
loss logged, shown and written down, leaving training untouched and resuming exactly."""

from __future__ import annotations

import importlib.util
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from toy_images import make_toy_dataset

from lycoft.training import loop
from lycoft.training.config import parse_args
from lycoft.training.dataset import TrainingDataset, build_dataset, split_paths
from lycoft.training.dataset_config import DatasetConfig, SubsetConfig, load_dataset_config
from lycoft.training.errors import ConfigError
from lycoft.training.noise import validation_timesteps


def images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (i, 40, 40)).save(folder / f"img{i:02d}.png")
    return sorted(folder.iterdir())


def names(ds: TrainingDataset | None) -> list[str]:
    return [] if ds is None else sorted(r.path.name for r in ds.records)


# -- the split ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "fraction", "held_out"), [(10, 0.2, 2), (4, 0.25, 1), (3, 0.5, 1), (5, 0.1, 0),
                                                         (7, 0.3, 2)])
def test_split_is_kohyas_shuffle_and_cut(n, fraction, held_out):
    paths = [Path(f"img{i}.png") for i in range(n)]
    train, held = split_paths(paths, fraction, seed=42)
    # kohya: random.seed(seed); random.shuffle(images); the first ceil(n * (1 - split)) train
    order = list(paths)
    random.seed(42)
    random.shuffle(order)
    assert set(train) == set(order[:len(train)]) and len(train) == n - held_out
    assert sorted(train + held) == sorted(paths) and not set(train) & set(held)  # a partition
    assert train == sorted(train) and held == sorted(held)
    assert split_paths(paths, fraction, seed=42) == (train, held)
    assert split_paths(paths, 0.0, seed=42) == (paths, [])


def test_validation_part_per_subset_without_reg_images_or_repeats(tmp_path):
    a, b, reg = images(tmp_path / "a", 8), images(tmp_path / "b", 4), images(tmp_path / "reg", 4)
    subsets = (SubsetConfig(image_dir=tmp_path / "a", num_repeats=3), SubsetConfig(image_dir=tmp_path / "b"),
               SubsetConfig(image_dir=tmp_path / "reg", is_reg=True))
    ds = TrainingDataset([DatasetConfig(subsets=subsets, resolution=(32, 32), validation_split=0.25)], seed=5)
    held = ds.validation
    assert held is not None and held.part == "validation"
    # each training subset loses its own quarter (2 of 8, 1 of 4), chosen by the run's seed
    assert names(held) == sorted(p.name for folder in (a, b) for p in split_paths(folder, 0.25, 5)[1])
    assert len(held.records) == 3 and held.num_train_slots == 3 and held.num_reg_slots == 0  # once each
    train_paths = {r.path for r in ds.records}
    assert not train_paths & {r.path for r in held.records}
    assert set(reg) <= train_paths  # regularization images are never split
    assert ds.num_train_slots == 6 * 3 + 3 and ds.num_reg_slots == 21
    # validation_seed picks the images instead of the run seed
    seeded = TrainingDataset([DatasetConfig(subsets=subsets, resolution=(32, 32), validation_split=0.25,
                                            validation_seed=5)], seed=99)
    assert names(seeded.validation) == names(held)
    assert TrainingDataset([DatasetConfig(subsets=subsets, resolution=(32, 32))]).validation is None


def test_validation_keys_in_a_dataset_toml(tmp_path, caplog):
    images(tmp_path / "a", 4)
    toml = tmp_path / "data.toml"
    toml.write_text(f"[general]\nvalidation_seed = 7\n[[datasets]]\nvalidation_split = 0.5\n"
                    f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\n")
    (ds,) = load_dataset_config(toml)
    assert (ds.validation_split, ds.validation_seed) == (0.5, 7)
    cfg = parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--dataset_config", str(toml),
                      "--resolution", "32", "--seed", "1"])
    assert len(build_dataset(cfg).validation.records) == 2
    # --validation_split is the datasets' default, as kohya's flags are; the TOML's own value wins
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\n")
    assert len(build_dataset(cfg.replace(validation_split=0.25)).validation.records) == 1
    # kohya's places: a dataset key, not a subset key; a fraction below 1
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\nvalidation_split = 0.2\n")
    with pytest.raises(ConfigError, match="validation_split.*move it up to .*datasets"):
        load_dataset_config(toml)
    with pytest.raises(ConfigError, match=r"--validation_split must be in \[0.0, 1.0\), got 1.0"):
        parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(tmp_path),
                    "--validation_split", "1"])
    # validation flags without a split do nothing, and say so
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\n")
    with caplog.at_level(logging.WARNING):
        assert build_dataset(cfg.replace(validate_every_n_steps=5)).validation is None
    assert "--validate_every_n_steps: there are no validation images (set validation_split)" in caplog.text


def test_fixed_timesteps_are_kohyas():
    assert validation_timesteps(0, 1000) == [200, 400, 600, 800]
    for low, high in ((0, 1000), (100, 900), (3, 998), (500, 501)):
        assert validation_timesteps(low, high) == list(np.linspace(low, high, 6, dtype=int)[1:-1])


# -- runs --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n=4, size=64)


def run(toy: Path, out: Path, **extra) -> loop.TrainResult:
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(toy), "--caption_extension",
            ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0", "--seed", "3", "--output_dir", str(out),
            "--learning_rate", "1e-2", "--validation_split", "0.5", "--network_args", "preset=attn-only",
            "module_dropout=0.1"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return loop.train(parse_args(argv))


def test_validation_is_logged_and_leaves_training_untouched(toy, tmp_path, caplog, capsys):
    """2 of 4 toy images held out, 2 steps per epoch, 3 steps: validation every 2 steps and at each epoch's
    end (the last, partial epoch too); the adapter is bit-identical to a run that never validates. A
    schedule-free optimizer (validated at its evaluation point, then put back) shows a restore that is not exact."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    optimizer = "AdamWScheduleFree" if importlib.util.find_spec("schedulefree") else "AdamW"
    with caplog.at_level(logging.INFO, logger="lycoft.train"):
        validated = run(toy, tmp_path / "v", max_train_steps=3, validate_every_n_steps=2, logging_dir=tmp_path / "logs",
                        optimizer_type=optimizer)
    assert [(step, kind) for step, kind, _ in validated.validation_losses] == [(2, "step"), (2, "epoch"), (3, "epoch")]
    values = [v for _, _, v in validated.validation_losses]
    assert values[0] == values[1] != values[2]  # one computation serves both at a step; the adapter learned since
    plain = run(toy, tmp_path / "p", max_train_steps=3, validate_every_n_epochs=100, optimizer_type=optimizer)
    assert plain.validation_losses == [] and plain.losses == validated.losses
    a, b = load_file(validated.adapter), load_file(plain.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(validated.adapter), "pt") as f:
        md = f.metadata()
    assert [md[f"ss_{k}"] for k in ("num_validation_images", "validation_split", "validate_every_n_steps")] == [
        "2", "0.5", "2"]
    # written to the log, shown in the progress line, and in TensorBoard under kohya's names
    assert f"validation loss at step 3 (epoch 2): {values[2]:.4f}" in caplog.text
    assert f"val_loss={values[2]:.4f}" in capsys.readouterr().err
    acc = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    logged = {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
              for tag in acc.Tags()["scalars"]}
    assert logged["loss/validation/step_average"] == ([2], pytest.approx([values[0]]))
    assert logged["loss/validation/epoch_average"] == ([2, 3], pytest.approx([values[1], values[2]]))
    # the validation loss minus the epoch's mean training loss (the last epoch has one step)
    divergence = [values[1] - sum(validated.losses[:2]) / 2, values[2] - validated.losses[2]]
    assert logged["loss/validation/epoch_divergence"] == ([2, 3], pytest.approx(divergence))


def test_validation_resumes_exactly_and_max_validation_steps_limits_it(toy, tmp_path):
    common = dict(max_train_steps=2, validate_every_n_steps=1, validate_every_n_epochs=5, train_batch_size=1)
    full = run(toy, tmp_path / "full", save_every_n_steps=1, save_state="true", **common)
    resumed = run(toy, tmp_path / "resumed", resume=tmp_path / "full" / "last-step00000001-state", **common)
    # the same noise at the same timesteps: an equal adapter gives an equal validation loss, bit for bit
    assert resumed.validation_losses == full.validation_losses[1:]
    a, b = load_file(full.adapter), load_file(resumed.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one held-out batch of the two (batch size 1) is another mean
    one = run(toy, tmp_path / "one", max_train_steps=1, validate_every_n_steps=1, validate_every_n_epochs=5,
              max_validation_steps=1)
    assert one.validation_losses[0][2] != full.validation_losses[0][2]
