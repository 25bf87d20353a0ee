"""Which layers of a UNet / text encoder get an adapter: presets, include/exclude regex, overrides.

Targets are picked by module path and layer type, never by class name, so the same rules work on
diffusers models and on kohya sd-scripts' own UNets (diffusers names for SD1/SD2, LDM names for SDXL).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import AdapterConfig
from .layers import SUPPORTED, UnsupportedLayerError, layer_dims
from .naming import UNET_PREFIX, te_prefix, text_encoder_path, to_key

# UNet module-path rules, covering diffusers names and LDM names (kohya's SDXL UNet, ComfyUI keys).
UNET_ATTN = r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
UNET_TRANSFORMER = r"\.(proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)$"
UNET_RESNET = (
    r"\.(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)"
    r"|\d+\.0\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1)"
    r"|middle_block\.[02]\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1))$"
)
UNET_SAMPLERS = r"(downsamplers\.0\.conv|upsamplers\.0\.conv|input_blocks\.\d+\.0\.op|output_blocks\.\d+\.\d+\.conv)$"
UNET_IO = r"^\.(conv_in|conv_out|time_embedding\.linear_[12]|input_blocks\.0\.0|out\.2|time_embed\.[02])$"
TE_ATTN = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"
TE_MLP = r"mlp\.(fc1|fc2)$"

PRESETS: dict[str, dict[str, Any]] = {
    "attn-only": {"unet": [UNET_ATTN], "te": [TE_ATTN], "convs": True},
    "attn-mlp": {"unet": [UNET_ATTN, UNET_TRANSFORMER], "te": [TE_ATTN, TE_MLP], "convs": True},
    "full": {
        "unet": [UNET_ATTN, UNET_TRANSFORMER, UNET_RESNET, UNET_SAMPLERS, UNET_IO],
        "te": [TE_ATTN, TE_MLP],
        "convs": True,
    },
    # everything above except convolutions with a kernel larger than 1x1
    "full-lin": {
        "unet": [UNET_ATTN, UNET_TRANSFORMER, UNET_RESNET, UNET_SAMPLERS, UNET_IO],
        "te": [TE_ATTN, TE_MLP],
        "convs": False,
    },
    "unet-only": {
        "unet": [UNET_ATTN, UNET_TRANSFORMER, UNET_RESNET, UNET_SAMPLERS, UNET_IO],
        "te": [],
        "convs": True,
    },
}


@dataclass
class Target:
    """One layer to adapt: where it lives, its file key and the config it gets."""

    component: str  # "unet", "te1", "te2"
    path: str  # module path inside its component, as named by the model
    key: str  # file key (docs/spec.md, "Key names"), e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    module: nn.Module
    config: AdapterConfig


def _compile(patterns: Iterable[str] | str | None) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"invalid regular expression {p!r}: {e}") from None
    return out


def is_kernel_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and any(k > 1 for k in module.kernel_size)


def apply_overrides(
    config: AdapterConfig,
    names: tuple[str, ...],
    module: nn.Module,
    overrides: Mapping[str, Mapping[str, Any]] | None,
    conv_block_size: int | None,
) -> AdapterConfig:
    """Per-module config: the network default, then `conv_block_size` for kernel convs, then every
    override whose regex matches the module path or key (in the order given; later ones win)."""
    if conv_block_size and is_kernel_conv(module):
        config = config.replace(block_size=conv_block_size, block_num=None)
    for pattern, changes in (overrides or {}).items():
        rx = re.compile(pattern)
        if any(rx.search(n) for n in names):
            changes = dict(changes)
            if "block_size" in changes and "block_num" not in changes:
                changes["block_num"] = None
            if "block_num" in changes and "block_size" not in changes:
                changes["block_size"] = None
            config = config.replace(**changes)
    return config


def select_targets(
    components: Mapping[str, nn.Module],
    key_of: Mapping[str, Any],
    config: AdapterConfig,
    preset: str = "full",
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    conv_block_size: int | None = None,
) -> tuple[list[Target], list[tuple[str, str]]]:
    """Pick the layers to adapt.

    components: ``{"unet": unet, "te1": te, ...}``; key_of: component -> callable(path) -> file key.
    Returns the targets and the skipped layers as ``(key, reason)`` (sizes that do not fit, grouped
    convs...), which the caller reports in one summary line.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not known; use one of {sorted(PRESETS)}")
    rules = PRESETS[preset]
    inc = _compile(include)
    exc = _compile(exclude)
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    for comp, model in components.items():
        pats = _compile(rules["unet"] if comp == "unet" else rules["te"])
        for path, module in model.named_modules():
            if not isinstance(module, SUPPORTED) or not path:
                continue
            key = key_of[comp](path)
            names = (path, key)
            wanted = any(p.search("." + path) for p in pats) and (rules["convs"] or not is_kernel_conv(module))
            if any(p.search(n) for p in inc for n in names):
                wanted = True
            if any(p.search(n) for p in exc for n in names):
                wanted = False
            if not wanted:
                continue
            cfg = apply_overrides(config, names, module, overrides, conv_block_size)
            try:
                out, fan_in, _ = layer_dims(module)
                cfg.layout(out if cfg.side == "output" else fan_in, where=key)
            except (UnsupportedLayerError, ValueError) as e:
                skipped.append((key, str(e)))
                continue
            targets.append(Target(comp, path, key, module, cfg))
    return targets, skipped


def unet_key_function(unet: nn.Module, family: str | None) -> Any:
    """path -> ``lora_unet_<name>``: diffusers names, except SDXL which uses LDM names (kohya convention).

    A UNet whose own modules already carry LDM names (kohya sd-scripts' SDXL UNet) keeps them.
    """
    has_ldm_names = any(n.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for n, _ in
                        unet.named_modules())
    if family != "sdxl" or has_ldm_names:
        return lambda path: to_key(UNET_PREFIX, path)
    from .checkpoints.ldm_keys import UNetLayout, unet_module_path_to_ldm

    layout = UNetLayout.from_config(unet.config)
    return lambda path: to_key(UNET_PREFIX, unet_module_path_to_ldm(path, layout))


def te_key_function(index: int, count: int) -> Any:
    prefix = te_prefix(index, count)
    return lambda path: to_key(prefix, text_encoder_path(path))
