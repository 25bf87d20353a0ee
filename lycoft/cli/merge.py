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
    parser.add_argument("--verify", nargs="?", const=8, default=0, type=int, metavar="N",
                        help="before moving the output into place, check N merged layers (default 8) against the "
                             "adapters applied on the fly")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, merge; returns the exit status (2: an error, printed as one line)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        report = merge_adapters(args.base, [AdapterArg.parse(a) for a in args.adapter], args.out, dtype=args.dtype,
                                force=args.force, allow_partial=args.allow_partial, verify=args.verify)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
