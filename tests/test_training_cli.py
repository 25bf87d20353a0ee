"""The real command lines: `accelerate launch train_network.py` with one process and with two-process
DDP on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from toy_images import make_toy_dataset

ROOT = Path(__file__).resolve().parents[1]


def launch(args: list[str], tmp_path: Path, *, processes: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    if processes == 1:
        cmd += ["--num_processes", "1", "--cpu"]
    else:  # `--cpu` with several processes silently runs one; this is the CPU DDP recipe
        env["ACCELERATE_USE_CPU"] = "1"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(port)]
    cmd += [str(ROOT / "train_network.py"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_accelerate_launch_single_process_with_a_config_file(tmp_path):
    data = make_toy_dataset(tmp_path / "data", n=2, size=64)
    config = tmp_path / "train.toml"
    config.write_text(f"""
[model]
pretrained_model_name_or_path = "builtin:tiny-sd2"
[data]
train_data_dir = "{data}"
resolution = 64
max_data_loader_n_workers = 0
[captions]
caption_extension = ".txt"
[caching]
cache_latents = true
[training]
max_train_steps = 3
seed = 1
[network]
network_args = ["algo=boft", "block_size=8", "butterfly_factors=2", "preset=attn-only"]
[saving]
output_dir = "out"
output_name = "cli"
save_state = true
""")
    proc = launch(["--config", str(config), "--learning_rate", "5e-4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    with safe_open(str(out / "cli.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "sd_v2_v" and md["ss_learning_rate"] == "0.0005"
    assert json.loads(md["ss_network_args"])["butterfly_factors"] == "2"
    assert json.loads((out / "cli-state" / "train_state.json").read_text())["global_step"] == 3
    assert "resolved lycoft training config" in (out / "cli-config.toml").read_text()


def test_two_process_ddp_on_cpu_keeps_ranks_identical_and_writes_once(tmp_path):
    data = make_toy_dataset(tmp_path / "data", n=4, size=64)
    proc = launch(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data),
                   "--caption_extension", ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0",
                   "--seed", "2", "--max_train_steps", "3", "--learning_rate", "1e-3",
                   "--network_args", "block_size=8", "preset=attn-only", "--output_dir", "out",
                   "--save_every_n_steps", "2", "--save_state"], tmp_path, processes=2)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "2 process(es)" in log
    # every rank's adapter gathered and compared with the main process's at the end
    assert "adapter parameters on all 2 processes: max difference 0" in log
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["last-step00000002.safetensors", "last.safetensors"]
    assert not list(out.glob(".*"))  # no temporary files left behind
    state = out / "last-step00000002-state"
    assert {"random_states_0.pkl", "random_states_1.pkl", "train_state.json"} <= {p.name for p in state.iterdir()}
    assert json.loads((state / "train_state.json").read_text())["num_processes"] == 2
