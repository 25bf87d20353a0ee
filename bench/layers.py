"""One training step per Stable Diffusion layer shape: lycoft OFT/BOFT against PEFT and LyCORIS on this machine.

What one step is: forward, backward with a fixed random output gradient, AdamW step on the adapter
parameters only; the base layer is frozen and the input requires grad (as inside a UNet). Every case
(method x shape) runs in its own freshly forked process; the libraries are imported once, before any
tensor work, so a fork starts clean and costs nothing. Ratios are taken within one run only. Each case
process also steps a frozen copy of the layer alternately with the method: the paired ratio of the two
medians does not depend on how busy the host was when the `frozen` case itself ran.

    python bench/layers.py --quick                       # < 3 min on 2 cores
    python bench/layers.py --out bench/results/layers.md  # full: >= 20 timed steps, every case

See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (layer kind, in, out, input shape, bias, note)
SHAPES: dict[str, tuple[str, int, int, tuple[int, ...], bool, str]] = {
    "attn320": ("linear", 320, 320, (1, 4096, 320), False, "to_q/k/v @64x64 latents"),
    "attn640": ("linear", 640, 640, (1, 1024, 640), False, "to_q/k/v @32x32"),
    "attn1280": ("linear", 1280, 1280, (1, 256, 1280), False, "to_q/k/v @16x16"),
    "xattn_k": ("linear", 768, 320, (1, 77, 768), False, "attn2.to_k/v on 77 CLIP tokens"),
    "ff1280": ("linear", 1280, 5120, (1, 256, 1280), True, "feed-forward-sized 1280->5120 @16x16"),
    "conv320": ("conv", 320, 320, (1, 320, 64, 64), True, "resnet conv 3x3 @64x64"),
    "conv1280": ("conv", 1280, 1280, (1, 1280, 16, 16), True, "resnet conv 3x3 @16x16"),
}

# name -> (family, description)
METHODS: dict[str, tuple[str, str]] = {
    "frozen": ("base", "frozen base layer, input grad only"),
    "lora-r8": ("lora", "PEFT LoRA r=8 alpha=8"),
    "peft-oft": ("oft", "PEFT OFT oft_block_size=32, exact Cayley (use_cayley_neumann=False)"),
    "peft-oft-cn": ("oft", "PEFT OFT oft_block_size=32, Cayley-Neumann (5 terms)"),
    "peft-boft": ("boft", "PEFT BOFT block 8, n_butterfly_factor=2 asked (CPU: PEFT forces 1)"),
    "lyco-diag-oft": ("oft", "LyCORIS diag-oft lora_dim=32, default (rebuild weight) mode"),
    "lyco-diag-oft-bp": ("oft", "LyCORIS diag-oft lora_dim=32, bypass mode"),
    "lyco-boft": ("boft", "LyCORIS boft, smallest valid lora_dim >= 8, default mode"),
    "lyco-boft-bp": ("boft", "LyCORIS boft, smallest valid lora_dim >= 8, bypass mode"),
    "lycoft-oft": ("oft", "lycoft OFT block 32, path auto"),
    "lycoft-oft-w": ("oft", "lycoft OFT block 32, weight path forced"),
    "lycoft-oft-a": ("oft", "lycoft OFT block 32, activation path forced"),
    "lycoft-boft": ("boft", "lycoft BOFT block 8, m=2, path auto"),
    "lycoft-boft-w": ("boft", "lycoft BOFT block 8, m=2, weight path forced"),
    "lycoft-boft-a": ("boft", "lycoft BOFT block 8, m=2, activation path forced"),
    # only with --baseline DIR: the same two adapters from another lycoft source tree (before/after)
    "baseline-oft": ("oft", "lycoft OFT block 32, path auto, from the --baseline tree"),
    "baseline-boft": ("boft", "lycoft BOFT block 8, m=2, path auto, from the --baseline tree"),
}
PEERS = {"oft": ["peft-oft", "peft-oft-cn", "lyco-diag-oft", "lyco-diag-oft-bp"],
         "boft": ["peft-boft", "lyco-boft", "lyco-boft-bp"]}
# Cases known to take many seconds per step (PEFT BOFT builds a dense d x d rotation over the conv fan-in,
# LyCORIS boft rebuilds the weight through 8-10 stages): left out of --quick.
QUICK_SKIP = {("peft-boft", "conv320"), ("peft-boft", "conv1280"), ("lyco-boft", "conv1280"),
              ("peft-boft", "ff1280"), ("peft-boft", "attn1280")}
ORTH_STDS = (0.01, 0.1)
MERGE_BUDGET_S = 2.0  # merges are timed until --merge reps or this many seconds (at least 3 merges)


@dataclass
class Case:
    """What a method gives the measuring loop."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    params: list[nn.Parameter]
    config: str
    # params ~ N(0, std) -> the float32 rotation blocks the method itself builds; None when not a rotation
    rotation: Callable[[float], torch.Tensor] | None = None
    merge: Callable[[], Any] | None = None
    merge_reset: Callable[[], None] | None = None  # undo a merge that changed the base layer (untimed)
    q_scale: float = 1.0  # std of the skew entries per unit parameter std (layouts differ)
    notes: list[str] = field(default_factory=list)
    path: Callable[[], str] | None = None


# ----------------------------------------------------------------------------------------------------
# methods


def make_base(shape: str) -> tuple[nn.Module, torch.Tensor]:
    kind, fin, fout, xshape, bias, _ = SHAPES[shape]
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(fin, fout, bias=bias)
    else:
        base = nn.Conv2d(fin, fout, 3, padding=1, bias=bias)
    for p in base.parameters():
        p.requires_grad_(False)
    x = torch.randn(xshape)
    return base, x


def _fill(p: torch.Tensor, std: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p.copy_(torch.randn(p.shape, generator=g) * std)


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def _peft_merge_reset(layer: nn.Module) -> Callable[[], None]:
    """PEFT merges in place: put the base weight back and forget the merge."""
    base = layer.get_base_layer()
    w0 = base.weight.detach().clone()

    def reset() -> None:
        base.weight.data.copy_(w0)
        layer.merged_adapters.clear()

    return reset


def build_peft(method: str, base: nn.Module) -> Case:
    from peft import BOFTConfig, LoraConfig, OFTConfig, inject_adapter_in_model

    if method == "lora-r8":
        cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["layer"])
    elif method in ("peft-oft", "peft-oft-cn"):
        cfg = OFTConfig(r=0, oft_block_size=32, target_modules=["layer"],
                        use_cayley_neumann=method == "peft-oft-cn")
    else:
        cfg = BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["layer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        holder = inject_adapter_in_model(cfg, _Holder(base))
    layer = holder.layer
    params = [p for p in layer.parameters() if p.requires_grad]
    fin = base.weight[0].numel()
    case = Case(fn=layer, params=params, config="", merge=layer.merge, merge_reset=_peft_merge_reset(layer))
    if method == "lora-r8":
        case.config = "r=8 alpha=8"
    elif method.startswith("peft-oft"):
        rot = layer.oft_R["default"]
        case.config = (f"b=32 x {rot.r} blocks on the input dim {fin}, "
                       + ("Cayley-Neumann 5 terms" if rot.use_cayley_neumann else "exact Cayley (solve)"))

        def rotation(std: float, rot=rot) -> torch.Tensor:
            _fill(rot.weight, std)
            with torch.no_grad():
                return rot._cayley_batch(rot.weight, rot.block_size, rot.use_cayley_neumann,
                                         rot.num_cayley_neumann_terms)

        case.rotation = rotation
        if isinstance(base, nn.Conv2d):
            case.notes.append("PEFT OFT conv unfolds the input with padding 0: its output is not the adapted "
                              "conv's (PEFT's merged weight disagrees with it; docs/spec.md)")
    else:
        R = layer.boft_R["default"]
        m, nb, b, _ = R.shape
        case.config = f"b={b} x {nb} blocks, m={m} (asked 2) on the input dim {fin}, dense d x d rotation"
        case.q_scale = 1 / math.sqrt(2)

        def rotation(std: float, R=R, layer=layer) -> torch.Tensor:
            _fill(R, std)
            with torch.no_grad():
                return layer.cayley_batch(R.view(-1, b, b))

        case.rotation = rotation
    return case


def lyco_boft_dim(out: int) -> int:
    from lycoris.functional import power2factorization

    for d in range(8, out + 1, 2):
        if power2factorization(out, d)[1]:
            return d
    raise ValueError(f"no boft factorisation of {out}")


def build_lyco(method: str, base: nn.Module) -> Case:
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule

    bypass = method.endswith("-bp")
    out = base.weight.shape[0]
    if "diag" in method:
        mod = DiagOFTModule("layer", base, multiplier=1.0, lora_dim=32, bypass_mode=bypass)
        cfg = f"lora_dim=32 -> b={mod.block_size} x {mod.block_num} blocks on the output dim {out}"
    else:
        d = lyco_boft_dim(out)
        mod = ButterflyOFTModule("layer", base, multiplier=1.0, lora_dim=d, bypass_mode=bypass)
        cfg = (f"lora_dim={d} -> b={mod.block_size} x {mod.block_num} blocks, m={mod.boft_m} "
               f"on the output dim {out}")
    cfg += ", bypass y + (R - I) y" if bypass else ", rebuild W' = R W"
    mod.apply_to()

    def rotation(std: float) -> torch.Tensor:
        _fill(mod.oft_blocks, std)
        with torch.no_grad():
            return mod.get_r()

    def merge() -> torch.Tensor:
        return mod.get_merged_weight(multiplier=1.0, shape=base.weight.shape, device=base.weight.device)[0]

    params = [p for p in mod.parameters() if p.requires_grad]
    return Case(fn=base, params=params, config=cfg, rotation=rotation, merge=merge, q_scale=math.sqrt(2))


def _import_baseline(tree: str) -> None:
    """Swap the imported lycoft for the one in `tree` (only ever in a forked case process)."""
    for name in [n for n in sys.modules if n == "lycoft" or n.startswith("lycoft.")]:
        del sys.modules[name]
    sys.path.insert(0, tree)


def build_lycoft(method: str, base: nn.Module, baseline: str | None = None) -> Case:
    if method.startswith("baseline-"):
        if not baseline:
            raise ValueError("baseline-* methods need --baseline DIR (a lycoft source tree)")
        _import_baseline(baseline)
    from lycoft import AdapterConfig, wrap

    if method.startswith(("lycoft-oft", "baseline-oft")):
        cfg = AdapterConfig(block_size=32)
    else:
        cfg = AdapterConfig(algo="boft", block_size=8, butterfly_factors=2)
    layer = wrap(base, cfg)
    layer.path = {"w": "weight", "a": "activation"}.get(method.rsplit("-", 1)[-1], "auto")
    lay = layer.layout
    desc = f"b={lay.block_size} x {lay.block_num} blocks" + (f", m={lay.stages}" if lay.algo == "boft" else "")

    def rotation(std: float) -> torch.Tensor:
        _fill(layer.oft_blocks, std)
        with torch.no_grad():
            return layer.rotation()

    def merge() -> torch.Tensor:
        with torch.no_grad():
            return layer.merged_weight()

    return Case(fn=layer, params=layer.adapter_parameters(), config=f"{desc} on the output dim {lay.dim}",
                rotation=rotation, merge=merge, q_scale=math.sqrt(2), path=lambda: layer.last_path)


def build(method: str, base: nn.Module, baseline: str | None = None) -> Case:
    if method == "frozen":
        return Case(fn=base, params=[], config="frozen base, input grad only")
    if method.startswith(("lora", "peft")):
        return build_peft(method, base)
    if method.startswith("lyco-"):
        return build_lyco(method, base)
    return build_lycoft(method, base, baseline)


# ----------------------------------------------------------------------------------------------------
# measuring (runs in the forked child)


def orth_error(R: torch.Tensor) -> float:
    """max over blocks of ||R^T R - I||_F, in float64."""
    R = R.detach().to(torch.float64).reshape(-1, R.shape[-2], R.shape[-1])
    E = R.transpose(-1, -2) @ R - torch.eye(R.shape[-1], dtype=torch.float64)
    return float(torch.linalg.matrix_norm(E).max())


def saved_bytes(case: Case, base: nn.Module, x: torch.Tensor, g: torch.Tensor) -> int:
    """Bytes autograd keeps for backward beyond the input, the base weights and the adapter parameters."""
    known = {t.untyped_storage().data_ptr() for t in [x, *base.parameters(), *case.params]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in known:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = case.fn(x)
    y.backward(g)
    return sum(seen.values())


def _busy_jiffies() -> int:
    """CPU time (jiffies) all processes of the machine have used, from /proc/stat; 0 where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0
    return sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all but idle and iowait


def other_load(work: Callable[[], Any]) -> tuple[Any, float | None]:
    """Run `work()`; also return the share of the machine's CPUs that OTHER processes used meanwhile."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    b0, c0, w0 = _busy_jiffies(), time.process_time(), time.perf_counter()
    out = work()
    b1, c1, w1 = _busy_jiffies(), time.process_time(), time.perf_counter()
    if not b0:
        return out, None
    others = (b1 - b0) / hz - (c1 - c0)
    return out, max(0.0, others / ((w1 - w0) * (os.cpu_count() or 1)))


def wait_for_quiet(max_wait: float, threshold: float = 0.10, window: float = 0.5) -> float:
    """Sleep until other processes use less than `threshold` of the CPUs over `window` seconds, at most
    `max_wait` seconds; returns the seconds waited. Two OpenMP threads sharing cores with other work wait
    on each other at every parallel region, which slows a frozen GEMM far more than a chain of small ops:
    only quiet measurements give fair ratios."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        _, load = other_load(lambda: time.sleep(window))
        if load is None or load < threshold:
            break
    return time.perf_counter() - t0


def _step_fn(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor,
             opt: torch.optim.Optimizer | None) -> Callable[[], float]:
    def step() -> float:
        t0 = time.perf_counter()
        x.grad = None
        y = fn(x)
        y.backward(g)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def measure(method: str, shape: str, opts: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(opts["threads"])
    warnings.filterwarnings("ignore")
    base, x = make_base(shape)
    # The paired reference: a frozen copy of the same layer (same weights, own input), stepped alternately with
    # the method in this process, so that the ratio does not depend on how fast the host was at another time.
    ref_base, x_ref = make_base(shape) if method != "frozen" else (None, None)
    case = build(method, base, opts.get("baseline"))
    x.requires_grad_(True)
    with torch.no_grad():
        y0 = case.fn(x)
    g = torch.randn(y0.shape, generator=torch.Generator().manual_seed(2))
    del y0
    opt = torch.optim.AdamW(case.params, lr=1e-4) if case.params else None
    step = _step_fn(case.fn, x, g, opt)
    ref = _step_fn(ref_base, x_ref.requires_grad_(True), g, None) if ref_base is not None else None

    res: dict[str, Any] = {"method": method, "shape": shape, "config": case.config, "notes": case.notes,
                           "params": sum(p.numel() for p in case.params), "load_start": os.getloadavg()[0]}
    first = step()
    capped = first > opts["step_cap"]
    times, ref_times = [first], []
    if not capped:
        for _ in range(opts["warmup"] - 1):
            step()
            if ref is not None:
                ref()
        t = statistics.median([step() for _ in range(2)])
        n = max(opts["min_steps"], min(opts["steps"], int(opts["budget"] / max(t, 1e-6))))

        def timed() -> list[float]:
            out = []
            for _ in range(n):
                if ref is not None:
                    ref_times.append(ref())
                out.append(step())
            return out

        times, res["other_load"] = other_load(timed)
    res["ms"] = 1e3 * statistics.median(times)
    res["ms_min"] = 1e3 * min(times)
    if ref_times:
        res["frozen_paired_ms"] = 1e3 * statistics.median(ref_times)
        res["paired"] = res["ms"] / res["frozen_paired_ms"]
    elif method == "frozen":
        res["frozen_paired_ms"], res["paired"] = res["ms"], 1.0
    res["steps"] = len(times)
    res["capped"] = capped
    if case.path is not None:
        res["path"] = case.path()
    extras = opts.get("extras", True) and not capped
    res["saved_mb"] = saved_bytes(case, base, x, g) / 2**20 if extras else None
    if case.rotation is not None and extras:
        res["orth"] = {str(s): orth_error(case.rotation(s)) for s in ORTH_STDS}
        res["q_scale"] = case.q_scale
        case.rotation(0.01)
    if case.merge is not None and extras:
        mt: list[float] = []
        for i in range(opts["merge_reps"] + 1):  # the first one warms up
            t0 = time.perf_counter()
            case.merge()
            mt.append(time.perf_counter() - t0)
            if case.merge_reset is not None:
                case.merge_reset()
            if i >= 3 and sum(mt[1:]) > MERGE_BUDGET_S:  # slow merges (peers' conv1280: seconds each)
                break
        mt = mt[1:]
        res["merge_ms"] = 1e3 * statistics.median(mt)
    res["load_end"] = os.getloadavg()[0]
    return res


def _child(conn: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        conn.send(fn(*args))
    except Exception as e:
        traceback.print_exc(limit=4)  # the whole story on stderr; the results keep the exception only (no paths)
        conn.send({"error": "".join(traceback.format_exception_only(type(e), e)).strip()})
    conn.close()


def run_forked(fn: Callable[..., Any], args: tuple, timeout: float, start: str = "fork") -> Any:
    """`fn(*args)` in a fresh process; `{"error": ...}` on an exception, a timeout or a crash.

    Fork by default: the parent has imported torch and the peers but run no tensor work, so the child
    starts clean without paying the imports again. `start="spawn"` for CUDA: a process forked from one
    that has touched CUDA cannot use it, and a spawned one imports everything anew (`fn` must then be a
    module-level function of an importable module or of the main script).
    """
    ctx = mp.get_context(start)
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args))
    t0 = time.perf_counter()
    p.start()
    child.close()
    res: Any = None
    if parent.poll(timeout):
        try:
            res = parent.recv()
        except EOFError:
            res = None
    if p.is_alive():
        p.kill()
    p.join(5)
    if res is None:
        waited = time.perf_counter() - t0
        res = {"error": f"timeout > {timeout:.0f} s" if waited >= timeout else "worker died"}
    return res


def run_case(method: str, shape: str, opts: dict[str, Any]) -> dict[str, Any]:
    waited = wait_for_quiet(opts.get("quiet_wait", 0.0))
    res = run_forked(measure, (method, shape, opts), opts["timeout"])
    res["waited_s"] = waited
    res.setdefault("method", method)
    res.setdefault("shape", shape)
    return res


# ----------------------------------------------------------------------------------------------------
# report


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _ok(r: dict[str, Any] | None) -> bool:
    return r is not None and "ms" in r


def summarise(results: dict[tuple[str, str], dict[str, Any]], shapes: list[str], methods: list[str],
              key: str = "ms") -> dict[str, Any]:
    """lycoft's speed goals, checked on the results of one run.

    `key`: "ms" (median step), "ms_min" (best step), both over the frozen layer's own case, or "paired" (the
    median step over the median of the frozen copy stepped alternately in the same process).
    """
    out: dict[str, Any] = {}

    def ok(r: dict[str, Any] | None) -> bool:
        return _ok(r) and key in r  # type: ignore[operator]

    for fam, auto, goal_geo, peer_factor in (("oft", "lycoft-oft", 1.25, 1.0), ("boft", "lycoft-boft", 1.4, 0.5)):
        if auto not in methods:
            continue
        ratios, per_shape = [], {}
        for s in shapes:
            r, f = results.get((auto, s)), results.get(("frozen", s))
            peers = [results.get((p, s)) for p in PEERS[fam]]
            peers = [p for p in peers if ok(p)]
            best = min(peers, key=lambda p: p[key]) if peers else None
            if not (ok(r) and ok(f)):
                continue
            ratios.append(r[key] / f[key])
            per_shape[s] = {
                "ms": r[key], "frozen": f[key], "best_peer": best["method"] if best else None,
                "best_peer_ms": best[key] if best else None,
                "vs_peer": r[key] / best[key] if best else None,
                "pass": bool(best) and r[key] <= peer_factor * best[key],
                # a frozen layer slower than the peer goal makes the goal unreachable by any adapter
                "reachable": bool(best) and f[key] <= peer_factor * best[key],
            }
        geo = math.exp(statistics.fmean(math.log(v) for v in ratios)) if ratios else None
        orth = [results[(auto, s)]["orth"]["0.1"] for s in shapes if _ok(results.get((auto, s)))
                and "orth" in results[(auto, s)]]
        lyco = "lyco-diag-oft" if fam == "oft" else "lyco-boft"
        merges = {}
        for s in shapes:
            a, b = results.get((auto, s)), results.get((lyco, s))
            if _ok(a) and _ok(b) and "merge_ms" in a and "merge_ms" in b:
                merges[s] = {"lycoft": a["merge_ms"], "lycoris": b["merge_ms"],
                             "pass": a["merge_ms"] <= b["merge_ms"]}
        out[fam] = {
            "geomean_vs_frozen": geo, "goal_geomean": goal_geo, "geomean_pass": geo is not None and geo <= goal_geo,
            "peer_factor": peer_factor, "per_shape": per_shape,
            "orth_max_std0.1": max(orth) if orth else None,
            "orth_pass": bool(orth) and max(orth) <= 1e-5, "merge": merges,
        }
    return out


def _step_cell(results: dict[tuple[str, str], dict[str, Any]], m: str, s: str, r: dict[str, Any],
               key: str = "ms") -> str:
    fr = results.get(("frozen", s))
    txt = f"{r[key]:.2f}" + ("*" if r["capped"] else "")
    if _ok(fr) and m != "frozen":
        txt += f" ({r[key] / fr[key]:.2f}x"
        peers = [p for p in (results.get((q, s)) for q in PEERS.get(METHODS[m][0], [])) if _ok(p)]
        if peers and m.startswith(("lycoft", "baseline")):
            txt += f", {r[key] / min(p[key] for p in peers):.2f}p"
        txt += ")"
    if r.get("path") and m in ("lycoft-oft", "lycoft-boft", "baseline-oft", "baseline-boft"):
        txt += f" [{r['path'][0]}]"
    return txt


def _paired_cell(results: dict[tuple[str, str], dict[str, Any]], m: str, s: str, r: dict[str, Any]) -> str:
    if "paired" not in r:
        return "-"
    txt = f"{r['paired']:.2f}x"
    peers = [p for p in (results.get((q, s)) for q in PEERS.get(METHODS[m][0], [])) if _ok(p) and "paired" in p]
    if peers and m.startswith(("lycoft", "baseline")):
        txt += f" ({r['paired'] / min(p['paired'] for p in peers):.2f}p)"
    if m != "frozen":
        txt += f" of {r['frozen_paired_ms']:.2f}"
    return txt


def markdown(results: dict[tuple[str, str], dict[str, Any]], shapes: list[str], methods: list[str],
             meta: dict[str, Any], targets: dict[str, Any]) -> str:
    L: list[str] = []
    L.append("# Layer benchmark: one training step per SD layer shape (CPU)\n")
    for k, v in meta.items():
        L.append(f"- {k}: {v}")
    L.append("\n## Shapes\n")
    L.append("| shape | layer | input | bias | note |\n|---|---|---|---|---|")
    for s in shapes:
        kind, fin, fout, xs, bias, note = SHAPES[s]
        layer = f"Linear {fin}->{fout}" if kind == "linear" else f"Conv2d {fin}->{fout} 3x3 pad 1"
        L.append(f"| {s} | {layer} | {tuple(xs)} | {bias} | {note} |")

    L.append("\n## Targets\n")
    L.append("Verdicts on the median step (the measure the goals name), in brackets on the best step of the same "
             "case, and in braces on the paired ratio: each case's median step over the median of a frozen copy "
             "of the layer stepped alternately with it in the same process. The paired ratio does not depend "
             "on how busy the host happened to be when the frozen layer's own case ran; the first two "
             "do.\n")
    best, paired = targets.get("best_step", {}), targets.get("paired", {})

    def verdict(p: dict[str, Any]) -> str:
        return "PASS" if p.get("pass") else ("FAIL" if p.get("reachable") else "FAIL, unreachable")

    for fam, t in targets.items():
        if fam in ("best_step", "paired"):
            continue
        tb, tp = best.get(fam, {}), paired.get(fam, {})
        goal = "<= best peer" if t["peer_factor"] == 1 else f"<= {t['peer_factor']} x best peer"
        geo = _fmt(t["geomean_vs_frozen"], ".3f")
        geo_b = _fmt(tb.get("geomean_vs_frozen"), ".3f")
        geo_p = _fmt(tp.get("geomean_vs_frozen"), ".3f")
        pf = {True: "PASS", False: "FAIL"}
        v, vb, vp = (pf[bool(x.get("geomean_pass"))] for x in (t, tb, tp))
        L.append(f"- **lycoft {fam}** geomean step/frozen = {geo} [{geo_b}] {{{geo_p}}} "
                 f"(goal <= {t['goal_geomean']}): {v} [{vb}] {{{vp}}}")
        for s, p in t["per_shape"].items():
            pb = tb.get("per_shape", {}).get(s, {})
            pp = tp.get("per_shape", {}).get(s, {})
            L.append(f"  - {s}: {p['ms']:.2f} ms vs best peer {p['best_peer']} {_fmt(p['best_peer_ms'], '.2f')} ms"
                     f" = {_fmt(p['vs_peer'], '.2f')}x [{_fmt(pb.get('vs_peer'), '.2f')}x vs {pb.get('best_peer')}]"
                     f" {{{_fmt(pp.get('vs_peer'), '.2f')}x vs {pp.get('best_peer')}}}"
                     f" (goal {goal}): {verdict(p)} [{verdict(pb)}] {{{verdict(pp)}}}")
        L.append(f"  - orthogonality error at std 0.1: {_fmt(t['orth_max_std0.1'], '.1e')} (goal <= 1e-5): "
                 f"{'PASS' if t['orth_pass'] else 'FAIL'}")
        for s, m in t["merge"].items():
            L.append(f"  - merge {s}: {m['lycoft']:.2f} ms vs LyCORIS {m['lycoris']:.2f} ms: "
                     f"{'PASS' if m['pass'] else 'FAIL'}")

    head = "| method | " + " | ".join(shapes) + " |\n|---|" + "---|" * len(shapes)

    def cell(m: str, s: str, f: Callable[[dict[str, Any]], str]) -> str:
        r = results.get((m, s))
        if r is None:
            return "skipped"
        if "error" in r:
            return r["error"].strip().splitlines()[-1][:60]
        return f(r)

    L.append("\n## Training step: median ms/step (x frozen; p = x best peer of the same family)\n")
    L.append(head)
    for m in methods:
        L.append(f"| {m} | " + " | ".join(cell(m, s, lambda r, m=m, s=s: _step_cell(results, m, s, r))
                                          for s in shapes) + " |")
    L.append("\n`*` = the first step exceeded the step cap: that single step is reported. "
             "[a]/[w] = path the automatic choice took.")

    L.append("\n## Training step: best (minimum) ms/step of the same timed steps (less sensitive to other load)\n")
    L.append(head)
    for m in methods:
        L.append(f"| {m} | " + " | ".join(cell(m, s, lambda r, m=m, s=s: _step_cell(results, m, s, r, "ms_min"))
                                          for s in shapes) + " |")

    L.append("\n## Training step: paired ratio (median step / median step of a frozen copy stepped alternately in "
             "the same process; p = over the best peer's paired ratio)\n")
    L.append(head)
    for m in methods:
        L.append(f"| {m} | " + " | ".join(cell(m, s, lambda r, m=m, s=s: _paired_cell(results, m, s, r))
                                          for s in shapes) + " |")

    L.append("\n## Trainable params / extra saved activations MB / merge ms (one layer's merged weight)\n")
    L.append(head)
    for m in methods:
        def f(r: dict[str, Any]) -> str:
            return f"{r['params']:,} / {_fmt(r.get('saved_mb'), '.2f')} / {_fmt(r.get('merge_ms'), '.2f')}"
        L.append(f"| {m} | " + " | ".join(cell(m, s, f) for s in shapes) + " |")

    L.append("\n## Orthogonality: max over blocks of ||R^T R - I||_F, float32 R as each method builds it, "
             "params ~ N(0, std)\n")
    L.append("q = std of the skew-symmetric entries per unit parameter std (layouts differ).\n")
    L.append("| method | q | std | " + " | ".join(shapes) + " |\n|---|---|---|" + "---|" * len(shapes))
    for m in methods:
        rs = [results.get((m, s)) for s in shapes]
        if not any(_ok(r) and "orth" in r for r in rs):
            continue
        q = next(r["q_scale"] for r in rs if _ok(r) and "orth" in r)
        for std in ORTH_STDS:
            cells = [_fmt(r["orth"][str(std)], ".1e") if _ok(r) and "orth" in r else "-" for r in rs]
            L.append(f"| {m} | {q:.2f} | {std} | " + " | ".join(cells) + " |")

    L.append("\n## Configuration per case\n")
    L.append("other load = share of the machine's CPUs used by OTHER processes during the case's timed steps "
             "(from /proc/stat); above ~10% the times are inflated (OpenMP threads wait on each other).\n")
    L.append("| shape | method | config | steps | other load | load 1-min avg | notes |\n|---|---|---|---|---|---|---|")
    for s in shapes:
        for m in methods:
            r = results.get((m, s))
            if r is None:
                L.append(f"| {s} | {m} | skipped (--quick) | | | | |")
            elif "error" in r:
                L.append(f"| {s} | {m} | | | | | {r['error'].strip().splitlines()[-1][:120]} |")
            else:
                share = f"{r['other_load']:.0%}" if r.get("other_load") is not None else "-"
                steps = f"{r['steps']}" + (f", best of {r['rounds']} rounds" if r.get("rounds", 1) > 1 else "")
                L.append(f"| {s} | {m} | {r['config']} | {steps} | {share} | "
                         f"{r['load_start']:.2f} -> {r['load_end']:.2f} | {'; '.join(r['notes'])} |")
    return "\n".join(L) + "\n"


def rerender(src: Path, out: Path) -> int:
    """Rebuild the markdown report from a JSON written by an earlier run (same numbers, current layout)."""
    data = json.loads(src.read_text())
    results = {(r["method"], r["shape"]): r for r in data["results"]}
    shapes = [s for s in SHAPES if any(k[1] == s for k in results)]
    methods = [m for m in METHODS if any(k[0] == m for k in results)]
    targets = summarise(results, shapes, methods)
    targets["best_step"] = summarise(results, shapes, methods, key="ms_min")
    targets["paired"] = summarise(results, shapes, methods, key="paired")
    meta = dict(data["meta"])
    meta["report"] = f"re-rendered from {src.name} by `python bench/layers.py --from-json`"
    out.write_text(markdown(results, shapes, methods, meta, targets))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer steps, skip the slowest peer cases; finishes in < 3 min on 2 cores")
    ap.add_argument("--out", default="bench/results/layers.md", help="markdown report (JSON next to it)")
    ap.add_argument("--json", default=None, help="JSON results path (default: --out with .json)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of shapes")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of methods")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20, quick 6)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3, quick 2)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per case (default 300, quick 30)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="rounds over all cases (default 3, quick 1); each case keeps its round with the lowest "
                    "median, so every case gets several chances at a quiet machine. Memory, merge and "
                    "orthogonality are measured in the first round; cases slower than 1 s/step run once")
    ap.add_argument("--retries", type=int, default=None,
                    help="re-run a case while other processes used > 10%% of the CPUs during it, keeping the "
                    "least disturbed run (default 2, quick 0)")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="before each case wait up to this many seconds for other processes to use < 10%% of the "
                    "CPUs (default 120, quick 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every case")
    ap.add_argument("--from-json", default=None,
                    help="measure nothing: re-render the report (--out) from a JSON this script wrote")
    ap.add_argument("--baseline", default=None,
                    help="another lycoft source tree (e.g. `git archive <rev> lycoft | tar -x -C DIR`): adds "
                    "methods baseline-oft/baseline-boft, measured in the same run")
    args = ap.parse_args(argv)

    if args.from_json:
        return rerender(Path(args.from_json), Path(args.out))
    shapes = [s for s in args.shapes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    if args.methods == ap.get_default("methods") and not args.baseline:
        methods = [m for m in methods if not m.startswith("baseline-")]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    opts = {
        "threads": args.threads,
        "steps": args.steps or (6 if args.quick else 20),
        "warmup": args.warmup or (2 if args.quick else 3),
        "min_steps": 3 if args.quick else 20,
        "budget": 1.0 if args.quick else 1e9,  # seconds of timed steps per case before the step count is cut
        "step_cap": 10.0 if args.quick else 60.0,
        "timeout": args.timeout or (30.0 if args.quick else 300.0),
        "merge_reps": 3 if args.quick else 25,
        "baseline": str(Path(args.baseline).resolve()) if args.baseline else None,
        "quiet_wait": args.quiet_wait if args.quiet_wait is not None else (5.0 if args.quick else 120.0),
    }
    # Import the peers once here, before any tensor work, so that every forked case starts with them loaded.
    if any(m.startswith(("lora", "peft")) for m in methods):
        import peft  # noqa: F401
        import peft.tuners.boft.layer  # noqa: F401
    if any(m.startswith("lyco-") for m in methods):
        import lycoris.modules.boft  # noqa: F401
    import lycoft  # noqa: F401

    retries = args.retries if args.retries is not None else (0 if args.quick else 2)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    t_start = time.time()
    load0 = os.getloadavg()
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for rep in range(repeat):
        for s in shapes:
            for m in methods:
                if args.quick and (m, s) in QUICK_SKIP:
                    continue
                old = results.get((m, s))
                if old is not None and ("ms" not in old or old["ms"] > 1000):
                    continue  # failed, timed out or far too slow to matter: one round is enough
                r = run_case(m, s, {**opts, "extras": old is None})
                for _ in range(retries):
                    if "ms" not in r or (r.get("other_load") or 0) <= 0.10:
                        break
                    again = run_case(m, s, {**opts, "extras": old is None})
                    if "ms" in again and (again.get("other_load") or 0) < r["other_load"]:
                        r = again
                if old is None:
                    results[(m, s)] = r
                elif "ms" in r and r["ms"] < old["ms"]:
                    kept = {k: old[k] for k in ("saved_mb", "orth", "q_scale", "merge_ms") if k in old}
                    results[(m, s)] = {**r, **kept, "rounds": old.get("rounds", 1) + 1}
                else:
                    old["rounds"] = old.get("rounds", 1) + 1
                status = (f"{r['ms']:9.2f} ms  other load {r.get('other_load') or 0:.0%}" if "ms" in r
                          else r["error"].strip().splitlines()[-1][:80])
                print(f"[{rep}] {s:9s} {m:17s} {status}", flush=True)
    load1 = os.getloadavg()

    versions = []
    for mod, dist in (("peft", "peft"), ("lycoris", "lycoris-lora")):
        if mod in sys.modules:  # lycoris has no __version__: ask the installed distribution
            try:
                versions.append(f"{mod} {importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                versions.append(f"{mod} {getattr(sys.modules[mod], '__version__', '?')}")
    meta = {
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + " by `python bench/layers.py "
        + " ".join(sys.argv[1:] if argv is None else argv) + "`",
        "wall time": f"{(time.time() - t_start) / 60:.1f} min",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
        f"torch {torch.__version__}, set_num_threads({args.threads}); Python {platform.python_version()}",
        "peers": ", ".join(versions) or "none",
        "method": f"fp32, batch 1, warm-up {opts['warmup']}, median of {opts['steps']} timed steps "
        f"(fewer where marked), AdamW lr 1e-4 on adapter params, fixed random output gradient, every case in "
        f"a fresh forked process; {repeat} round(s) over all cases, each case keeping its round with the lowest "
        f"median (cases > 1 s/step: one round); before each case up to {opts['quiet_wait']:.0f} s of waiting for "
        f"other processes to use < 10% of the CPUs, and up to {retries} re-run(s) of a case disturbed anyway",
        "load average (1, 5, 15 min)": f"start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
        f"end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}",
    }
    targets = summarise(results, shapes, methods)
    targets["best_step"] = summarise(results, shapes, methods, key="ms_min")
    targets["paired"] = summarise(results, shapes, methods, key="paired")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, shapes, [m for m in METHODS if m in methods], meta, targets))
    jpath = Path(args.json) if args.json else out.with_suffix(".json")
    jpath.write_text(json.dumps({"meta": meta, "opts": opts, "targets": targets,
                                 "results": [results[k] for k in sorted(results)]}, indent=1))
    print(f"wrote {out} and {jpath} in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
