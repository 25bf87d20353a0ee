"""tools/convert.py: every conversion is a round trip or an equivalence with the program that reads the other
format (PEFT applying a PEFT file, the real LyCORIS loader reading a .diff, the kohya/A1111 formulas)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from consumers import a1111_merge, comfy_merge, kohya_legacy_merge
from safetensors.torch import load_file, save_file
from tiny_files import (
    layer_of,
    model_outputs,
    rel,
    shared_files,
    write_adapter,
)

import lycoft
from lycoft.convert import convert_adapter
from lycoft.formats.lycoris import ModuleSpec, oft_as_one_stage_butterfly
from lycoft.io import AdapterFileError, read_safetensors
from lycoft.ops import cayley, skew

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
PEFT_TARGETS = ["to_q", "to_k", "to_out.0", "proj_in", "conv1"]  # linear, 1x1 conv (SD1 proj_in), 3x3 conv



@pytest.fixture
def files():
    return shared_files


def fresh(f):
    return copy.deepcopy(f["pipe"])


# -- LyCORIS legacy layouts --------------------------------------------------------------------------
def test_kohya_legacy_to_lycoris(tmp_path, files):
    f = files("sd1")
    pipe = fresh(f)
    g = torch.Generator().manual_seed(0)
    paths = ["down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "up_blocks_1_resnets_0_conv1"]
    tensors = {}
    for p in paths:  # kohya networks.oft: dim = number of blocks (4), alpha = constraint (default 1e-3)
        out = layer_of(pipe, "sd1")["lora_unet_" + p].weight.shape[0]
        tensors[f"oft_unet_{p}.oft_blocks"] = torch.randn(4, out // 4, out // 4, generator=g) * 0.2
        tensors[f"oft_unet_{p}.alpha"] = torch.tensor(1e-3)
    src, out = tmp_path / "kohya.safetensors", tmp_path / "lyco.safetensors"
    save_file(tensors, src, {"ss_network_module": "networks.oft"})
    report = convert_adapter(str(src), str(out), "lycoris")
    assert report.flavour == "kohya-legacy" and any("block_size > block_num" in n for n in report.notes)
    converted, meta = read_safetensors(out)
    heads = sorted(k.partition(".")[0] for k in converted if k.endswith("oft_blocks"))
    assert heads == ["lora_unet_" + p for p in paths]
    assert meta["ss_network_module"] == "lycoft.kohya" and meta["lycoft.family"] == "sd1"
    assert meta["lycoft.converted_from"] == "kohya-legacy: kohya.safetensors"
    net = lycoft.load(str(out), pipe=pipe)
    layers = layer_of(pipe, "sd1")
    for p in paths:
        W = layers["lora_unet_" + p].weight.detach()
        kohya = kohya_legacy_merge(W, tensors[f"oft_unet_{p}.oft_blocks"], 1e-3)
        assert rel(net.adapters["lora_unet_" + p].merged_weight(), kohya) <= TOL
        # ComfyUI reads the converted file as kohya meant it (it ignored the original's oft_unet_ prefix)
        A, alpha = converted[f"lora_unet_{p}.oft_blocks"], float(converted[f"lora_unet_{p}.alpha"])
        assert rel(comfy_merge(W, A, alpha), kohya) <= TOL


def test_lycoris_2_oft_diag_to_lycoris_is_the_exact_inverse_cayley(tmp_path, files):
    f = files("sd1")
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
    R = cayley(skew(torch.randn(16, 4, 4, dtype=torch.float64) * 0.3))
    src, out = tmp_path / "v20.safetensors", tmp_path / "lyco.safetensors"
    save_file({f"{key}.oft_diag": R.float().contiguous()}, src)
    assert convert_adapter(str(src), str(out), "lycoris").flavour == "lycoris-2.0"
    A = load_file(out)[f"{key}.oft_blocks"]
    assert rel(cayley(skew(A.double())), R) <= 1e-6
    pipe = fresh(f)
    W = layer_of(pipe, "sd1")[key].weight.detach().double()
    I = torch.eye(4, dtype=torch.float64)
    for m in (1.0, 0.5):  # A1111 reads oft_diag as R itself: (m R + (1 - m) I)^T W per block
        ref = torch.cat([(m * R[k] + (1 - m) * I).T @ W[4 * k:4 * k + 4] for k in range(16)])
        net = lycoft.load(str(out), pipe=pipe, multiplier=m)
        assert rel(net.adapters[key].merged_weight(), ref) <= TOL
        net.remove()


# -- PEFT ------------------------------------------------------------------------------------------------
def _peft_unet(f, cfg_cls, seed=0, **kw):
    """A fresh UNet with a random PEFT adapter (diffusers add_adapter)."""
    unet = copy.deepcopy(f["pipe"].unet)
    unet.add_adapter(cfg_cls(target_modules=PEFT_TARGETS, init_weights=False, **kw))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "oft_R" in name or "boft_R" in name:
                p.normal_(0, 0.05)
    return unet


def _peft_merged_weights(unet) -> dict[str, torch.Tensor]:
    """PEFT's own merge of every adapted layer, by module path."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            out[name] = module.get_base_layer().weight.detach().clone()
    return out


@pytest.mark.parametrize("neumann", [False, True])
def test_peft_oft_diffusers_layout_to_lycoft_and_back(tmp_path, files, neumann):
    f = files("sd1")
    unet = _peft_unet(f, _oft_config(), r=0, oft_block_size=4, use_cayley_neumann=neumann)
    unet.save_lora_adapter(str(tmp_path / "peft"))
    src = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    peft_weights = _peft_merged_weights(unet)
    out = tmp_path / "lycoft.safetensors"
    report = convert_adapter(str(src), str(out), "lycoris")
    assert report.flavour == "peft-oft" and report.layers == len(peft_weights)
    assert any("use_cayley_neumann=True" in n for n in report.notes) == neumann
    pipe = fresh(f)
    net = lycoft.load(str(out), pipe=pipe)
    layers = {k: v for k, v in net.adapters.items()}
    worst = max(rel(layers["lora_unet_" + p.replace(".", "_")].merged_weight(), w) for p, w in peft_weights.items())
    if not neumann:
        assert worst <= TOL  # PEFT applied by PEFT == the converted adapter applied by lycoft
        # whole UNet: PEFT's merged model against lycoft on the fly
        pipe_peft = fresh(f)
        pipe_peft.unet = unet
        assert rel(model_outputs(pipe, "sd1")["unet"], model_outputs(pipe_peft, "sd1")["unet"]) <= 1e-4
        # and back: lycoft input side -> PEFT file with the same numbers
        back = tmp_path / "back.safetensors"
        convert_adapter(str(out), str(back), "peft")
        assert load_file(back).keys() == load_file(src).keys()
        assert all(torch.allclose(load_file(back)[k], load_file(src)[k], atol=1e-7) for k in load_file(src))
    else:
        # the exact rotation the 5-term series approximates: close, not equal (the note says how close)
        assert 1e-6 < worst < 0.05
        diff = tmp_path / "peft.diff.safetensors"
        convert_adapter(str(src), str(diff), "diff", base=str(f["single-file"]))
        d = load_file(diff)
        base = layer_of(fresh(f), "sd1")
        for p, w in peft_weights.items():
            key = "lora_unet_" + p.replace(".", "_")
            assert rel(base[key].weight.detach() + d[key + ".diff"], w) <= TOL


def _oft_config():
    from peft import OFTConfig

    return OFTConfig


def test_lycoft_input_side_to_peft_loaded_by_peft(tmp_path, files):
    """Both PEFT layouts, read back by PEFT's own loaders, merge to lycoft's weights."""
    from peft import PeftConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict

    f = files("sd1")
    src = write_adapter("sd1", lycoft.AdapterConfig(block_size=4, side="input"), tmp_path / "in.safetensors",
                        pipe=fresh(f), preset="unet-only", include=None, exclude=r"conv|time_emb|proj_in")
    pipe = fresh(f)
    net = lycoft.load(str(src), pipe=pipe)
    ours = {k: layer.merged_weight().detach() for k, layer in net.adapters.items()}

    out = tmp_path / "peft.safetensors"
    convert_adapter(str(src), str(out), "peft")
    tensors, meta = read_safetensors(out)
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["use_cayley_neumann"] is False and cfg["oft_block_size"] == 4
    unet = copy.deepcopy(f["pipe"].unet)
    inject_adapter_in_model(PeftConfig.from_peft_type(**cfg), unet)
    result = set_peft_model_state_dict(unet, tensors)
    assert not [k for k in result.unexpected_keys if "oft_R" in k]
    merged = _peft_merged_weights(unet)
    assert len(merged) == len(ours)
    assert max(rel(w, ours["lora_unet_" + p.replace(".", "_")]) for p, w in merged.items()) <= TOL

    folder = tmp_path / "peftmodel"
    convert_adapter(str(src), str(folder), "peft", peft_layout="peftmodel")
    model = PeftModel.from_pretrained(copy.deepcopy(f["pipe"].unet), str(folder)).merge_and_unload()
    for p in merged:
        w = model.get_submodule(p).weight.detach()
        assert rel(w, ours["lora_unet_" + p.replace(".", "_")]) <= TOL
    # a PeftModel folder converts back to the same lycoft file
    again = tmp_path / "again.safetensors"
    convert_adapter(str(folder), str(again), "lycoris")
    a, b = load_file(src), load_file(again)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_peft_boft_to_full_differences(tmp_path, files):
    from peft import BOFTConfig

    f = files("sd1")
    unet = _peft_unet(f, BOFTConfig, boft_block_size=4)
    unet.save_lora_adapter(str(tmp_path / "peft"))
    src = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    peft_weights = _peft_merged_weights(unet)
    with pytest.raises(AdapterFileError, match="BOFT.*--to diff"):
        convert_adapter(str(src), str(tmp_path / "x.safetensors"), "lycoris")
    out = tmp_path / "boft.diff.safetensors"
    report = convert_adapter(str(src), str(out), "diff", base=str(f["single-file"]))
    assert report.flavour == "peft-boft" and report.layers == len(peft_weights)
    d = load_file(out)
    base = layer_of(fresh(f), "sd1")
    for p, w in peft_weights.items():
        key = "lora_unet_" + p.replace(".", "_")
        assert rel(base[key].weight.detach() + d[key + ".diff"], w) <= TOL


# -- full differences ----------------------------------------------------------------------------------
@pytest.fixture
def lycoris_without_timestep_embedding(monkeypatch):
    """lycoris-lora 4.1.3 lists TimestepEmbedding in its UNet targets and then creates time_embedding.linear_1
    twice on a diffusers UNet (docs/spec.md, "LyCORIS"); the documented workaround."""
    from lycoris.kohya import LycorisNetworkKohya

    targets = [t for t in LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE if t != "TimestepEmbedding"]
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_MODULE", targets)


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_diff_loaded_by_the_real_lycoris_loader_equals_our_merge(tmp_path, files, lycoris_without_timestep_embedding,
                                                                multiplier):
    from lycoris.kohya import create_network_from_weights

    f = files("sd1")
    out = tmp_path / "b.diff.safetensors"
    convert_adapter(str(f["b"]), str(out), "diff", base=str(f["single-file"]), multiplier=multiplier)
    pipe = fresh(f)
    lyco, _ = create_network_from_weights(1.0, str(out), None, pipe.text_encoder, pipe.unet)
    modules = {m.lora_name: m for m in lyco.unet_loras}
    ours = lycoft.load(str(f["b"]), pipe=fresh(f), multiplier=multiplier)
    unet_keys = [k for k in ours.adapters if k.startswith("lora_unet_")]
    assert len(modules) == len(unet_keys)  # boft with rescale on every UNet layer, read as LyCORIS 'full'
    worst = max(rel(modules[k].get_merged_weight(multiplier=1.0)[0], ours.adapters[k].merged_weight())
                for k in unet_keys)
    assert worst <= TOL


def test_diff_of_sd2_fused_text_encoder_and_diffusers_base(tmp_path, files):
    f = files("sd2")
    d_single, d_dir = tmp_path / "s.diff.safetensors", tmp_path / "d.diff.safetensors"
    convert_adapter(str(f["a"]), str(d_single), "diff", base=str(f["single-file"]))
    convert_adapter(str(f["a"]), str(d_dir), "diff", base=str(f["diffusers"]))
    a, b = load_file(d_single), load_file(d_dir)
    assert a.keys() == b.keys() and "lora_te_text_model_encoder_layers_0_self_attn_v_proj.diff" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    net = lycoft.load(str(f["a"]), pipe=fresh(f))
    for key, layer in net.adapters.items():
        W = layer.base.weight.detach()
        assert rel(W + a[key + ".diff"], layer.merged_weight()) <= TOL


# -- --ui-safe: rescaled oft as one-stage butterflies ------------------------------------------------
RESCALED_OFT = lycoft.AdapterConfig(block_size=4, rescale=True, constraint=1e-3)


@pytest.fixture
def ui_safe_pair(tmp_path, files):
    """A rescaled, constrained oft adapter (every layer but conv_out, whose one block of 4 LyCORIS cannot
    rebuild as oft) and its --ui-safe conversion."""
    f = files("sd1")
    src = write_adapter("sd1", RESCALED_OFT, tmp_path / "r.safetensors", pipe=fresh(f), exclude=r"conv_out$")
    out = tmp_path / "r-ui.safetensors"
    report = convert_adapter(str(src), str(out), "lycoris", ui_safe=True)
    return f, src, out, report


def test_ui_safe_is_the_same_adapter_for_lycoft_at_every_strength(ui_safe_pair):
    """Every rescaled oft layer becomes a one-stage butterfly (1, nb, b, b) with the same rescale and an alpha
    for the same norm; lycoft.load (and so tools/merge.py) reads it back to the same weights at any strength."""
    f, src, out, report = ui_safe_pair
    before, (after, meta) = load_file(src), read_safetensors(out)
    heads = sorted(k[: -len(".oft_blocks")] for k in before if k.endswith(".oft_blocks"))
    assert report.ui_safe == len(heads) and "LyCORIS" in " ".join(report.notes)
    assert meta["lycoft.algo"] == "boft" and "lycoft.ui_safe" in meta
    for h in heads:
        A, B = before[f"{h}.oft_blocks"], after[f"{h}.oft_blocks"]
        assert B.shape == (1, *A.shape)
        assert torch.equal(after[f"{h}.rescale"], before[f"{h}.rescale"])
        assert float(after[f"{h}.alpha"]) == pytest.approx(float(before[f"{h}.alpha"]), rel=1e-6)
    for m in (1.0, 0.5, -1.0):
        a = lycoft.load(str(src), pipe=fresh(f), multiplier=m)
        b = lycoft.load(str(out), pipe=fresh(f), multiplier=m)
        assert all(b.adapters[k].layout.algo == "boft" and b.adapters[k].layout.stages == 1 for k in heads)
        worst = max(rel(b.adapters[k].merged_weight(), a.adapters[k].merged_weight()) for k in heads)
        print(f"--ui-safe read back by lycoft, strength {m}: worst layer rel err {worst:.1e}")
        assert worst <= TOL


def test_ui_safe_is_read_right_by_the_comfyui_and_a1111_formulas(ui_safe_pair):
    """At strength 1: ComfyUI's formula (reForge's too) applies a butterfly's rescale, so the --ui-safe file
    equals lycoft's merge where the plain oft file does not (rescale ignored); A1111's reads both right."""
    f, src, out, _ = ui_safe_pair
    before, after = load_file(src), load_file(out)
    net = lycoft.load(str(src), pipe=fresh(f))
    worst = {"comfy": 0.0, "a1111": 0.0, "comfy, plain oft": 0.0}
    for key, layer in net.adapters.items():
        W, ours, rescale = layer.base.weight.detach(), layer.merged_weight(), after[f"{key}.rescale"]
        B, alpha = after[f"{key}.oft_blocks"], float(after[f"{key}.alpha"])
        worst["comfy"] = max(worst["comfy"], rel(comfy_merge(W, B, alpha, rescale), ours))
        worst["a1111"] = max(worst["a1111"], rel(a1111_merge(W, B, alpha, rescale), ours))
        plain = comfy_merge(W, before[f"{key}.oft_blocks"], float(before[f"{key}.alpha"]), rescale)
        worst["comfy, plain oft"] = max(worst["comfy, plain oft"], rel(plain, ours))
    print("--ui-safe, formulas at strength 1:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert worst["comfy"] <= TOL and worst["a1111"] <= TOL and worst["comfy, plain oft"] > 0.05


def test_ui_safe_is_misread_by_the_real_lycoris_loader(ui_safe_pair, lycoris_without_timestep_embedding):
    """What the --ui-safe file costs: lycoris-lora's loader rebuilds full butterflies and copies the one stage
    into each of their stages without a word (a wrong merge), where it reads the plain oft file right."""
    from lycoris.kohya import create_network_from_weights

    f, src, out, _ = ui_safe_pair
    ours = lycoft.load(str(src), pipe=fresh(f))
    worst = {}
    for name, path in (("plain oft", src), ("--ui-safe", out)):
        pipe = fresh(f)
        lyco, _ = create_network_from_weights(1.0, str(path), None, pipe.text_encoder, pipe.unet)
        modules = {m.lora_name: m for m in lyco.unet_loras}
        assert len(modules) == sum(1 for k in ours.adapters if k.startswith("lora_unet_"))
        worst[name] = max(rel(m.get_merged_weight(multiplier=1.0)[0], ours.adapters[k].merged_weight())
                          for k, m in modules.items())
    print("real LyCORIS loader at multiplier 1:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert worst["plain oft"] <= TOL and worst["--ui-safe"] > 0.1


def test_ui_safe_refusals_and_cli(tmp_path, files, capsys):
    f = files("sd1")
    odd = ModuleSpec("lora_unet_x", "oft", torch.zeros(4, 3, 3), 0.0, torch.ones(12, 1), "output", "lycoris")
    with pytest.raises(AdapterFileError, match="even block size.*--to diff"):
        oft_as_one_stage_butterfly(odd)
    with pytest.raises(ValueError, match="--ui-safe.*--to diff"):
        convert_adapter(str(f["a"]), str(tmp_path / "d.safetensors"), "diff", base=str(f["single-file"]),
                        ui_safe=True)
    # nothing rescaled (f["a"]): written unchanged, and said so
    report = convert_adapter(str(f["a"]), str(tmp_path / "same.safetensors"), "lycoris", ui_safe=True)
    assert report.ui_safe == 0 and "nothing was changed" in report.summary()
    spec = importlib.util.spec_from_file_location("tools_convert", REPO / "tools" / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    src = write_adapter("sd1", RESCALED_OFT, tmp_path / "r.safetensors", pipe=fresh(f), preset="attn-only")
    assert convert.main(["--in", str(src), "--out", str(tmp_path / "r-ui.safetensors"), "--to", "lycoris",
                         "--ui-safe"]) == 0
    assert "one-stage butterflies" in capsys.readouterr().out
    assert all(t.dim() == 4 for k, t in load_file(tmp_path / "r-ui.safetensors").items() if k.endswith("oft_blocks"))


# -- key names -----------------------------------------------------------------------------------------
def test_sdxl_key_styles_round_trip(tmp_path, files):
    f = files("sdxl")
    to_diffusers, back = tmp_path / "diffusers_names.safetensors", tmp_path / "ldm_names.safetensors"
    convert_adapter(str(f["b"]), str(to_diffusers), "lycoris", keys="diffusers")
    convert_adapter(str(to_diffusers), str(back), "lycoris", base=str(f["diffusers"]))  # layout from the base
    orig, mid, end = load_file(f["b"]), load_file(to_diffusers), load_file(back)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions") for k in mid)
    assert not any("input_blocks" in k for k in mid)
    assert orig.keys() == end.keys() and all(torch.equal(orig[k], end[k]) for k in orig)
    a = lycoft.load(str(f["b"]), pipe=fresh(f))
    b = lycoft.load(str(to_diffusers), pipe=fresh(f))
    assert len(a.adapters) == len(b.adapters)
    wa = sorted(float(x.merged_weight().sum()) for x in a.adapters.values())
    wb = sorted(float(x.merged_weight().sum()) for x in b.adapters.values())
    assert wa == wb


def test_text_encoder_names_are_normalised(tmp_path):
    src = tmp_path / "flat.safetensors"
    A = torch.randn(8, 4, 4) * 0.1
    save_file({"lora_te1_encoder_layers_0_self_attn_q_proj.oft_blocks": A,  # LyCORIS under transformers 5
               "lora_te1_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(0.0),
               "lora_unet_down_blocks_1_attentions_0_proj_in.oft_blocks": torch.randn(16, 4, 4) * 0.1}, src)
    out = tmp_path / "normal.safetensors"
    convert_adapter(str(src), str(out), "lycoris", family="sdxl")
    keys = {k.partition(".")[0] for k in load_file(out)}
    assert keys == {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                    "lora_unet_input_blocks_4_1_proj_in"}


# -- bad input -----------------------------------------------------------------------------------------
def test_refusals(tmp_path, files):
    f = files("sd1")
    with pytest.raises(ValueError, match="--to diff needs --base"):
        convert_adapter(str(f["a"]), str(tmp_path / "d.safetensors"), "diff")
    with pytest.raises(AdapterFileError, match="output side.*--to diff"):
        convert_adapter(str(f["a"]), str(tmp_path / "p.safetensors"), "peft")
    with pytest.raises(ValueError, match="one of the inputs"):
        convert_adapter(str(f["a"]), str(f["a"]), "lycoris", force=True)
    with pytest.raises(ValueError, match="one of the inputs"):
        convert_adapter(str(f["a"]), str(f["single-file"]), "diff", base=str(f["single-file"]), force=True)
    nocfg = tmp_path / "nocfg.safetensors"
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.oft_R.weight": torch.zeros(8, 6)}, nocfg)
    with pytest.raises(AdapterFileError, match="--peft-config"):
        convert_adapter(str(nocfg), str(tmp_path / "x.safetensors"), "lycoris")
    sdxl_adapter = files("sdxl")["a"]
    with pytest.raises(AdapterFileError, match="made for sdxl.*base is sd1"):
        convert_adapter(str(sdxl_adapter), str(tmp_path / "d.safetensors"), "diff", base=str(f["single-file"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nocfg.safetensors"]


def test_cli(tmp_path, files, capsys):
    spec = importlib.util.spec_from_file_location("tools_convert", REPO / "tools" / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    f = files("sd1")
    out = tmp_path / "a.diff.safetensors"
    assert convert.main(["--in", str(f["a"]), "--out", str(out), "--to", "diff", "--base", str(f["single-file"]),
                         "--dtype", "fp16"]) == 0
    assert "diff, " in capsys.readouterr().out
    assert {t.dtype for t in load_file(out).values()} == {torch.float16}
    assert convert.main(["--in", str(f["a"]), "--out", str(out), "--to", "diff"]) == 2
    assert "--base" in capsys.readouterr().err





@pytest.mark.parametrize("neumann", [False, True])
def test_peft_block_share_and_boft_stages_match_peft(neumann):
    """PEFT's own merge on plain layers: OFT with one block shared by all (block_share), and BOFT with 1 to 3
    butterfly stages (PEFT builds more than one only with its CUDA extension, so stages 2-3 are checked
    against PEFT's permutation functions and torch.block_diag)."""
    from peft import OFTConfig, get_peft_model
    from peft.tuners.boft.layer import BOFTLayer

    from lycoft.formats.peft import PeftModule

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Conv2d(4, 8, 3))
    W = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = OFTConfig(r=0, oft_block_size=4, target_modules=["0", "1"], block_share=True, init_weights=False,
                    use_cayley_neumann=neumann)
    peft_model = get_peft_model(model, cfg)
    vecs = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "oft_R" in k}
    merged = peft_model.merge_and_unload().state_dict()
    for i in ("0", "1"):
        (vec,) = [v for k, v in vecs.items() if f".{i}.oft_R" in k]
        assert vec.shape[0] == 1
        m = PeftModule("unet", i, "oft", {"oft_R.weight": vec}, cfg.to_dict())
        assert rel(m.merged(W[f"{i}.weight"]), merged[f"{i}.weight"]) <= TOL
    for stages in (1, 2, 3):
        n, b = 32, 4
        A = torch.randn(stages, n // b, b, b, dtype=torch.float64) * 0.2
        s = 1 + 0.1 * torch.randn(6, 1, dtype=torch.float64)
        Wt = torch.randn(6, n, dtype=torch.float64)
        S = 0.5 * (A - A.transpose(-1, -2))
        I = torch.eye(b, dtype=torch.float64)
        R = torch.linalg.solve(I + S, I - S, left=False)
        M = torch.eye(n, dtype=torch.float64)
        for i in range(stages):
            perm = BOFTLayer.block_butterfly_perm(None, n, (n // b) // 2**i, b // 2, stages - 1)
            P = BOFTLayer.perm2mat(None, perm).double()
            M = (P @ torch.block_diag(*R[i]) @ P.T) @ M
        m = PeftModule("unet", "x", "boft", {"boft_R": A.float(), "boft_s": s.float()}, {})
        assert rel(m.merged(Wt.float()), (Wt @ M.T) * s) <= TOL
