"""Crash-safe training: the trainer is killed with SIGKILL at random moments (inside a step, inside an
adapter or state save, inside sampling), then continued with ``--resume`` from the newest state folder.

After every kill: every visible ``.safetensors`` in the output folder reads with `read_safetensors`, every
visible state folder has readable counters and weights, no temporary file shows under a real output
name, "keep last N" has not removed the newest complete save, and at most the steps since that save are
lost. The chain ends with an uninterrupted resume that finishes the run.

The default test runs a few trials (about a minute on two cores); ``LYCOFT_SOAK=1`` runs the long soak
(``LYCOFT_SOAK_TRIALS``, default 24) and prints its figures.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from toy_images import make_toy_dataset

from lycoft.io.safe_io import read_safetensors
from lycoft.training.saving import TrainState

ROOT = Path(__file__).resolve().parents[1]
NAME = "run"
SAVE_EVERY = 2
KEEP_STEPS = 4
TOTAL_STEPS = 16

# Runs the real CLI entry point with probes: each step, save and sampling prints a marker on stderr (so
# the test can aim its kill), and saves and sampling are slowed a little so that kills land inside them.
DRIVER = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from lycoft.io import atomic
    from lycoft.training import losses, sampling, saving, loop, step

    def mark(what):
        os.write(2, ("\\n@@" + what + "\\n").encode())

    real_loss, real_render, real_fsync = losses.diffusion_loss, sampling.render, atomic._fsync_file
    real_adapter, real_state = saving.Saver.save_adapter, saving.Saver.save_state
    real_write = saving.TrainState.write

    def diffusion_loss(*a, **k):
        mark("step")
        return real_loss(*a, **k)

    def render(*a, **k):
        mark("sample")
        time.sleep(0.15)
        return real_render(*a, **k)

    def fsync(path):  # between the complete temporary file and its rename
        time.sleep(0.1)
        return real_fsync(path)

    def save_adapter(self, *a, **k):
        mark("save")
        return real_adapter(self, *a, **k)

    def save_state(self, *a, **k):
        mark("save")
        return real_state(self, *a, **k)

    def write(self, folder):  # after accelerate wrote the folder, before it is renamed
        time.sleep(0.1)
        return real_write(self, folder)

    losses.diffusion_loss, sampling.render, atomic._fsync_file = diffusion_loss, render, fsync
    step.render = render  # the loop calls the name it imported
    saving.Saver.save_adapter, saving.Saver.save_state, saving.TrainState.write = save_adapter, save_state, write
    mark("start")
    sys.exit(loop.main(sys.argv[1:]))
""")

VISIBLE = re.compile(rf"^({NAME}-config\.toml|sample|{NAME}(-step\d{{8}})?(\.safetensors|-state))$")


def trainer_args(data: Path, out: Path, prompts: Path, resume: Path | None, total: int) -> list[str]:
    args = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data),
            "--caption_extension", ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0",
            "--seed", "3", "--output_dir", str(out), "--output_name", NAME, "--learning_rate", "1e-3",
            "--max_train_steps", str(total), "--save_every_n_steps", str(SAVE_EVERY), "--save_state",
            "--save_last_n_steps", str(KEEP_STEPS), "--sample_prompts", str(prompts),
            "--sample_every_n_steps", "3", "--network_args", "preset=attn-only"]
    if resume is not None:
        args += ["--resume", str(resume)]
    return args


def start(driver: Path, args: list[str], tmp: Path) -> subprocess.Popen:
    # PYTHONPATH: the checkout under test, whatever `lycoft` the environment's (editable) install points at
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf"),
               PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, str(driver), *args], cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace")


def newest_state(out: Path) -> tuple[int, Path | None]:
    best: tuple[int, Path | None] = (0, None)
    for entry in out.iterdir() if out.is_dir() else []:
        m = re.fullmatch(rf"{NAME}-step(\d{{8}})-state", entry.name)
        if m and int(m.group(1)) > best[0]:
            best = (int(m.group(1)), entry)
    return best


def check_output_dir(out: Path) -> dict[str, int]:
    """Everything visible must be complete; returns counts for the report."""
    counts = {"files": 0, "states": 0, "hidden": 0}
    for entry in sorted(out.iterdir()):
        if entry.name.startswith("."):
            counts["hidden"] += 1
            continue
        assert VISIBLE.match(entry.name), f"unexpected visible output {entry.name}"
        if entry.suffix == ".safetensors":
            tensors, _ = read_safetensors(entry, check_finite=True)
            assert tensors, entry
            counts["files"] += 1
        elif entry.name.endswith("-state"):
            state = TrainState.read(entry)
            m = re.search(r"-step(\d{8})-state$", entry.name)
            if m:
                assert state.global_step == int(m.group(1)), entry
            tensors, _ = read_safetensors(entry / "model.safetensors")
            assert tensors, entry
            torch.load(entry / "optimizer.bin", weights_only=True)
            counts["states"] += 1
    return counts


def run_trial(driver: Path, args: list[str], tmp: Path, rng: random.Random) -> tuple[str, int, bool]:
    """Start the trainer, kill it at a random marker (plus a random delay); return (phase, steps run, killed)."""
    phase = rng.choice(["step", "save", "sample"])
    skip = rng.randrange(0, 4)
    delay = rng.uniform(0.0, 0.25)
    proc = start(driver, args, tmp)
    steps = seen = 0
    killed = False
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("@@step"):
            steps += 1
        if line.startswith("@@" + phase):
            seen += 1
            if seen > skip:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
    proc.stderr.close()
    proc.wait(timeout=120)
    if not killed:
        assert proc.returncode == 0, f"trainer exited with {proc.returncode}"
    return phase, steps, killed


def crash_chain(tmp: Path, trials: int, seed: int, total: int = TOTAL_STEPS) -> dict[str, object]:
    rng = random.Random(seed)
    data = make_toy_dataset(tmp / "data", n=4, size=64)
    prompts = tmp / "prompts.txt"
    prompts.write_text("a photo of sks toy --s 2 --w 32 --h 32\n")
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    out = tmp / "out"
    figures: dict[str, object] = {"trials": 0, "killed": 0, "phases": {}, "lost": [], "max_lost": 0}
    resume: Path | None = None
    reached = 0
    for _ in range(trials):
        before, _ = newest_state(out)
        phase, steps, killed = run_trial(driver, trainer_args(data, out, prompts, resume, total), tmp, rng)
        figures["trials"] += 1
        if not killed:  # the run finished before the chosen marker came
            break
        figures["killed"] += 1
        figures["phases"][phase] = figures["phases"].get(phase, 0) + 1
        figures["hidden_max"] = max(figures.get("hidden_max", 0), check_output_dir(out)["hidden"])
        step, resume = newest_state(out)
        assert step >= before, "keep-last-N or a crash removed the newest complete state"
        # `steps` counts loss computations started; the one in progress had not finished
        reached = before + max(steps - 1, 0)
        lost = max(reached - step, 0)
        figures["lost"].append(lost)
        assert lost <= SAVE_EVERY, f"{lost} steps lost with saves every {SAVE_EVERY} (phase {phase})"
        if step:
            assert (out / f"{NAME}-step{step:08d}.safetensors").is_file(), "newest state has no adapter file"
    # finish the run without a kill
    proc = start(driver, trainer_args(data, out, prompts, resume, total), tmp)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    counts = check_output_dir(out)
    assert counts["hidden"] == 0, "the finishing run did not remove the temporaries of the killed ones"
    assert TrainState.read(out / f"{NAME}-state").global_step == total
    figures["max_lost"] = max(figures["lost"], default=0)
    figures.update(counts)
    return figures


def test_sigkill_at_random_moments_then_resume(tmp_path):
    figures = crash_chain(tmp_path, trials=2, seed=int(os.environ.get("LYCOFT_CRASH_SEED", "1")))
    print("crash figures:", json.dumps(figures))
    assert figures["killed"] >= 1


@pytest.mark.skipif(os.environ.get("LYCOFT_SOAK") != "1", reason="soak: set LYCOFT_SOAK=1")
def test_sigkill_soak(tmp_path):
    trials = int(os.environ.get("LYCOFT_SOAK_TRIALS", "24"))
    figures = crash_chain(tmp_path, trials=trials, seed=int(os.environ.get("LYCOFT_CRASH_SEED", "7")),
                          total=8 * trials)
    print("soak figures:", json.dumps(figures))
    assert figures["killed"] >= min(trials, 20)


def test_remove_stale_deletes_only_this_runs_temporaries(tmp_path):
    from types import SimpleNamespace

    from lycoft.training.saving import Saver

    saver = Saver(SimpleNamespace(is_main_process=True), tmp_path, NAME, metadata=lambda s, e: {})
    stale = [f".{NAME}-step00000004.safetensors.0123456789ab.tmp", f".{NAME}.safetensors.abcdefabcdef.tmp",
             f".{NAME}-step00000006-state.partial", f".{NAME}-state.old", f".{NAME}-000002-state.partial"]
    keep = [f"{NAME}-step00000004.safetensors", f"{NAME}-step00000004-state", f"{NAME}-state", ".other-state.partial",
            f".{NAME}x-state.partial", f"{NAME}.safetensors", ".keep.tmp"]
    for name in stale + keep:
        if name.endswith(("-state", ".partial", ".old")):
            (tmp_path / name).mkdir()
            (tmp_path / name / "optimizer.bin").write_bytes(b"x")
        else:
            (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in saver.remove_stale()) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_subprocesses_run_this_checkout(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", "import lycoft; print(lycoft.__file__)"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=True)
    assert Path(done.stdout.strip()).resolve() == (ROOT / "lycoft" / "__init__.py").resolve()
