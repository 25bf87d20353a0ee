"""The one source of truth for diffusers <-> LDM (original single-file) naming.

UNet paths are computed from the UNet's config (levels, resnets per level, which levels have
attention), not from hard-coded tables, so the same code serves SD1.x, SD2.x, SDXL and the tiny
builtin models. Layout facts (docs/spec.md, "Key names" and "Checkpoints"):

* ``down_blocks.i.resnets.j`` -> ``input_blocks.{start_i + j}.0``, attentions -> ``.1``, the
  downsampler -> ``input_blocks.{start_i + L_i}.0.op`` with ``start_0 = 1, start_{i+1} = start_i + L_i + 1``
  (``input_blocks.0.0`` is ``conv_in``);
* ``up_blocks.i.resnets.j`` -> ``output_blocks.{ostart_i + j}.0``, attentions -> ``.1``, the upsampler sits
  in the level's last block at ``.2`` when the level has attentions, else ``.1``;
* ``mid_block.resnets.0 / attentions.0 / resnets.1`` -> ``middle_block.0 / 1 / 2``;
* inside resnets ``norm1, conv1, norm2, dropout, conv2, time_emb_proj, conv_shortcut`` ->
  ``in_layers.0, in_layers.2, out_layers.0, out_layers.2, out_layers.3, emb_layers.1, skip_connection``;
  names inside attentions (transformer blocks) are the same on both sides.

Text encoders: "clip" layout keeps transformers names (always with the ``text_model.`` wrapper that
transformers >= 5.6 dropped from ``CLIPTextModel``); "open_clip" (SD2, SDXL TE2) renames and fuses q/k/v
into ``attn.in_proj_weight`` / ``in_proj_bias`` (rows q, k, v in that order) and stores
``text_projection`` transposed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..naming import text_encoder_path
from .families import CLIP, UNET_PREFIX, VAE_PREFIX, family_info

# ----------------------------------------------------------------------------------------------- UNet


@dataclass(frozen=True)
class UNetLayout:
    """The block structure of a diffusers ``UNet2DConditionModel`` that fixes its LDM names.

    Fields:
        down_layers: resnets per down level (diffusers ``layers_per_block``), length n_levels.
        down_attn: whether each down level has attentions (``CrossAttnDownBlock2D``).
        up_layers: resnets per up level (``reversed(layers_per_block) + 1``).
        up_attn: whether each up level has attentions.
        mid_attn: whether the mid block has an attention (``UNetMidBlock2DCrossAttn``).
    """

    down_layers: tuple[int, ...]
    down_attn: tuple[bool, ...]
    up_layers: tuple[int, ...]
    up_attn: tuple[bool, ...]
    mid_attn: bool = True

    @property
    def n_levels(self) -> int:
        return len(self.down_layers)

    @classmethod
    def from_config(cls, config: Any) -> UNetLayout:
        """Layout of a UNet from its config (a dict, a diffusers FrozenDict, or an object with attributes)."""

        def get(key: str, default: Any = None) -> Any:
            if isinstance(config, Mapping):
                return config.get(key, default)
            return getattr(config, key, default)

        down_types = list(get("down_block_types"))
        up_types = list(get("up_block_types"))
        n = len(down_types)
        if len(up_types) != n:
            raise ValueError(
                f"UNet config has {n} down blocks but {len(up_types)} up blocks; they must match"
            )
        lpb = get("layers_per_block", 2)
        down_layers = tuple(int(x) for x in lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * n
        mid_type = get("mid_block_type", "UNetMidBlock2DCrossAttn") or "UNetMidBlock2DCrossAttn"
        if mid_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
            raise ValueError(
                f"unsupported mid_block_type {mid_type!r}; SD/SDXL UNets use UNetMidBlock2DCrossAttn"
            )
        return cls(
            down_layers=down_layers,
            down_attn=tuple("Attn" in t for t in down_types),
            up_layers=tuple(x + 1 for x in reversed(down_layers)),
            up_attn=tuple("Attn" in t for t in up_types),
            mid_attn=mid_type == "UNetMidBlock2DCrossAttn",
        )

    @classmethod
    def for_family(cls, family: str) -> UNetLayout:
        """Layout of the family's real UNet (SD1.5, SD2.1, SDXL base); the tiny models share it."""
        return _family_layout(family)

    def input_start(self, level: int) -> int:
        """LDM ``input_blocks`` index of the first resnet of down level `level`."""
        return 1 + sum(n + 1 for n in self.down_layers[:level])

    def output_start(self, level: int) -> int:
        """LDM ``output_blocks`` index of the first resnet of up level `level`."""
        return sum(self.up_layers[:level])


@functools.cache
def _family_layout(family: str) -> UNetLayout:
    from .bundled import load_component_config

    return UNetLayout.from_config(load_component_config(family_info(family).config, "unet"))


_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "dropout": "out_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_RESNET_FROM_LDM = {v: k for k, v in _RESNET_TO_LDM.items()}

# Top-level modules that exist once; a longer path continues with the same suffix on both sides.
_UNET_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_act": "out.1",
    "conv_out": "out.2",
    "time_embedding": "time_embed",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.act": "time_embed.1",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding": "label_emb.0",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.act": "label_emb.0.1",
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_TOP_FROM_LDM = {v: k for k, v in _UNET_TOP_TO_LDM.items()}


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _resnet_rest_to_ldm(rest: list[str], path: str) -> str:
    if not rest:
        return ""
    head = rest[0]
    if head not in _RESNET_TO_LDM:
        raise ValueError(
            f"{path!r}: resnet child {head!r} has no LDM counterpart (mapped: {', '.join(_RESNET_TO_LDM)})"
        )
    return _join(_RESNET_TO_LDM[head], *rest[1:])


def _resnet_rest_from_ldm(rest: list[str], path: str) -> str:
    if not rest:
        return ""
    for n in (2, 1):
        head = ".".join(rest[:n])
        if len(rest) >= n and head in _RESNET_FROM_LDM:
            return _join(_RESNET_FROM_LDM[head], *rest[n:])
    raise ValueError(
        f"{path!r}: LDM resnet child {'.'.join(rest)!r} has no diffusers counterpart "
        f"(mapped: {', '.join(_RESNET_FROM_LDM)})"
    )


def _index(text: str, path: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{path!r}: expected a block index, got {text!r}")
    return int(text)


def _check_level(level: int, layout: UNetLayout, path: str) -> None:
    if not 0 <= level < layout.n_levels:
        raise ValueError(f"{path!r}: level {level} does not exist in this UNet ({layout.n_levels} levels)")


def unet_module_path_to_ldm(path: str, layout: UNetLayout) -> str:
    """LDM module path (without ``model.diffusion_model.``) of a diffusers UNet module path.

    Example: ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` (SD1.5). Works for every module that owns
    parameters and for the resnet / attention / sampler containers; containers with no single LDM
    counterpart (``down_blocks.0``, a resnet's shared ``nonlinearity``) raise ValueError.
    """
    if path == "":
        return ""
    for top in sorted(_UNET_TOP_TO_LDM, key=len, reverse=True):
        if path == top or path.startswith(top + "."):
            return _UNET_TOP_TO_LDM[top] + path[len(top) :]
    parts = path.split(".")
    head = parts[0]
    if head == "mid_block":
        if len(parts) == 1:
            return "middle_block"
        if len(parts) < 3:
            raise ValueError(f"{path!r}: no LDM counterpart for this container; name a resnet or attention")
        kind, idx = parts[1], _index(parts[2], path)
        if kind == "resnets" and idx in (0, 1):
            block = 0 if idx == 0 else (2 if layout.mid_attn else 1)
            return _join(f"middle_block.{block}", _resnet_rest_to_ldm(parts[3:], path))
        if kind == "attentions" and idx == 0 and layout.mid_attn:
            return _join("middle_block.1", *parts[3:])
        raise ValueError(f"{path!r}: the mid block has no {kind}.{idx}")
    if head in ("down_blocks", "up_blocks"):
        if len(parts) < 4:
            raise ValueError(
                f"{path!r}: no LDM counterpart for this container; name a resnet, attention or sampler"
            )
        level, kind, idx = _index(parts[1], path), parts[2], _index(parts[3], path)
        _check_level(level, layout, path)
        rest = parts[4:]
        if head == "down_blocks":
            n_res = layout.down_layers[level]
            start = layout.input_start(level)
            if kind == "resnets" and idx < n_res:
                return _join(f"input_blocks.{start + idx}.0", _resnet_rest_to_ldm(rest, path))
            if kind == "attentions" and idx < n_res and layout.down_attn[level]:
                return _join(f"input_blocks.{start + idx}.1", *rest)
            if kind == "downsamplers" and idx == 0 and level < layout.n_levels - 1:
                if rest and rest[0] == "conv":
                    rest = ["op", *rest[1:]]
                return _join(f"input_blocks.{start + n_res}.0", *rest)
        else:
            n_res = layout.up_layers[level]
            start = layout.output_start(level)
            if kind == "resnets" and idx < n_res:
                return _join(f"output_blocks.{start + idx}.0", _resnet_rest_to_ldm(rest, path))
            if kind == "attentions" and idx < n_res and layout.up_attn[level]:
                return _join(f"output_blocks.{start + idx}.1", *rest)
            if kind == "upsamplers" and idx == 0 and level < layout.n_levels - 1:
                pos = 2 if layout.up_attn[level] else 1
                return _join(f"output_blocks.{start + n_res - 1}.{pos}", *rest)
        raise ValueError(f"{path!r}: {head}.{level} has no {kind}.{idx} in this UNet layout {layout}")
    raise ValueError(f"{path!r} is not a diffusers UNet2DConditionModel module path with an LDM counterpart")


def unet_ldm_module_path_to_diffusers(path: str, layout: UNetLayout) -> str:
    """Inverse of :func:`unet_module_path_to_ldm`: LDM module path (unprefixed) -> diffusers path."""
    if path == "":
        return ""
    for top in sorted(_UNET_TOP_FROM_LDM, key=len, reverse=True):
        if path == top or path.startswith(top + "."):
            return _UNET_TOP_FROM_LDM[top] + path[len(top) :]
    parts = path.split(".")
    head = parts[0]
    if head == "middle_block":
        if len(parts) == 1:
            return "mid_block"
        block = _index(parts[1], path)
        if block == 0 or block == (2 if layout.mid_attn else 1):
            return _join(
                f"mid_block.resnets.{0 if block == 0 else 1}", _resnet_rest_from_ldm(parts[2:], path)
            )
        if block == 1 and layout.mid_attn:
            return _join("mid_block.attentions.0", *parts[2:])
        raise ValueError(f"{path!r}: the middle block has no child {block}")
    if head in ("input_blocks", "output_blocks"):
        if len(parts) < 3:
            raise ValueError(
                f"{path!r}: no diffusers counterpart for this container; name its .0/.1/.2 child"
            )
        number, pos, rest = _index(parts[1], path), _index(parts[2], path), parts[3:]
        if head == "input_blocks":
            for level in range(layout.n_levels):
                start, n_res = layout.input_start(level), layout.down_layers[level]
                has_down = level < layout.n_levels - 1
                if not start <= number < start + n_res + (1 if has_down else 0):
                    continue
                j = number - start
                if j < n_res and pos == 0:
                    return _join(f"down_blocks.{level}.resnets.{j}", _resnet_rest_from_ldm(rest, path))
                if j < n_res and pos == 1 and layout.down_attn[level]:
                    return _join(f"down_blocks.{level}.attentions.{j}", *rest)
                if j == n_res and pos == 0:
                    if rest and rest[0] == "op":
                        rest = ["conv", *rest[1:]]
                    return _join(f"down_blocks.{level}.downsamplers.0", *rest)
                break
        else:
            for level in range(layout.n_levels):
                start, n_res = layout.output_start(level), layout.up_layers[level]
                if not start <= number < start + n_res:
                    continue
                j = number - start
                up_pos = 2 if layout.up_attn[level] else 1
                if pos == 0:
                    return _join(f"up_blocks.{level}.resnets.{j}", _resnet_rest_from_ldm(rest, path))
                if pos == 1 and layout.up_attn[level]:
                    return _join(f"up_blocks.{level}.attentions.{j}", *rest)
                if pos == up_pos and j == n_res - 1 and level < layout.n_levels - 1:
                    return _join(f"up_blocks.{level}.upsamplers.0", *rest)
                break
        raise ValueError(f"{path!r} does not exist in this UNet layout {layout}")
    raise ValueError(f"{path!r} is not an LDM UNet module path with a diffusers counterpart")


def _split_key(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def unet_state_dict_to_ldm(
    state_dict: Mapping[str, torch.Tensor], layout: UNetLayout
) -> dict[str, torch.Tensor]:
    """Diffusers UNet state dict -> LDM keys (no ``model.diffusion_model.`` prefix); tensors unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, param = _split_key(key)
        new = _join(unet_module_path_to_ldm(module, layout), param)
        if new in out:
            raise ValueError(f"two UNet keys map to {new!r}; the layout {layout} does not fit this UNet")
        out[new] = value
    return out


# ------------------------------------------------------------------------------------------------ VAE

_VAE_ATTN_TO_LDM = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names of diffusers < 0.15, still found in old saved folders
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def vae_module_path_to_ldm(path: str, n_levels: int) -> str:
    """LDM path (without ``first_stage_model.``) of a diffusers ``AutoencoderKL`` module path."""
    parts = path.split(".")
    if parts[0] not in ("encoder", "decoder") or len(parts) == 1:
        return path  # quant_conv, post_quant_conv, encoder/decoder roots keep their names
    side, rest = parts[0], parts[1:]
    if rest[0] == "conv_norm_out":
        return _join(side, "norm_out", *rest[1:])
    if rest[0] in ("down_blocks", "up_blocks") and len(rest) >= 4:
        level = _index(rest[1], path)
        ldm_level = level if rest[0] == "down_blocks" else n_levels - 1 - level
        ldm_side = "down" if rest[0] == "down_blocks" else "up"
        if rest[2] == "resnets":
            tail = ["nin_shortcut" if rest[4:5] == ["conv_shortcut"] else x for x in rest[4:5]] + rest[5:]
            return _join(side, f"{ldm_side}.{ldm_level}.block.{rest[3]}", *tail)
        if rest[2] in ("downsamplers", "upsamplers"):
            sampler = "downsample" if rest[2] == "downsamplers" else "upsample"
            return _join(side, f"{ldm_side}.{ldm_level}.{sampler}", *rest[4:])
    if rest[0] == "mid_block" and len(rest) >= 3:
        idx = _index(rest[2], path)
        if rest[1] == "resnets":
            tail = ["nin_shortcut" if rest[3:4] == ["conv_shortcut"] else x for x in rest[3:4]] + rest[4:]
            return _join(side, f"mid.block_{idx + 1}", *tail)
        if rest[1] == "attentions":
            inner = ".".join(rest[3:])
            for name in sorted(_VAE_ATTN_TO_LDM, key=len, reverse=True):
                if inner == name or inner.startswith(name + "."):
                    inner = _VAE_ATTN_TO_LDM[name] + inner[len(name) :]
                    break
            return _join(side, "mid.attn_1", inner)
    return path


def vae_state_dict_to_ldm(state_dict: Mapping[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    """Diffusers VAE state dict -> LDM keys (no ``first_stage_model.`` prefix).

    The mid-attention q/k/v/proj_out weights are 2-D ``(C, C)`` Linear weights in diffusers and 1x1 convs
    ``(C, C, 1, 1)`` in LDM files, so they are reshaped (a view; no copy).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, param = _split_key(key)
        ldm_module = vae_module_path_to_ldm(module, n_levels)
        if ".mid.attn_1." in f".{ldm_module}." and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[_join(ldm_module, param)] = value
    return out


# -------------------------------------------------------------------------------------- text encoders


text_encoder_module_path = text_encoder_path  # one source of truth: lycoft.naming


def clip_state_dict_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text encoder (SD1, SDXL TE1) state dict -> LDM keys below ``...transformer.``: the transformers
    names, with ``text_model.`` put back where transformers 5 dropped it."""
    return {text_encoder_module_path(k): v for k, v in state_dict.items()}


# OpenCLIP names of one encoder layer's parameters; q/k/v rows are fused in that order.
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_LAYER_FROM_LDM = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
_QKV = ("q_proj", "k_proj", "v_proj")
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",  # stored transposed: (hidden, projection)
}
_OPEN_CLIP_TOP_FROM_LDM = {v: k for k, v in _OPEN_CLIP_TOP.items()}
_LAYER_RE = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_RESBLOCK_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def open_clip_state_dict_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text encoder (SD2, SDXL TE2) state dict -> OpenCLIP LDM keys below ``...model.``.

    q/k/v of layer i are concatenated along rows into ``transformer.resblocks.i.attn.in_proj_weight``
    ``(3h, h)`` / ``in_proj_bias`` ``(3h,)``; ``text_projection`` = ``text_projection.weight.T``
    ``(h, proj)``. The ``position_ids`` buffer is dropped. Unknown keys raise ValueError.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for raw_key, value in state_dict.items():
        key = text_encoder_module_path(raw_key)
        if key.endswith("embeddings.position_ids"):
            continue
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value.T if key == "text_projection.weight" else value
            continue
        match = _LAYER_RE.match(key)
        if match is None:
            raise ValueError(f"text-encoder key {raw_key!r} has no OpenCLIP counterpart")
        layer, module, param = match.groups()
        if module.startswith("self_attn.") and module.split(".", 1)[1] in _QKV:
            fused.setdefault(f"transformer.resblocks.{layer}.attn.in_proj_{param}", {})[module[10:]] = value
        elif module in _OPEN_CLIP_LAYER:
            out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = value
        else:
            raise ValueError(f"text-encoder key {raw_key!r} has no OpenCLIP counterpart")
    for key, parts in fused.items():
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise ValueError(f"cannot fuse {key}: the state dict lacks {', '.join(missing)}")
        out[key] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


# ------------------------------------------------------------------------------- whole checkpoints


def pipeline_to_ldm_state_dict(pipe: Any, family: str) -> dict[str, torch.Tensor]:
    """Full single-file LDM state dict (UNet, VAE, text encoders, with the family's prefixes) of a diffusers
    ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``. Tensors share storage with the models."""
    info = family_info(family)
    out: dict[str, torch.Tensor] = {}
    layout = UNetLayout.from_config(pipe.unet.config)
    for k, v in unet_state_dict_to_ldm(pipe.unet.state_dict(), layout).items():
        out[UNET_PREFIX + k] = v
    n_levels = len(pipe.vae.config.block_out_channels)
    for k, v in vae_state_dict_to_ldm(pipe.vae.state_dict(), n_levels).items():
        out[VAE_PREFIX + k] = v
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if len(info.text_prefixes) > 1 else [])
    for encoder, prefix, kind in zip(encoders, info.text_prefixes, info.text_kinds):
        if encoder is None:
            raise ValueError(f"the pipeline has no text encoder for {prefix!r}; family {family!r} needs it")
        convert = clip_state_dict_to_ldm if kind == CLIP else open_clip_state_dict_to_ldm
        for k, v in convert(encoder.state_dict()).items():
            out[prefix + k] = v
    return out


# ----------------------------------------------------------------------- LDM key -> module (streaming)


@dataclass(frozen=True)
class ModuleTarget:
    """Where (part of) one single-file tensor lives in the diffusers / adapter world.

    Fields:
        component: ``"unet"``, ``"te1"`` (SD1/SD2 text encoder, SDXL CLIP-L) or ``"te2"`` (SDXL OpenCLIP-G).
        module: module path inside that component: diffusers names for the UNet
            (``down_blocks.1.attentions.0.proj_in``), the ``text_model.``-wrapped transformers names for
            text encoders (``text_model.encoder.layers.3.self_attn.k_proj``; ``text_projection``).
        param: parameter name on that module (``weight``, ``bias``).
        chunk: for fused tensors, which of `chunks` equal row blocks of the LDM tensor (dim 0) belongs to
            `module`; None when the whole tensor does.
        chunks: number of equal row blocks (3 for an OpenCLIP ``in_proj_weight``/``in_proj_bias``).
        transposed: the LDM tensor is the module parameter transposed (OpenCLIP ``text_projection``).
    """

    component: str
    module: str
    param: str
    chunk: int | None = None
    chunks: int = 1
    transposed: bool = False

    def rows(self, n_rows: int) -> slice:
        """Rows (dim 0) of the LDM tensor with `n_rows` rows that hold this module's parameter."""
        if self.chunk is None:
            return slice(0, n_rows)
        if n_rows % self.chunks:
            raise ValueError(f"{n_rows} rows cannot be split in {self.chunks} equal parts for {self.module}")
        size = n_rows // self.chunks
        return slice(self.chunk * size, (self.chunk + 1) * size)


def _open_clip_key_to_targets(rest: str, component: str) -> list[ModuleTarget]:
    if rest in _OPEN_CLIP_TOP_FROM_LDM:
        module, param = _split_key(_OPEN_CLIP_TOP_FROM_LDM[rest])
        return [ModuleTarget(component, module, param, transposed=rest == "text_projection")]
    match = _RESBLOCK_RE.match(rest)
    if match is None:
        return []  # logit_scale, attn_mask and other non-parameters of OpenCLIP
    layer, inner = match.groups()
    base = f"text_model.encoder.layers.{layer}"
    if inner in ("attn.in_proj_weight", "attn.in_proj_bias"):
        param = inner.rsplit("_", 1)[1]
        return [
            ModuleTarget(component, f"{base}.self_attn.{name}", param, chunk=i, chunks=3)
            for i, name in enumerate(_QKV)
        ]
    module, param = _split_key(inner)
    if module not in _OPEN_CLIP_LAYER_FROM_LDM:
        raise ValueError(f"OpenCLIP key {rest!r} has no transformers counterpart")
    return [ModuleTarget(component, f"{base}.{_OPEN_CLIP_LAYER_FROM_LDM[module]}", param)]


def ldm_key_to_modules(key: str, family: str, layout: UNetLayout | None = None) -> list[ModuleTarget]:
    """Which diffusers / adapter module(s) a single-file checkpoint tensor belongs to.

    Contract:
        * UNet keys (``model.diffusion_model.``) -> one target, component ``"unet"``, diffusers module
          path (mapped with `layout`, default: the family's real UNet layout, which the tiny models share).
        * CLIP text-encoder keys -> one target (``te1``/``te2``), module in ``text_model.`` form.
        * OpenCLIP ``attn.in_proj_weight`` / ``in_proj_bias`` -> three targets, ``self_attn.q_proj``,
          ``k_proj``, ``v_proj`` with ``chunk`` 0, 1, 2 of ``chunks=3`` row blocks (``target.rows(n)``);
          ``text_projection`` -> module ``text_projection``, ``transposed=True``.
        * Keys no adapter can touch -> ``[]``: VAE, EMA copies, buffers (``position_ids``), OpenCLIP
          ``logit_scale`` / ``attn_mask``, unknown top-level keys.
        * A key under a known prefix that does not fit the layout raises ValueError.
    SD2 files carry a 24th OpenCLIP layer that diffusers drops: it maps to ``layers.23``, which the
    diffusers text encoder does not have (so no adapter will match it).
    """
    info = family_info(family)
    if key.startswith(UNET_PREFIX):
        module, param = _split_key(key[len(UNET_PREFIX) :])
        layout = layout or UNetLayout.for_family(family)
        return [ModuleTarget("unet", unet_ldm_module_path_to_diffusers(module, layout), param)]
    for component, prefix, kind in zip(info.text_components, info.text_prefixes, info.text_kinds):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if kind != CLIP:
            return _open_clip_key_to_targets(rest, component)
        module, param = _split_key(text_encoder_module_path(rest))
        if param == "position_ids":
            return []
        return [ModuleTarget(component, module, param)]
    return []
