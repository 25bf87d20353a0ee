"""Bake OFT/BOFT adapters into a Stable Diffusion checkpoint (SD1.x, SD2.x, SDXL), tensor by tensor.

lycoft-merge --base model.safetensors --adapter a.safetensors --out merged.safetensors
lycoft-merge --base sdxl-folder/ --adapter a.safetensors:0.8 --adapter b.safetensors --out merged/

The base is a single-file checkpoint (.safetensors, or .ckpt read without running code from it) or a
diffusers folder; the output has the same form. Adapters are applied in the order given, each with its
multiplier (":<m>", default 1). The output is written beside its final path and renamed into place when
complete; the base is only read. In a lycoft checkout, `python tools/merge.py` is the same command.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..merge import AdapterArg, merge_adapters
from .argtypes import non_negative_int
from .runner import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="single-file checkpoint or diffusers folder")
    parser.add_argument("--adapter", action="append", required=True, metavar="FILE[:M]",
                        help="adapter file, optionally with a multiplier (a.safetensors:0.7); repeat for several, "
                             "applied in order")
    parser.add_argument("--out", required=True,
                        help="output .safetensors (single-file base) or folder (diffusers base)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="cast every floating tensor of the output "
                        "(default: keep the base's dtypes)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--allow-partial", action="store_true",
                        help="merge even if some adapter keys match no layer of the base (they are listed)")
    parser.add_argument("--verify", nargs="?", const=8, default=0, type=non_negative_int, metavar="N",
                        help="before moving the output into place, check N merged layers (default 8) against the "
                             "adapters applied on the fly")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, merge; returns the exit status (`lycoft.cli.runner`: 2 for an error printed as one line)."""
    return run_command("lycoft-merge", lambda: _merge(build_parser().parse_args(argv)))


def _merge(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    adapters = [AdapterArg.parse(a) for a in args.adapter]
    report = merge_adapters(args.base, adapters, args.out, dtype=args.dtype, force=args.force,
                            allow_partial=args.allow_partial, verify=args.verify)
    print(report.summary())


if __name__ == "__main__":
    sys.exit(main())
