"""Runs lycoft's webui extension inside one UI's real LoRA code, in a process of its own; prints JSON.

    python tests/webui_worker.py forge|reforge|forge_classic|a1111 <UI checkout> <work dir>

Each UI is imported as it runs on a CPU (`--always-cpu`), with stand-ins only for modules of its GUI and
webui state (`modules`, `gradio`, `launch`) and for packages of code never run here (`sentencepiece`,
`torchvision`). Its own model classes hold the tiny checkpoints (Forge: `IntegratedUNet2DConditionModel`
from the LDM config of the tiny UNet, `IntegratedCLIP`; reForge: `load_state_dict_guess_config`, Forge
Classic: `load_checkpoint_guess_config`, see `comfy_family`). The LoRA path is the UI's: Forge's
`networks.load_lora_for_models` + `ModelPatcher` (`LoraLoader.refresh`, `merge_lora_to_weight`); reForge's
and Forge Classic's `ldm_patched.modules.sd.load_lora_for_models` + `ModelPatcher.patch_model` (Forge
Classic: the file read by its Lora extension's `networks.load_lora_state_dict`); A1111's Lora extension
(`networks.load_networks` + `network_apply_weights`, see `a1111`). Steps: a LoRA file and an OFT file
through the stock UI; the extension installed as the webui loads it (`scripts/lycoft_oft.py`); the same
files again, the OFT file at every strength.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import runpy
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / "extensions" / "sd-webui-lycoft"
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from stand_ins import Dummy, stand_ins  # noqa: E402
from tiny_files import rel, write_adapter  # noqa: E402
from ui_files import STRENGTHS, checkpoint, mixed_adapter  # noqa: E402

import lycoft  # noqa: E402
from lycoft.convert import convert_adapter  # noqa: E402
from lycoft.formats.lycoris import read_adapter  # noqa: E402
from lycoft.merge import apply_spec  # noqa: E402

FAMILIES = ("sd1", "sdxl")


class _Options:
    """`modules.shared.opts` of a webui: every option unset."""

    def __getattr__(self, name: str) -> None:
        return None


class _WebuiModule(types.ModuleType):
    """A module of the webui's GUI and state: unknown attributes are inert dummies."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        return Dummy()


def _webui_modules(work: Path) -> dict[str, types.ModuleType]:
    """`modules` (the webui's GUI and state) with the few values the LoRA code reads at import."""
    out = {"modules": _WebuiModule("modules")}
    out["modules"].__path__ = []
    for name in ("shared", "sd_models", "errors", "scripts", "hashes", "cache", "devices", "paths",
                 "script_callbacks", "extra_networks", "ui_extra_networks", "sd_hijack", "shared_cmd_options"):
        module = _WebuiModule(f"modules.{name}")
        setattr(out["modules"], name, module)
        out[f"modules.{name}"] = module
    shared = out["modules.shared"]
    shared.opts = _Options()
    shared.cmd_opts = types.SimpleNamespace(lora_dir=str(work / "loras"), lyco_dir_backcompat=str(work / "loras"))
    shared.walk_files = lambda *args, **kwargs: []
    return out


def install_extension() -> None:
    """Load the extension's script as the webui loads extension scripts (the extension folder on sys.path)."""
    sys.path.insert(0, str(EXTENSION))
    try:
        runpy.run_path(str(EXTENSION / "scripts" / "lycoft_oft.py"), run_name="lycoft_oft")
    finally:
        sys.path.remove(str(EXTENSION))


def lora_file(family: str, keys: dict, weights: dict, out: Path) -> Path:
    """A stock LoRA file (kohya names) on every 2-D / 4-D layer the key map names."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, target in keys.items():
        if not name.startswith(("lora_unet_", "lora_te")) or not isinstance(target, str) or target not in weights:
            continue
        W = weights[target]
        if W.dim() not in (2, 4):
            continue
        tensors[f"{name}.lora_down.weight"] = torch.randn((4, W.shape[1], *W.shape[2:]), generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn((W.shape[0], 4, *([1] * (W.dim() - 2))), generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, out)
    return out


def lycoft_reference(specs: dict, keys: dict, held: dict, strength: float) -> dict[str, torch.Tensor]:
    """lycoft's merge (tools/merge.py's per-weight function, float32) of the weights the UI holds."""
    return {keys[k]: apply_spec(held[keys[k]], spec, strength) for k, spec in specs.items()}


def compare(got: dict, ref: dict) -> float:
    return max(rel(got[k].float(), ref[k]) for k in ref)


# --------------------------------------------------------------------------------------------------- Forge
def ldm_unet_config(diffusers: dict) -> dict:
    """The LDM UNet config (Forge's `IntegratedUNet2DConditionModel` arguments) of a diffusers UNet config."""
    channels = diffusers["block_out_channels"]
    levels = len(channels)
    nrb = diffusers["layers_per_block"]
    per = diffusers.get("transformer_layers_per_block", 1)
    per = [per] * levels if isinstance(per, int) else list(per)
    depth = [per[i] if "CrossAttn" in t else 0 for i, t in enumerate(diffusers["down_block_types"])]
    cfg = {
        "in_channels": diffusers["in_channels"], "out_channels": diffusers["out_channels"],
        "model_channels": channels[0], "channel_mult": [c // channels[0] for c in channels],
        "num_res_blocks": [nrb] * levels, "transformer_depth": [d for d in depth for _ in range(nrb)],
        "transformer_depth_output": [d for d in depth for _ in range(nrb + 1)],
        "transformer_depth_middle": per[-1], "context_dim": diffusers["cross_attention_dim"],
        "use_linear_in_transformer": diffusers.get("use_linear_projection", False),
        "use_spatial_transformer": True, "num_heads": 2, "num_head_channels": -1,
    }
    if diffusers.get("addition_embed_type") == "text_time":
        cfg.update(num_classes="sequential", adm_in_channels=diffusers["projection_class_embeddings_input_dim"])
    return cfg


def forge(root: Path, work: Path) -> dict:
    sys.path[:0] = [str(root), str(root / "packages_3rdparty"), str(root / "extensions-builtin" / "sd_forge_lora")]
    sys.argv = ["webui", "--always-cpu"]
    import transformers  # noqa: F401  (before the stand-ins: it probes optional packages)

    with stand_ins(("sentencepiece", "gradio"), modules=_webui_modules(work)):
        import backend.patcher.lora as forge_lora
        import networks
        from backend.modules.k_model import KModel
        from backend.nn.clip import IntegratedCLIP
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.patcher.clip import CLIP
        from backend.patcher.unet import UnetPatcher
    from diffusers import DDPMScheduler, EulerDiscreteScheduler
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lycoft.checkpoints import build_tiny_pipeline
    from lycoft.checkpoints.bundled import load_component_config

    def build(family: str, dtype: torch.dtype):
        name = f"tiny-{family}"
        unet = IntegratedUNet2DConditionModel(**ldm_unet_config(load_component_config(name, "unet")))
        ckpt = load_file(checkpoint(family, work))
        unet.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in ckpt.items()
                              if k.startswith("model.diffusion_model.")}, strict=True)
        unet.to(dtype)
        unet.storage_dtype, unet.computation_dtype = dtype, torch.float32
        sched = (DDPMScheduler if family == "sd1" else EulerDiscreteScheduler).from_config(
            load_component_config(name, "scheduler"))
        repo = "runwayml/stable-diffusion-v1-5" if family == "sd1" else "stabilityai/stable-diffusion-xl-base-1.0"
        kmodel = KModel(unet, sched, config=types.SimpleNamespace(huggingface_repo=repo))
        patcher = UnetPatcher(kmodel, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        pipe = build_tiny_pipeline(family)
        encoders = {}
        for clip_name, te in (("clip_l", pipe.text_encoder), ("clip_g", getattr(pipe, "text_encoder_2", None))):
            if te is None:
                continue
            # Forge pins transformers 4.46, whose CLIPTextModel keeps `text_model.`; under transformers 5 the
            # class with projection has that layout
            model = IntegratedCLIP(CLIPTextModelWithProjection, CLIPTextConfig(**te.config.to_dict()))
            sd = {("" if k.startswith("text_") else "text_model.") + k: v for k, v in te.state_dict().items()}
            model.transformer.load_state_dict(sd, strict=False)
            encoders[clip_name] = model.to(dtype)
        return patcher, CLIP(model_dict=encoders, tokenizer_dict={})

    def weights(unet, clip) -> dict[str, torch.Tensor]:
        unet.refresh_loras()
        clip.patcher.refresh_loras()
        out = {**{k: v.detach().clone() for k, v in unet.model.state_dict().items()},
               **{k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}}
        return out

    results: dict = {"ui": "forge"}
    for family in FAMILIES:
        for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            unet, clip = build(family, dtype)
            held = weights(unet, clip)
            keys = {**forge_lora.model_lora_keys_unet(unet.model, {}), **forge_lora.model_lora_keys_clip(
                clip.cond_stage_model, {})}
            adapter, layers = mixed_adapter(family, work, work / f"{family}-lycoft.safetensors")
            lora = lora_file(family, keys, held, work / f"{family}-lora.safetensors")
            r = results.setdefault(f"{family}-{dtype_name}", {})
            if "installed" not in results:
                u2, c2 = networks.load_lora_for_models(unet, clip, networks.load_lora_state_dict(str(adapter)),
                                                       1.0, 1.0, filename=str(adapter))
                r["stock_oft_dropped"] = u2 is unet and c2 is clip
                stock_lora = weights(*networks.load_lora_for_models(
                    unet, clip, networks.load_lora_state_dict(str(lora)), 0.7, 0.7, filename=str(lora)))
                install_extension()
                results["installed"] = True
                ext_lora = weights(*networks.load_lora_for_models(
                    unet, clip, networks.load_lora_state_dict(str(lora)), 0.7, 0.7, filename=str(lora)))
                r["lora_unchanged"] = all(torch.equal(stock_lora[k], ext_lora[k]) for k in stock_lora)
            specs, _ = read_adapter(str(adapter))
            for s in STRENGTHS:
                u2, c2 = networks.load_lora_for_models(unet, clip, networks.load_lora_state_dict(str(adapter)), s, s,
                                                       filename=str(adapter))
                got = weights(u2, c2)
                changed = sum(not torch.equal(got[k], held[k]) for k in held)
                ref = lycoft_reference(specs, keys, held, s)
                r[str(s)] = {"layers": changed, "expected_layers": layers, "worst_rel": compare(got, ref),
                             "rounding": max(rel(ref[k].to(dtype).float(), ref[k]) for k in ref)}
            weights(unet, clip)  # back to the base
    return results


# ----------------------------------------------------------------------------------- reForge, Forge Classic
def reforge(root: Path, work: Path) -> dict:
    """reForge: its OFT adapters (ComfyUI's), then lycoft's; float32 and float16 models."""
    return ldm_patched_ui("reforge", root, work)


def forge_classic(root: Path, work: Path) -> dict:
    """Forge Classic (Forge 1's `ldm_patched`, no OFT loader), through its Lora extension's
    `networks.load_lora_state_dict` and `load_lora_for_models`; float32 and float16 models (its
    `--clip-in-fp32` / `--unet-in-fp16 --clip-in-fp16`)."""
    return ldm_patched_ui("forge_classic", root, work)


def ldm_patched_ui(ui: str, root: Path, work: Path) -> dict:
    classic = ui == "forge_classic"
    sys.path[:0] = [str(root)] + ([str(root / "extensions-builtin" / "Lora")] if classic else [])
    sys.argv = ["webui", "--always-cpu"]
    import transformers  # noqa: F401

    modules = _webui_modules(work)
    if classic:  # Forge 1's ldm_patched imports these webui modules too
        for name in ("safe", "sd_vae_taesd", "paths_internal", "modelloader"):
            modules[f"modules.{name}"] = _WebuiModule(f"modules.{name}")
            setattr(modules["modules"], name, modules[f"modules.{name}"])
    with stand_ins(("torchvision", "gradio", "launch"), modules=modules):
        import ldm_patched.modules.args_parser as args_parser

        args_parser.args.always_cpu = True
        import ldm_patched.modules.lora as lora_mod
        import ldm_patched.modules.model_detection as model_detection
        import ldm_patched.modules.sd as sd_mod
        import ldm_patched.modules.sd1_clip as sd1_clip
        import ldm_patched.modules.sdxl_clip as sdxl_clip
        import ldm_patched.modules.supported_models as supported_models
        import ldm_patched.modules.supported_models_base as supported_models_base
        import ldm_patched.modules.utils as utils

        networks = importlib.import_module("networks") if classic else None
    from comfy_family import load_checkpoint
    from safetensors.torch import load_file

    if not hasattr(sd1_clip.modeling_utils, "no_init_weights"):
        # reForge pins transformers 4.48 (Forge Classic 4.46), whose CLIPTextModel has the `text_model.`
        # wrapper and whose modeling_utils has no_init_weights; under transformers 5 the class with projection
        # keeps that layout
        from transformers import CLIPTextModelWithProjection

        sd1_clip.CLIPTextModel = CLIPTextModelWithProjection
        sd1_clip.modeling_utils = types.SimpleNamespace(no_init_weights=contextlib.nullcontext)

    ns = types.SimpleNamespace(supported_models=supported_models, supported_models_base=supported_models_base,
                               sd1_clip=sd1_clip, sdxl_clip=sdxl_clip, utils=utils, sd=sd_mod,
                               model_detection=model_detection, args=args_parser.args)

    def weights(model, clip) -> dict[str, torch.Tensor]:
        out = {}
        for patcher, root_module in ((model, model.model), (clip.patcher, clip.cond_stage_model)):
            patcher.patch_model()
            out.update({k: v.detach().clone() for k, v in root_module.state_dict().items()})
            patcher.unpatch_model()
        return out

    def load(model, clip, path, s):
        # Forge Classic's Lora extension reads the file with its cached `load_lora_state_dict`
        sd = networks.load_lora_state_dict(str(path)) if classic else load_file(path)
        return sd_mod.load_lora_for_models(model, clip, sd, s, s, filename=str(path))

    results: dict = {"ui": ui}
    for family in FAMILIES:
        for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            model, clip = load_checkpoint(ns, checkpoint(family, work), family, dtype, vocab=None)
            held = weights(model, clip)
            keys = lora_mod.model_lora_keys_clip(clip.cond_stage_model,
                                                 lora_mod.model_lora_keys_unet(model.model, {}))
            adapter, layers = mixed_adapter(family, work, work / f"{family}-lycoft.safetensors")
            lora = lora_file(family, keys, held, work / f"{family}-lora.safetensors")
            specs, _ = read_adapter(str(adapter))
            r = results.setdefault(f"{family}-{dtype_name}", {})
            if "installed" not in results:
                stock_model, stock_clip = load(model, clip, adapter, 1.0)
                if classic:
                    r["stock_oft_dropped"] = stock_model is model and stock_clip is clip
                else:
                    stock = weights(stock_model, stock_clip)
                    r["stock_oft_s1_worst_rel"] = compare(stock, lycoft_reference(specs, keys, held, 1.0))
                    ui_safe = work / f"{family}-lycoft-ui.safetensors"
                    convert_adapter(str(adapter), str(ui_safe), "lycoris", ui_safe=True, force=True)
                    stock = weights(*load(model, clip, ui_safe, 1.0))
                    r["stock_ui_safe_s1_worst_rel"] = compare(stock, lycoft_reference(specs, keys, held, 1.0))
                stock_lora = weights(*load(model, clip, lora, 0.7))
                install_extension()
                results["installed"] = True
                ext_lora = weights(*load(model, clip, lora, 0.7))
                r["lora_unchanged"] = all(torch.equal(stock_lora[k], ext_lora[k]) for k in stock_lora)
            for s in STRENGTHS:
                got = weights(*load(model, clip, adapter, s))
                changed = sum(not torch.equal(got[k], held[k]) for k in held)
                ref = lycoft_reference(specs, keys, held, s)
                r[str(s)] = {"layers": changed, "expected_layers": layers, "worst_rel": compare(got, ref),
                             "rounding": max(rel(ref[k].to(held[k].dtype).float(), ref[k]) for k in ref),
                             "dtypes": sorted({str(held[k].dtype) for k in ref})}
    return results


# --------------------------------------------------------------------------------------------------- A1111
class _A1111Options:
    """`modules.shared.opts` of A1111 with the Lora extension's defaults (weights merged, not "functional")."""

    lora_functional = False
    lora_in_memory_limit = 0
    lora_not_found_warning_console = False
    lora_not_found_gradio_warning = False
    lora_bundled_ti_to_infotext = True
    lora_preferred_name = "Alias from file"

    def __getattr__(self, name: str) -> None:
        return None


def _a1111_modules(work: Path, lora_dir: Path, errors: list) -> dict[str, types.ModuleType]:
    """The `modules` A1111's Lora code imports, with the few functions it calls on them."""
    import os

    from safetensors.torch import load_file

    from lycoft.ui.state import safetensors_metadata

    out = _webui_modules(work)
    for name in ("cache", "patches", "models", "models.sd3", "models.sd3.mmdit", "textual_inversion",
                 "textual_inversion.textual_inversion"):
        module = _WebuiModule(f"modules.{name}")
        module.__path__ = []
        out[f"modules.{name}"] = module
        parent, _, leaf = f"modules.{name}".rpartition(".")
        setattr(out[parent], leaf, module)
    shared = out["modules.shared"]
    shared.opts = _A1111Options()
    shared.cmd_opts = types.SimpleNamespace(lora_dir=str(lora_dir), lyco_dir_backcompat=str(lora_dir))
    shared.walk_files = lambda path, allowed_extensions: [str(p) for p in sorted(Path(path).iterdir())
                                                          if p.suffix in allowed_extensions]
    cpu = torch.device("cpu")
    out["modules.devices"].__dict__.update(cpu=cpu, device=cpu, dtype=torch.float32, torch_gc=lambda: None,
                                           cond_cast_unet=lambda x: x)
    # modules.sd_models.read_state_dict also renames checkpoint keys; a LoRA file has none of those
    out["modules.sd_models"].__dict__.update(read_state_dict=lambda filename, *a, **k: load_file(filename),
                                             read_metadata_from_safetensors=safetensors_metadata)
    out["modules.cache"].cached_data_for_file = lambda subsection, title, filename, func: func()
    out["modules.hashes"].__dict__.update(sha256_from_cache=lambda *a, **k: None, sha256=lambda *a, **k: "")
    out["modules.errors"].__dict__.update(display=lambda e, task, **k: errors.append(f"{task}: {e!r}"),
                                          report=lambda message, **k: errors.append(message))
    out["modules.sd_hijack"].model_hijack = types.SimpleNamespace(
        comments=[], embedding_db=types.SimpleNamespace(word_embeddings={}, expected_shape=-1))

    class QkvLinear(torch.nn.Linear):
        pass

    out["modules.models.sd3.mmdit"].QkvLinear = QkvLinear

    def patch(key, obj, field, replacement):
        original = getattr(obj, field)
        setattr(obj, field, replacement)
        return original

    out["modules.patches"].patch = patch
    del os
    return out


def _a1111_extension_stand_ins(lora_code: Path) -> dict[str, types.ModuleType]:
    """Module types A1111's `networks` imports and a test never gives a layer (LoHa, IA3, LoKr, full, norm,
    GLoRA) and `lora_logger`, for the files of the Lora extension that `lora_code` lacks."""
    out = {}
    for name, cls in (("network_hada", "ModuleTypeHada"), ("network_ia3", "ModuleTypeIa3"),
                      ("network_lokr", "ModuleTypeLokr"), ("network_full", "ModuleTypeFull"),
                      ("network_norm", "ModuleTypeNorm"), ("network_glora", "ModuleTypeGLora")):
        if not (lora_code / f"{name}.py").exists():
            module = types.ModuleType(name)
            setattr(module, cls, type(cls, (), {"create_module": lambda self, net, weights: None}))
            out[name] = module
    if not (lora_code / "lora_logger.py").exists():
        import logging

        out["lora_logger"] = types.SimpleNamespace(logger=logging.getLogger("lora"))
    return out


def _module_tree(sd: dict[str, torch.Tensor], prefix: str) -> torch.nn.Module:
    """The Linear / Conv2d layers of a checkpoint's weights under `prefix`, under their names in the LDM model
    (what A1111's `assign_network_names_to_compvis_modules` walks), holding those weights."""
    root = torch.nn.Module()
    for key, W in sd.items():
        if not key.startswith(prefix) or not key.endswith(".weight") or W.dim() not in (2, 4):
            continue
        path = key[len(prefix):-len(".weight")]
        if path.endswith("embedding"):
            continue
        bias = sd.get(f"{prefix}{path}.bias")
        if W.dim() == 2:
            layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
        else:
            layer = torch.nn.Conv2d(W.shape[1], W.shape[0], tuple(W.shape[2:]), bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(W)
            if bias is not None:
                layer.bias.copy_(bias)
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    return root.requires_grad_(False)  # as A1111 holds its models


def a1111(root: Path, work: Path) -> dict:
    """A1111's Lora extension (`extensions-builtin/Lora` of `root`) on the tiny SD1 checkpoint: its LDM UNet
    and CLIP layers (`_module_tree`) as `shared.sd_model`; `networks.load_networks([name], [m], [m])` (what
    `<lora:name:m>` calls) and `networks.network_apply_weights` on every layer (what their forward calls)."""
    from safetensors.torch import load_file, save_file

    lora_code = root / "extensions-builtin" / "Lora"
    lora_dir = work / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    sys.path[:0] = [str(lora_code)]
    ckpt = load_file(checkpoint("sd1", work))
    sd_model = types.SimpleNamespace(is_sdxl=False, model=_module_tree(ckpt, "model."),
                                     cond_stage_model=types.SimpleNamespace(
                                         wrapped=_module_tree(ckpt, "cond_stage_model.")))
    modules = _a1111_modules(work, lora_dir, errors)
    modules["modules.shared"].sd_model = sd_model
    with stand_ins(("gradio",), modules={**modules, **_a1111_extension_stand_ins(lora_code)}):
        import lora_patches
        import networks
    networks.originals = lora_patches.LoraPatches()
    networks.extra_network_lora = types.SimpleNamespace(errors={})
    networks.assign_network_names_to_compvis_modules(sd_model)
    layers_of = {name: m for name, m in sd_model.network_layer_mapping.items()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    held = {name: m.weight.detach().clone() for name, m in layers_of.items()}

    adapter, layers = mixed_adapter("sd1", work, lora_dir / "lycoft_sd1.safetensors")
    write_adapter("sd1", lycoft.AdapterConfig(block_size=4), lora_dir / "oft_sd1.safetensors", seed=4)
    # input side: `oft_R.weight` layers (the layout of PEFT and kohya oft_v2), kohya names
    write_adapter("sd1", lycoft.AdapterConfig(block_size=4, side="input"), lora_dir / "input_sd1.safetensors",
                  seed=5, preset="attn-mlp")
    specs = {name: read_adapter(str(lora_dir / f"{name}.safetensors"))[0]
             for name in ("lycoft_sd1", "oft_sd1", "input_sd1")}
    tensors = load_file(adapter)
    legacy = {k.replace("lora_unet_", "oft_unet_", 1).replace("lora_te_", "oft_te_", 1): v for k, v in tensors.items()}
    save_file(legacy, lora_dir / "legacy_sd1.safetensors")  # kohya legacy spelling, SD1 diffusers names
    specs["legacy_sd1"] = specs["lycoft_sd1"]  # A1111 sees it under the names the extension renames it to
    g = torch.Generator().manual_seed(3)
    lora = {}
    for prefix in specs["lycoft_sd1"]:
        W = held[networks.convert_diffusers_name_to_compvis(prefix, False)]
        lora[f"{prefix}.lora_down.weight"] = torch.randn((4, W.shape[1], *W.shape[2:]), generator=g) * 0.1
        lora[f"{prefix}.lora_up.weight"] = torch.randn((W.shape[0], 4, *([1] * (W.dim() - 2))), generator=g) * 0.1
        lora[f"{prefix}.alpha"] = torch.tensor(2.0)
    save_file(lora, lora_dir / "lora_sd1.safetensors")

    def apply(name: str, m: float) -> tuple[dict[str, torch.Tensor], dict]:
        networks.load_networks([name], [m], [m], [None])
        for layer in layers_of.values():
            networks.network_apply_weights(layer)
        modules = networks.loaded_networks[0].modules if networks.loaded_networks else {}
        return {k: layer.weight.detach().clone() for k, layer in layers_of.items()}, modules

    def kind(spec) -> str:
        return spec.algo + ("+rescale" if spec.rescale is not None else "")

    def against_lycoft(name: str, m: float) -> dict:
        got, modules = apply(name, m)
        by_prefix = {mod.network_key.partition(".")[0]: sd_key for sd_key, mod in modules.items()}
        out = {"layers": sum(not torch.equal(got[k], held[k]) for k in held), "expected_layers": len(specs[name]),
               "module_types": sorted({type(mod).__name__ for mod in modules.values()})}
        for p, spec in specs[name].items():
            if p in by_prefix:
                k = by_prefix[p]
                err = rel(got[k].float(), apply_spec(held[k], spec, m))
                out[f"worst_rel {kind(spec)}"] = max(out.get(f"worst_rel {kind(spec)}", 0.0), err)
        out["worst_rel"] = max((v for k, v in out.items() if k.startswith("worst_rel ")), default=None)
        return out

    results: dict = {"ui": "a1111", "sd1-fp32": {}}
    r = results["sd1-fp32"]
    for m in (1.0, 0.5):
        r[f"stock {m}"] = against_lycoft("lycoft_sd1", m)
    r["stock legacy layers"] = len(apply("legacy_sd1", 1.0)[1])
    r["stock input-side layers"] = len(apply("input_sd1", 1.0)[1])
    r["stock errors"] = list(errors)
    errors.clear()
    stock_lora, _ = apply("lora_sd1", 0.7)
    networks.networks_in_memory.clear()  # loaded with the stock module types before the extension was there
    install_extension()
    r["module_types"] = [type(t).__name__ for t in networks.module_types]
    ext_lora, _ = apply("lora_sd1", 0.7)
    r["lora_unchanged"] = all(torch.equal(stock_lora[k], ext_lora[k]) for k in stock_lora)
    for s in STRENGTHS:
        r[str(s)] = {name: against_lycoft(name, s) for name in ("lycoft_sd1", "oft_sd1", "legacy_sd1", "input_sd1")}
    networks.load_networks([], [], [], [])
    for layer in layers_of.values():
        networks.network_apply_weights(layer)
    r["restored"] = all(torch.equal(layers_of[k].weight, held[k]) for k in held)
    r["errors"] = errors
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    ui, root, work = sys.argv[1], Path(sys.argv[2]).resolve(), Path(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    out = {"forge": forge, "reforge": reforge, "forge_classic": forge_classic, "a1111": a1111}[ui](root, work)
    print("LYCOFT-RESULT " + json.dumps(out))
