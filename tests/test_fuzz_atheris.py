"""Coverage-guided fuzzing of the file readers (`fuzz_readers.py`, atheris) for a bounded number of runs: every
mutated safetensors header, adapter file and ``.ckpt`` checkpoint is read or refused with `AdapterFileError`.
Skipped where atheris is not installed (the ``dev`` extra installs it where wheels exist: Linux x86_64, macOS arm64).
libFuzzer ends its process when done, so the fuzzer runs in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_files import BOFT_RESCALE, OFT, write_adapter

pytest.importorskip("atheris")

HERE = Path(__file__).resolve().parent
RUNS = int(os.environ.get("LYCOFT_FUZZ_RUNS", "10000"))


class Unsafe:
    def __reduce__(self):
        return (print, ("never printed",))


def seed_corpus(folder: Path, scratch: Path) -> None:
    """Valid inputs for each reader (selector byte + file), so mutations start from deep inside the formats."""
    folder.mkdir()
    seeds = {}
    for name, cfg in (("oft", OFT), ("boft", BOFT_RESCALE)):
        # a few modules of a real adapter file: small inputs keep the fuzzer fast
        full = write_adapter("sd1", cfg, scratch / f"{name}-full.safetensors")
        with safe_open(str(full), "pt") as f:
            modules = sorted({k.split(".")[0] for k in f.keys()})[:3]
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.split(".")[0] in modules}
            metadata = f.metadata()
        save_file(tensors, scratch / f"{name}.safetensors", metadata)
        adapter = (scratch / f"{name}.safetensors").read_bytes()
        seeds[f"header-{name}"] = b"\0" + adapter
        seeds[f"adapter-{name}"] = b"\1" + adapter
    checkpoints = {"plain": {"state_dict": {"model.w": torch.ones(2, 3), "step": 3}},
                   "unsafe": {"state_dict": {"model.w": torch.zeros(1)}, "hook": Unsafe()}}
    for name, obj in checkpoints.items():
        torch.save(obj, scratch / f"{name}.ckpt")
        seeds[f"ckpt-{name}"] = b"\2" + (scratch / f"{name}.ckpt").read_bytes()
    for name, content in seeds.items():
        (folder / name).write_bytes(content)


def test_fuzzed_readers_only_refuse_with_adapter_file_error(tmp_path):
    corpus = tmp_path / "corpus"
    seed_corpus(corpus, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(HERE / "fuzz_readers.py"), str(corpus), f"-runs={RUNS}", "-seed=1",
           "-max_total_time=20", "-max_len=65536", "-timeout=10", "-rss_limit_mb=3072", f"-artifact_prefix={tmp_path}/"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, errors="replace", timeout=120)
    log = done.stdout + done.stderr
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert done.returncode == 0 and not crashes, f"{crashes}\n{log[-4000:]}"
    assert "Done" in log, log[-2000:]
    print(log.strip().splitlines()[-1])
