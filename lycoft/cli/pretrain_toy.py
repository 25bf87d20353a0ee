"""Train the toy judge and the toy SD1 model (``builtin:toy-sd1``) from scratch, on 2 CPU cores.

python tools/pretrain_toy.py                         (the shipped files: about 25 minutes on one core)
python tools/pretrain_toy.py --steps 5 --images 64 --out /tmp/toy.safetensors --judge lycoft/toy/judge.safetensors
python tools/pretrain_toy.py --v-prediction --judge lycoft/toy/judge.safetensors
                                                     (builtin:toy-sd1-v from builtin:toy-sd1: about 8 minutes)

Writes the checkpoint (SD1 single file, float16), and beside it ``<name>.json`` (recipe, metrics, file
size and hash) and ``<name>.md`` (the same as a report). The run is deterministic: the same command on
the same machine and torch version writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..checkpoints.loading import BUILTIN_FILES
from ..toy import judge as judging
from ..toy import pretrain as recipe_module
from ..toy import scoring


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tools/pretrain_toy.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint to write (default: the shipped builtin:toy-sd1 file, or builtin:toy-sd1-v's "
                             "with --v-prediction)")
    parser.add_argument("--v-prediction", action="store_true",
                        help="fine-tune the shipped builtin:toy-sd1 into a v-prediction model instead of pretraining")
    parser.add_argument("--judge", type=Path, default=None,
                        help="use this judge instead of training one (e.g. lycoft/toy/judge.safetensors)")
    parser.add_argument("--judge-out", type=Path, default=judging.JUDGE_FILE,
                        help="where a newly trained judge is written (default: the shipped judge file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's recipe (default 0)")
    parser.add_argument("--images", type=int, default=None, help="number of training scenes")
    parser.add_argument("--steps", type=int, default=None,
                        help="cut every training phase to this many steps (quick checks); default: the recipe")
    parser.add_argument("--unet-steps", type=int, default=None, help="denoiser steps (default: the recipe)")
    parser.add_argument("--eval-seeds", type=int, default=2,
                        help="seeds per prompt when scoring the model's samples (0: no scoring)")
    return parser


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _samples_table(ev: dict) -> list[str]:
    """The judge's accuracy per guidance on the model's own samples, as markdown table lines."""
    return ["| guidance | shape | colour | size | all three |", "|---|---|---|---|---|"] + [
        f"| {row['guidance']} | {row['shape']:.3f} | {row['colour']:.3f} | {row['size']:.3f} | {row['all']:.3f} |"
        for row in ev["accuracy"]]


def _report(info: dict) -> str:
    m, ev = info["metrics"], info.get("samples", {})
    lines = [
        f"# {info['name']}: the toy SD1 model",
        "",
        "An SD1-architecture model (the builtin tiny shapes: 64x64 images, 8x8 latents) trained from scratch "
        "on procedural scenes: one small or big red, green, blue or yellow circle, square or triangle on the left, "
        "right, top, bottom or in the middle of a grey background, captioned \"a big red circle\" (the place is "
        "not captioned). The cross and magenta are kept back as concepts to teach (the VAE, a general image "
        "codec, learnt them; the UNet and text encoder never saw them).",
        "",
        f"- file: {info['file_bytes'] / 2**20:.2f} MiB, float16, sha256 `{info['sha256']}`",
        f"- made by: `python tools/pretrain_toy.py` in {m['total_seconds'] / 60:.1f} min "
        f"({m['total_cpu_seconds'] / 60:.1f} min of CPU time; {info['threads']} thread, torch {info['torch']}, "
        f"{info['machine']})",
        f"- VAE reconstruction MSE (images in [-1, 1]): {m['vae_reconstruction_mse']}",
        f"- denoiser loss: {m['unet_loss_first_100']} (first 100 steps) -> {m['unet_loss_last_10pct']} "
        "(last 10%)",
    ]
    if "judge_held_out" in info:
        acc = info["judge_held_out"]
        lines.append("- judge on 1000 fresh rendered scenes: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    if ev:
        lines += ["", f"Judge accuracy on the model's own samples ({ev['images']} images: every shape x colour x "
                  f"size prompt at seeds 0..{ev['seeds'] - 1}, {ev['sampler']} {ev['steps']} steps):", "",
                  *_samples_table(ev)]
    lines += ["", "Recipe:", "", "```json", json.dumps(info["recipe"], indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def _report_v(info: dict) -> str:
    m = info["metrics"]
    lines = [
        f"# {info['name']}: the toy SD1 model, v-prediction",
        "",
        "`builtin:toy-sd1` fine-tuned to predict v instead of epsilon (UNet and text encoder; the VAE is the "
        "same), on the same scenes and captions, as SD 2's 768-v model was made from its epsilon base. The "
        "checkpoint says `modelspec.prediction_type: v`, so it loads as a v-prediction model.",
        "",
        f"- file: {info['file_bytes'] / 2**20:.2f} MiB, float16, sha256 `{info['sha256']}`",
        f"- made by: `python tools/pretrain_toy.py --v-prediction` in {m['total_seconds'] / 60:.1f} min "
        f"({info['threads']} thread, torch {info['torch']}, {info['machine']})",
        f"- v loss ({m['v_steps']} steps): {m['v_loss_first_100']} (first 100 steps) -> {m['v_loss_last_10pct']} "
        "(last 10%)",
    ]
    ev = info.get("samples")
    if ev:
        lines += ["", f"Judge accuracy on the model's own samples ({ev['images']} images, {ev['sampler']} "
                  f"{ev['steps']} steps):", "", *_samples_table(ev)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, train (judge, then model), save, score; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.out is None:
        args.out = BUILTIN_FILES["toy-sd1-v" if args.v_prediction else "toy-sd1"]
    if args.out.suffix != ".safetensors":
        print(f"error: --out {args.out} must end in .safetensors", file=sys.stderr)
        return 2
    recipe = replace(recipe_module.Recipe(), seed=args.seed)
    if args.images is not None:
        recipe = replace(recipe, images=args.images)
    if args.steps is not None:
        recipe = recipe.with_steps(args.steps)
    if args.unet_steps is not None:
        recipe = replace(recipe, unet_steps=args.unet_steps)

    def log(message: str) -> None:
        print(message, flush=True)

    info: dict = {"name": args.out.stem, "recipe": asdict(recipe)}
    if args.judge is None:
        t = time.perf_counter()
        with recipe_module.deterministic():
            judge = judging.train_judge(log=log)
        judging.save_judge(judge, args.judge_out)
        judge = judging.load_judge(args.judge_out)  # score with the stored (float16) weights
        info["judge_held_out"] = judging.held_out_accuracy(judge)
        info["judge_seconds"] = round(time.perf_counter() - t, 1)
        log(f"judge written to {args.judge_out}; held-out accuracy {info['judge_held_out']}")
    else:
        judge = judging.load_judge(args.judge)

    if args.v_prediction:
        from ..checkpoints.loading import load_pipeline

        pipe, _, _ = load_pipeline("builtin:toy-sd1")
        steps = args.unet_steps or (args.steps or recipe_module.V_STEPS)
        result = recipe_module.to_v_prediction(pipe, recipe, steps, log=log)
        info["from"] = "builtin:toy-sd1"
    else:
        result = recipe_module.pretrain(recipe, log=log)
    path = recipe_module.save_toy_checkpoint(result.pipe, args.out, recipe)
    info.update(metrics=result.metrics, file_bytes=path.stat().st_size, sha256=_sha256(path),
                torch=torch.__version__, threads=recipe_module.THREADS, machine=platform.machine())
    log(f"checkpoint written to {path} ({path.stat().st_size / 2**20:.2f} MiB)")

    if args.eval_seeds > 0:
        from ..checkpoints.loading import load_pipeline

        pipe, _, _ = load_pipeline(str(path))  # score what was saved (float16 weights), not the live model
        items = scoring.prompted(scoring.prompt_grid(), seeds=range(args.eval_seeds))
        rows = []
        for guidance in (1.0, scoring.GUIDANCE):
            images = scoring.sample(pipe, items, guidance=guidance)
            rows.append({"guidance": guidance, **scoring.judge_accuracy(judge, images, items)})
            log(f"samples at guidance {guidance}: {rows[-1]}")
        info["samples"] = {"images": len(items), "seeds": args.eval_seeds, "sampler": scoring.SAMPLER,
                           "steps": scoring.SAMPLE_STEPS, "accuracy": rows}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    path.with_suffix(".md").write_text(_report_v(info) if args.v_prediction else _report(info))
    return 0
