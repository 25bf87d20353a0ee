"""lycoft's webui extension (extensions/sd-webui-lycoft) in Forge, Forge Classic, reForge and A1111.

Against the UIs' real code (`webui_worker.py`, one process per UI): set ``LYCOFT_FORGE_DIR`` /
``LYCOFT_FORGE_CLASSIC_DIR`` / ``LYCOFT_REFORGE_DIR`` / ``LYCOFT_A1111_DIR`` to a checkout of
lllyasviel/stable-diffusion-webui-forge / Haoming02/sd-webui-forge-classic / Panchovix/stable-diffusion-webui-reForge
/ AUTOMATIC1111/stable-diffusion-webui (A1111: a folder holding at least its `extensions-builtin/Lora` files;
they are not on PyPI, so CI skips these). What CI runs: the extension's Forge collection and `ldm_patched`
hook, reForge/Forge Classic registration and A1111 module type against minimal stand-ins of those interfaces.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_files import rel

from lycoft.formats.lycoris import ModuleSpec
from lycoft.merge import apply_spec
from lycoft.ui.state import TensorsWithMetadata

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / "extensions" / "sd-webui-lycoft"
STRENGTHS = ("0.5", "1.0", "1.5", "-1.0")


def _worker(ui: str, root: str, tmp_path: Path) -> dict:
    run = subprocess.run([sys.executable, str(REPO / "tests" / "webui_worker.py"), ui, root, str(tmp_path)],
                         capture_output=True, text=True, timeout=1200, cwd=REPO)
    lines = [line for line in run.stdout.splitlines() if line.startswith("LYCOFT-RESULT ")]
    assert run.returncode == 0 and lines, (run.stdout[-3000:], run.stderr[-3000:])
    return json.loads(lines[-1][len("LYCOFT-RESULT "):])


@pytest.mark.skipif(not os.environ.get("LYCOFT_FORGE_DIR"), reason="set LYCOFT_FORGE_DIR to a Forge checkout")
def test_forge_real_code(tmp_path):
    """Stock Forge drops an OFT file ("LoRA version mismatch"); with the extension every layer is lycoft's merge
    at every strength (fp32 storage: float32 precision; fp16 storage: the reference rounded once), and a LoRA
    file patches exactly as before."""
    out = _worker("forge", os.environ["LYCOFT_FORGE_DIR"], tmp_path)
    print(json.dumps(out, indent=1))
    assert out["sd1-fp32"]["stock_oft_dropped"] and out["sd1-fp32"]["lora_unchanged"]
    _assert_lycoft_merge(out)


@pytest.mark.skipif(not os.environ.get("LYCOFT_REFORGE_DIR"), reason="set LYCOFT_REFORGE_DIR to a reForge checkout")
def test_reforge_real_code(tmp_path):
    """Stock reForge ignores an OFT file's rescale even at strength 1, and reads its `tools/convert.py --ui-safe`
    conversion right at strength 1; with the extension every layer is lycoft's merge at every strength (float32
    and float16 models), and a LoRA file patches exactly as before."""
    out = _worker("reforge", os.environ["LYCOFT_REFORGE_DIR"], tmp_path)
    print(json.dumps(out, indent=1))
    assert out["sd1-fp32"]["stock_oft_s1_worst_rel"] > 0.05 and out["sd1-fp32"]["lora_unchanged"]
    assert out["sd1-fp32"]["stock_ui_safe_s1_worst_rel"] <= 1e-5
    _assert_lycoft_merge(out)


@pytest.mark.skipif(not os.environ.get("LYCOFT_FORGE_CLASSIC_DIR"),
                    reason="set LYCOFT_FORGE_CLASSIC_DIR to a Forge Classic checkout")
def test_forge_classic_real_code(tmp_path):
    """Stock Forge Classic drops an OFT file ("LoRA version mismatch"); with the extension every layer is
    lycoft's merge at every strength, and a LoRA file patches exactly as before."""
    out = _worker("forge_classic", os.environ["LYCOFT_FORGE_CLASSIC_DIR"], tmp_path)
    print(json.dumps(out, indent=1))
    assert out["sd1-fp32"]["stock_oft_dropped"] and out["sd1-fp32"]["lora_unchanged"]
    _assert_lycoft_merge(out)


def _assert_lycoft_merge(out: dict) -> None:
    """Every layer changed, and to lycoft's merge: float32 models to float32 precision, float16 models to the
    float32 merge rounded once to float16."""
    for case in ("sd1-fp32", "sd1-fp16", "sdxl-fp32", "sdxl-fp16"):
        for s in STRENGTHS:
            r = out[case][s]
            assert r["layers"] == r["expected_layers"], (case, s)
            assert r["worst_rel"] <= (1e-5 if case.endswith("fp32") else r["rounding"] + 1e-5), (case, s)


@pytest.mark.skipif(not os.environ.get("LYCOFT_A1111_DIR"),
                    reason="set LYCOFT_A1111_DIR to an A1111 checkout (its extensions-builtin/Lora)")
def test_a1111_real_code(tmp_path):
    """Stock A1111 is exact at multiplier 1 only (BOFT and rescaled OFT differ at 0.5); with the extension every
    layer of an OFT+BOFT file with rescale, of a plain OFT file, of a kohya-legacy SD1 file (which stock A1111
    drops) and of an input-side `oft_R.weight` file (which stock A1111 refuses) is lycoft's merge at every
    multiplier, a LoRA file patches exactly as before, and unloading restores the weights."""
    out = _worker("a1111", os.environ["LYCOFT_A1111_DIR"], tmp_path)
    print(json.dumps(out, indent=1))
    r = out["sd1-fp32"]
    assert r["stock 1.0"]["worst_rel"] <= 1e-5 < 0.05 < r["stock 0.5"]["worst_rel"]
    assert r["stock legacy layers"] == r["stock input-side layers"] == 0
    assert len(r["stock errors"]) == 1 and "Could not find a module type" in r["stock errors"][0]
    assert r["lora_unchanged"] and r["restored"] and not r["errors"]
    assert r["module_types"][0] == "LycoftOFTModuleType" and "ModuleTypeOFT" in r["module_types"]
    for s in STRENGTHS:
        for name, f in r[s].items():
            assert f["layers"] == f["expected_layers"] and f["module_types"] == ["LycoftOFTModule"], (s, name)
            assert f["worst_rel"] <= 1e-5, (s, name)


# ----------------------------------------------------------------------------- without the UIs (CI)
@pytest.fixture
def webui(monkeypatch):
    monkeypatch.syspath_prepend(str(EXTENSION))
    for name in [m for m in sys.modules if m == "lycoft_webui" or m.startswith("lycoft_webui.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("lycoft_webui")


def _oft_file():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 4, 4, generator=g) * 0.1
    s = 1 + 0.1 * torch.randn(32, 1, generator=g)
    tensors = {"oft_unet_x.oft_blocks": A, "oft_unet_x.alpha": torch.tensor(0.0), "oft_unet_x.rescale": s,
               "lora_unet_y.lora_up.weight": torch.ones(32, 2), "lora_unet_y.lora_down.weight": torch.ones(2, 16)}
    return tensors, ModuleSpec("lora_unet_x", "oft", A, 0.0, s, "output", "kohya-legacy")


def test_forge_collection_reads_oft_layers_and_hands_on_the_rest(webui, tmp_path, monkeypatch):
    """Forge's interface: `lora_collection_priority` (asked in turn for `load_lora`) and
    `extra_weight_calculators[patch_type](weight, strength, payload)`."""
    seen = {}

    def stock_load_lora(lora, to_load):
        seen.update(lora)
        return {to_load[x]: ("lora", x) for x in to_load if f"{x}.lora_up.weight" in lora}, {}

    forge_lora = types.ModuleType("backend.patcher.lora")
    forge_lora.lora_collection_priority = [types.SimpleNamespace(), types.SimpleNamespace(load_lora=stock_load_lora)]
    forge_lora.extra_weight_calculators = {}
    monkeypatch.setitem(sys.modules, "backend", types.ModuleType("backend"))
    monkeypatch.setitem(sys.modules, "backend.patcher", types.ModuleType("backend.patcher"))
    monkeypatch.setitem(sys.modules, "backend.patcher.lora", forge_lora)
    assert webui.forge.install() and webui.forge.install()  # idempotent
    assert len(forge_lora.lora_collection_priority) == 3
    tensors, spec = _oft_file()
    # the OFT layer is spelled kohya-legacy (oft_unet_x): found through the alias of lora_unet_x
    to_load = {"lora_unet_x": "diffusion_model.x.weight", "lora_unet_y": "diffusion_model.y.weight"}
    collection = forge_lora.lora_collection_priority[0]
    patches, remaining = collection.load_lora(TensorsWithMetadata(tensors, {}, "a.safetensors"), to_load)
    assert patches["diffusion_model.y.weight"] == ("lora", "lora_unet_y")
    kind, payload = patches["diffusion_model.x.weight"]
    assert kind == "lycoft_oft" and not any(k.startswith("oft_unet_x") for k in seen)
    W = torch.randn(32, 16)
    for m in (0.5, 1.0, -1.0):
        got = forge_lora.extra_weight_calculators[kind](W.clone(), m, payload)
        assert rel(got, apply_spec(W, spec, m)) <= 1e-6


def test_ldm_patched_hook_reads_oft_layers_and_hands_on_the_rest(webui, monkeypatch):
    """Forge 1 / Forge Classic's interface: `ldm_patched.modules.lora.load_lora(lora, to_load)` ->
    `(patches, remaining)`, `model_patcher.extra_weight_calculators[patch_type](weight, strength, payload)`."""
    seen = {}

    def stock_load_lora(lora, to_load):
        seen.update(lora)
        patches = {to_load[x]: ("lora", x) for x in to_load if f"{x}.lora_up.weight" in lora}
        return patches, {k: v for k, v in lora.items() if not k.startswith("lora_unet_y.")}

    lora = types.ModuleType("ldm_patched.modules.lora")
    lora.load_lora = stock_load_lora
    patcher = types.ModuleType("ldm_patched.modules.model_patcher")
    patcher.extra_weight_calculators = {}
    for name, module in (("ldm_patched", types.ModuleType("ldm_patched")),
                         ("ldm_patched.modules", types.ModuleType("ldm_patched.modules")),
                         ("ldm_patched.modules.lora", lora), ("ldm_patched.modules.model_patcher", patcher)):
        monkeypatch.setitem(sys.modules, name, module)
    assert webui.forge.install_ldm_patched() and webui.forge.install_ldm_patched()  # idempotent
    assert lora.load_lora.__wrapped__ is stock_load_lora
    tensors, spec = _oft_file()
    to_load = {"lora_unet_x": "diffusion_model.x.weight", "lora_unet_y": "diffusion_model.y.weight"}
    patches, remaining = lora.load_lora(TensorsWithMetadata(tensors, {}, "a.safetensors"), to_load)
    assert patches["diffusion_model.y.weight"] == ("lora", "lora_unet_y") and not remaining
    kind, payload = patches["diffusion_model.x.weight"]
    assert not any(k.startswith("oft_unet_x") for k in seen)
    W = torch.randn(32, 16)
    for m in (0.5, 1.0, -1.0):
        got = patcher.extra_weight_calculators[kind](W.clone(), m, payload)
        assert rel(got, apply_spec(W, spec, m)) <= 1e-6


def test_comfy_interface_registration_replaces_stock_oft_adapters(webui, monkeypatch):
    """reForge / Forge Classic's interface: `weight_adapter.adapters` + `WeightAdapterBase`, `lora.load_lora`."""

    class Base:
        pass

    class LoRAAdapter(Base):
        pass

    class OFTAdapter(Base):
        pass

    class BOFTAdapter(Base):
        pass

    wa = types.ModuleType("ldm_patched.modules.weight_adapter")
    wa.WeightAdapterBase, wa.OFTAdapter, wa.BOFTAdapter = Base, OFTAdapter, BOFTAdapter
    wa.adapters = [LoRAAdapter, OFTAdapter, BOFTAdapter]
    lora = types.ModuleType("ldm_patched.modules.lora")
    lora.load_lora = lambda sd, to_load, log_missing=True: to_load
    for name, module in (("ldm_patched", types.ModuleType("ldm_patched")),
                         ("ldm_patched.modules", types.ModuleType("ldm_patched.modules")),
                         ("ldm_patched.modules.weight_adapter", wa), ("ldm_patched.modules.lora", lora)):
        monkeypatch.setitem(sys.modules, name, module)
    assert webui.comfy_interface.install_reforge() and webui.comfy_interface.install_reforge()
    assert [a.__name__ for a in wa.adapters] == ["LoRAAdapter", "LycoftOFTAdapter"]
    assert issubclass(wa.adapters[-1], Base)
    tensors = {"oft_unet_x.oft_blocks": torch.zeros(8, 4, 4)}
    assert lora.load_lora(tensors, {"lora_unet_x": "w"}) == {"lora_unet_x": "w", "oft_unet_x": "w"}
    assert lora.load_lora({"lora_unet_x.lora_up.weight": torch.zeros(1)}, {"lora_unet_x": "w"}) == {"lora_unet_x": "w"}
    adapter = wa.adapters[-1].load("oft_unet_x", tensors, None, None, set())
    assert adapter is not None and adapter.loaded_keys == {"oft_unet_x.oft_blocks"}


def test_metadata_travels_with_the_webuis_cached_reader(webui, tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_file({"x.oft_R.weight": torch.zeros(2, 6)}, path, metadata={"lycoft.side": "input"})
    networks = types.ModuleType("networks")
    networks.load_lora_state_dict = lambda filename: {"x.oft_R.weight": torch.zeros(2, 6)}
    monkeypatch.setitem(sys.modules, "networks", networks)
    assert webui.state_dict.install()
    assert networks.load_lora_state_dict(str(path)).metadata == {"lycoft.side": "input"}


def test_a1111_module_type_goes_first_and_reads_every_spelling(webui, tmp_path, monkeypatch):
    """A1111's interface: `network.ModuleType` / `NetworkModule`, `networks.module_types` (asked in turn for
    `create_module(net, NetworkWeights)`), `networks.sd_models.read_state_dict`; the module's `calc_updown`
    gives the weight difference at `multiplier()`."""

    class NetworkModule:
        def __init__(self, net, weights):
            self.network, self.network_key, self.sd_key = net, weights.network_key, weights.sd_key
            self.ops, self.extra_kwargs = None, {}

        def multiplier(self):
            return self.network.unet_multiplier

    class StockOFT:
        def create_module(self, net, weights):
            return "stock" if "oft_blocks" in weights.w else None

    network = types.ModuleType("network")
    network.ModuleType, network.NetworkModule = type("ModuleType", (), {}), NetworkModule
    networks = types.ModuleType("networks")
    networks.module_types = [StockOFT()]
    tensors, spec = _oft_file()
    networks.sd_models = types.SimpleNamespace(read_state_dict=lambda filename: dict(tensors))
    monkeypatch.setitem(sys.modules, "network", network)
    monkeypatch.setitem(sys.modules, "networks", networks)
    assert webui.a1111.install() and webui.a1111.install()  # idempotent
    assert len(networks.module_types) == 2 and networks.module_types[1].__class__ is StockOFT
    path = tmp_path / "a.safetensors"
    save_file(tensors, path)
    sd = networks.sd_models.read_state_dict(str(path))
    assert "lora_unet_x.oft_blocks" in sd and "oft_unet_x.oft_blocks" not in sd  # kohya legacy -> lora_unet_
    assert "lora_unet_y.lora_up.weight" in sd
    net = types.SimpleNamespace(network_on_disk=types.SimpleNamespace(filename=str(path)), unet_multiplier=-1.0)
    w = {k.partition(".")[2]: v for k, v in sd.items() if k.startswith("lora_unet_x.")}
    weights = types.SimpleNamespace(network_key="lora_unet_x.oft_blocks", sd_key="diffusion_model_x", w=w)
    module = networks.module_types[0].create_module(net, weights)
    W = torch.randn(32, 16)
    updown, ex_bias = module.calc_updown(W)
    assert ex_bias is None and rel(W + updown, apply_spec(W, spec, -1.0)) <= 1e-6
    lora = types.SimpleNamespace(network_key="lora_unet_y.lora_up.weight", sd_key="y", w={"lora_up.weight": 0})
    assert networks.module_types[0].create_module(net, lora) is None


def test_a1111_kohya_names_of_other_spellings(webui):
    name = webui.a1111.kohya_prefix
    assert name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", False) == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert name("base_model.model.up_blocks.1.attentions.0.proj_in", False) == \
        "lora_unet_up_blocks_1_attentions_0_proj_in"
    assert name("text_encoder.encoder.layers.0.self_attn.q_proj", False) == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert name("text_encoder.text_model.encoder.layers.0.mlp.fc1", True) == \
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    assert name("clip_g.text_model.encoder.layers.3.mlp.fc2", True) == "lora_te2_text_model_encoder_layers_3_mlp_fc2"
    assert name("unet.input_blocks.4.1.proj_in", True) == "lora_unet_input_blocks_4_1_proj_in"
    assert name("oft_te_text_model_encoder_layers_0_mlp_fc1", False) == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert name("lora_unet_x", False) is None and name("vae.decoder.conv_in", False) is None
