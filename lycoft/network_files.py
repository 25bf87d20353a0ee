"""A live network's adapters to and from adapter files: the tensors and metadata they write (the LyCORIS
layout of `lycoft.formats.lycoris`), and a file's values copied back into their parameters.

`lycoft.network` stands on this room (`Network.save`, `Network.load_file`, `lycoft.load`), so the arrow
runs one way: a network here is any object with the `Network` fields read (``adapters``, ``family``,
``config``, ``preset``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import torch
from torch import nn

from ._version import __version__
from .checkpoints.families import FAMILY_INFO, MODELSPEC_VERSION, SD1, modelspec_architecture, ss_base_model_version
from .compatibility import rescaled_oft_advice
from .config import AdapterConfig, NetworkOptions
from .formats.lycoris import ALPHA_FLOOR, ALPHA_MARGIN, ModuleSpec, read_adapter
from .io.errors import AdapterFileError
from .io.safe_io import save_safetensors_atomic
from .layers import OFTLayer
from .ops import constraint_scale, skew

log = logging.getLogger("lycoft")


# -- writing ----------------------------------------------------------------------------------------------
def layer_tensors(layer: OFTLayer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The file tensors of one adapter (suffix -> tensor), constraint baked into the stored blocks."""
    if layer.side != "output":
        return _input_side_tensors(layer, dtype)
    A = layer.oft_blocks.detach().float()
    if layer.constraint > 0:
        A = A * constraint_scale(skew(A), layer.constraint * layer.layout.dim)
    stored = A.to(dtype or layer.oft_blocks.dtype).contiguous()
    # float64: blocks near float32's limit (a diverging run) must not give an inf alpha, which
    # readers refuse as non-finite; capped at float32's max, which no consumer's clamp ever reaches.
    norm = float(torch.linalg.vector_norm(skew(stored.double())))
    alpha = min(norm * (1.0 + ALPHA_MARGIN) + ALPHA_FLOOR, torch.finfo(torch.float32).max)
    out = {
        "oft_blocks": stored,
        "alpha": torch.tensor(alpha, dtype=torch.float32),
    }
    if layer.rescale is not None:
        out["rescale"] = layer.rescale.detach().to(dtype or layer.rescale.dtype).contiguous()
    return out


def _input_side_tensors(layer: OFTLayer, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Input-side oft is written as PEFT's upper-triangle vector (``oft_R.weight``), never ``oft_blocks``.

    PEFT's exact rotation is ``(I - S)(I + S)^-1`` per block with ``W' = W blockdiag(R_peft)^T``; ours is
    ``W M^T`` with ``M = blockdiag(C(Q)^T)`` and ``C(Q)^T = (I - Q)(I + Q)^-1``, so ``S = Q``.
    """
    if layer.is_boft or layer.rescale is not None:
        raise AdapterFileError(
            f"{layer.name}: input-side boft or rescale has no file format any consumer reads; "
            "train with side='output', or export full weight differences (tools/convert.py --to diff)"
        )
    Q = layer.skew_blocks().detach()
    b = Q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1)
    return {"oft_R.weight": Q[:, rows, cols].to(dtype or torch.float32).contiguous()}


def network_metadata(net: nn.Module, output_name: str | None = None, v_prediction: bool = False
                     ) -> dict[str, str]:
    """kohya ``ss_*``, SAI ``modelspec.*`` and ``lycoft.*`` metadata (all strings) of a `Network`."""
    cfg = net.config or AdapterConfig()
    layers = list(net.adapters.values())
    first = layers[0].layout if layers else None
    algo = "diag-oft" if (first is None or first.algo == "oft") else "boft"
    # the option schema's writer; algo (in LyCORIS' spelling) and preset are always stated
    args = {"algo": algo, "preset": str(net.preset or "custom")} | NetworkOptions.describe(cfg).to_strings()
    args["algo"] = algo
    info = FAMILY_INFO.get(net.family, FAMILY_INFO[SD1])
    md = {
        "ss_network_module": "lycoft.kohya",
        "ss_network_dim": str(first.block_size if first else ""),
        "ss_network_alpha": str(cfg.constraint),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": ss_base_model_version(info.name, v_prediction),
        "ss_v2": str(info.ss_v2),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(info.name, v_prediction, adapter="lora"),
        "modelspec.implementation": info.modelspec_implementation,
        "lycoft.version": __version__,
        "lycoft.algo": first.algo if first else "oft",
        "lycoft.block_sizes": json.dumps(sorted({layer.layout.block_size for layer in layers})),
        "lycoft.side": cfg.side,
        "lycoft.constraint": str(cfg.constraint),
        "lycoft.family": net.family,
        "lycoft.cayley": "exact" if cfg.neumann_terms == 0 else f"neumann{cfg.neumann_terms}",
    }
    if output_name:
        md["ss_output_name"] = output_name
        md["modelspec.title"] = output_name
    return md


def network_tensors(net: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, layer in net.adapters.items():
        for suffix, t in layer_tensors(layer, dtype).items():
            out[f"{key}.{suffix}"] = t
    return out


def save_network(net: nn.Module, path: str, metadata: Mapping[str, str] | None = None,
                 dtype: torch.dtype | None = None, output_name: str | None = None,
                 v_prediction: bool = False, warn_ui: bool = True) -> None:
    """Atomic write of the adapter file; user metadata (e.g. kohya's ``ss_*``) wins over ours. `warn_ui`: log
    which stock UIs misread the file, if any do (`lycoft.compatibility.rescaled_oft_advice`)."""
    md = network_metadata(net, output_name, v_prediction)
    for k, v in (metadata or {}).items():
        md[str(k)] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    if warn_ui and any(layer.rescale is not None and not layer.is_boft for layer in net.adapters.values()):
        log.warning("lycoft: %s", rescaled_oft_advice(path))
    save_safetensors_atomic(network_tensors(net, dtype), path, md)


# -- reading ----------------------------------------------------------------------------------------------
def copy_into(layer: OFTLayer, spec: ModuleSpec) -> None:
    """Overwrite a layer's parameters with a file module's values (same shapes)."""
    with torch.no_grad():
        layer.oft_blocks.copy_(spec.blocks.to(layer.oft_blocks.dtype))
        if spec.rescale is not None:
            layer.rescale.copy_(spec.rescale.reshape(layer.rescale.shape).to(layer.rescale.dtype))


def load_into_network(net: nn.Module, path: str, strict: bool = True) -> list[str]:
    """Load a file into an existing network (same keys and shapes): kohya's ``load_weights``."""
    specs, _ = read_adapter(path)
    missing = []
    for key, spec in specs.items():
        layer = net.adapters[key] if key in net.adapters else None
        if layer is None:
            missing.append(key)
            continue
        if tuple(layer.oft_blocks.shape) != tuple(spec.blocks.shape) or layer.side != spec.side:
            raise AdapterFileError(f"{path}: {key} has shape {tuple(spec.blocks.shape)}, the network expects "
                                   f"{tuple(layer.oft_blocks.shape)}; use the same algo and block size")
        if (spec.rescale is None) != (layer.rescale is None):
            raise AdapterFileError(f"{path}: {key}: rescale present in one of file/network but not the other")
        copy_into(layer, spec)
    if missing and strict:
        raise AdapterFileError(f"{path}: keys {missing[:10]} are not in the network")
    return missing
