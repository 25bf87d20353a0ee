"""A set of adapters attached to a UNet and its text encoders: inject or load, multiplier, merge, remove, save.

Adapters are attached by patching each base layer's ``forward`` (the kohya/LyCORIS way), so the model
keeps its modules and state-dict names; the adapters' parameters live in this `Network` module. `load`
attaches a file's modules (specs read by `lycoft.formats`) to the layers their keys name; the tensors a
network writes and reads are `lycoft.network_files`' job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .checkpoints.families import TEXT_ENCODER_COMPONENTS
from .checkpoints.families import detect_family_from_models as detect_family
from .config import AdapterConfig
from .formats.lycoris import ModuleSpec, read_adapter
from .io.errors import AdapterFileError
from .layers import SUPPORTED, OFTLayer, layer_dims
from .naming import UNET_PREFIX, to_key
from .network_files import copy_into, load_into_network, save_network
from .ops import check_multiplier
from .rotations import RotationCache
from .targets import Target, check_preset, select_targets, te_key_function, unet_key_function

log = logging.getLogger("lycoft")


def _components(unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str):
    comps: dict[str, nn.Module] = {}
    key_of: dict[str, Any] = {}
    if unet is not None:
        comps["unet"] = unet
        key_of["unet"] = unet_key_function(unet, family)
    for i, te in enumerate(text_encoders):
        comps[f"te{i + 1}"] = te
        key_of[f"te{i + 1}"] = te_key_function(i, len(text_encoders))
    return comps, key_of


class Network(nn.Module):
    """The adapters of one model, keyed by their file key (``lora_unet_...``, ``lora_te_...``)."""

    def __init__(self, family: str, config: AdapterConfig | None = None, preset: str | None = None) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.preset = preset
        self.adapters = nn.ModuleDict()
        self.components: dict[str, str] = {}  # key -> "unet" | "te1" | "te2"
        self.skipped: list[tuple[str, str]] = []
        self._patched: dict[str, tuple[nn.Module, Any]] = {}
        self.multiplier = 1.0
        self.rotations = RotationCache(self.adapters, self.components)

    # -- building -------------------------------------------------------------------------------------
    def add(self, target: Target, layout=None) -> OFTLayer:
        layer = OFTLayer(target.module, target.config, name=target.key, register_base=False, layout=layout)
        if target.key in self.adapters:
            raise ValueError(f"duplicate adapter key {target.key}: two modules map to the same name")
        self.adapters[target.key] = layer
        layer.rotation_cache = self.rotations
        self.components[target.key] = target.component
        return layer

    def apply(self) -> Network:
        """Route each base layer's forward through its adapter (idempotent; all or nothing)."""
        for key, layer in self.adapters.items():
            previous = layer.base.__dict__.get("forward")
            if key not in self._patched and isinstance(getattr(previous, "__self__", None), OFTLayer):
                raise ValueError(
                    f"{key}: this layer already carries an adapter from another network; stacking would "
                    "silently replace it. Merge the first one into the weights (net.merge()) or remove it first"
                )
        for key, layer in self.adapters.items():
            if key in self._patched:
                continue
            base = layer.base
            self._patched[key] = (base, base.__dict__.get("forward"))
            base.forward = layer.forward
            layer.rotation_cache = self.rotations
        return self

    def remove(self) -> None:
        """Detach every adapter: the model computes exactly what it did before `inject`."""
        for base, previous in self._patched.values():
            if previous is None:
                base.__dict__.pop("forward", None)
            else:
                base.forward = previous
        self._patched.clear()

    @property
    def applied(self) -> bool:
        return bool(self._patched)

    # -- runtime --------------------------------------------------------------------------------------
    def set_multiplier(self, multiplier: float, component: str | None = None) -> None:
        """Strength of every adapter (or of one component: ``"unet"``, ``"te1"``...). 0 gives the base model.
        A strength that is not a finite number is refused (ValueError)."""
        multiplier = check_multiplier(multiplier)
        if component is None:
            self.multiplier = multiplier
        for key, layer in self.adapters.items():
            if component is None or self.components[key] == component:
                layer.multiplier = multiplier

    def enable(self, on: bool = True) -> None:
        for layer in self.adapters.values():
            layer.enabled = on

    @torch.no_grad()
    def merge(self, multiplier: float | None = None) -> None:
        """Bake the adapters into the model weights (in place) and detach them."""
        if multiplier is not None:
            multiplier = check_multiplier(multiplier)
        for layer in self.adapters.values():
            W = layer.base.weight
            W.copy_(layer.merged_weight(multiplier).to(W.dtype))
        self.remove()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.adapters.values() for p in layer.adapter_parameters()]

    def parameter_groups(self, lrs: Mapping[str, float | None], default_lr: float) -> list[dict]:
        """Optimizer groups per component (``{"unet": lr, "te1": lr, ...}``; None -> default_lr)."""
        groups = []
        for comp in sorted(set(self.components.values())):
            params = [p for k, layer in self.adapters.items() if self.components[k] == comp
                      for p in layer.adapter_parameters()]
            if params:
                lr = lrs.get(comp)
                groups.append({"params": params, "lr": default_lr if lr is None else lr, "name": comp})
        return groups

    def items(self, component: str | None = None) -> Iterable[tuple[str, OFTLayer]]:
        for key, layer in self.adapters.items():
            if component is None or self.components[key] == component:
                yield key, layer

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for comp in self.components.values():
            counts[comp] = counts.get(comp, 0) + 1
        params = sum(p.numel() for p in self.trainable_parameters())
        parts = ", ".join(f"{c}: {n}" for c, n in sorted(counts.items()))
        return f"{len(self.adapters)} adapted layers ({parts}), {params:,} trainable parameters"

    # -- files ----------------------------------------------------------------------------------------
    def save(self, path: str, metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
             output_name: str | None = None) -> None:
        """Write the LyCORIS layout (docs/spec.md, "The adapter file") atomically; see `lycoft.network_files`."""
        save_network(self, path, metadata=metadata, dtype=dtype, output_name=output_name)

    def load_file(self, path: str, strict: bool = True) -> list[str]:
        """Load an adapter file into this network's existing adapters (same keys and shapes)."""
        return load_into_network(self, path, strict=strict)


def inject(
    unet: nn.Module | None = None,
    text_encoders: Sequence[nn.Module] | nn.Module | None = None,
    config: AdapterConfig | None = None,
    preset: str = "full",
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    conv_block_size: int | None = None,
    family: str | None = None,
    multiplier: float = 1.0,
    pipe: Any = None,
    network_class: type[Network] = Network,
    apply: bool = True,
) -> Network:
    """Attach fresh (identity) adapters to a UNet and/or text encoders and return the `Network`.

    preset: ``attn-only``, ``attn-mlp``, ``full`` (default: + resnet convs, samplers, conv_in/out, time
    embedding), ``full-lin`` (full without kernel>1 convs) or ``unet-only``. ``include``/``exclude`` are
    regexes searched in the module path (``down_blocks.0.attentions.0.proj_in``) and in the file key
    (``lora_unet_down_blocks_0_attentions_0_proj_in``). ``overrides`` maps a regex to AdapterConfig
    fields for the matching layers (e.g. ``{"conv": {"block_size": 16}}``); ``conv_block_size`` is the
    shorthand for kernel > 1 convolutions. Layers that cannot take the requested sizes are skipped and
    named in one log line. ``pipe``: a diffusers pipeline instead of unet/text_encoders.
    ``NetworkOptions.inject_kwargs()`` gives every selection argument from ``key=value`` options.
    ``network_class``: a `Network` subclass to build (kohya's entry points); ``apply=False`` builds the
    adapters without routing the model through them yet.
    """
    check_multiplier(multiplier)
    unet, tes = _resolve_models(unet, text_encoders, pipe)
    config = config or AdapterConfig()
    family = family or detect_family(unet, tes)
    check_preset(preset, family)
    comps, key_of = _components(unet, tes, family)
    targets, skipped = select_targets(comps, key_of, config, preset, include, exclude, overrides,
                                      conv_block_size)
    if not targets and skipped:
        raise ValueError(_nothing_fits(comps, key_of, config, preset, skipped))
    if not targets:
        raise ValueError(
            f"no layer matched preset {preset!r} with include={include!r} exclude={exclude!r}; "
            "check the regexes against the module names (model.named_modules())"
        )
    net = network_class(family, config, preset)
    for t in targets:
        net.add(t)
    net.skipped = skipped
    if skipped:
        names = ", ".join(k for k, _ in skipped[:8]) + (" ..." if len(skipped) > 8 else "")
        log.warning("lycoft: skipped %d layer(s) that cannot take the requested adapter: %s (first reason: %s)",
                    len(skipped), names, skipped[0][1])
    net.set_multiplier(multiplier)
    return net.apply() if apply else net


def _nothing_fits(comps: Mapping[str, nn.Module], key_of: Mapping[str, Any], config: AdapterConfig, preset: str,
                  skipped: Sequence[tuple[str, str]]) -> str:
    """Why every selected layer was skipped: for a block size that divides no width, the sizes that fit most
    of them (a few layers, such as a 4-channel conv_out, fit only tiny ones); else the first layer's reason."""
    head = f"no layer of preset {preset!r} can take this adapter (all {len(skipped)} it selects were skipped)"
    reason = skipped[0][1]
    if "does not divide" not in reason or config.block_num is not None:
        return f"{head}: {reason}"
    keys = {k for k, _ in skipped}
    widths = []
    for comp, model in comps.items():
        for path, module in model.named_modules():
            if path and isinstance(module, SUPPORTED) and key_of[comp](path) in keys:
                out, fan_in, _ = layer_dims(module)
                widths.append(out if config.side == "output" else fan_in)
    fits = {b: sum(w % b == 0 for w in widths) for b in range(2, 129, 2 if config.algo == "boft" else 1)}
    best = sorted(b for b, n in fits.items() if n * 2 >= len(widths))[-6:]
    distinct = sorted(set(widths))
    shown = ", ".join(map(str, distinct[:8])) + (" ..." if len(distinct) > 8 else "")
    return (f"{head}: {reason.split(' does not divide')[0]} divides none of their widths ({shown}); use a block "
            f"size that fits most of them: {', '.join(map(str, best)) or '1'}")


def _resolve_models(unet, text_encoders, pipe) -> tuple[nn.Module | None, list[nn.Module]]:
    if pipe is not None:
        unet = unet or getattr(pipe, "unet", None)
        if text_encoders is None:
            text_encoders = [m for m in (getattr(pipe, c, None) for c in TEXT_ENCODER_COMPONENTS) if m is not None]
    if text_encoders is None:
        tes: list[nn.Module] = []
    elif isinstance(text_encoders, nn.Module):
        tes = [text_encoders]
    else:
        tes = [t for t in text_encoders if t is not None]
    if unet is None and not tes:
        raise ValueError("nothing to adapt: pass unet=..., text_encoders=[...] or pipe=...")
    return unet, tes


def candidate_index(unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str
                    ) -> dict[str, tuple[str, str, nn.Module]]:
    """Every adaptable layer under each key spelling a file may use -> (component, path, module).

    Primary spellings are those `inject` writes; aliases accept the other UNet vocabulary (diffusers vs
    LDM names), the transformers-5 text-encoder names without ``text_model_`` and ``lora_te1_`` for a
    single encoder.
    """
    index: dict[str, tuple[str, str, nn.Module]] = {}
    comps, key_of = _components(unet, text_encoders, family)
    ldm = None
    if unet is not None and hasattr(unet, "config") and "block_out_channels" in dict(unet.config):
        try:
            from .checkpoints.ldm_keys import UNetLayout, unet_module_path_to_ldm

            layout = UNetLayout.from_config(unet.config)
            ldm = (layout, unet_module_path_to_ldm)
        except (ImportError, KeyError, ValueError):
            ldm = None
    for comp, model in comps.items():
        for path, module in model.named_modules():
            if not path or not isinstance(module, SUPPORTED):
                continue
            entry = (comp, path, module)
            keys = [key_of[comp](path)]
            if comp == "unet":
                keys.append(to_key(UNET_PREFIX, path))
                if ldm is not None:
                    try:
                        keys.append(to_key(UNET_PREFIX, ldm[1](path, ldm[0])))
                    except (KeyError, ValueError):
                        pass
            else:
                flat = path[len("text_model."):] if path.startswith("text_model.") else path
                prefix = keys[0].split("_text_model_")[0] if "_text_model_" in keys[0] else None
                if prefix:
                    keys.append(to_key(prefix, flat))
                    if prefix == "lora_te":
                        keys.append(to_key("lora_te1", "text_model." + flat))
            for k in keys:
                index.setdefault(k, entry)
    return index


def load(
    path: str,
    unet: nn.Module | None = None,
    text_encoders: Sequence[nn.Module] | nn.Module | None = None,
    multiplier: float = 1.0,
    family: str | None = None,
    pipe: Any = None,
    allow_partial: bool = False,
) -> Network:
    """Read an adapter file and attach it to the model; returns the applied `Network`."""
    check_multiplier(multiplier)
    unet, tes = _resolve_models(unet, text_encoders, pipe)
    specs, metadata = read_adapter(path)
    net = Network(family or metadata.get("lycoft.family") or detect_family(unet, tes))
    attach_specs(net, specs, unet, tes, path, allow_partial)
    net.set_multiplier(multiplier)
    return net.apply()


def attach_specs(net: Network, specs: Mapping[str, ModuleSpec], unet: nn.Module | None,
                 text_encoders: Sequence[nn.Module], path: str = "<tensors>", allow_partial: bool = False,
                 settings: Mapping[str, Any] | None = None) -> None:
    """Create one adapter per file module on the layer it names and copy the file's values into it.

    Keys that match no layer are an error naming them, unless ``allow_partial`` (then a warning; still an
    error when nothing matches). A layer of another width is always an error. ``settings``: `AdapterConfig`
    fields that replace the file's for every module (options a file does not fix, such as dropout to train
    with).
    """
    index = candidate_index(unet, text_encoders, net.family)
    unmatched: list[str] = []
    for key, spec in specs.items():
        hit = index.get(key)
        if hit is None:
            unmatched.append(key)
            continue
        comp, mpath, module = hit
        dim = _module_dim(module, spec.side)
        if spec.layout_dim != dim:
            raise AdapterFileError(
                f"{path}: {key} rotates {spec.layout_dim} channels ({tuple(spec.blocks.shape)}) but "
                f"{comp} layer {mpath} has {dim}; the adapter was trained for another model or family"
            )
        config = spec.config().replace(**settings) if settings else spec.config()
        layer = net.add(Target(comp, mpath, key, module, config), layout=spec.layout())
        copy_into(layer, spec)
    if unmatched:
        shown = ", ".join(unmatched[:10]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 10 else "")
        msg = f"{path}: {len(unmatched)} of {len(specs)} adapter keys match no layer of the model: {shown}"
        if not allow_partial or len(unmatched) == len(specs):
            raise AdapterFileError(msg + "; check the model family (sd1/sd2/sdxl) or pass allow_partial=True")
        log.warning("lycoft: %s (ignored: allow_partial)", msg)


def _module_dim(module: nn.Module, side: str) -> int:
    out, fan_in, _ = layer_dims(module)
    return out if side == "output" else fan_in
