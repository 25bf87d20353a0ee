"""Learn vs forget: teach a model a new concept with each adapter method, then measure what it learnt and
what it forgot. Same data, seeds, step budget and training loop for every method.

    python bench/quality.py --quick                      # < 3 min on 2 cores: every method, one setting
    python bench/quality.py --out bench/results/quality.md   # 4 learning rates x 2 step counts per method

By default the model is ``builtin:toy-sd1`` and the concept a colour it never saw (magenta, called
"sks", 8 pictures; ``--concept shape``: a cross), scored by the toy judge (`lycoft.toy`). With
``--model`` (any checkpoint lycoft loads), ``--data`` (a DreamBooth folder with .txt captions),
``--concept-prompts`` / ``--old-prompts`` (one prompt per line) and ``--clip`` (a local CLIP model
folder) the same measures run on a real model, on a GPU.

Measured per method, learning rate and step count (the adapters go on the UNet's attention and
feed-forward layers, ``preset=attn-mlp``):
- concept: toy: fraction of the concept prompts' samples in which the judge sees it; CLIP: mean
  image-text cosine similarity of those samples to their prompts.
- retention: toy: fraction of the old prompts' samples that still show the prompted shape, colour and
  size; CLIP: their mean similarity to their prompts.
- drift: distance of the old prompts' fixed-seed samples from the base model's: RMS pixel difference
  (0-1 scale) and distance of the scorer's image features (relative to their norm).
- energy: change of the hyperspherical energy (sum over neuron pairs of 1 / distance, neurons as unit
  vectors) of the adapted layers' weights, of their rows (each output unit's input weights: what a
  rotation on the input side keeps) and of their columns (what a rotation on the output side keeps).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lycoft  # noqa: E402
from lycoft.checkpoints.loading import load_pipeline  # noqa: E402
from lycoft.ops.energy import hyperspherical_energy  # noqa: E402
from lycoft.toy import concept as toy_concept  # noqa: E402
from lycoft.toy.data import Scene, parse_caption, to_tensor  # noqa: E402
from lycoft.toy.judge import image_features, load_judge, read_images  # noqa: E402
from lycoft.toy.scoring import Prompted, sample  # noqa: E402
from lycoft.training.sampling import default_conditioner  # noqa: E402

BLOCK = 8  # rotation block (OFT), rank (LoRA): the toy model's layers are 32 and 64 wide
METHODS: dict[str, str] = {
    "lycoft-oft": f"lycoft OFT, output side (as ComfyUI/A1111 load it), block {BLOCK}",
    "lycoft-oft-input": f"lycoft OFT, input side (the OFT paper's and PEFT's form), block {BLOCK}",
    "lycoft-boft": "lycoft BOFT, block 4, 2 butterfly factors",
    "lycoft-coft": f"lycoft OFT, output side, block {BLOCK}, constraint 1e-2 (COFT)",
    "lora-r8": "PEFT LoRA, rank 8, alpha 8",
    "lyco-diag-oft": f"LyCORIS diag-oft, lora_dim {BLOCK} (block size)",
    "peft-oft": f"PEFT OFT, block {BLOCK}, exact Cayley",
}
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
STEPS = (50, 100)
QUICK = {"learning_rates": (1e-3,), "steps": (100,)}
BATCH = 4


# --------------------------------------------------------------------------------------------- scorers


class ToyScorer:
    """The toy judge: concept = the judge reads the concept (the new colour or shape); retention = shape,
    colour and size right."""

    def __init__(self, concept: toy_concept.Concept) -> None:
        self.judge = load_judge()
        self.taught = concept

    def concept(self, images: Sequence[Any], items: Sequence[Prompted]) -> float:
        seen = read_images(self.judge, images)
        return sum(s[self.taught.attribute] == self.taught.value for s in seen) / len(images)

    def retention(self, images: Sequence[Any], items: Sequence[Prompted]) -> float:
        scenes = [it.scene if isinstance(it.scene, Scene) else parse_caption(it.prompt) for it in items]
        unread = [it.prompt for it, scene in zip(items, scenes) if scene is None]
        if unread:
            raise SystemExit(f"error: the toy judge cannot score the prompt {unread[0]!r}; write old prompts as "
                             "\"a big red circle\" (size, colour, shape), or score with --clip")
        seen = read_images(self.judge, images)
        return sum(all(s[k] == getattr(scene, k) for k in ("shape", "colour", "size"))
                   for s, scene in zip(seen, scenes)) / len(images)

    def features(self, images: Sequence[Any]) -> torch.Tensor:
        return image_features(self.judge, images)


def _projected(output: Any) -> torch.Tensor:
    """CLIP's projected embedding: transformers 4 returns the tensor, transformers 5 an output object that
    holds it as `pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """A local CLIP model: concept and retention = mean image-text cosine similarity to the prompts."""

    def __init__(self, path: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.name = f"CLIP {path}"
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def features(self, images: Sequence[Any]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        return _projected(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def _similarity(self, images: Sequence[Any], items: Sequence[Prompted]) -> float:
        text = self.processor(text=[it.prompt for it in items], return_tensors="pt", padding=True)
        t = F.normalize(_projected(self.model.get_text_features(**text)), dim=-1)
        i = F.normalize(self.features(images), dim=-1)
        return float((t * i).sum(-1).mean())

    concept = retention = _similarity


# ---------------------------------------------------------------------------------------------- methods


def adapted_modules(unet: nn.Module, preset: str) -> list[str]:
    """Module paths of the UNet that lycoft adapts with `preset` (every method adapts exactly these)."""
    net = lycoft.inject(unet=unet, config=lycoft.AdapterConfig(block_size=BLOCK), preset=preset)
    bases = {id(layer.base) for layer in net.adapters.values()}
    net.remove()
    return [n for n, m in unet.named_modules() if id(m) in bases]


@dataclass
class Adapted:
    """A method attached to a UNet: its trainable parameters and a switch between base and adapted."""

    params: list[nn.Parameter]
    set_enabled: Callable[[bool], None]
    optimizer: torch.optim.Optimizer | None = None


def attach(method: str, unet: nn.Module, names: list[str], preset: str) -> Adapted:
    """Attach `method` to the `names` modules of `unet` (a private copy: it is not restored)."""
    if method.startswith("lycoft"):
        cfg = {"lycoft-oft": lycoft.AdapterConfig(block_size=BLOCK),
               "lycoft-oft-input": lycoft.AdapterConfig(block_size=BLOCK, side="input"),
               "lycoft-boft": lycoft.AdapterConfig(algo="boft", block_size=4, butterfly_factors=2),
               "lycoft-coft": lycoft.AdapterConfig(block_size=BLOCK, constraint=1e-2)}[method]
        net = lycoft.inject(unet=unet, config=cfg, preset=preset)
        return Adapted(net.trainable_parameters(), lambda on: net.set_multiplier(1.0 if on else 0.0))
    if method in ("lora-r8", "peft-oft"):
        from peft import LoraConfig, OFTConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        cfg = (LoraConfig(r=BLOCK, lora_alpha=BLOCK, target_modules=names) if method == "lora-r8"
               else OFTConfig(r=0, oft_block_size=BLOCK, target_modules=names, use_cayley_neumann=False))
        inject_adapter_in_model(cfg, unet)
        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]

        def enable(on: bool) -> None:
            for layer in layers:
                layer.enable_adapters(on)

        return Adapted([p for p in unet.parameters() if p.requires_grad], enable)
    if method == "lyco-diag-oft":
        from lycoris.modules.diag_oft import DiagOFTModule

        modules = dict(unet.named_modules())
        keep = []
        for n in names:
            mod = DiagOFTModule(n.replace(".", "_"), modules[n], multiplier=1.0, lora_dim=BLOCK)
            mod.apply_to()
            keep.append(mod)
        unet._bench_lycoris = nn.ModuleList(keep)  # keep the modules alive with the model

        def enable(on: bool) -> None:
            for mod in keep:
                mod.multiplier = 1.0 if on else 0.0

        return Adapted([p for m in keep for p in m.parameters() if p.requires_grad], enable)
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------- measures


@torch.no_grad()
def effective_weight(module: nn.Module) -> torch.Tensor:
    """``(out, in)`` weight of a Linear or 1x1 Conv2d as it acts now (adapter included), probed with the
    identity: whatever an adapter does, a linear layer's response to unit inputs is its matrix."""
    base = getattr(module, "base_layer", module)
    n_in = base.in_features if isinstance(base, nn.Linear) else base.in_channels
    eye = torch.eye(n_in)
    x = eye if isinstance(base, nn.Linear) else eye[:, :, None, None]
    y = module(x) - module(torch.zeros_like(x[:1]))
    return y.reshape(n_in, -1).T


def energies(unet: nn.Module, names: list[str]) -> tuple[float, float]:
    """(row energy, column energy) summed over the adapted layers."""
    modules = dict(unet.named_modules())
    rows = cols = 0.0
    for n in names:
        w = effective_weight(modules[n])
        rows += hyperspherical_energy(w)
        cols += hyperspherical_energy(w, columns=True)
    return rows, cols


@dataclass
class Task:
    """What is taught and how it is judged."""

    latents: torch.Tensor  # (N, 4, h, w), scaled
    hidden: torch.Tensor  # (N, 77, D) text states of the captions
    concept: list[Prompted]
    old: list[Prompted]
    size: int


def prepare_task(pipe: Any, data: Path, concept: list[Prompted], old: list[Prompted], size: int) -> Task:
    """Encode the training images (VAE posterior mean) and captions once."""
    images = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not images:
        raise SystemExit(f"error: no images in {data}; give a folder of pictures with .txt captions")
    from PIL import Image

    pixels = to_tensor([Image.open(p) for p in images], size)
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        hidden = default_conditioner(pipe).encode(captions).hidden
    return Task(latents, hidden, concept, old, size)


def train(unet: nn.Module, adapted: Adapted, task: Task, noise_scheduler: Any, lr: float, steps: int,
          g: torch.Generator, start: int = 0) -> None:
    """Epsilon-prediction steps ``start..steps-1`` on the task (AdamW, 10 warm-up steps, then constant)."""
    if adapted.optimizer is None:
        adapted.optimizer = torch.optim.AdamW(adapted.params, lr=lr, weight_decay=0.0)
    opt = adapted.optimizer
    unet.train()
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        idx = torch.randint(0, len(task.latents), (BATCH,), generator=g)
        z = task.latents[idx]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH,), generator=g)
        pred = unet(noise_scheduler.add_noise(z, noise, t), t, task.hidden[idx]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    unet.eval()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from diffusers import DDPMScheduler

    torch.set_num_threads(args.threads)
    pipe, family, _ = load_pipeline(args.model)
    if family != "sd1":
        raise SystemExit(f"error: {args.model} is {family}; this benchmark runs SD1 models")
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    taught = toy_concept.CONCEPTS[args.concept]
    scorer = ClipScorer(args.clip) if args.clip else ToyScorer(taught)
    with tempfile.TemporaryDirectory(prefix="lycoft-quality-") as tmp:
        if args.data:
            data = Path(args.data)
            concept = [Prompted(_Text(p), s) for p in _lines(args.concept_prompts) for s in args.seeds]
            old = [Prompted(_Text(p), s) for p in _lines(args.old_prompts) for s in args.seeds]
        else:
            data = taught.data(Path(tmp) / "data")
            concept, old = taught.prompts(args.seeds), toy_concept.old_prompts(args.seeds[:1])
        task = prepare_task(pipe, data, concept, old, args.size)
    sampling = {"steps": args.sample_steps, "size": args.size}
    base_unet = pipe.unet
    names = adapted_modules(base_unet, args.preset)
    base_old = sample(pipe, old, **sampling)
    base_concept = sample(pipe, concept, **sampling)
    base_energy = energies(base_unet, names)
    base_features = scorer.features(base_old)
    rows = [{"method": "base", "lr": 0.0, "steps": 0, "params": 0,
             "concept": scorer.concept(base_concept, concept), "retention": scorer.retention(base_old, old),
             "drift_pixels": 0.0, "drift_features": 0.0, "energy_rows": 0.0, "energy_cols": 0.0, "seconds": 0.0}]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for method in args.methods:
        for lr in args.learning_rates:
            t0 = time.perf_counter()
            unet = copy.deepcopy(base_unet)
            adapted = attach(method, unet, names, args.preset)
            pipe.unet = unet
            g = torch.Generator().manual_seed(args.seed)
            done = 0
            for steps in args.steps:
                train(unet, adapted, task, noise_scheduler, lr, steps, g, start=done)
                done = steps
                with torch.no_grad():
                    old_images = sample(pipe, old, **sampling)
                    concept_images = sample(pipe, concept, **sampling)
                    energy = energies(unet, names)
                a, b = to_tensor(base_old, args.size), to_tensor(old_images, args.size)
                feats = scorer.features(old_images)
                row = {
                    "method": method, "lr": lr, "steps": steps, "params": sum(p.numel() for p in adapted.params),
                    "concept": scorer.concept(concept_images, concept),
                    "retention": scorer.retention(old_images, old),
                    "drift_pixels": float(((a - b) / 2).pow(2).mean(dim=(1, 2, 3)).sqrt().mean()),
                    "drift_features": float((feats - base_features).norm(dim=1).mean()
                                            / base_features.norm(dim=1).mean()),
                    "energy_rows": energy[0] / base_energy[0] - 1, "energy_cols": energy[1] / base_energy[1] - 1,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                rows.append(row)
                print(f"{method:17s} lr {lr:g} steps {steps}: concept {row['concept']:.3f} retention "
                      f"{row['retention']:.3f} drift {row['drift_pixels']:.4f}/{row['drift_features']:.4f} "
                      f"energy {row['energy_rows']:+.2e}/{row['energy_cols']:+.2e} ({row['seconds']:.0f} s)",
                      flush=True)
    pipe.unet = base_unet
    return rows


def _lines(path: str | None) -> list[str]:
    if not path:
        raise SystemExit("error: with --data, give --concept-prompts and --old-prompts (one prompt per line)")
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class _Text:
    """A prompt of a real model's run, where `Prompted` expects a toy scene: only its text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def caption(self, **words: object) -> str:
        return self.text


# ---------------------------------------------------------------------------------------------- report


def frontier(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per method, the settings no other setting of the same method beats on both concept and drift."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "base"):
        mine = [r for r in rows if r["method"] == method]
        out[method] = sorted((r for r in mine if not any(
            o["concept"] >= r["concept"] and o["drift_features"] <= r["drift_features"]
            and (o["concept"], o["drift_features"]) != (r["concept"], r["drift_features"]) for o in mine)),
            key=lambda r: r["drift_features"])
    return out


def report(rows: list[dict[str, Any]], args: argparse.Namespace, scorer_name: str, seconds: float) -> str:
    lines = [
        "# Learn vs forget",
        "",
        f"`python bench/quality.py {' '.join(args.argv)}`: {platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), {seconds / 60:.1f} min. Model `{args.model}`, scorer: {scorer_name}. "
        f"Adapters on the UNet's `{args.preset}` layers; batch {BATCH}, AdamW, 10 warm-up steps, seed "
        f"{args.seed}; samples: euler_a, {args.sample_steps} steps, guidance 4, seeds {list(args.seeds)}.",
        "",
        "| method | lr | steps | params | concept | retention | drift (pixels) | drift (features) "
        "| energy change (rows) | energy change (columns) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['steps']} | {r['params']:,} | {r['concept']:.3f} | "
                     f"{r['retention']:.3f} | {r['drift_pixels']:.4f} | {r['drift_features']:.4f} | "
                     f"{r['energy_rows']:+.1e} | {r['energy_cols']:+.1e} |")
    lines += ["", "Methods:", ""] + [f"- `{m}`: {METHODS[m]}" for m in args.methods]
    lines += ["", "Best trade-off per method (no other setting of the method learns more with less drift):", ""]
    for method, best in frontier(rows).items():
        points = ", ".join(f"concept {r['concept']:.2f} at drift {r['drift_features']:.3f} (lr {r['lr']:g}, "
                           f"{r['steps']} steps)" for r in best)
        lines.append(f"- `{method}`: {points}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for method, best in frontier(rows).items():
        mine = [r for r in rows if r["method"] == method]
        line = ax.plot([r["drift_features"] for r in best], [r["concept"] for r in best], "-o", label=method)[0]
        ax.scatter([r["drift_features"] for r in mine], [r["concept"] for r in mine], color=line.get_color(),
                   alpha=0.35, s=14)
    ax.set_xlabel("drift of old prompts' samples (scorer features, relative)")
    ax.set_ylabel("concept score")
    ax.set_title("Learn vs forget (lines: best trade-off per method)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one learning rate and step count (< 3 min)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--learning-rates", default=None, help=f"comma list (default {LEARNING_RATES})")
    parser.add_argument("--steps", default=None, help=f"comma list of step counts to measure at (default {STEPS})")
    parser.add_argument("--model", default="builtin:toy-sd1", help="SD1 checkpoint (default builtin:toy-sd1)")
    parser.add_argument("--data", default=None, help="concept pictures with .txt captions (default: the toy's)")
    parser.add_argument("--concept-prompts", default=None, help="file of prompts that should show the concept")
    parser.add_argument("--old-prompts", default=None, help="file of prompts the model should keep drawing")
    parser.add_argument("--clip", default=None, help="local CLIP model folder to score with (default: toy judge)")
    parser.add_argument("--size", type=int, default=64, help="sample size in pixels (default 64, the toy's)")
    parser.add_argument("--sample-steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--seeds", default="0,1", help="sampling seeds of the concept prompts (default 0,1)")
    parser.add_argument("--concept", choices=sorted(toy_concept.CONCEPTS), default="colour",
                        help='the toy concept "sks" stands for: a new colour (magenta, default) or shape (a cross)')
    parser.add_argument("--preset", default="attn-mlp", help="lycoft preset naming the adapted layers")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (JSON and plot beside it)")
    args = parser.parse_args(argv)
    args.argv = argv
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; use {', '.join(METHODS)}")
    preset = QUICK if args.quick else {"learning_rates": LEARNING_RATES, "steps": STEPS}
    args.learning_rates = ([float(v) for v in args.learning_rates.split(",")] if args.learning_rates
                           else list(preset["learning_rates"]))
    args.steps = sorted(int(v) for v in args.steps.split(",")) if args.steps else list(preset["steps"])
    args.seeds = tuple(int(v) for v in args.seeds.split(","))
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    rows = run(args)
    scorer_name = f"CLIP {args.clip}" if args.clip else "toy judge"
    text = report(rows, args, scorer_name, time.perf_counter() - t0)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        plot(rows, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
