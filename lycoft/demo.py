"""The embedded demo: teach the pretrained toy model something it never saw, with OFT, offline, on a CPU.

    python -m lycoft.demo --out demo_out        (what `make demo` runs)

``builtin:toy-sd1`` draws small and big red, green, blue and yellow circles, squares and triangles.
The demo writes 8 pictures of a new colour (magenta; ``--concept shape``: a new shape, a cross) named
by a new word ("a big sks circle") and 16 pictures of the old shapes for prior preservation, trains an
OFT adapter on them with the same code as ``accelerate launch train_network.py`` (the settings are those
of ``configs/tiny-demo.toml``), then
samples the base and the adapted model at fixed seeds and lets the toy judge score them: how often the
"sks" prompts show the concept (what was learnt), and how far the old prompts' images moved (what was
forgotten). ``samples.png`` shows the same; a checkpoint with the adapter baked in is written through
`lycoft.merge`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

# The demo's training settings: same as configs/tiny-demo.toml (kept in step by a test).
DEMO_SETTINGS: dict[str, Any] = {
    "pretrained_model_name_or_path": "builtin:toy-sd1",
    "resolution": 64,
    "caption_extension": ".txt",
    "train_batch_size": 4,
    "max_train_steps": 120,
    "learning_rate": 1e-4,
    "prior_loss_weight": 1.0,
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 10,
    "network_args": ["algo=oft", "block_size=8", "preset=full", "exclude=conv_out$"],
    "max_data_loader_n_workers": 0,
    "seed": 0,
    "output_name": "demo-oft",
}
CONCEPT = "colour"  # what the demo teaches by default: "colour" (magenta) or "shape" (a cross)
SHEET_SEEDS = (0, 1, 2, 3)
SHEET_OLD = ("a big red circle", "a small blue square")  # at seeds 0 and 1


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def run(out: str | Path, steps: int | None = None, concept_name: str = CONCEPT) -> dict[str, Path]:
    """Generate data, train, sample, score, merge; returns the files written (name -> path)."""
    import os

    import torch

    from lycoft.toy.concept import CONCEPTS, compare, demo_data, old_prompts
    from lycoft.toy.judge import load_judge
    from lycoft.toy.scoring import prompted, sample
    from lycoft.training.config import config_from_dict
    from lycoft.training.loop import train
    from lycoft.training.sampling import image_grid

    if "OMP_NUM_THREADS" not in os.environ:
        # The toy model's tensors are too small to gain from intra-op threads, and on shared cores
        # those threads spin against each other: one thread is several times faster here.
        torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    taught = CONCEPTS[concept_name]
    data, prior = demo_data(out / "data", concept_name)
    settings = dict(DEMO_SETTINGS, train_data_dir=str(data), reg_data_dir=str(prior), output_dir=str(out))
    if steps is not None:
        settings["max_train_steps"] = steps
    result = train(config_from_dict(settings, where="the demo settings"))
    files: dict[str, Path] = {"adapter": result.adapter, "config": out / f"{settings['output_name']}-config.toml"}
    n = max(1, len(result.losses) // 10)
    print(f"loss: {_mean(result.losses[:n]):.4f} over the first {n} steps -> {_mean(result.losses[-n:]):.4f} "
          f"over the last {n} ({len(result.losses)} steps)")

    concept, old = taught.prompts(), old_prompts(seeds=(0, 1))
    sheet = prompted([concept[1].scene], SHEET_SEEDS, **{f"{taught.attribute}_word": taught.word})
    sheet += [it for it in old if it.prompt in SHEET_OLD]
    pipe, network = result.models.pipe, result.network
    network.eval()
    with torch.no_grad():
        scores = compare(pipe, network, load_judge(), concept, old)
        rows = []
        for multiplier in (0.0, 1.0):
            network.set_multiplier(multiplier)
            rows.append(sample(pipe, sheet))
    grid = image_grid(rows)
    samples = out / "samples.png"
    grid.resize((grid.width * 3, grid.height * 3), resample=0).save(samples)
    files[f'samples (top: base, bottom: adapted; "{sheet[0].prompt}" at seeds 0-3, then '
          + " and ".join(f'"{p}"' for p in SHEET_OLD) + " at seeds 0 and 1)"] = samples
    before, after = scores.concept["base"], scores.concept["adapted"]
    others = [k for k in ("shape", "colour", "size") if k != taught.attribute]
    print(f'"{taught.word}" prompts ({len(concept)} images, e.g. "{concept[1].prompt}"): the judge sees '
          f"{taught.value} in {before[taught.attribute]:.0%} of the base model's samples -> "
          f"{after[taught.attribute]:.0%} with the adapter ("
          + ", ".join(f"{k} right {before[k]:.0%} -> {after[k]:.0%}" for k in others) + ")")
    kept_before, kept_after = scores.retention["base"], scores.retention["adapted"]
    print(f"old prompts ({len(old)} images of circles, squares, triangles): shape, colour and size right in "
          f"{kept_before['all']:.0%} -> {kept_after['all']:.0%}; drift from the base model's images: "
          f"{scores.drift['pixel_rms']:.3f} rms pixels (0-1 scale), {scores.drift['features']:.3f} in the "
          "judge's features")
    files.update(_merge(result.adapter, out))
    files["training data"] = data
    files["prior-preservation pictures"] = prior
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return files


def _merge(adapter: Path, out: Path) -> dict[str, Path]:
    """Bake the adapter into the toy model's single-file checkpoint on disk, when `lycoft.merge` is there."""
    from lycoft.checkpoints.loading import BUILTIN_FILES

    try:
        from lycoft.merge import merge_adapters
    except ImportError:
        print("merged checkpoint: skipped (lycoft.merge is not available in this version)")
        return {}
    merged = out / "toy-sd1-demo-oft-merged.safetensors"
    report = merge_adapters(BUILTIN_FILES["toy-sd1"], [str(adapter)], merged, force=True, verify=8)
    worst = max((err for _, err, _ in report.verified), default=0.0)
    print(f"merged checkpoint: {report.patched_tensors} weights rotated; {len(report.verified)} checked against "
          f"the adapter applied on the fly (worst relative error {worst:.1e})")
    return {"merged checkpoint (the adapter baked into builtin:toy-sd1)": merged}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lycoft.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default: {DEMO_SETTINGS['max_train_steps']})")
    parser.add_argument("--concept", choices=("colour", "shape"), default=CONCEPT,
                        help=f'what "sks" means: a new colour (magenta) or a new shape (a cross); default {CONCEPT}')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("transformers", "diffusers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    files = run(args.out, args.steps, args.concept)
    print("\nfiles written:")
    width = max(len(k) for k in files)
    for name, path in files.items():
        print(f"  {name.ljust(width)}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
