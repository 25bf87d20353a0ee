"""Runs lycoft's webui extension inside one UI's real LoRA code, in a process of its own; prints JSON.

    python tests/webui_worker.py forge|reforge <UI checkout> <work dir>

Each UI is imported as it runs on a CPU (`--always-cpu`), with stand-ins only for modules of its GUI and
webui state (`modules`, `gradio`, `launch`) and for packages of code never run here (`sentencepiece`,
`torchvision`). Its own model classes hold the tiny checkpoints (Forge: `IntegratedUNet2DConditionModel`
from the LDM config of the tiny UNet, `IntegratedCLIP`; reForge: `load_state_dict_guess_config`, see
`comfy_family`). The LoRA path is the UI's: Forge's `networks.load_lora_for_models` + `ModelPatcher`
(`LoraLoader.refresh`, `merge_lora_to_weight`); reForge's `ldm_patched.modules.sd.load_lora_for_models` +
`ModelPatcher.patch_model`. Steps: a LoRA file and an OFT file through the stock UI; the extension installed
as the webui loads it (`scripts/lycoft_oft.py`); the same files again, the OFT file at every strength.
"""

from __future__ import annotations

import contextlib
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
from tiny_files import rel  # noqa: E402
from ui_files import STRENGTHS, checkpoint, mixed_adapter  # noqa: E402

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


# -------------------------------------------------------------------------------------------------- reForge
def reforge(root: Path, work: Path) -> dict:
    sys.path[:0] = [str(root)]
    sys.argv = ["webui", "--always-cpu"]
    import transformers  # noqa: F401

    with stand_ins(("torchvision", "gradio", "launch"), modules=_webui_modules(work)):
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
    from comfy_family import load_checkpoint
    from safetensors.torch import load_file

    if not hasattr(sd1_clip.modeling_utils, "no_init_weights"):
        # reForge pins transformers 4.48, whose CLIPTextModel has the `text_model.` wrapper and whose
        # modeling_utils has no_init_weights; under transformers 5 the class with projection keeps that layout
        from transformers import CLIPTextModelWithProjection

        sd1_clip.CLIPTextModel = CLIPTextModelWithProjection
        sd1_clip.modeling_utils = types.SimpleNamespace(no_init_weights=contextlib.nullcontext)

    ns = types.SimpleNamespace(supported_models=supported_models, supported_models_base=supported_models_base,
                               sd1_clip=sd1_clip, sdxl_clip=sdxl_clip, utils=utils, sd=sd_mod,
                               model_detection=model_detection)

    def weights(model, clip) -> dict[str, torch.Tensor]:
        out = {}
        for patcher, root_module in ((model, model.model), (clip.patcher, clip.cond_stage_model)):
            patcher.patch_model()
            out.update({k: v.detach().clone() for k, v in root_module.state_dict().items()})
            patcher.unpatch_model()
        return out

    def load(model, clip, path, s):
        return sd_mod.load_lora_for_models(model, clip, load_file(path), s, s, filename=str(path))

    results: dict = {"ui": "reforge"}
    for family in FAMILIES:
        model, clip = load_checkpoint(ns, checkpoint(family, work), family, torch.float32, vocab=None)
        held = weights(model, clip)
        keys = lora_mod.model_lora_keys_clip(clip.cond_stage_model, lora_mod.model_lora_keys_unet(model.model, {}))
        adapter, layers = mixed_adapter(family, work, work / f"{family}-lycoft.safetensors")
        lora = lora_file(family, keys, held, work / f"{family}-lora.safetensors")
        specs, _ = read_adapter(str(adapter))
        r = results.setdefault(f"{family}-fp32", {})
        if "installed" not in results:
            stock = weights(*load(model, clip, adapter, 1.0))
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
            r[str(s)] = {"layers": changed, "expected_layers": layers,
                         "worst_rel": compare(got, lycoft_reference(specs, keys, held, s))}
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    ui, root, work = sys.argv[1], Path(sys.argv[2]).resolve(), Path(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    out = {"forge": forge, "reforge": reforge}[ui](root, work)
    print("LYCOFT-RESULT " + json.dumps(out))
