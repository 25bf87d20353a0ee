"""tools/inspect.py: the numbers it reports are right, its consumer verdicts follow the compatibility matrix
(and, where the real program is installed, what that program does), and the plot is written."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_files import (
    shared_files,
    write_adapter,
)

import lycoft
from lycoft.compatibility import CONSUMERS, FAILS, IGNORED, OK, RULES, WRONG, verdict_table
from lycoft.inspect import inspect_adapter, plot_inspection

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture
def files():
    return shared_files


# -- the matrix as data --------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour,facts,consumer,expected", [
    ("lycoris-oft", [], "ComfyUI", OK),
    ("lycoris-oft", ["rescale"], "ComfyUI", WRONG),  # rescale ignored for 3-D oft
    ("lycoris-boft", ["rescale"], "ComfyUI", OK),  # ... but applied for boft
    ("lycoris-boft", ["no_alpha"], "ComfyUI", WRONG),  # boft without alpha: silently unchanged
    ("lycoris-oft", ["no_alpha"], "ComfyUI", OK),  # oft without alpha reads as alpha = 0
    ("lycoris-oft", ["comfy_clamp"], "ComfyUI", WRONG),
    ("lycoris-oft", ["te_flat_names"], "A1111", WRONG),
    ("lycoris-oft", ["block_size_gt_block_num"], "LyCORIS", FAILS),
    ("lycoris-boft", ["partial_butterfly"], "LyCORIS", FAILS),
    ("lycoris-boft", ["partial_butterfly"], "A1111", OK),
    ("lycoris-oft", ["no_alpha"], "LyCORIS", FAILS),
    ("lycoris-oft", ["rescale"], "A1111", OK),
    ("kohya-legacy", ["sd1_unet_names"], "A1111", IGNORED),
    ("kohya-legacy", [], "A1111", OK),
    ("kohya-legacy", [], "ComfyUI", IGNORED),
    ("kohya-legacy", [], "kohya-oft", OK),
    ("lycoris-2.0", [], "A1111", OK),
    ("lycoris-2.0", [], "LyCORIS", IGNORED),
    ("peft-oft", [], "PEFT", OK),
    ("peft-oft", [], "lycoft", "convert"),
    ("lycoft-input", [], "PEFT", "convert"),
    ("diff", [], "LyCORIS", OK),
    ("diff", [], "ComfyUI", OK),
    ("lycoris-oft", ["rescale"], "reForge", WRONG),  # reForge reads files as ComfyUI does
    ("lycoris-boft", ["rescale", "one_stage_butterfly"], "reForge", OK),  # what --ui-safe writes
    ("lycoris-boft", ["rescale", "one_stage_butterfly"], "ComfyUI", OK),
    ("lycoris-boft", ["rescale", "one_stage_butterfly"], "A1111", OK),
    ("lycoris-boft", ["one_stage_butterfly"], "LyCORIS", WRONG),  # broadcast into its full butterfly
    ("lycoris-oft", ["rescale"], "Forge", IGNORED),
    ("lycoris-boft", [], "Forge Classic", IGNORED),
    ("diff", [], "Forge", OK),
    ("diff", [], "Forge Classic", OK),
])
def test_compatibility_matrix(flavour, facts, consumer, expected):
    assert verdict_table(flavour, facts)[consumer].verdict == expected


def test_every_flavour_has_a_verdict_from_every_consumer():
    flavours = {f for r in RULES for f in r.flavours}
    for flavour in flavours:
        assert set(verdict_table(flavour, [])) == set(CONSUMERS)


# -- numbers ---------------------------------------------------------------------------------------------
def test_angle_and_norm_of_a_known_rotation(tmp_path):
    """A 2x2 block with Q = [[0, t], [-t, 0]] is a plane rotation by 2 atan(t); ||Q||_F = sqrt(2) t per block."""
    t = 0.3
    A = torch.zeros(16, 2, 2)
    A[:, 0, 1] = t
    A[5, 0, 1] = 2 * t  # one block rotates further
    path = tmp_path / "known.safetensors"
    save_file({"lora_unet_conv_in.oft_blocks": A, "lora_unet_conv_in.alpha": torch.tensor(0.0)}, path)
    ins = inspect_adapter(str(path), family="sd1")
    (layer,) = ins.layers
    assert layer.max_angle == pytest.approx(math.degrees(2 * math.atan(2 * t)), rel=1e-6)
    assert layer.q_norm == pytest.approx(math.sqrt(2 * (15 * t**2 + 4 * t**2)), rel=1e-6)
    assert layer.ortho_error < 1e-6 and layer.module == "conv_in" and layer.group == "in"
    assert (layer.block_size, layer.blocks, layer.stages) == (2, 16, 1)


def test_base_fit_and_weight_change(tmp_path, files):
    f = files("sd1")
    t = load_file(f["a"])
    t["lora_unet_no_such_layer.oft_blocks"] = torch.zeros(8, 4, 4)
    t["lora_unet_conv_in.oft_blocks"] = torch.zeros(16, 4, 4)  # 64 channels; conv_in has 32
    path = tmp_path / "mixed.safetensors"
    save_file(t, path)
    ins = inspect_adapter(str(path), base=str(f["single-file"]))
    assert ins.not_in_base == ["lora_unet_no_such_layer"]
    assert len(ins.wrong_shape) == 1 and ins.wrong_shape[0].startswith("lora_unet_conv_in: rotates 64 channels")
    net = lycoft.load(str(f["a"]), pipe=copy.deepcopy(f["pipe"]))
    by_key = {x.key: x for x in ins.layers}
    for key, layer in list(net.adapters.items())[:20]:
        if key == "lora_unet_conv_in":  # replaced by the wrong-width one above
            assert by_key[key].rel_change is None
            continue
        W = layer.base.weight.detach()
        expected = float(torch.linalg.vector_norm(layer.merged_weight().detach() - W) / torch.linalg.vector_norm(W))
        assert by_key[key].rel_change == pytest.approx(expected, rel=1e-4)
    text = ins.text()
    assert "not in the base: lora_unet_no_such_layer" in text and "wrong shape" in text


def test_verdicts_agree_with_the_real_lycoris_loader(tmp_path, files, monkeypatch):
    """inspect says LyCORIS cannot load an oft file with conv_out in one block of 4 (block_size > block_num);
    LyCORIS indeed refuses it, and loads the same adapter without that layer."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    targets = [t for t in LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE if t != "TimestepEmbedding"]
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_MODULE", targets)  # docs/spec.md, "LyCORIS"
    f = files("sd1")
    ins = inspect_adapter(str(f["a"]))
    assert "block_size_gt_block_num" in ins.facts
    assert {v.consumer: v.verdict for v in ins.verdicts}["LyCORIS"] == FAILS
    pipe = copy.deepcopy(f["pipe"])
    with pytest.raises(Exception):  # noqa: B017 - any refusal
        net, _ = create_network_from_weights(1.0, str(f["a"]), None, pipe.text_encoder, pipe.unet)
        for m in net.unet_loras:
            m.get_merged_weight(multiplier=1.0)
    trimmed = tmp_path / "no_conv_out.safetensors"
    tensors = {k: v for k, v in load_file(f["a"]).items() if not k.startswith("lora_unet_conv_out.")}
    save_file(tensors, trimmed, {"lycoft.version": "0.1.0"})
    ins = inspect_adapter(str(trimmed), family="sd1")
    assert {v.consumer: v.verdict for v in ins.verdicts}["LyCORIS"] == OK
    net, _ = create_network_from_weights(1.0, str(trimmed), None, pipe.text_encoder, pipe.unet)
    assert len(net.unet_loras) == sum(1 for k in tensors if k.startswith("lora_unet_") and k.endswith("oft_blocks"))


def test_file_facts(tmp_path, files):
    f = files("sd1")
    rescaled = write_adapter("sd1", lycoft.AdapterConfig(block_size=4, rescale=True), tmp_path / "r.safetensors",
                             pipe=copy.deepcopy(f["pipe"]), preset="attn-only")
    ins = inspect_adapter(str(rescaled))
    assert "rescale" in ins.facts and {v.consumer: v.verdict for v in ins.verdicts}["ComfyUI"] == WRONG
    assert all(x.rescale and x.rescale[0] <= x.rescale[1] for x in ins.layers)
    legacy = tmp_path / "kohya.safetensors"
    save_file({"oft_unet_down_blocks_0_attentions_0_proj_in.oft_blocks": torch.randn(4, 8, 8) * 0.1,
               "oft_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1e-3)}, legacy)
    ins = inspect_adapter(str(legacy))
    table = {v.consumer: v.verdict for v in ins.verdicts}
    assert ins.flavour == "kohya-legacy" and table["A1111"] == IGNORED and table["kohya-oft"] == OK


def test_rescaled_oft_names_the_uis_that_misread_it_and_the_fix(tmp_path, files, capsys):
    """A rescaled oft file: inspect says stock ComfyUI and reForge read it wrong and prints the --ui-safe
    command; the converted file reads right in both and wrong in the LyCORIS loader (one-stage butterflies),
    and an oft layer without rescale beside them does not make it look misread."""
    from lycoft.cli.inspect import main as inspect_main
    from lycoft.convert import convert_adapter

    f = files("sd1")
    rescaled = write_adapter("sd1", lycoft.AdapterConfig(block_size=4, rescale=True), tmp_path / "r.safetensors",
                             pipe=copy.deepcopy(f["pipe"]), preset="attn-only")
    assert inspect_main([str(rescaled)]) == 0
    text = capsys.readouterr().out
    misread = [line for line in text.splitlines() if "reads it WRONG" in line]
    assert len(misread) == 2 and "ComfyUI" in misread[0] and "reForge" in misread[1]
    assert f"python tools/convert.py --in {rescaled} --out" in text and "--ui-safe" in text
    fixed = tmp_path / "r-ui.safetensors"
    convert_adapter(str(rescaled), str(fixed), "lycoris", ui_safe=True)
    tensors = load_file(fixed)
    tensors["lora_unet_conv_in.oft_blocks"] = torch.zeros(8, 4, 4)  # plain oft, no rescale
    tensors["lora_unet_conv_in.alpha"] = torch.tensor(1e-3)
    mixed = tmp_path / "mixed.safetensors"
    save_file(tensors, mixed, {"lycoft.version": "0.1.0"})
    ins = inspect_adapter(str(mixed))
    table = {v.consumer: v.verdict for v in ins.verdicts}
    assert {"rescale", "one_stage_butterfly"} <= set(ins.facts)
    assert table["ComfyUI"] == table["reForge"] == table["A1111"] == OK
    assert table["LyCORIS"] == WRONG and table["Forge"] == table["Forge Classic"] == IGNORED
    assert not any("--ui-safe" in n for n in ins.notes)


def test_peft_neumann_file(tmp_path, files):
    from peft import OFTConfig

    f = files("sd1")
    unet = copy.deepcopy(f["pipe"].unet)
    unet.add_adapter(OFTConfig(r=0, oft_block_size=4, target_modules=["to_q"], init_weights=False))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "oft_R" in name:
                p.normal_(0, 0.1)
    unet.save_lora_adapter(str(tmp_path))
    ins = inspect_adapter(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert ins.flavour == "peft-oft" and all(x.side == "input" for x in ins.layers)
    assert max(x.ortho_error for x in ins.layers) > 1e-4  # the truncated series is not orthogonal
    table = {v.consumer: v.verdict for v in ins.verdicts}
    assert table["PEFT"] == OK and table["lycoft"] == "convert" and table["ComfyUI"] == IGNORED


# -- plot and command line -----------------------------------------------------------------------------
def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots(tmp_path, files):
    f = files("sdxl")
    many = inspect_adapter(str(f["b"]), base=str(f["single-file"]))
    assert len(many.layers) > 200 and [x.group for x in many.layers][:1] == ["TE1"]
    plot_inspection(many, str(tmp_path / "many.png"))
    w, h = _png_size(tmp_path / "many.png")
    assert 1000 <= w <= 2700 and 400 <= h <= 1200
    few_file = write_adapter("sdxl", lycoft.AdapterConfig(block_size=8), tmp_path / "few.safetensors",
                             pipe=copy.deepcopy(f["pipe"]), preset="attn-only",
                             exclude=r"up_blocks|mid_block|te1|down_blocks.2")
    few = inspect_adapter(str(few_file))
    assert len(few.layers) <= 48
    plot_inspection(few, str(tmp_path / "few.png"))
    assert _png_size(tmp_path / "few.png")[1] >= 400


def test_cli(tmp_path, files, capsys):
    spec = importlib.util.spec_from_file_location("tools_inspect", REPO / "tools" / "inspect.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    f = files("sd1")
    assert tool.main([str(f["b"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["flavour"] == "lycoris" and data["verdicts"]["lycoft"]["verdict"] == OK
    assert len(data["layers"]) > 200 and data["metadata"]["lycoft.algo"] == "boft"
    assert tool.main([str(f["a"]), "--base", str(f["diffusers"]), "--plot", str(tmp_path / "a.png"), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "consumers:" in out and "largest 3 of" in out and (tmp_path / "a.png").is_file()
    assert tool.main([str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_text_report_shows_whole_keys(files):
    """Real SD1 keys run past 64 characters (71 for the one below)."""
    import dataclasses

    from lycoft.inspect import inspect_adapter

    ins = inspect_adapter(str(files("sdxl")["a"]))
    layer = ins.layers[0]
    long_key = "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_out_0"
    ins.layers = [dataclasses.replace(layer, key=long_key), layer]
    printed = [line.split()[0] for line in ins.text(show_all=True).splitlines() if line.strip().startswith("lora_")]
    assert printed == [long_key, layer.key]


def test_energy_change_follows_the_rotated_side(tmp_path, files):
    """--energy: a rotation of the inputs keeps the angles between the neurons (the rows' hyperspherical
    energy stays put to rounding), one of the outputs keeps the columns'; the other side moves. The total
    is the relative change of the summed energies, and the CLI prints both."""
    from lycoft.cli.inspect import main as inspect_main
    from lycoft.ops.energy import hyperspherical_energy

    f = files("sd1")
    moved = {}
    for side in ("input", "output"):
        cfg = lycoft.AdapterConfig(algo="oft", block_size=4, side=side)
        path = write_adapter("sd1", cfg, tmp_path / f"{side}.safetensors", pipe=copy.deepcopy(f["pipe"]),
                             preset="attn-mlp", std=0.2)
        ins = inspect_adapter(str(path), base=str(f["single-file"]), energy=True)
        kept, changed = ("energy_rows", "energy_cols") if side == "input" else ("energy_cols", "energy_rows")
        layers = [x for x in ins.layers if x.rel_change is not None]
        assert layers and max(abs(getattr(x, kept)) for x in layers) < 1e-6, side  # float32 weights
        assert max(abs(getattr(x, changed)) for x in layers) > 1e-4, side
        moved[side] = ins.energy_total
    assert abs(moved["input"]["rows"]) < 1e-6 < abs(moved["input"]["cols"])
    assert abs(moved["output"]["cols"]) < 1e-6 < abs(moved["output"]["rows"])
    # A layer's figure is the relative change of the function's value on its weights.
    W = torch.randn(12, 20, dtype=torch.float64)
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    u = W / W.norm(dim=1, keepdim=True)
    assert hyperspherical_energy(W) == pytest.approx(sum(float(1 / (u[i] - u[j]).norm()) for i, j in pairs), rel=1e-12)
    assert inspect_main([str(tmp_path / "output.safetensors"), "--base", str(f["single-file"]), "--energy"]) == 0
    assert inspect_main([str(tmp_path / "output.safetensors"), "--energy"]) == 2  # a user error: needs --base
