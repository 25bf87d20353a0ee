"""The embedded demo: train an OFT adapter on the builtin tiny SD1 model, offline, in about a minute.

    python -m lycoft.demo --out demo_out        (what `make demo` runs)

It generates a small subject dataset (a yellow toy on varied backgrounds, `training.toy_data`), trains
with the same code as ``accelerate launch train_network.py`` (the settings are those of
``configs/tiny-demo.toml``), then writes sample images of the base and the adapted model side by side
and, through `lycoft.merge`, a checkpoint with the adapter baked in. The tiny model is random, so its
images are abstract; what the demo shows is the workflow and the loss going down.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

# The tiny demo model: same settings as configs/tiny-demo.toml (kept in step by a test).
DEMO_SETTINGS: dict[str, Any] = {
    "pretrained_model_name_or_path": "builtin:tiny-sd1",
    "resolution": 64,
    "caption_extension": ".txt",
    "train_batch_size": 4,
    "max_train_steps": 120,
    "learning_rate": 1e-2,
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 10,
    "network_args": ["algo=oft", "block_size=8", "preset=full", "exclude=conv_out$"],
    "max_data_loader_n_workers": 0,
    "seed": 0,
    "output_name": "demo-oft",
}
PROMPTS = ["a photo of sks toy", "a photo of sks toy on a red background", "a photo of a cat"]


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def run(out: str | Path, steps: int | None = None) -> dict[str, Path]:
    """Generate data, train, sample, merge; returns the files written (name -> path)."""
    import os

    import torch

    from lycoft.training.config import config_from_dict
    from lycoft.training.loop import train
    from lycoft.training.sampling import SamplePrompt, image_grid, render
    from lycoft.training.toy_data import make_toy_dataset

    if "OMP_NUM_THREADS" not in os.environ:
        # The tiny model's tensors are too small to gain from intra-op threads, and on shared cores
        # those threads spin against each other: one thread is several times faster here.
        torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = make_toy_dataset(out / "data", n=8, size=64, token="sks toy")
    settings = dict(DEMO_SETTINGS, train_data_dir=str(data), output_dir=str(out))
    if steps is not None:
        settings["max_train_steps"] = steps
    result = train(config_from_dict(settings, where="the demo settings"))
    files: dict[str, Path] = {"adapter": result.adapter, "config": out / f"{settings['output_name']}-config.toml"}
    n = max(1, len(result.losses) // 10)
    print(f"loss: {_mean(result.losses[:n]):.4f} over the first {n} steps -> {_mean(result.losses[-n:]):.4f} "
          f"over the last {n} ({len(result.losses)} steps)")

    prompts = [SamplePrompt(p, width=64, height=64, seed=i, steps=12, index=i) for i, p in enumerate(PROMPTS)]
    pipe, network, family = result.models.pipe, result.network, result.models.family
    base_file = _save_base(pipe, family, out)  # before the in-memory merge below changes the weights
    network.eval()
    with torch.no_grad():
        network.set_multiplier(0.0)
        base = render(pipe, prompts, sampler="euler_a")
        # Baked into the weights, the adapter costs nothing per denoising step (same images as applied).
        network.merge(1.0)
        adapted = render(pipe, prompts, sampler="euler_a")
    samples = out / "samples.png"
    image_grid([base, adapted]).save(samples)
    files["samples (top: base model, bottom: with the adapter)"] = samples
    files.update(_merge(base_file, result.adapter, out))
    files["training data"] = data
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return files


def _save_base(pipe: Any, family: str, out: Path) -> Path:
    from lycoft.checkpoints.loading import save_single_file

    return save_single_file(pipe, out / "tiny-sd1-base.safetensors", family)


def _merge(base: Path, adapter: Path, out: Path) -> dict[str, Path]:
    """Bake the adapter into the single-file base model on disk, when `lycoft.merge` is there."""
    files = {"base checkpoint (single file)": base}
    try:
        from lycoft.merge import merge_adapters
    except ImportError:
        print("merged checkpoint: skipped (lycoft.merge is not available in this version)")
        return files
    merged = out / "tiny-sd1-demo-oft-merged.safetensors"
    report = merge_adapters(base, [str(adapter)], merged, force=True, verify=8)
    worst = max((err for _, err, _ in report.verified), default=0.0)
    print(f"merged checkpoint: {report.patched_tensors} weights rotated; {len(report.verified)} checked against "
          f"the adapter applied on the fly (worst relative error {worst:.1e})")
    files["merged checkpoint"] = merged
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lycoft.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default: {DEMO_SETTINGS['max_train_steps']})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("transformers", "diffusers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    files = run(args.out, args.steps)
    print("\nfiles written:")
    width = max(len(k) for k in files)
    for name, path in files.items():
        print(f"  {name.ljust(width)}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
