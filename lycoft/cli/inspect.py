"""Show what an OFT/BOFT adapter file holds and which programs read it correctly.

lycoft-inspect a.safetensors
lycoft-inspect a.safetensors --base model.safetensors --plot a.png
lycoft-inspect a.safetensors --json > a.json

Prints the format and algorithm, block sizes, per-layer rotation size (||Q||, largest rotation angle) and
orthogonality error, the metadata, the verdict of lycoft, LyCORIS, ComfyUI, reForge, A1111, Forge, Forge Classic,
kohya and PEFT on it
and, with --base, the keys that match no layer of that model and how much each layer's weight changes
(with --energy also its hyperspherical energy: the spread of its neurons, which rotation keeps).
In a lycoft checkout, `python tools/inspect.py` is the same command.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..checkpoints.families import FAMILIES
from ..inspect import inspect_adapter, plot_inspection
from .argtypes import positive_int
from .runner import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter file (LyCORIS, kohya, PEFT, full differences) or PeftModel folder")
    parser.add_argument("--base", help="base model (single file or diffusers folder) to check the keys against")
    parser.add_argument("--plot", metavar="PNG", help="write a per-layer chart")
    parser.add_argument("--energy", action="store_true",
                        help="with --base: each layer's change of hyperspherical energy (the neurons' spread, which "
                             "orthogonal finetuning keeps); seconds on SD1, minutes on SDXL")
    parser.add_argument("--json", action="store_true", help="print everything as JSON instead of text")
    parser.add_argument("--all", action="store_true", help="list every layer, in model order")
    parser.add_argument("--top", type=positive_int, default=20, help="layers listed otherwise (largest rotation first)")
    parser.add_argument("--family", choices=list(FAMILIES), help="model family (default: detected)")
    parser.add_argument("--component", choices=["unet", "te1", "te2"], help="model of bare PEFT keys")
    parser.add_argument("--peft-config", help="adapter_config.json of a PEFT file that does not carry it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, inspect the adapter, print the result; returns the exit status (`lycoft.cli.runner`)."""
    return run_command("lycoft-inspect", lambda: _inspect(build_parser().parse_args(argv)))


def _inspect(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.energy and not args.base:
        raise ValueError("--energy compares the adapted weights with the base's; give the model with --base")
    result = inspect_adapter(args.adapter, base=args.base, family=args.family, component=args.component,
                             peft_config=args.peft_config, energy=args.energy)
    if args.plot:
        plot_inspection(result, args.plot)
    print(result.to_json() if args.json else result.text(top=args.top, show_all=args.all))
    if args.plot and not args.json:
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
