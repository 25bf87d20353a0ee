"""The LyCORIS adapter layout (docs/spec.md, "The adapter file"): what ComfyUI, A1111 and LyCORIS read.

Writes ``<key>.oft_blocks`` (3-D oft / 4-D boft, constraint baked in), ``<key>.alpha`` (always, just above
the stored norm so that every consumer's clamp is inactive) and ``<key>.rescale`` when trained with it.
Reads that layout, LyCORIS files without ``alpha``, kohya legacy ``oft_unet_`` files (dim = number of
blocks) and LyCORIS 2.0 ``oft_diag`` files (R itself, converted by the exact inverse Cayley).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .._version import __version__
from ..config import AdapterConfig, BlockLayout
from ..io.errors import AdapterFileError
from ..io.safe_io import read_safetensors, save_safetensors_atomic
from ..ops import constraint_scale, inverse_cayley, orthogonality_error, skew

ALPHA_MARGIN = 1e-4  # alpha = ||Q_stored|| * (1 + margin) + 1e-6: no consumer's clamp ever fires
ALPHA_FLOOR = 1e-6
ORTHO_TOL = 1e-3  # an oft_diag block further from orthogonal than this carries a folded rescale


# -- reading ----------------------------------------------------------------------------------------------
@dataclass
class ModuleSpec:
    """One adapted module as read from a file, normalised to lycoft's parameters."""

    key: str  # file key after prefix normalisation
    algo: str  # "oft" | "boft"
    blocks: torch.Tensor  # raw A, float32, (nb,b,b) or (m,nb,b,b)
    constraint: float  # per-unit-dim constraint (LyCORIS alpha); 0 = none
    rescale: torch.Tensor | None
    side: str
    source: str  # "lycoris", "kohya-legacy", "lycoris-2.0", "lycoft-input"

    @property
    def layout_dim(self) -> int:
        b = self.blocks.shape[-1]
        return self.blocks.shape[-3] * b

    def layout(self) -> BlockLayout:
        b = self.blocks.shape[-1]
        nb = self.blocks.shape[-3]
        stages = self.blocks.shape[0] if self.algo == "boft" else 1
        return BlockLayout(self.algo, nb * b, b, nb, stages)

    def config(self) -> AdapterConfig:
        return AdapterConfig(algo=self.algo, block_size=self.blocks.shape[-1], constraint=self.constraint,
                             rescale=self.rescale is not None, side=self.side)


def normalise_key(key: str) -> str:
    """kohya legacy ``oft_unet_`` -> ``lora_unet_``; everything else unchanged."""
    if key.startswith("oft_unet_"):
        return "lora_unet_" + key[len("oft_unet_"):]
    return key


def parse_adapter_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                          path: str = "<tensors>") -> dict[str, ModuleSpec]:
    """Group a file's tensors by module and convert every supported flavour to raw blocks."""
    metadata = metadata or {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        head, _, suffix = k.partition(".")
        if not suffix:
            raise AdapterFileError(f"{path}: tensor {k!r} has no '.<kind>' suffix; this is not an adapter file")
        groups.setdefault(head, {})[suffix] = t
    specs: dict[str, ModuleSpec] = {}
    for head, parts in groups.items():
        key = normalise_key(head)
        spec = _parse_module(path, head, key, parts, metadata)
        if key in specs:
            raise AdapterFileError(f"{path}: {head} and another key both name module {key}; remove one")
        specs[key] = spec
    if not specs:
        raise AdapterFileError(f"{path}: no adapter tensors found")
    return specs


def _parse_module(path: str, head: str, key: str, parts: dict[str, torch.Tensor],
                  metadata: Mapping[str, str]) -> ModuleSpec:
    alpha_t = parts.get("alpha")
    if alpha_t is not None and alpha_t.numel() != 1:
        raise AdapterFileError(f"{path}: {head}.alpha must be a scalar, got shape {tuple(alpha_t.shape)}")
    alpha = float(alpha_t.float()) if alpha_t is not None else 0.0
    if not (alpha >= 0.0 and alpha == alpha and alpha != float("inf")):
        raise AdapterFileError(f"{path}: {head}.alpha is {alpha}; a constraint must be a finite value >= 0")
    rescale = parts.get("rescale")
    known = {"oft_blocks", "alpha", "rescale", "oft_diag", "oft_R.weight"}
    unknown = sorted(set(parts) - known)
    if unknown:
        hint = ""
        if any(s.startswith(("lora_up", "lora_down", "hada_", "lokr_")) for s in unknown):
            hint = " (a LoRA/LoHa/LoKr file, not OFT)"
        elif "diff" in unknown:
            hint = " (a full-difference export: load it as a LyCORIS 'full' adapter, not as OFT)"
        elif any(s.startswith("boft_") for s in unknown):
            hint = " (a PEFT/kohya BOFT file: convert it with tools/convert.py)"
        raise AdapterFileError(f"{path}: {head} has tensors {unknown} that are not OFT/BOFT{hint}")
    source = "kohya-legacy" if head.startswith("oft_unet_") else "lycoris"
    if "lycoft.version" in metadata:
        alpha = 0.0  # our files bake the constraint into the blocks; alpha only keeps consumers' clamps off
    if "oft_blocks" in parts:
        A = parts["oft_blocks"]
        if A.dim() not in (3, 4) or A.shape[-1] != A.shape[-2]:
            raise AdapterFileError(f"{path}: {head}.oft_blocks has shape {tuple(A.shape)}; expected "
                                   "(blocks, b, b) for oft or (stages, blocks, b, b) for boft")
        A = A.float()
        if not torch.isfinite(A).all():
            raise AdapterFileError(f"{path}: {head}.oft_blocks contains NaN or inf; the file is damaged")
        algo = "oft" if A.dim() == 3 else "boft"
        if algo == "boft":
            m, nb, b = A.shape[0], A.shape[1], A.shape[2]
            if b % 2 or nb % (2 ** (m - 1)):
                raise AdapterFileError(f"{path}: {head}.oft_blocks shape {tuple(A.shape)} is not a valid "
                                       f"butterfly (b even and 2**(m-1) dividing the block count {nb})")
        return ModuleSpec(key, algo, A, alpha, _check_rescale(path, head, rescale), "output", source)
    if "oft_diag" in parts:
        R = parts["oft_diag"].double()
        if R.dim() != 3 or R.shape[-1] != R.shape[-2]:
            raise AdapterFileError(f"{path}: {head}.oft_diag has shape {tuple(R.shape)}; expected (blocks, b, b)")
        err = orthogonality_error(R)
        if err > ORTHO_TOL:
            raise AdapterFileError(
                f"{path}: {head}.oft_diag is not orthogonal (||R^T R - I|| = {err:.2e}): this LyCORIS 2.0 file "
                "folded a rescale into R, which the current layout cannot express; export it as full weight "
                "differences with tools/convert.py --to diff"
            )
        return ModuleSpec(key, "oft", inverse_cayley(R).float(), 0.0, None, "output", "lycoris-2.0")
    if "oft_R.weight" in parts:
        if metadata.get("lycoft.side") != "input" or metadata.get("lycoft.cayley", "exact") != "exact":
            raise AdapterFileError(
                f"{path}: {head}.oft_R.weight is a PEFT / kohya OFTv2 tensor whose Cayley convention is not "
                "recorded; convert it with tools/convert.py"
            )
        vec = parts["oft_R.weight"].float()
        nb, n = vec.shape
        b = int(round((1 + (1 + 8 * n) ** 0.5) / 2))
        if b * (b - 1) // 2 != n:
            raise AdapterFileError(f"{path}: {head}.oft_R.weight has {n} entries per block, not b(b-1)/2")
        rows, cols = torch.triu_indices(b, b, 1)
        S = torch.zeros(nb, b, b)
        S[:, rows, cols] = vec
        Q = S - S.transpose(-1, -2)
        return ModuleSpec(key, "oft", 0.5 * Q, 0.0, None, "input", "lycoft-input")
    raise AdapterFileError(f"{path}: {head} has no oft_blocks/oft_diag tensor (found {sorted(parts)})")


def _check_rescale(path: str, head: str, rescale: torch.Tensor | None) -> torch.Tensor | None:
    if rescale is None:
        return None
    if rescale.dim() < 2 or any(s != 1 for s in rescale.shape[1:]):
        raise AdapterFileError(f"{path}: {head}.rescale has shape {tuple(rescale.shape)}; expected (out, 1[, 1...])")
    return rescale.float()


def read_adapter(path: str) -> tuple[dict[str, ModuleSpec], dict[str, str]]:
    tensors, metadata = read_safetensors(path)
    return parse_adapter_tensors(tensors, metadata, path), metadata


# -- writing ----------------------------------------------------------------------------------------------
def spec_tensors(spec: ModuleSpec, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The file tensors of one module spec, as `lycoft.network_files.layer_tensors` writes them for a layer.

    Output side: the constraint is baked into the stored blocks and alpha set just above their norm (see
    docs/spec.md). Input side: PEFT's upper-triangle vector ``oft_R.weight`` (exact Cayley, ``S = Q``).
    """
    A = spec.blocks.detach().float()
    if spec.side != "output":
        if spec.algo != "oft" or spec.rescale is not None:
            raise AdapterFileError(
                f"{spec.key}: input-side boft or rescale has no file format any consumer reads; "
                "export full weight differences (tools/convert.py --to diff)"
            )
        Q = skew(A)
        b = Q.shape[-1]
        rows, cols = torch.triu_indices(b, b, 1)
        return {"oft_R.weight": Q[:, rows, cols].to(dtype or torch.float32).contiguous()}
    if spec.constraint > 0:
        A = A * constraint_scale(skew(A), spec.constraint * spec.layout_dim)
    stored = A.to(dtype or torch.float32).contiguous()
    norm = float(torch.linalg.vector_norm(skew(stored.double())))
    alpha = min(norm * (1.0 + ALPHA_MARGIN) + ALPHA_FLOOR, torch.finfo(torch.float32).max)
    out = {"oft_blocks": stored, "alpha": torch.tensor(alpha, dtype=torch.float32)}
    if spec.rescale is not None:
        out["rescale"] = spec.rescale.detach().to(dtype or torch.float32).contiguous()
    return out


def butterfly_order(b: int) -> torch.Tensor:
    """Where a one-stage butterfly takes each entry of a group of `b` channels from: the two halves
    interleaved, ``[0, b/2, 1, b/2 + 1, ...]`` (docs/spec.md, "Butterfly (BOFT)")."""
    return torch.arange(b).reshape(2, b // 2).T.reshape(-1)


def oft_as_one_stage_butterfly(spec: ModuleSpec) -> ModuleSpec:
    """The same output-side oft module as a one-stage butterfly ``(1, nb, b, b)``: the same merged weight
    for every reader of the butterfly layout, which (unlike their oft path) ComfyUI and reForge rescale.

    OFT applies ``R_k^T = C(-Q_k)`` to each group of `b` output channels; a one-stage butterfly applies
    ``P^T R'_k P`` with `P` the interleave of `butterfly_order`. So ``R'_k = P R_k^T P^T = C(-P Q_k P^T)``:
    the blocks are ``-A`` with rows and columns reordered. Negation and reordering keep every norm, so the
    constraint, `alpha` and the clamps are unchanged, and ``m R' + (1 - m) I`` is the same conjugate of the
    oft interpolation: lycoft and LyCORIS read it at every strength as before. `b` must be even.
    """
    if spec.algo != "oft" or spec.side != "output":
        raise ValueError(f"{spec.key}: only output-side oft modules have a one-stage butterfly form")
    b = spec.blocks.shape[-1]
    if b % 2:
        raise AdapterFileError(f"{spec.key}: blocks of {b} rows have no butterfly form (a butterfly needs an "
                               "even block size); export full weight differences instead (tools/convert.py --to "
                               "diff --base <model>)")
    order = butterfly_order(b)
    blocks = -spec.blocks[:, order][:, :, order]
    return ModuleSpec(spec.key, "boft", blocks.unsqueeze(0).contiguous(), spec.constraint, spec.rescale,
                      spec.side, spec.source)


def specs_metadata(specs: Mapping[str, ModuleSpec], family: str | None,
                   base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Metadata of a file written from specs: `base` (e.g. the source file's kohya ``ss_*`` keys, and the
    family's ``ss_base_model_version`` / ``modelspec.architecture``) with the ``lycoft.*`` keys that say
    how to read it (constraint baked, side, algo, `family`)."""
    md = {k: v for k, v in (base or {}).items() if not k.startswith("lycoft.")}
    algos = sorted({s.algo for s in specs.values()})
    sides = sorted({s.side for s in specs.values()})
    md.update({
        "lycoft.version": __version__,
        "lycoft.algo": algos[0] if len(algos) == 1 else ",".join(algos),
        "lycoft.block_sizes": json.dumps(sorted({int(s.blocks.shape[-1]) for s in specs.values()})),
        "lycoft.side": sides[0] if len(sides) == 1 else ",".join(sides),
        "lycoft.constraint": json.dumps(sorted({s.constraint for s in specs.values()})),
        "lycoft.cayley": "exact",
    })
    if family:
        md["lycoft.family"] = family
    md.setdefault("ss_network_module", "lycoft.kohya")
    return md


def save_specs(specs: Mapping[str, ModuleSpec], path: str, metadata: Mapping[str, str] | None = None,
               dtype: torch.dtype | None = None) -> None:
    """Atomic write of module specs in the lycoft/LyCORIS layout; `metadata` as from `specs_metadata`."""
    if any(s.side != "output" for s in specs.values()) and any(s.side == "output" for s in specs.values()):
        raise AdapterFileError(f"{path}: cannot mix input-side and output-side modules in one file")
    tensors: dict[str, torch.Tensor] = {}
    for key, spec in specs.items():
        for suffix, t in spec_tensors(spec, dtype).items():
            tensors[f"{key}.{suffix}"] = t
    save_safetensors_atomic(tensors, path, dict(metadata or {}))
