"""One whole-model training step (UNet + text encoder) with an adapter network injected.

lycoft OFT/BOFT against LyCORIS (diag-oft, boft), PEFT (OFT, BOFT) and PEFT LoRA, all on the SAME set of
layers: the layers that `lycoft.inject(..., preset=...)` adapts are named, and each peer adapts exactly
those modules. One step = text encoder forward, UNet forward on noisy latents, MSE loss, backward, AdamW
on the adapter parameters; base weights frozen. On CPU all methods share one process and are stepped in turn
(`--interleave`); on CUDA each method gets its own spawned process (its own peak memory).

    python bench/train_step.py                 # CPU: mid-size random UNet (64,128,256) at 32x32 latents
    python bench/train_step.py --model sd15    # CUDA: full-size SD1.5 UNet at 512 px (64x64 latents)
    python bench/train_step.py --model sdxl    # CUDA: full-size SDXL UNet at 1024 px (128x128 latents)

The full-size models are built from the diffusers configs bundled in lycoft (random weights: speed does
not depend on them). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from layers import run_forked  # noqa: E402

CONFIGS = ROOT / "lycoft" / "checkpoints" / "configs"
# model -> (bundled diffusers config folder, latent size; None = the config's sample_size). The tiny ones
# run the full-size code path (incl. SDXL's two text encoders and added conditioning) in seconds on CPU.
FOLDERS = {"sd15": ("sd15", 64), "sdxl": ("sdxl-base-1.0", 128), "tiny-sd1": ("tiny-sd1", None),
           "tiny-sdxl": ("tiny-sdxl", None)}

METHODS: dict[str, str] = {
    "frozen": "no adapter (latents require grad, so the backward still runs through every layer)",
    "lora-r8": "PEFT LoRA r=8 alpha=8",
    "peft-oft": "PEFT OFT oft_block_size=32, exact Cayley",
    "peft-boft": "PEFT BOFT block 8, n_butterfly_factor=2 (CPU: PEFT forces 1)",
    "lyco-diag-oft": "LyCORIS diag-oft lora_dim=32, default mode",
    "lyco-diag-oft-bp": "LyCORIS diag-oft lora_dim=32, bypass mode",
    "lyco-boft-bp": "LyCORIS boft, smallest valid lora_dim >= 8 per layer, bypass mode",
    "lycoft-oft": "lycoft OFT block 32 (auto path)",
    "lycoft-boft": "lycoft BOFT block 8, m=2 (auto path)",
}


# ----------------------------------------------------------------------------------------------------
# models


def build_models(model: str, device: torch.device) -> tuple[nn.Module, list[nn.Module]]:
    """Random-weight UNet and text encoder(s), frozen, created on `device` (a full-size UNet is initialised
    by the GPU in a second instead of by the CPU in a minute)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with device:
        if model == "mid":
            unet = UNet2DConditionModel(
                sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256,
                attention_head_dim=8, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            )
            tes = [CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                                num_attention_heads=4, vocab_size=1000,
                                                max_position_embeddings=77))]
        else:
            folder = CONFIGS / FOLDERS[model][0]
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            tes = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
            if (folder / "text_encoder_2").exists():
                tes.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    for m in (unet, *tes):
        m.requires_grad_(False)
        m.to(device)
    return unet, tes


def make_inputs(model: str, unet: nn.Module, tes: list[nn.Module], batch: int, device: torch.device
                ) -> dict[str, Any]:
    """The inputs of one step of `batch` samples (fixed: every step sees the same ones)."""
    latent = 32 if model == "mid" else (FOLDERS[model][1] or unet.config.sample_size)
    vocab = tes[0].config.vocab_size
    g = torch.Generator().manual_seed(1)
    return {
        "latents": torch.randn(batch, 4, latent, latent, generator=g).to(device),
        "ids": torch.randint(0, vocab, (batch, 77), generator=g).to(device),
        "target": torch.randn(batch, 4, latent, latent, generator=g).to(device),
        "t": torch.full((batch,), 500, device=device),
        "sdxl": len(tes) == 2,
    }


def target_names(unet: nn.Module, tes: list[nn.Module], preset: str) -> dict[int, list[str]]:
    """Module paths (per model: 0 = unet, 1.. = text encoders) that lycoft adapts with this preset."""
    import lycoft

    models = [unet, *tes]
    net = lycoft.inject(unet=unet, text_encoders=tes, config=lycoft.AdapterConfig(block_size=32), preset=preset)
    bases = {id(layer.base) for layer in net.adapters.values()}
    net.remove()
    return {i: [n for n, m in model.named_modules() if id(m) in bases] for i, model in enumerate(models)}


PEFT_BOFT_BLOCK = 8


def peft_boft_fits(module: nn.Module) -> bool:
    """Whether PEFT BOFT (block 8, 2 butterfly factors) is given this layer: linear layers whose in features
    split into an even number of blocks of 8. PEFT BOFT keeps a dense fan-in x fan-in permutation per layer
    and builds a dense rotation of that size every step: 11520^2 (0.5 GB) for a 1280-channel 3x3 conv,
    which took the full SD1.5 UNet past 24 GiB of host memory before its first step. Convs are left out."""
    return isinstance(module, nn.Linear) and module.in_features % (2 * PEFT_BOFT_BLOCK) == 0


def inject(method: str, unet: nn.Module, tes: list[nn.Module], names: dict[int, list[str]], preset: str
           ) -> tuple[list[nn.Parameter], str]:
    models = [unet, *tes]
    if method == "frozen":
        return [], "-"
    if method.startswith("lycoft"):
        import lycoft

        cfg = (lycoft.AdapterConfig(block_size=32) if method == "lycoft-oft"
               else lycoft.AdapterConfig(algo="boft", block_size=8, butterfly_factors=2))
        net = lycoft.inject(unet=unet, text_encoders=tes, config=cfg, preset=preset)
        return net.trainable_parameters(), f"{len(net.adapters)} layers ({len(net.skipped)} skipped)"
    params: list[nn.Parameter] = []
    count = 0
    if method.startswith(("lora", "peft")):
        from peft import BOFTConfig, LoraConfig, OFTConfig, inject_adapter_in_model

        left_out = 0
        for i, model in enumerate(models):
            if method == "peft-boft":  # PEFT refuses the whole model when one layer breaks its rule
                kept = [n for n in names[i] if peft_boft_fits(model.get_submodule(n))]
                left_out += len(names[i]) - len(kept)
                names = {**names, i: kept}
            if not names[i]:
                continue
            if method == "lora-r8":
                cfg = LoraConfig(r=8, lora_alpha=8, target_modules=names[i])
            elif method == "peft-oft":
                cfg = OFTConfig(r=0, oft_block_size=32, target_modules=names[i], use_cayley_neumann=False)
            else:
                cfg = BOFTConfig(boft_block_size=PEFT_BOFT_BLOCK, boft_n_butterfly_factor=2, target_modules=names[i])
            inject_adapter_in_model(cfg, model)
            count += len(names[i])
        params = [p for m in models for p in m.parameters() if p.requires_grad]
        return params, f"{count} layers" + (f" ({left_out} left out: convs, see peft_boft_fits)" if left_out else "")
    from layers import lyco_boft_dim
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule

    keep = []
    for i, model in enumerate(models):
        modules = dict(model.named_modules())
        for n in names[i]:
            base = modules[n]
            bypass = method.endswith("-bp")
            if "diag" in method:
                mod = DiagOFTModule(n, base, multiplier=1.0, lora_dim=32, bypass_mode=bypass)
            else:
                mod = ButterflyOFTModule(n, base, multiplier=1.0, lora_dim=lyco_boft_dim(base.weight.shape[0]),
                                         bypass_mode=bypass)
            mod.to(base.weight.device)
            mod.apply_to()
            keep.append(mod)
            params += [p for p in mod.parameters() if p.requires_grad]
    unet._bench_lycoris = nn.ModuleList(keep)  # keep the modules alive with the model
    return params, f"{len(keep)} layers"


def step_fn(unet: nn.Module, tes: list[nn.Module], inputs: dict[str, Any], opt: torch.optim.Optimizer | None,
            amp: torch.dtype | None):
    x = inputs["latents"].clone().requires_grad_(True)
    device = x.device

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if inputs["sdxl"]:
                h1 = tes[0](inputs["ids"], output_hidden_states=True).hidden_states[-2]
                out2 = tes[1](inputs["ids"], output_hidden_states=True)
                ctx = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
                time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device=device).expand(x.shape[0], 6)
                added = {"text_embeds": out2.text_embeds, "time_ids": time_ids}
                pred = unet(x, inputs["t"], ctx, added_cond_kwargs=added).sample
            else:
                ctx = tes[0](inputs["ids"]).last_hidden_state
                pred = unet(x, inputs["t"], ctx).sample
            loss = torch.nn.functional.mse_loss(pred.float(), inputs["target"])
        loss.backward()
        x.grad = None
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _setup(opts: dict[str, Any]) -> None:
    warnings.filterwarnings("ignore")
    if opts["device"] == "cpu":
        torch.set_num_threads(opts["threads"])


def prepare(method: str, opts: dict[str, Any]) -> tuple[Callable[[int], Callable[[], float]], dict[str, Any]]:
    """A fresh model with `method` injected, and its table row. Returns `steps_for(batch)`, which gives the
    timed step (seconds, CUDA-synchronised) on `batch` samples; the model is built once for all batches."""
    device = torch.device(opts["device"])
    unet, tes = build_models(opts["model"], device)
    names = target_names(unet, tes, opts["preset"])
    params, desc = inject(method, unet, tes, names, opts["preset"])
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    amp = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[opts["amp"]]

    def steps_for(batch: int) -> Callable[[], float]:
        step = step_fn(unet, tes, make_inputs(opts["model"], unet, tes, batch, device), opt, amp)

        def timed() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        return timed

    return steps_for, {"method": method, "layers": desc, "params": sum(p.numel() for p in params)}


def _times(times: list[float]) -> dict[str, Any]:
    return {"ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times), "steps": len(times),
            "load": os.getloadavg()[0]}


def measure(method: str, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """One method on one model, every batch size of `opts["batches"]` in turn: a row per batch. On CUDA the
    peak memory is that of the batch's timed steps; a batch that runs out of memory gets an error row."""
    _setup(opts)
    steps_for, base = prepare(method, opts)
    cuda = opts["device"] == "cuda"
    rows = []
    for batch in opts["batches"]:
        row = {**base, "batch": batch}
        try:
            timed = steps_for(batch)
            for _ in range(opts["warmup"]):
                timed()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            row.update(_times([timed() for _ in range(opts["steps"])]))
            if cuda:
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"OutOfMemoryError: {str(e).splitlines()[0]}"
        finally:
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def measure_interleaved(methods: list[str], opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Every method in ONE process, each on its own copy of the model, stepped in turn: step i of every
    method runs within the same few seconds, so a host that slows down for a while slows all of them alike
    (separate processes each meet the host at a different time). No peak memory: the copies share it.
    A row per method and batch size (batches one after the other, each with its own warm-up)."""
    _setup(opts)
    makers: dict[str, Callable[[int], Callable[[], float]]] = {}
    base: dict[str, dict[str, Any]] = {}
    for m in methods:
        try:
            makers[m], base[m] = prepare(m, opts)
        except Exception as e:  # noqa: BLE001  (a method that cannot run is reported, the others go on)
            base[m] = {"method": m, "error": _error(e)}
    rows: list[dict[str, Any]] = []
    for batch in opts["batches"]:
        runs: dict[str, Callable[[], float]] = {}
        out = {m: {**base[m], "batch": batch} for m in methods}
        for m, steps_for in makers.items():
            try:
                timed = steps_for(batch)
                for _ in range(opts["warmup"]):
                    timed()
            except Exception as e:  # noqa: BLE001
                out[m]["error"] = _error(e)
                continue
            runs[m] = timed
        times: dict[str, list[float]] = {m: [] for m in runs}
        for _ in range(opts["steps"]):
            for m, timed in runs.items():
                times[m].append(timed())
        for m in runs:
            out[m].update(_times(times[m]))
        rows += [out[m] for m in methods]
    return rows


def report(model: str, batch: int, opts: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """One table: time, it/s and (CUDA) peak memory of each method, against the frozen model and LoRA r8."""
    ok = {r["method"]: r for r in rows if "ms" in r}
    frozen, lora = ok.get("frozen"), ok.get("lora-r8")
    lines = [f"\n## {model} (batch {batch}, amp {opts['amp']}, median of {opts['steps']} steps)\n"]
    lines.append("| method | layers | trainable params | ms/step | it/s | x frozen | it/s x LoRA | peak GiB | "
                 "peak x LoRA | notes |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['method']} | | | | | | | | | {r['error'].strip().splitlines()[-1][:120]} |")
            continue
        x_frozen = f"{r['ms'] / frozen['ms']:.2f}" if frozen else "-"
        x_lora = f"{lora['ms'] / r['ms']:.2f}" if lora else "-"
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        peak_lora = f"{r['peak_gib'] / lora['peak_gib']:.2f}" if lora and "peak_gib" in r else "-"
        lines.append(f"| {r['method']} | {r['layers']} | {r['params']:,} | {r['ms']:.1f} | {1e3 / r['ms']:.2f} | "
                     f"{x_frozen} | {x_lora} | {peak} | {peak_lora} | load {r['load']:.1f} |")
    oft = ok.get("lycoft-oft")
    if oft and lora:
        goal = f"\n- lycoft OFT: it/s {lora['ms'] / oft['ms']:.2f}x LoRA r8 (goal >= 0.9)"
        if "peak_gib" in oft:
            goal += f", peak memory {oft['peak_gib'] / lora['peak_gib']:.2f}x LoRA r8 (goal <= 1.1)"
        lines.append(goal)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["mid", *FOLDERS], default=None,
                    help="mid (default on CPU), full-size sd15/sdxl (default on CUDA: both), or tiny-sd1/tiny-sdxl "
                    "(the full-size code path on the bundled tiny configs, a smoke test)")
    ap.add_argument("--preset", default="attn-mlp", help="lycoft preset naming the adapted layers (all methods)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default CPU 5, CUDA 10)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp", choices=["no", "bf16", "fp16"], default=None, help="default: no on CPU, bf16 on CUDA")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default: CPU 1, CUDA 1,4)")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="all methods in one process, stepped in turn (default on CPU; on CUDA each method gets its "
                    "own process, so that its peak memory is its own)")
    ap.add_argument("--start", choices=["fork", "spawn"], default=None,
                    help="how worker processes start (default: spawn on CUDA, which a forked process cannot use; fork "
                    "on CPU, which saves the imports)")
    ap.add_argument("--out", default="bench/results/train_step.md")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    interleave = (not cuda) if args.interleave is None else args.interleave
    # The parent asks CUDA for the device name; a process forked after that cannot use CUDA: spawn there.
    start = args.start or ("spawn" if cuda else "fork")
    models = [args.model] if args.model else (["sd15", "sdxl"] if cuda else ["mid"])
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    import diffusers  # noqa: F401  (import before forking: every case starts with it loaded)
    import lycoris  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    lines = ["# Whole-model training step with an adapter network\n"]
    lines.append(f"- generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python bench/train_step.py "
                 f"{' '.join(sys.argv[1:] if argv is None else argv)}`")
    lines.append(f"- {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
                 + (f", {torch.cuda.get_device_name()}" if cuda else f", set_num_threads({args.threads})"))
    lines.append(f"- preset `{args.preset}` picks the layers (lycoft's rule); every peer adapts the same modules")
    lines.append(f"- load average at start {os.getloadavg()[0]:.2f}")
    lines.append("- " + ("all methods in one process, each on its own model copy, stepped in turn (`--interleave`)"
                         if interleave else
                         f"each method in its own process ({start}), all batch sizes of a model in that process"))
    batches = [int(b) for b in (args.batch or ("1,4" if cuda else "1")).split(",") if b]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    report_opts: dict[str, Any] = {}

    def write() -> None:
        """The report as far as it goes, rewritten after every measurement: a run stopped from outside
        (a time limit) still leaves every finished row on disk."""
        body = list(lines)
        for key, rows in results.items():
            model, batch = key.split(" batch ")
            body += report(model, int(batch), report_opts, rows)
        body.append(f"\n- load average at end {os.getloadavg()[0]:.2f}")
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("\n".join(body) + "\n")
        tmp.replace(out)
        tmp_json = out.with_suffix(".json.tmp")
        tmp_json.write_text(json.dumps(results, indent=1))
        tmp_json.replace(out.with_suffix(".json"))

    def add(model: str, got: Any, expected: list[str]) -> None:
        """File the rows a worker returned (or its error, once per expected method and batch)."""
        if isinstance(got, dict):  # the worker died, timed out or raised
            got = [{"method": m, "batch": b, **got} for m in expected for b in batches]
        for r in got:
            results.setdefault(f"{model} batch {r['batch']}", []).append(r)
            status = f"{r['ms']:9.1f} ms" if "ms" in r else r["error"].strip().splitlines()[-1][:100]
            print(f"{model:5s} batch {r['batch']} {r['method']:17s} {status}", flush=True)
        write()

    for model in models:
        opts = {"model": model, "preset": args.preset, "device": device, "threads": args.threads,
                "steps": args.steps or (10 if cuda else 5), "warmup": args.warmup, "batches": batches,
                "amp": args.amp or ("bf16" if cuda else "no")}
        report_opts = opts
        for b in batches:
            results[f"{model} batch {b}"] = []
        if interleave:
            add(model, run_forked(measure_interleaved, (methods, opts), args.timeout * len(methods) * len(batches),
                                  start), methods)
        else:
            for m in methods:
                add(model, run_forked(measure, (m, opts), args.timeout * len(batches), start), [m])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
