"""Look inside an adapter file: what it is, how far each layer rotates, who can read it, does it fit a base.

``inspect_adapter(path, base=None)`` returns an `Inspection`: the flavour (LyCORIS oft/boft, kohya legacy,
LyCORIS 2.0, lycoft input side, PEFT OFT/BOFT, full differences), per-layer statistics, the file's
metadata, the verdict of each consumer (`lycoft.compatibility`) and, with a base model, the keys that
match no layer of it and the relative weight change of each layer. ``plot_inspection`` draws the
per-layer chart.

Per-layer numbers (rotation blocks R as the consumers compute them, at strength 1):
- ``q_norm``: ``||Q||_F`` over the whole layer (after the constraint), the quantity the constraint bounds;
- ``max_angle``: the largest rotation angle in degrees, ``max |arg(lambda)|`` over the eigenvalues of every
  block (every stage for boft). 0 is the identity, 180 a reflection through a plane;
- ``ortho_error``: ``max ||R^T R - I||_F`` over blocks, from R in float32 (PEFT's Neumann series: float64,
  so the number is the series' own error);
- ``rel_change`` (with a base): ``||W' - W||_F / ||W||_F``.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base_model import BaseModel, adapter_key_spellings, open_base
from .checkpoints.families import family_info
from .checkpoints.ldm_keys import text_encoder_module_path
from .compatibility import (
    CONSUMER_NAMES,
    FAILS,
    IGNORED,
    OK,
    STRENGTH_NOTE,
    WRONG,
    Verdict,
    rescaled_oft_advice,
    verdicts,
)
from .convert import ReadAdapter, guess_family, key_index, read_any_adapter
from .formats.lycoris import ModuleSpec
from .formats.peft import PeftModule, cayley_minus
from .io.safe_io import read_safetensors
from .io.streaming import OpenInputs
from .ops import cayley, constrain, orthogonality_error, skew
from .ops.energy import hyperspherical_energy

_BADNESS = {FAILS: 4, WRONG: 3, IGNORED: 2, "convert": 1, OK: 0}
_FLAVOUR_DIMS = {"lycoris-oft": (3,), "lycoris-boft": (4,)}
_TE_FLAT = re.compile(r"^lora_te\d?_encoder_")


@dataclass
class LayerStats:
    key: str
    component: str
    module: str
    group: str
    algo: str
    side: str
    shape: list[int]
    block_size: int
    blocks: int
    stages: int
    params: int
    q_norm: float | None = None
    max_angle: float | None = None
    ortho_error: float | None = None
    rescale: list[float] | None = None  # [min, max]
    alpha: float | None = None
    rel_change: float | None = None
    energy_rows: float | None = None  # relative change of the neurons' hyperspherical energy (--energy)
    energy_cols: float | None = None  # the same for the columns (what an output-side rotation keeps)


@dataclass
class Inspection:
    path: str
    flavour: str
    family: str
    family_source: str
    layers: list[LayerStats]
    metadata: dict[str, str]
    facts: list[str]
    verdicts: list[Verdict]
    base: str | None = None
    not_in_base: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    base_family: str | None = None
    energy_total: dict[str, float] | None = None  # "rows" / "cols": relative change summed over the layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdicts"] = {v.consumer: {"verdict": v.verdict, "why": v.why} for v in self.verdicts}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def text(self, top: int = 20, show_all: bool = False) -> str:
        return _format_text(self, top, show_all)


# --------------------------------------------------------------------------------------------- groups
def group_of(component: str, module: str, family: str) -> str:
    if component != "unet":
        return "TE" if len(family_info(family).text_encoders) == 1 else component.upper()
    m = re.match(r"(down|up)_blocks\.(\d+)", module)
    if m:
        return f"{m[1]}{m[2]}"
    if module.startswith("mid_block"):
        return "mid"
    if module.startswith(("conv_out", "conv_norm_out")):
        return "out"
    return "in"


def _group_rank(group: str) -> tuple[int, int]:
    order = {"TE": 0, "TE1": 0, "TE2": 1, "in": 2, "mid": 4, "out": 6}
    if group in order:
        return order[group], 0
    m = re.match(r"(down|up)(\d+)", group)
    return (3 if m[1] == "down" else 5), int(m[2])


# ---------------------------------------------------------------------------------------------- stats
def _angles(R: torch.Tensor) -> float:
    if R.numel() == 0:
        return 0.0
    lam = torch.linalg.eigvals(R.reshape(-1, R.shape[-1], R.shape[-1]).double())
    return float(lam.angle().abs().max()) * 180.0 / math.pi


def _spec_stats(spec: ModuleSpec) -> dict[str, Any]:
    dim = spec.layout_dim
    Q = constrain(skew(spec.blocks.double()), spec.constraint * dim)
    R32 = cayley(Q.float())
    R64 = cayley(Q)
    if spec.side == "input":
        R64 = R64.transpose(-1, -2)
    return {"q_norm": float(torch.linalg.vector_norm(Q)), "max_angle": _angles(R64),
            "ortho_error": orthogonality_error(R32)}


def _peft_stats(m: PeftModule) -> dict[str, Any]:
    if m.kind == "oft":
        S = m.skew()
        R = m.rotation_blocks(S.shape[0] * S.shape[-1])
    else:
        A = m.tensors["boft_R"].double()
        S = 0.5 * (A - A.transpose(-1, -2))
        R = cayley_minus(S)
    return {"q_norm": float(torch.linalg.vector_norm(S)), "max_angle": _angles(R),
            "ortho_error": orthogonality_error(R)}


def _layout_numbers(shape: tuple[int, ...], algo: str) -> tuple[int, int, int]:
    b = shape[-1]
    nb = shape[-3] if len(shape) >= 3 else 1
    return b, nb, (shape[0] if algo == "boft" else 1)


def _facts(adapter: ReadAdapter, raw: dict[str, torch.Tensor], dims: tuple[int, ...] = (3, 4)) -> list[str]:
    """The `lycoft.compatibility.FACTS` of the file's modules whose oft_blocks have one of `dims` (3: oft, 4:
    boft), so that an oft verdict does not hear of a boft module's rescale; keys alone: of every module."""
    facts = set()
    heads = {k.partition(".")[0] for k in raw}
    if any(f"{h}.oft_blocks" in raw for h in heads):
        heads = {h for h in heads if f"{h}.oft_blocks" not in raw or raw[f"{h}.oft_blocks"].dim() in dims}
    for head in heads:
        blocks = raw.get(f"{head}.oft_blocks")
        if blocks is None:
            continue
        alpha = raw.get(f"{head}.alpha")
        if alpha is None:
            facts.add("no_alpha")
        if f"{head}.rescale" in raw:
            facts.add("rescale")
        b = blocks.shape[-1]
        nb = blocks.shape[-3]
        if blocks.dim() == 3 and b > nb:
            facts.add("block_size_gt_block_num")
        if blocks.dim() == 4 and (nb & (nb - 1) or blocks.shape[0] != 1 + int(math.log2(nb))):
            # one stage of 2^k blocks fits (broadcasts into) the full butterfly LyCORIS rebuilds; others do not
            facts.add("one_stage_butterfly" if blocks.shape[0] == 1 and not nb & (nb - 1) else "partial_butterfly")
        if alpha is not None and float(alpha) > 0:
            qn = float(torch.linalg.vector_norm(skew(blocks.double())))
            if qn + 1e-8 > float(alpha):
                facts.add("comfy_clamp")
    if any(_TE_FLAT.match(h) for h in heads):
        facts.add("te_flat_names")
    if any(h.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block",
                         "oft_unet_down_blocks", "oft_unet_up_blocks", "oft_unet_mid_block")) for h in heads):
        facts.add("sd1_unet_names")
    return sorted(facts)


def _compat_flavours(adapter: ReadAdapter) -> list[str]:
    if adapter.flavour == "lycoris":
        return sorted({f"lycoris-{s.algo}" for s in adapter.specs.values()})
    return [adapter.flavour]


def _combined_verdicts(flavours: list[str], facts: dict[str, list[str]]) -> list[Verdict]:
    """With oft and boft layers in one file, each consumer gets its worse verdict of the two (each from the
    facts of its own layers)."""
    tables = [verdicts(f, facts[f]) for f in flavours]
    return [max(col, key=lambda v: _BADNESS[v.verdict]) for col in zip(*tables)]


# -------------------------------------------------------------------------------------------- inspect
def inspect_adapter(path: str, base: str | None = None, family: str | None = None,
                    component: str | None = None, peft_config: str | None = None,
                    energy: bool = False) -> Inspection:
    """Statistics, consumers and base fit of the adapter at `path` (see module docstring); with a `base`
    and `energy`, also each layer's change of hyperspherical energy (`lycoft.ops.energy`)."""
    adapter = read_any_adapter(path, component, peft_config)
    raw: dict[str, torch.Tensor] = {}
    if adapter.peft is None and adapter.flavour != "diff":
        raw, _ = read_safetensors(path)
    with ExitStack() as stack:
        model = stack.enter_context(open_base(base, family)) if base else None
        inputs = stack.enter_context(OpenInputs())
        if family:
            fam, source = family, "given"
        else:
            fam = guess_family(adapter)
            source = "metadata" if any(k in adapter.metadata for k in ("lycoft.family", "ss_base_model_version",
                                                                      "modelspec.architecture")) else "key names"
            # Key names can show an SDXL adapter, not an SD1 or SD2 one: without metadata, the base decides.
            if model is not None and source == "key names" and not (fam == "sdxl" != model.family):
                fam, source = model.family, "base"
        adapter_fam = fam
        if model is not None:
            fam = model.family  # the layers are matched against the base, whatever the adapter is
        index = key_index(fam, model)
        order = {loc: i for i, loc in enumerate(dict.fromkeys(index.values()))}
        layers, not_in_base, wrong_shape = [], [], []
        energies: dict[str, list[float]] | None = {"rows": [0.0, 0.0], "cols": [0.0, 0.0]} if energy else None
        for key, info in _layer_sources(adapter, fam, model):
            comp, module = index.get(key, ("?", key))
            stats = LayerStats(key=key, component=comp, module=module, group=group_of(comp, module, fam)
                               if comp != "?" else "?", **info["base"])
            for k, v in info["stats"].items():
                setattr(stats, k, v)
            if model is not None:
                _base_fit(model, inputs, key, info, stats, not_in_base, wrong_shape, energies)
            layers.append((order.get((comp, module), len(order)), stats))
        layers.sort(key=lambda x: (_group_rank(x[1].group) if x[1].group != "?" else (9, 0), x[0]))
    flavours = _compat_flavours(adapter)
    by_flavour = {f: _facts(adapter, raw, _FLAVOUR_DIMS.get(f, (3, 4))) for f in flavours}
    facts = sorted(set().union(*by_flavour.values()))
    notes = []
    if "rescale" in by_flavour.get("lycoris-oft", ()):
        notes.append(rescaled_oft_advice(path))
    if adapter.peft is not None and any(m.neumann for m in adapter.peft.modules):
        notes.append("PEFT Neumann series (use_cayley_neumann=True): rotations are approximations; ortho_error "
                     "is the series' own error")
    if model is not None and adapter_fam != model.family:
        notes.append(f"the adapter is {adapter_fam} (from its {source}) but the base is {model.family}; inspect it "
                     f"against an {adapter_fam} base")
    total = None
    if energies is not None and model is not None:
        total = {k: (after / before - 1.0 if before else 0.0) for k, (before, after) in energies.items()}
    return Inspection(path, adapter.flavour, adapter_fam, source, [s for _, s in layers], adapter.metadata, facts,
                      _combined_verdicts(flavours, by_flavour), base, not_in_base, wrong_shape, notes,
                      model.family if model is not None else None, total)


def _layer_sources(adapter: ReadAdapter, fam: str, model: BaseModel | None):
    """(key, info) per layer; info: base fields, stats, and how to apply it to a base weight."""
    from .merge import apply_spec

    if adapter.peft is not None:
        for m in adapter.peft.modules:
            path = m.path if m.component == "unet" else text_encoder_module_path(m.path)
            key = adapter_key_spellings(m.component, path, fam, model.layout if model else None)[0]
            t = m.tensors["oft_R.weight"] if m.kind == "oft" else m.tensors["boft_R"]
            if m.kind == "oft":
                b = m.block_size
                shape, nb, stages = (t.shape[0], b, b), t.shape[0], 1
            else:
                shape, nb, stages = tuple(t.shape), t.shape[1], t.shape[0]
                b = t.shape[-1]
            yield key, {"base": dict(algo=m.kind, side="input", shape=list(shape), block_size=b, blocks=nb,
                                     stages=stages, params=sum(x.numel() for x in m.tensors.values())),
                        "stats": _peft_stats(m), "apply": m.merged, "dim": (nb * b, "input")}
        return
    if adapter.flavour == "diff":
        for k, d in adapter.diffs.items():
            if not k.endswith(".diff"):
                continue
            key = k[: -len(".diff")]
            yield key, {"base": dict(algo="diff", side="output", shape=list(d.shape), block_size=0, blocks=0,
                                     stages=0, params=d.numel()),
                        "stats": {"q_norm": None}, "apply": lambda W, d=d: W + d.float(), "shape": tuple(d.shape)}
        return
    for key, spec in adapter.specs.items():
        b, nb, stages = _layout_numbers(tuple(spec.blocks.shape), spec.algo)
        rescale = None
        if spec.rescale is not None:
            rescale = [float(spec.rescale.min()), float(spec.rescale.max())]
        params = spec.blocks.numel() + (spec.rescale.numel() if spec.rescale is not None else 0)
        stats = _spec_stats(spec)
        stats["rescale"] = rescale
        stats["alpha"] = spec.constraint or None
        yield key, {"base": dict(algo=spec.algo, side=spec.side, shape=list(spec.blocks.shape), block_size=b,
                                 blocks=nb, stages=stages, params=params),
                    "stats": stats, "apply": lambda W, s=spec: apply_spec(W, s), "dim": (spec.layout_dim, spec.side)}


def _base_fit(model: BaseModel, inputs: OpenInputs, key: str, info: dict, stats: LayerStats,
              not_in_base: list[str], wrong_shape: list[str], energies: dict[str, list[float]] | None) -> None:
    slots = model.slots.get(key)
    if not slots:
        not_in_base.append(key)
        return
    slot = slots[0]
    if "dim" in info:
        dim, side = info["dim"]
        if slot.dim(side) != dim:
            wrong_shape.append(f"{key}: rotates {dim} channels, the base layer {slot.module} has {slot.dim(side)}")
            return
    elif tuple(info["shape"]) != tuple(slot.shape):
        wrong_shape.append(f"{key}: shape {info['shape']}, the base layer {slot.module} has {slot.shape}")
        return
    W = slot.take(inputs[slot.file].read(slot.tensor)).float()
    with torch.no_grad():
        W2 = info["apply"](W)
    stats.rel_change = float(torch.linalg.vector_norm(W2 - W) / torch.linalg.vector_norm(W).clamp_min(1e-30))
    if energies is not None:
        for kind, columns in (("rows", False), ("cols", True)):
            before, after = hyperspherical_energy(W, columns), hyperspherical_energy(W2, columns)
            setattr(stats, f"energy_{kind}", after / before - 1.0 if before else 0.0)
            energies[kind][0] += before
            energies[kind][1] += after


# ---------------------------------------------------------------------------------------------- text
def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _format_text(ins: Inspection, top: int, show_all: bool) -> str:
    lines = []
    comps: dict[str, int] = {}
    for layer in ins.layers:
        comps[layer.component] = comps.get(layer.component, 0) + 1
    lines.append(f"{ins.path}")
    lines.append(f"  format: {ins.flavour}   family: {ins.family} (from {ins.family_source})   layers: "
                 + ", ".join(f"{c} {n}" for c, n in comps.items()))
    algos = sorted({f"{x.algo}/{x.side}" for x in ins.layers})
    sizes = sorted({x.block_size for x in ins.layers if x.block_size})
    stages = sorted({x.stages for x in ins.layers if x.algo == "boft"})
    params = sum(x.params for x in ins.layers)
    line = f"  algo: {', '.join(algos)}   block sizes: {sizes or '-'}"
    if stages:
        line += f"   butterfly stages: {stages}"
    line += f"   parameters: {params:,}"
    if any(x.rescale for x in ins.layers):
        line += "   rescale: yes"
    lines.append(line)
    angles = [x.max_angle for x in ins.layers if x.max_angle is not None]
    if angles:
        qn = [x.q_norm for x in ins.layers if x.q_norm is not None]
        ortho = max((x.ortho_error for x in ins.layers if x.ortho_error is not None), default=0.0)
        lines.append(f"  rotation: largest angle {max(angles):.3g} deg (median {_median(angles):.3g}), "
                     f"||Q|| max {max(qn):.3g} (median {_median(qn):.3g}), orthogonality error max {ortho:.1e}")
    changes = [x.rel_change for x in ins.layers if x.rel_change is not None]
    if changes:
        lines.append(f"  weight change vs base: max {max(changes):.3g}, median {_median(changes):.3g} (||W'-W||/||W||)")
    if ins.energy_total is not None:
        lines.append(f"  hyperspherical energy vs base, all layers: neurons (rows) {ins.energy_total['rows']:+.2e}, "
                     f"columns {ins.energy_total['cols']:+.2e} (relative change; a rotation of the inputs keeps "
                     "the rows', one of the outputs the columns')")
    if ins.metadata:
        lines.append("  metadata:")
        for k in sorted(ins.metadata):
            v = ins.metadata[k].replace("\n", " ")
            lines.append(f"    {k}: {v if len(v) <= 100 else v[:97] + '...'}")
    lines.append("  consumers:")
    for v in ins.verdicts:
        lines.append(f"    {CONSUMER_NAMES[v.consumer]:<40} {v.text()}")
    lines.append(f"    note: {STRENGTH_NOTE}")
    for n in ins.notes:
        lines.append(f"  note: {n}")
    if ins.base:
        matching = len(ins.layers) - len(ins.not_in_base) - len(ins.wrong_shape)
        lines.append(f"  base {ins.base} ({ins.base_family}): {matching} of {len(ins.layers)} layers match")
        for k in ins.not_in_base[:20]:
            lines.append(f"    not in the base: {k}")
        if len(ins.not_in_base) > 20:
            lines.append(f"    ... {len(ins.not_in_base) - 20} more")
        for k in ins.wrong_shape[:20]:
            lines.append(f"    wrong shape: {k}")
    shown = ins.layers if show_all else sorted(
        ins.layers, key=lambda x: -(x.max_angle if x.max_angle is not None else (x.rel_change or 0)))[:top]
    title = "layers" if show_all else f"largest {len(shown)} of {len(ins.layers)} layers (--all for every one)"
    lines.append(f"  {title}:")
    width = max([len(x.key) for x in shown] + [3])  # whole keys: SDXL's run past 64 characters
    energy = ins.energy_total is not None
    head = f"    {'key':<{width}} {'blocks':>12} {'||Q||':>8} {'angle':>7} {'ortho':>8} {'dW/W':>8}"
    lines.append(head + (f" {'dHE rows':>9} {'dHE cols':>9}" if energy else ""))
    for x in shown:
        blocks = f"{x.stages}x{x.blocks}x{x.block_size}" if x.algo == "boft" else f"{x.blocks}x{x.block_size}"
        row = (f"    {x.key:<{width}} {blocks:>12} {_fmt(x.q_norm):>8} {_fmt(x.max_angle, '.2f'):>7} "
               f"{_fmt(x.ortho_error, '.1e'):>8} {_fmt(x.rel_change):>8}")
        if energy:
            row += f" {_fmt(x.energy_rows, '+.1e'):>9} {_fmt(x.energy_cols, '+.1e'):>9}"
        lines.append(row)
    return "\n".join(lines)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ---------------------------------------------------------------------------------------------- plot
GROUP_COLOURS = {"TE": "#8c564b", "TE1": "#8c564b", "TE2": "#c49c94", "in": "#7f7f7f", "mid": "#d62728",
                 "out": "#7f7f7f", "?": "#bcbd22"}
_DOWN, _UP = "#1f77b4", "#2ca02c"


def _colour(group: str) -> str:
    if group in GROUP_COLOURS:
        return GROUP_COLOURS[group]
    return _DOWN if group.startswith("down") else _UP


def _short(layer: LayerStats) -> str:
    m = layer.module
    for a, b in (("transformer_blocks.", "tb"), ("attentions.", "attn"), ("resnets.", "res"),
                 ("text_model.encoder.layers.", "L"), ("down_blocks.", "d"), ("up_blocks.", "u"),
                 ("mid_block.", "mid."), ("self_attn.", ""), ("downsamplers.0.", "down."),
                 ("upsamplers.0.", "up.")):
        m = m.replace(a, b)
    return (layer.component.upper() + " " if layer.component != "unet" else "") + m


def plot_inspection(ins: Inspection, out: str) -> None:
    """Per-layer chart: rotation angle (top) and ||Q|| or the weight change against the base (bottom), one
    bar per layer in model order, coloured and labelled by part of the model."""
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError("--plot needs matplotlib: pip install 'lycoft[plot]' (or pip install matplotlib)",
                                  name="matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layers = ins.layers
    if not layers:
        raise ValueError(f"{ins.path}: no layers to plot")
    has_rot = any(x.max_angle is not None for x in layers)
    has_base = any(x.rel_change is not None for x in layers)
    panels = []
    if has_rot:
        panels.append(("largest rotation angle (deg)", [x.max_angle or 0.0 for x in layers]))
    if has_base:
        panels.append(("weight change ||W'-W|| / ||W|| (%)", [100 * (x.rel_change or 0.0) for x in layers]))
    elif has_rot:
        panels.append(("||Q||_F (what the constraint bounds)", [x.q_norm or 0.0 for x in layers]))
    n = len(layers)
    colours = [_colour(x.group) for x in layers]
    few = n <= 48
    if few:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.28 * n + 1.6), squeeze=False,
                                 sharey=True)
        for ax, (label, values) in zip(axes[0], panels):
            ax.barh(range(n), values, color=colours)
            ax.set_xlabel(label)
            ax.grid(axis="x", alpha=0.3)
        axes[0][0].set_yticks(range(n))
        axes[0][0].set_yticklabels([_short(x) for x in layers], fontsize=8)
        axes[0][0].invert_yaxis()
    else:
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(10, min(24, n / 18)), 3.2 * len(panels) + 1.2),
                                 squeeze=False, sharex=True)
        spans = _group_spans(layers)
        for ax, (label, values) in zip(axes[:, 0], panels):
            ax.bar(range(n), values, width=1.0, color=colours, linewidth=0)
            ax.set_ylabel(label, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.set_xlim(-0.5, n - 0.5)
            for i, (_, a, b) in enumerate(spans):
                if i % 2:
                    ax.axvspan(a - 0.5, b - 0.5, color="#000000", alpha=0.04, linewidth=0)
            for i in _spaced_maxima(values, count=3, gap=max(n // 6, 1)):
                ax.annotate(_short(layers[i]), (i, values[i]), xytext=(0, 3), textcoords="offset points",
                            fontsize=7, ha="center")
            ax.set_ylim(0, max(values) * 1.18 if max(values) > 0 else 1)
        bottom = axes[-1, 0]
        bottom.set_xticks([(a + b - 1) / 2 for _, a, b in spans])
        # Narrow groups (the UNet's in/out layers, a short text encoder) would print their names on top of
        # each other: every other label goes one line lower.
        centres = [(a + b - 1) / 2 for _, a, b in spans]
        labels, lowered = [], False
        for i, (g, _, _) in enumerate(spans):
            lowered = i > 0 and not lowered and centres[i] - centres[i - 1] < n / 14
            labels.append("\n" + g if lowered else g)
        bottom.set_xticklabels(labels, fontsize=9)
        bottom.set_xlabel("layers in model order (text encoders, UNet input, down blocks, mid, up blocks, output)")
    names = {"TE": "text encoder", "TE1": "text encoder 1", "TE2": "text encoder 2", "in": "UNet in/out",
             "out": "UNet in/out", "mid": "UNet mid", "?": "not in the model"}
    legend, seen = [], set()
    for x in layers:
        label = names.get(x.group) or ("UNet down" if x.group.startswith("down") else "UNet up")
        if label not in seen:
            seen.add(label)
            legend.append(Patch(color=_colour(x.group), label=label))
    sizes = sorted({x.block_size for x in layers if x.block_size})
    algos = "/".join(sorted({x.algo for x in layers}))
    fig.suptitle(f"{Path(ins.path).name}: {ins.family} {algos}, {n} layers, block sizes {sizes}", fontsize=11)
    fig.legend(handles=legend, loc="upper right", fontsize=8, ncol=len(legend), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    try:
        fig.savefig(out, dpi=110)
    except ValueError as e:  # matplotlib's "Format 'x' is not supported (supported formats: ...)"
        raise ValueError(f"--plot {out}: {e}; name the chart e.g. {Path(out).stem or 'chart'}.png") from None
    finally:
        plt.close(fig)


def _spaced_maxima(values: list[float], count: int, gap: int) -> list[int]:
    """Indices of the largest positive values, at least `gap` apart (labels that do not overlap)."""
    chosen: list[int] = []
    for i in sorted(range(len(values)), key=lambda i: -values[i]):
        if values[i] <= 0 or len(chosen) == count:
            break
        if all(abs(i - j) >= gap for j in chosen):
            chosen.append(i)
    return chosen


def _group_spans(layers: list[LayerStats]) -> list[tuple[str, int, int]]:
    spans: list[tuple[str, int, int]] = []
    for i, x in enumerate(layers):
        if spans and spans[-1][0] == x.group:
            spans[-1] = (x.group, spans[-1][1], i + 1)
        else:
            spans.append((x.group, i, i + 1))
    return spans
