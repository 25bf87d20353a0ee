"""Numerical faults reached through real mechanisms, not a patched loss: a learning rate so high that the
rotations blow up, and a latent cache file on disk whose latents are all NaN. Either stops training with a
message naming the step and the state saved before it (finite), or, with ``--skip_nonfinite``, skips the
steps and counts them."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from toy_images import make_toy_dataset

from lycoft.io.safe_io import read_safetensors
from lycoft.training import loop
from lycoft.training.config import parse_args
from lycoft.training.saving import TrainState


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data),
            "--caption_extension", ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0",
            "--seed", "3", "--output_dir", str(out), "--output_name", "run", "--max_train_steps", "6",
            "--network_args", "preset=attn-only", *extra]


def stopped_at(err: str, out: Path) -> int:
    """The step the error names; checks the state saved before it is there, finite, and at that step."""
    m = re.search(r"at step (\d+) \(epoch \d+\); training stopped\. The state before this step is in (\S+) ", err)
    assert m, err
    step, where = int(m.group(1)), Path(m.group(2))
    assert where == out / f"run-step{step - 1:08d}-state" and where.is_dir()
    assert TrainState.read(where).global_step == step - 1
    read_safetensors(where / "model.safetensors", check_finite=True)
    read_safetensors(out / f"run-step{step - 1:08d}.safetensors", check_finite=True)
    assert not (out / "run.safetensors").exists()
    return step


def state_tensors_finite(folder: Path) -> None:
    """Every tensor of a state folder is finite: the adapter's parameters and the optimizer's state."""
    read_safetensors(folder / "model.safetensors", check_finite=True)
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)
    tensors = [t for per_param in optimizer["state"].values() for t in per_param.values() if torch.is_tensor(t)]
    assert all(bool(torch.isfinite(t).all()) for t in tensors)


def resumes_at_a_sane_rate(data: Path, out: Path, err: str, *extra: str) -> None:
    """The state the message offers is finite, and resuming from it with a sane learning rate finishes."""
    step = stopped_at(err, out)
    where = out / f"run-step{step - 1:08d}-state"
    state_tensors_finite(where)
    resumed = loop.train(parse_args(flags(data, out, "--learning_rate", "1e-4", "--resume", str(where),
                                          "--max_train_steps", str(step + 1), *extra)))
    assert resumed.state.global_step == step + 1 and all(math.isfinite(x) for x in resumed.losses)
    read_safetensors(resumed.adapter, check_finite=True)


def test_diverging_learning_rate_stops_with_the_finite_state_before(tmp_path, capsys):
    """SGD at 1e37: the update leaves finite parameters whose next forward pass is NaN, so the state after it
    is useless too; the one offered is from before that update."""
    data = make_toy_dataset(tmp_path / "data", n=4, size=64)
    out = tmp_path / "out"
    args = ("--optimizer_type", "torch.optim.SGD", "--network_args", "preset=attn-only", "rescale=true")
    code = loop.main(flags(data, out, "--learning_rate", "1e37", *args))
    assert code == 3
    err = capsys.readouterr().err
    assert "the adapter diverged: the loss is nan at step 2, after the update at step 1 (epoch 1)" in err
    resumes_at_a_sane_rate(data, out, err, *args)


def test_an_update_that_overflows_the_adapter_offers_the_state_before_it(tmp_path, capsys):
    """AdamW at 1e30 without warmup: the second update overflows the parameters to inf. The state offered
    is the one before that update (finite, parameters and optimizer state), and resuming from it with a sane
    learning rate finishes; with --skip_nonfinite the update is undone and training goes on."""
    data = make_toy_dataset(tmp_path / "data", n=4, size=64)
    out = tmp_path / "out"
    diverging = ("--learning_rate", "1e30", "--lr_warmup_steps", "0", "--save_state", "--max_train_steps", "3")
    assert loop.main(flags(data, out, *diverging)) == 3
    err = capsys.readouterr().err
    assert "became NaN or inf in the update at step 2 (epoch 1); training stopped" in err, err
    resumes_at_a_sane_rate(data, out, err, "--lr_warmup_steps", "0")

    skipped = loop.train(parse_args(flags(data, tmp_path / "skip", *diverging, "--skip_nonfinite")))
    assert skipped.state.global_step == 3 and skipped.state.nonfinite_skipped >= 1
    read_safetensors(skipped.adapter, check_finite=True)


def test_nan_latent_cache_file_stops_or_is_skipped_and_counted(tmp_path, capsys):
    data = make_toy_dataset(tmp_path / "data", n=4, size=64)
    cache = ["--cache_latents", "--cache_latents_to_disk", "--learning_rate", "1e-3"]
    assert loop.main(flags(data, tmp_path / "warm", *cache, "--max_train_steps", "1")) == 0
    files = sorted(data.rglob("*.lycoft.npz"))
    assert len(files) == 4
    with np.load(files[1], allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    for k in arrays:
        if k.startswith("latents"):
            arrays[k] = np.full_like(arrays[k], np.nan)
    with open(files[1], "wb") as fh:  # same fingerprint: the cache trusts the file
        np.savez(fh, **arrays)

    out = tmp_path / "out"
    assert loop.main(flags(data, out, *cache)) == 3
    step = stopped_at(capsys.readouterr().err, out)
    assert 1 <= step <= 4

    result = loop.train(parse_args(flags(data, tmp_path / "skip", *cache, "--skip_nonfinite")))
    # 6 steps over 4 images: the NaN image comes once or twice
    assert result.state.global_step == 6 and result.state.nonfinite_skipped in (1, 2)
    assert len(result.losses) == 6 - result.state.nonfinite_skipped
    assert all(math.isfinite(x) for x in result.losses)
    read_safetensors(result.adapter, check_finite=True)


def test_nonfinite_gradient_with_a_finite_loss_stops_or_is_skipped(tmp_path, capsys, monkeypatch):
    """A finite loss whose gradient is NaN (a hook poisons one adapter's gradient at the third backward):
    without the gradient check the optimizer would write NaN into the parameters silently."""
    real = loop.build_network
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 3 else grad

    def build_network(cfg, models):
        network = real(cfg, models)
        next(p for p in network.parameters() if p.requires_grad).register_hook(poison)
        return network

    monkeypatch.setattr(loop, "build_network", build_network)
    data = make_toy_dataset(tmp_path / "data", n=4, size=64)
    out = tmp_path / "out"
    assert loop.main(flags(data, out, "--learning_rate", "1e-3")) == 3
    err = capsys.readouterr().err
    assert "the gradient is NaN or inf" in err
    assert stopped_at(err, out) == 3

    calls["n"] = 0
    result = loop.train(parse_args(flags(data, tmp_path / "skip", "--learning_rate", "1e-3", "--skip_nonfinite")))
    assert result.state.global_step == 6 and result.state.nonfinite_skipped == 1
    assert len(result.losses) == 5
    read_safetensors(result.adapter, check_finite=True)
