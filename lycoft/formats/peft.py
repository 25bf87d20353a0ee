"""PEFT OFT / BOFT adapters (peft >= 0.16 layout; docs/spec.md, "PEFT OFT and BOFT").

Layouts read: diffusers ``save_lora_adapter`` (bare ``<module path>.oft_R.weight`` with the PEFT config as
JSON in the safetensors metadata key ``lora_adapter_metadata``), diffusers pipeline files (``unet.`` /
``text_encoder.`` / ``text_encoder_2.`` prefixes, config keys packed with the same prefixes) and
``PeftModel.save_pretrained`` folders (``base_model.model.<path>``, ``adapter_config.json`` beside).

PEFT rotates the *input* dimension: ``W'_flat = s * (W_flat M^T)`` (``s`` only for BOFT), with
- OFT: ``M = blockdiag(R_k)``, ``S`` the skew matrix of the stored upper-triangle vector (no 1/2),
  exact ``R = (I - S)(I + S)^-1`` (``use_cayley_neumann=False``), or the truncated series
  ``I + 2S + 2S^2 + ... + S^(n-1)`` (the default), which approximates the *other* Cayley convention
  ``(I + S)(I - S)^-1``: the same vector means transposed rotations depending on that flag;
- BOFT: ``R = (I - S)(I + S)^-1`` with ``S = (A - A^T)/2`` per block, ``M = prod_i P_i D_i P_i^T``
  (PEFT's block butterfly permutations).

lycoft's input side is ``W'_flat = W_flat M^T`` with ``M = blockdiag(C(Q)^T)`` and ``C(Q)^T =
(I - Q)(I + Q)^-1``, so an exact PEFT OFT vector is our ``Q`` as is, and a Neumann one is ``-Q`` up to the
series' truncation (reported). BOFT has no lycoft file form; it converts to full weight differences.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io.atomic import atomic_write
from ..io.errors import AdapterFileError
from ..io.safe_io import read_safetensors, save_safetensors_atomic
from ..ops import cayley
from .lycoris import ModuleSpec

PEFTMODEL_PREFIX = "base_model.model."
COMPONENT_PREFIXES = {"unet.": "unet", "text_encoder.": "te1", "text_encoder_2.": "te2"}
COMPONENT_NAMES = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
_PARAM = re.compile(r"^(?P<path>.+)\.(?P<param>oft_R\.weight|boft_R|boft_s)$")
_TE_PATH = re.compile(r"^(text_model\.|encoder\.layers\.)")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_KEY = "lora_adapter_metadata"


# ---------------------------------------------------------------------------------------------- math
def skew_from_vector(vec: torch.Tensor, b: int) -> torch.Tensor:
    """PEFT's ``(r, b(b-1)/2)`` upper-triangle vectors -> ``(r, b, b)`` skew matrices ``S - S^T``."""
    rows, cols = torch.triu_indices(b, b, 1)
    S = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    S[:, rows, cols] = vec
    return S - S.transpose(-1, -2)


def block_size_of(n_elements: int) -> int:
    b = int(round((1 + (1 + 8 * n_elements) ** 0.5) / 2))
    if b * (b - 1) // 2 != n_elements:
        raise ValueError(f"{n_elements} entries per block is not b(b-1)/2 for any block size b")
    return b


def cayley_minus(S: torch.Tensor) -> torch.Tensor:
    """``(I - S)(I + S)^-1``, batched (PEFT's exact Cayley)."""
    I = torch.eye(S.shape[-1], dtype=S.dtype).expand_as(S)
    return torch.linalg.solve(I + S, I - S, left=False)


def neumann_rotation(S: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated series (peft 0.21 ``_cayley_batch``): ``I``, ``I + 2S``, then
    ``I + 2S + 2S^2 + ... + 2S^(n-2) + S^(n-1)``; 3 terms give the same as 4."""
    I = torch.eye(S.shape[-1], dtype=S.dtype).expand_as(S).clone()
    if terms <= 1:
        return I
    R = I + 2 * S
    if terms == 2:
        return R
    power = S @ S
    R = R + 2 * power
    for _ in range(3, terms - 1):
        power = power @ S
        R = R + 2 * power
    return R + power @ S


def butterfly_permutation(n: int, blocks: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm(n, blocks, r, n_butterfly_factor)``: ``P[i, perm[i]] = 1``."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if blocks * r * 2 > n:
        raise ValueError(f"invalid butterfly: {blocks} blocks of sub-size {r} on {n} channels")
    block = n // blocks
    step = block // r
    seq = torch.cat([torch.arange(0, step, 2), torch.arange(1, step, 2)])
    order = torch.cat([torch.arange(p * r, p * r + r) for p in seq.tolist()])
    return torch.cat([start + order for start in range(0, n, block)])


# ------------------------------------------------------------------------------------------- modules
@dataclass
class PeftModule:
    """One PEFT-adapted layer: where it is and its tensors.

    Fields:
        component: ``unet``, ``te1`` or ``te2``; path: module path inside that component.
        kind: ``oft`` or ``boft``.
        tensors: ``oft_R.weight`` ``(r, b(b-1)/2)``; or ``boft_R`` ``(N, nb, b, b)`` and ``boft_s`` ``(out, 1)``.
        config: the PEFT config of this layer's model (dict).
    """

    component: str
    path: str
    kind: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def neumann(self) -> bool:
        return bool(self.config.get("use_cayley_neumann", True))

    @property
    def neumann_terms(self) -> int:
        return int(self.config.get("num_cayley_neumann_terms", 5))

    @property
    def block_size(self) -> int:
        if self.kind == "oft":
            return block_size_of(self.tensors["oft_R.weight"].shape[-1])
        return int(self.tensors["boft_R"].shape[-1])

    def skew(self) -> torch.Tensor:
        vec = self.tensors["oft_R.weight"].double()
        return skew_from_vector(vec, self.block_size)

    def rotation_blocks(self, fan_in: int | None = None) -> torch.Tensor:
        """OFT: PEFT's ``(r, b, b)`` blocks as PEFT computes them (float64), shared blocks repeated."""
        S = self.skew()
        R = neumann_rotation(S, self.neumann_terms) if self.neumann else cayley_minus(S)
        return self._expand_shared(R, fan_in)

    def _expand_shared(self, R: torch.Tensor, fan_in: int | None) -> torch.Tensor:
        if not self.config.get("block_share"):
            return R
        b = R.shape[-1]
        count = int(self.config.get("r") or 0) or (fan_in // b if fan_in else 0)
        if not count:
            raise ValueError(f"{self.path}: a block_share adapter needs the layer's fan-in; pass --base")
        return R.expand(count, b, b)

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """PEFT's merged weight (its ``merge()``), computed in float64, returned in float32."""
        W = weight.double().reshape(weight.shape[0], -1)
        n = W.shape[1]
        if self.kind == "oft":
            R = self.rotation_blocks(n)
            nb, b, _ = R.shape
            if nb * b != n:
                raise ValueError(f"{self.path}: {nb} blocks of {b} do not cover fan-in {n}")
            out = torch.einsum("orb,rcb->orc", W.reshape(-1, nb, b), R).reshape(W.shape)
        else:
            out = self._boft_rotate(W) * self.tensors["boft_s"].double().reshape(-1, 1)
        return out.reshape(weight.shape).float()

    def _boft_rotate(self, W: torch.Tensor) -> torch.Tensor:
        """``W M^T`` with ``M = prod_i P_i D_i P_i^T`` (stage 0 applied first)."""
        A = self.tensors["boft_R"].double()
        N, nb, b, _ = A.shape
        n = W.shape[1]
        if nb * b != n:
            raise ValueError(f"{self.path}: {nb} blocks of {b} do not cover fan-in {n}")
        R = cayley_minus(0.5 * (A - A.transpose(-1, -2)))
        X = W
        for i in range(N):
            perm = butterfly_permutation(n, nb // 2**i, b // 2, N - 1)
            Y = torch.empty_like(X)
            Y[:, perm] = X  # X P_i
            Z = torch.einsum("otb,tcb->otc", Y.reshape(-1, nb, b), R[i]).reshape(X.shape)  # (X P_i) D_i^T
            X = Z[:, perm]  # ... P_i^T
        return X

    def to_spec(self, key: str, fan_in: int | None = None) -> tuple[ModuleSpec, float]:
        """The lycoft input-side module with the same rotation, and how far it is from PEFT's.

        Exact Cayley: ``Q = S``, identical rotation (error ~ 1e-16). Neumann: ``Q = -S``, the exact
        rotation the series approximates; the error is ``max_k ||R_series - R_exact||_F``.
        """
        if self.kind != "oft":
            raise AdapterFileError(
                f"{self.path}: PEFT BOFT has no lycoft adapter form (input-side butterfly with a scale); "
                "export full weight differences instead (tools/convert.py --to diff --base <model>)"
            )
        S = self.skew()
        Q = -S if self.neumann else S
        R_ours = cayley(Q).transpose(-1, -2)  # the blocks of M in W M^T
        R_ours = self._expand_shared(R_ours, fan_in)
        err = float(torch.linalg.matrix_norm(R_ours - self.rotation_blocks(fan_in)).max())
        A = self._expand_shared(0.5 * Q, fan_in).contiguous().float()
        return ModuleSpec(key, "oft", A, 0.0, None, "input", "peft"), err


@dataclass
class PeftAdapter:
    """A PEFT adapter file read into memory."""

    path: str
    layout: str  # "diffusers", "pipeline" or "peftmodel"
    modules: list[PeftModule]
    configs: dict[str, dict[str, Any]]  # component -> PEFT config

    @property
    def kind(self) -> str:
        kinds = sorted({m.kind for m in self.modules})
        return kinds[0] if len(kinds) == 1 else "+".join(kinds)


def is_peft_tensors(keys: list[str]) -> bool:
    return any(_PARAM.match(k) and not k.startswith(("lora_unet_", "lora_te")) for k in keys)


def _component_of(path: str, component: str | None) -> tuple[str, str]:
    for prefix, comp in COMPONENT_PREFIXES.items():
        if path.startswith(prefix):
            return comp, path[len(prefix):]
    if component is not None:
        return component, path
    return ("te1" if _TE_PATH.match(path) else "unet"), path


def _config_json(text: str, source: str) -> dict[str, Any]:
    """A PEFT config from JSON text; an error naming `source` (a file, or a file's metadata key) if broken."""
    try:
        config = json.loads(text)
    except ValueError as e:
        raise AdapterFileError(source, f"is not valid JSON ({e})", "give the adapter_config.json PEFT wrote") from None
    if not isinstance(config, dict):
        raise AdapterFileError(source, f"holds a JSON {type(config).__name__}, not an object of PEFT options",
                               "give the adapter_config.json PEFT wrote")
    return config


def _find_config(path: Path, metadata: Mapping[str, str], explicit: str | None) -> tuple[dict, str]:
    if explicit:
        try:
            text = Path(explicit).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AdapterFileError(explicit, f"cannot be read ({e})", "check the --peft-config path") from None
        return _config_json(text, explicit), "given"
    if METADATA_KEY in metadata:
        return _config_json(metadata[METADATA_KEY], f"{path}: metadata {METADATA_KEY!r}"), "metadata"
    beside = path.parent / CONFIG_FILE
    if beside.is_file():
        return _config_json(beside.read_text(encoding="utf-8", errors="replace"), str(beside)), "file"
    raise AdapterFileError(
        str(path), f"is a PEFT adapter without its config (no {METADATA_KEY!r} metadata, no {CONFIG_FILE} beside it)",
        "pass the adapter_config.json with --peft-config: the Cayley convention (use_cayley_neumann) "
        "decides which rotation the stored numbers mean",
    )


def _split_config(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pipeline files pack each model's config with a ``unet.`` / ``text_encoder.`` prefix."""
    packed = [k for k in config if any(k.startswith(p) for p in COMPONENT_PREFIXES)]
    if not packed:
        return {"*": config}
    out: dict[str, dict[str, Any]] = {}
    for k, v in config.items():
        for prefix, comp in COMPONENT_PREFIXES.items():
            if k.startswith(prefix):
                out.setdefault(comp, {})[k[len(prefix):]] = v
    return out


def peft_config_for(key: str, metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The PEFT config that a file's ``lora_adapter_metadata`` gives the layer `key` (pipeline files pack one
    config per model, prefixed like their keys), or None when the file carries none."""
    if METADATA_KEY not in metadata:
        return None
    try:
        configs = _split_config(json.loads(metadata[METADATA_KEY]))
    except (ValueError, AttributeError):
        return None
    component = next((c for p, c in COMPONENT_PREFIXES.items() if key.startswith(p)), "*")
    return configs.get(component, configs.get("*"))


def read_peft(path: str | os.PathLike[str], component: str | None = None, config: str | None = None
              ) -> PeftAdapter:
    """Read a PEFT OFT/BOFT adapter (file, or PeftModel folder). `component` names the model of bare
    keys (default: text encoder 1 for ``text_model.`` paths, else the UNet)."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_FILE
    tensors, metadata = read_safetensors(p)
    cfg, _ = _find_config(p, metadata, config)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type and peft_type not in ("OFT", "BOFT"):
        raise AdapterFileError(str(p), f"is a PEFT {peft_type} adapter, not OFT/BOFT", "lycoft converts OFT and BOFT")
    configs = _split_config(cfg)
    layout = "pipeline" if "*" not in configs else ("peftmodel" if any(
        k.startswith(PEFTMODEL_PREFIX) for k in tensors) else "diffusers")
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        m = _PARAM.match(k)
        if m is None:
            raise AdapterFileError(str(p), f"tensor {k!r} is not a PEFT OFT/BOFT parameter",
                                   "convert PEFT files holding only oft_R / boft_R / boft_s tensors")
        mod = m["path"][len(PEFTMODEL_PREFIX):] if m["path"].startswith(PEFTMODEL_PREFIX) else m["path"]
        groups.setdefault(_component_of(mod, component), {})[m["param"]] = t
    modules = []
    for (comp, mpath), parts in groups.items():
        kind = "oft" if "oft_R.weight" in parts else "boft"
        if kind == "boft":
            if "boft_R" not in parts or "boft_s" not in parts:
                raise AdapterFileError(str(p), f"{mpath}: a BOFT layer needs both boft_R and boft_s",
                                       "the file is incomplete")
            s = parts["boft_s"]
            parts["boft_s"] = s.reshape(-1, 1)  # conv layers store (1, out)
        ccfg = configs.get(comp, configs.get("*", {}))
        if ccfg.get("bias", "none") != "none":
            raise AdapterFileError(str(p), f"was trained with bias={ccfg['bias']!r}: its bias changes are not "
                                   "in the OFT tensors", "retrain with bias='none'")
        modules.append(PeftModule(comp, mpath, kind, {k: v.float() for k, v in parts.items()}, ccfg))
    return PeftAdapter(str(p), layout, modules, {c: v for c, v in configs.items()})


# ------------------------------------------------------------------------------------------- writing
def peft_config(paths: list[str], block_sizes: set[int], block_counts: set[int]) -> dict[str, Any]:
    """A PEFT ``OFTConfig`` (as a dict) for input-side lycoft modules: exact Cayley, one block size (or one
    block count) for all layers, since PEFT's OFT config has no per-layer sizes."""
    if len(block_sizes) == 1:
        r, b = 0, block_sizes.pop()
    elif len(block_counts) == 1:
        r, b = block_counts.pop(), 0
    else:
        raise ValueError(f"PEFT OFT needs one block size or one block count for all layers; this adapter has "
                         f"sizes {sorted(block_sizes)} and counts {sorted(block_counts)}: convert the layers of "
                         "each size separately")
    return {
        "peft_type": "OFT", "task_type": None, "r": r, "oft_block_size": b, "target_modules": sorted(paths),
        "module_dropout": 0.0, "coft": False, "eps": 6e-05, "block_share": False,
        "use_cayley_neumann": False, "num_cayley_neumann_terms": 5, "bias": "none", "fan_in_fan_out": False,
        "init_weights": True, "inference_mode": True, "base_model_name_or_path": None, "revision": None,
        "modules_to_save": None, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
    }


def write_peft(modules: Mapping[str, ModuleSpec], out: str | os.PathLike[str], layout: str = "diffusers"
               ) -> None:
    """Write input-side oft module specs (module path -> spec) as a PEFT OFT adapter.

    layout ``diffusers``: one ``.safetensors`` with bare keys and the config in ``lora_adapter_metadata``
    (``unet.load_lora_adapter``-style, read by PEFT's ``set_peft_model_state_dict``); ``peftmodel``: a
    folder with ``adapter_model.safetensors`` (``base_model.model.<path>``) and ``adapter_config.json``
    (``PeftModel.from_pretrained``).
    """
    tensors: dict[str, torch.Tensor] = {}
    sizes, counts = set(), set()
    for mpath, spec in modules.items():
        if spec.side != "input" or spec.algo != "oft" or spec.rescale is not None:
            raise AdapterFileError(
                f"{spec.key}: PEFT rotates the input side with plain oft; this {spec.side}-side {spec.algo}"
                f"{' with rescale' if spec.rescale is not None else ''} layer has no PEFT form; "
                "use --to diff (full weight differences) for consumers that cannot read it"
            )
        Q = spec.blocks.double() - spec.blocks.double().transpose(-1, -2)
        b = Q.shape[-1]
        rows, cols = torch.triu_indices(b, b, 1)
        prefix = PEFTMODEL_PREFIX if layout == "peftmodel" else ""
        tensors[f"{prefix}{mpath}.oft_R.weight"] = Q[:, rows, cols].float().contiguous()
        sizes.add(b)
        counts.add(Q.shape[0])
    cfg = peft_config(list(modules), sizes, counts)
    if layout == "diffusers":
        save_safetensors_atomic(tensors, out, {METADATA_KEY: json.dumps(cfg, indent=2, sort_keys=True),
                                               "format": "pt"})
        return
    if layout != "peftmodel":
        raise ValueError(f"PEFT layout {layout!r} is not known; use 'diffusers' or 'peftmodel'")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(tensors, folder / WEIGHTS_FILE, {"format": "pt"})
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))
