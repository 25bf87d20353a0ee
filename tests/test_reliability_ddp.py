"""A save that fails on one process of a two-process DDP run (`accelerate launch`, CPU, gloo) stops every
process with the `SaveError` message, promptly: none is left waiting in the next collective call for a
rank that has given up. The files written before stay intact.

The faults are real where that is possible: the adapter's path is taken by a folder, which only the main
process (the only writer of adapter files) runs into; root ignores chmod, so no permission trick is used.
A failure after the state folder is written (its counters, then the rename, main process only) is
simulated by the counters' write raising ENOSPC.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import Planted
from toy_images import make_toy_dataset

from lycoft.io.safe_io import read_safetensors
from lycoft.training.saving import TrainState

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120

# The real CLI; with FAIL_STATE_AT set, the main process's write of that step's train_state.json fails
# as on a full disk.
DRIVER = textwrap.dedent("""
    import errno, os, sys
    from lycoft.training import loop, saving

    fail_at = int(os.environ.get("FAIL_STATE_AT", "0"))
    real_write = saving.TrainState.write

    def write(self, folder):
        if self.global_step == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, folder)

    saving.TrainState.write = write
    sys.exit(loop.main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n=4, size=64)


def launch_two(driver: Path, args: list[str], tmp: Path, **env_extra: str) -> tuple[int, str]:
    """`accelerate launch` with two CPU processes (the recipe of test_training_cli.py); on a timeout the
    whole process group is killed and the test fails as a hang."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf"),
               PYTHONWARNINGS="ignore", ACCELERATE_USE_CPU="1", **env_extra,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port),
           str(driver), *args]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the run hung: no exit within {TIMEOUT_S} s after a failed save\n{log[-3000:]}")
    return proc.returncode, log


def flags(data: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data),
            "--caption_extension", ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0",
            "--seed", "2", "--max_train_steps", "4", "--learning_rate", "1e-3", "--network_args",
            "block_size=8", "preset=attn-only", "--output_dir", str(out), "--output_name", "run",
            "--save_every_n_steps", "1", "--save_state"]


def check_step_one_intact(out: Path) -> None:
    read_safetensors(out / "run-step00000001.safetensors", check_finite=True)
    state = out / "run-step00000001-state"
    assert TrainState.read(state).global_step == 1
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= \
        {p.name for p in state.iterdir()}
    assert not (out / "run.safetensors").exists()


@pytest.mark.parametrize("fault", ["adapter path taken by a folder", "state counters hit ENOSPC"])
def test_a_save_failing_on_the_main_process_stops_both_processes(data, tmp_path, fault):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    out.mkdir()
    if fault.startswith("adapter"):
        blocker = out / "run-step00000002.safetensors"
        blocker.mkdir()
        (blocker / "keep.txt").write_text("not ours")
        failed = blocker
        code, log = launch_two(driver, flags(data, out), tmp_path)
        assert (blocker / "keep.txt").read_text() == "not ours"
    else:
        failed = out / "run-step00000002-state"
        code, log = launch_two(driver, flags(data, out), tmp_path, FAIL_STATE_AT="2")
        assert not failed.exists() and not (out / ".run-step00000002-state.partial").exists()
        read_safetensors(out / "run-step00000002.safetensors", check_finite=True)  # written before the state
    assert code != 0, log[-3000:]
    # the main process: the cause, the step and where to resume from ...
    assert re.search(rf"error: cannot write {re.escape(str(failed))} \(.+\) at step 2; training stopped", log), \
        log[-3000:]
    assert f"resume with --resume {out / 'run-step00000001-state'}" in log
    # ... the other one: which process failed on which path
    assert (f"error (process 1): process 0 could not write {failed} at step 2 (that process reports the "
            "cause); training stopped on every process") in log, log[-3000:]
    check_step_one_intact(out)


def test_a_tampered_rng_state_of_one_process_stops_both_with_the_refusal(data, tmp_path):
    """Only process 1 loads `random_states_1.pkl`; process 0 must refuse the folder too, not go on into a
    collective call whose peer has left (on gloo: "Connection closed by peer"; on NCCL: a hang)."""
    import torch

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    one_step = flags(data, out)
    one_step[one_step.index("--max_train_steps") + 1] = "1"  # the final save writes run-state
    code, log = launch_two(driver, one_step, tmp_path)
    assert code == 0, log[-3000:]
    state = out / "run-state"
    marker = tmp_path / "code-ran"
    torch.save({"x": Planted(marker)}, state / "random_states_1.pkl")
    resumed = flags(data, tmp_path / "again") + ["--resume", str(state)]
    code, log = launch_two(driver, resumed, tmp_path)
    assert code != 0
    assert not marker.exists(), "resuming ran code from the state folder"
    assert "refused to load random_states_1.pkl in it" in log, log[-3000:]
    # both stop on the refusal (exit code 2, a configuration error), none on a broken collective
    assert "Connection closed" not in log and "exitcode: 1" not in log, log[-3000:]
    assert "exitcode: 2" in log, log[-3000:]
