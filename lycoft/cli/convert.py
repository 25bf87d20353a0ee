"""Convert OFT/BOFT adapters between formats.

lycoft-convert --in kohya_oft.safetensors --out a.safetensors --to lycoris
lycoft-convert --in a.safetensors --out a_ldm.safetensors --to lycoris --keys ldm
lycoft-convert --in pytorch_lora_weights.safetensors --out a.safetensors --to lycoris
lycoft-convert --in a_input_side.safetensors --out peft/ --to peft --peft-layout peftmodel
lycoft-convert --in a.safetensors --out a-ui.safetensors --to lycoris --ui-safe
lycoft-convert --in a.safetensors --out a.diff.safetensors --to diff --base model.safetensors

Reads: LyCORIS oft/boft (any version: kohya oft_unet_, LyCORIS 2.0 oft_diag, files without alpha), lycoft
input-side files, PEFT OFT/BOFT (diffusers save_lora_adapter files, PeftModel folders). Writes:
  lycoris  lycoft's layout: LyCORIS oft_blocks for output-side adapters (ComfyUI, A1111, LyCORIS read
           them), lycoft's input-side layout for PEFT-style ones; keys normalised (text_model_ form for text
           encoders, --keys for the UNet). --ui-safe writes rescaled oft layers as one-stage butterflies
           (same weights), whose rescale stock ComfyUI and reForge apply; the LyCORIS loader refuses them.
  peft     input-side oft as a PEFT OFT adapter (exact Cayley) for one model (--component).
  diff     full weight differences <key>.diff = W' - W against --base, for programs that cannot read OFT
           correctly (ComfyUI with rescale, old A1111 with BOFT, stable-diffusion.cpp); use them at strength 1.

In a lycoft checkout, `python tools/convert.py` is the same command.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..checkpoints.families import FAMILIES
from ..convert import convert_adapter
from .argtypes import finite_float
from .runner import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="src", required=True, help="adapter file (or PeftModel folder)")
    parser.add_argument("--out", required=True, help="output file (a folder for --peft-layout peftmodel)")
    parser.add_argument("--to", required=True, choices=["lycoris", "peft", "diff"], help="output format")
    parser.add_argument("--base", help="base model (single file or diffusers folder): needed by --to diff; "
                        "otherwise gives the exact UNet layout")
    parser.add_argument("--keys", choices=["ldm", "diffusers"],
                        help="UNet key names of --to lycoris (default: LDM for SDXL, diffusers for SD1/SD2)")
    parser.add_argument("--family", choices=list(FAMILIES),
                        help="model family (default: from --base, the file's metadata or its key names)")
    parser.add_argument("--multiplier", type=finite_float, default=1.0,
                        help="strength baked into --to diff (default 1)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                        help="dtype of the written tensors (diff default: the base weights' dtype)")
    parser.add_argument("--component", choices=["unet", "te1", "te2"],
                        help="model of bare PEFT keys; for --to peft, which model to export")
    parser.add_argument("--peft-config", help="adapter_config.json of a PEFT file that does not carry it")
    parser.add_argument("--peft-layout", choices=["diffusers", "peftmodel"], default="diffusers",
                        help="--to peft: one file with the config in its metadata (diffusers, default) or a "
                             "PeftModel folder")
    parser.add_argument("--ui-safe", action="store_true",
                        help="--to lycoris: rescaled oft layers as one-stage butterflies (same weights), which stock "
                             "ComfyUI and reForge read right; the LyCORIS loader refuses them")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--allow-partial", action="store_true", help="leave out keys that match no layer")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, convert; returns the exit status (`lycoft.cli.runner`: 2 for an error printed as one line)."""
    return run_command("lycoft-convert", lambda: _convert(build_parser().parse_args(argv)))


def _convert(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    report = convert_adapter(args.src, args.out, args.to, base=args.base, keys=args.keys, family=args.family,
                             multiplier=args.multiplier, dtype=args.dtype, force=args.force,
                             allow_partial=args.allow_partial, component=args.component,
                             peft_config=args.peft_config, peft_layout=args.peft_layout, ui_safe=args.ui_safe)
    print(report.summary())


if __name__ == "__main__":
    sys.exit(main())
