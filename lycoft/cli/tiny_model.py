"""Write a builtin tiny model (random weights) as a single-file checkpoint or a diffusers folder.

lycoft-tiny-model --family sd1 --format single-file --out tiny-sd1.safetensors
lycoft-tiny-model --family sdxl --format diffusers --out tiny-sdxl/ --seed 3

In a lycoft checkout, `python tools/tiny_model.py` is the same command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoints import build_tiny_pipeline, save_diffusers, save_single_file
from ..checkpoints.families import FAMILIES
from .argtypes import seed
from .runner import EXIT_USER_ERROR, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family", required=True, choices=list(FAMILIES), help="model family to imitate"
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=["single-file", "diffusers"],
        help="single-file: one LDM .safetensors (as A1111/ComfyUI load); diffusers: a save_pretrained folder",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file or folder")
    parser.add_argument(
        "--seed", type=seed, default=0, help="weights are a deterministic function of the seed"
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, build the tiny pipeline, save it; returns the exit status (`lycoft.cli.runner`)."""
    return run_command("lycoft-tiny-model", lambda: _tiny_model(build_parser().parse_args(argv)))


def _tiny_model(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.format == "single-file" and args.out.suffix.lower() != ".safetensors":
        print(f"error: single-file output {args.out} must end in .safetensors", file=sys.stderr)
        return EXIT_USER_ERROR

    pipe = build_tiny_pipeline(args.family, seed=args.seed)
    if args.format == "single-file":
        save_single_file(pipe, args.out, args.family)
    else:
        save_diffusers(pipe, args.out)
    print(f"wrote tiny {args.family} ({args.format}, seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
