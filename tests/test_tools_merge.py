"""tools/merge.py: adapters baked into single-file checkpoints and diffusers folders equal the adapters applied
on the fly; the merge is streamed, atomic, leaves the input alone and refuses bad input clearly."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_files import (
    layer_of,
    leftovers,
    model_outputs,
    rel,
    shared_files,
)

import lycoft
from lycoft.checkpoints import load_pipeline
from lycoft.io import AdapterFileError, read_safetensors
from lycoft.merge import AdapterArg, merge_adapters

REPO = Path(__file__).resolve().parents[1]
LAYER_TOL = 1e-5  # float32, relative per layer (docs/spec.md, "Exactness")
# Whole-model outputs: the merged file and the on-the-fly model round differently in every layer (~1e-7),
# and the random tiny UNets amplify that through ~20 norm layers: measured 1e-6 (SDXL) to 6e-5 (SD1/SD2),
# the same size as the gap between lycoft's own two exact execution paths on the same model (2e-5).
MODEL_TOL = {"unet": 2e-4, "te1": 1e-5, "te2": 1e-5}



@pytest.fixture
def files():
    return shared_files


def reference(f, family, mb):
    """Base + adapters on the fly: a baked by lycoft itself, then b applied on the fly at strength mb
    (lycoft runs one adapter per layer on the fly, so the first of two is merged by `Network.merge`)."""
    pipe = copy.deepcopy(f["pipe"])
    lycoft.load(str(f["a"]), pipe=pipe).merge()
    net = lycoft.load(str(f["b"]), pipe=pipe, multiplier=mb)
    return pipe, net


@pytest.mark.parametrize("kind", ["single-file", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_merged_model_equals_adapters_on_the_fly(tmp_path, files, family, kind):
    f = files(family)
    out = tmp_path / ("merged.safetensors" if kind == "single-file" else "merged")
    report = merge_adapters(f[kind], [AdapterArg(str(f["a"])), AdapterArg(str(f["b"]), 0.5)], out, verify=4)
    assert report.unmatched == [[], []] and report.patched_tensors > 100
    assert all(err <= tol for _, err, tol in report.verified)
    merged, fam, _ = load_pipeline(str(out))  # from_single_file (bundled config, offline) / from_pretrained
    assert fam == family
    ref, net = reference(f, family, 0.5)
    # every adapted layer: the loaded weight equals the on-the-fly layer's merged weight
    loaded = layer_of(merged, family)
    worst = max(rel(loaded[key].weight.detach(), layer.merged_weight().detach()) for key, layer in net.adapters.items())
    assert worst <= LAYER_TOL
    # the fused OpenCLIP q/k/v of SD2 / SDXL TE2 came back through from_single_file third by third
    assert any(k.endswith("self_attn_k_proj") for k in net.adapters)
    ours, theirs = model_outputs(merged, family), model_outputs(ref, family)
    for name, tol in MODEL_TOL.items():
        if name in ours:
            assert rel(ours[name], theirs[name]) <= tol, name


def test_untouched_tensors_are_copied_byte_for_byte(tmp_path, files):
    f = files("sd2")
    tensors, meta = read_safetensors(f["single-file"])
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.diffusion_modelinput_blocks00weight"] = torch.randn(32, 4, 3, 3)
    tensors["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    base = tmp_path / "with_extras.safetensors"
    save_file(tensors, base, meta)
    out = tmp_path / "m.safetensors"
    merge_adapters(base, [str(f["a"])], out)
    merged, meta_out = read_safetensors(out)
    assert merged.keys() == tensors.keys() and list(load_file(out)) == list(merged)
    changed = {k for k in tensors if not torch.equal(tensors[k], merged[k])}
    assert changed and all(k.startswith(("model.diffusion_model.", "cond_stage_model.model.transformer"))
                           for k in changed)
    assert "model_ema.decay" not in changed and not any(k.startswith("first_stage_model.") for k in changed)
    assert json.loads(meta_out["lycoft.merged_adapters"]) == [{"file": "a.safetensors", "multiplier": 1.0}]
    assert {k: v for k, v in meta_out.items() if not k.startswith("lycoft.")} == meta


def test_in_proj_thirds_are_rotated_by_their_own_adapters(tmp_path, files):
    """SD2's fused q/k/v: an adapter on k_proj only changes the middle third of in_proj_weight."""
    f = files("sd2")
    key = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    src = tmp_path / "k_only.safetensors"
    specs = {k: v for k, v in load_file(f["a"]).items() if k.startswith(key + ".")}
    save_file(specs, src, {"lycoft.version": "0.1.0", "lycoft.family": "sd2"})
    out = tmp_path / "m.safetensors"
    merge_adapters(f["single-file"], [str(src)], out)
    name = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    before, after = load_file(f["single-file"])[name], load_file(out)[name]
    h = before.shape[0] // 3
    assert torch.equal(before[:h], after[:h]) and torch.equal(before[2 * h:], after[2 * h:])
    net = lycoft.load(str(src), pipe=copy.deepcopy(f["pipe"]))
    assert rel(after[h:2 * h], net.adapters[key].merged_weight().detach()) <= LAYER_TOL


def test_dtype_and_ckpt_base(tmp_path, files):
    f = files("sd1")
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": load_file(f["single-file"])}, ckpt)
    out16 = tmp_path / "m16.safetensors"
    report = merge_adapters(ckpt, [str(f["b"]) + ":0.7"], out16, dtype="fp16", verify=3)
    assert report.adapters[0].multiplier == 0.7 and all(e <= t for _, e, t in report.verified)
    merged = load_file(out16)
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {torch.float16}
    out32 = tmp_path / "m32.safetensors"
    merge_adapters(f["single-file"], [AdapterArg(str(f["b"]), 0.7)], out32)
    ref = load_file(out32)
    assert all(rel(merged[k], ref[k]) <= 1e-3 for k in ref if ref[k].is_floating_point() and ref[k].numel())


def test_peak_memory_stays_near_the_largest_tensor(tmp_path, files):
    """A checkpoint with four 64 MiB tensors (two of them adapted, one an EMA copy), merged in a fresh
    process: the resident memory the merge adds is a few copies of one tensor, not the checkpoint."""
    f = files("sd1")
    tensors, meta = read_safetensors(f["single-file"])
    big = 4096
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(big, big, 1, 1)  # conv_in
    tensors["model.diffusion_model.time_embed.0.weight"] = torch.randn(big, big)
    tensors["model_ema.big"] = torch.randn(big, big)
    tensors["first_stage_model.big"] = torch.randn(big, big)
    base = tmp_path / "big.safetensors"
    save_file(tensors, base, meta)
    del tensors
    adapter = tmp_path / "big_adapter.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_conv_in.oft_blocks": torch.randn(big // 8, 8, 8, generator=g) * 0.05,
               "lora_unet_time_embedding_linear_1.oft_blocks": torch.randn(big // 8, 8, 8, generator=g) * 0.05},
              adapter)
    # VmHWM (the peak of this process image) rather than ru_maxrss, which Linux carries over from the forking
    # parent, here pytest with the checkpoint it just built still in memory.
    script = (
        "import sys, json\n"
        "from lycoft.merge import merge_adapters\n"
        "def status(field):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(field + ':'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "before = status('VmRSS')\n"
        "merge_adapters(sys.argv[1], [sys.argv[2]], sys.argv[3])\n"
        "print(json.dumps({'before': before, 'peak': status('VmHWM')}))\n"
    )
    out = tmp_path / "merged.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script, str(base), str(adapter), str(out)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    mem = json.loads(res.stdout.strip().splitlines()[-1])
    added = mem["peak"] - mem["before"]
    size = base.stat().st_size
    largest = big * big * 4
    print(f"\nmerge peak memory: +{added / 2**20:.0f} MiB over the imports for a {size / 2**20:.0f} MiB "
          f"checkpoint (largest tensor {largest / 2**20:.0f} MiB): {added / size:.2f} x checkpoint, "
          f"{added / largest:.2f} x tensor")
    assert added < 4 * largest and added < 0.75 * size
    assert torch.equal(load_file(out)["model_ema.big"], load_file(base)["model_ema.big"])


# -- bad input ------------------------------------------------------------------------------------------
def _no_output(folder: Path, out: Path, keep: set[str]) -> None:
    assert not out.exists()
    assert leftovers(folder, keep) == set()


def test_truncated_and_non_safetensors_bases(tmp_path, files):
    f = files("sd1")
    data = Path(f["single-file"]).read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "page.safetensors").write_bytes(b"<html><body>404 Not Found</body></html>" * 4)
    keep = {"trunc.safetensors", "page.safetensors"}
    out = tmp_path / "m.safetensors"
    with pytest.raises(AdapterFileError, match="truncated"):
        merge_adapters(tmp_path / "trunc.safetensors", [str(f["a"])], out)
    with pytest.raises(AdapterFileError, match="not a safetensors file.*text"):
        merge_adapters(tmp_path / "page.safetensors", [str(f["a"])], out)
    _no_output(tmp_path, out, keep)


def test_truncated_adapter(tmp_path, files):
    f = files("sd1")
    data = Path(f["a"]).read_bytes()
    bad = tmp_path / "a.safetensors"
    bad.write_bytes(data[:-100])
    out = tmp_path / "m.safetensors"
    with pytest.raises(AdapterFileError, match="truncated|damaged"):
        merge_adapters(f["single-file"], [str(bad)], out)
    _no_output(tmp_path, out, {"a.safetensors"})


def test_base_of_the_wrong_family(tmp_path, files):
    out = tmp_path / "m.safetensors"
    with pytest.raises(AdapterFileError, match="made for sdxl.*base .* is sd1"):
        merge_adapters(files("sd1")["single-file"], [str(files("sdxl")["a"])], out)
    # without metadata the keys decide: SDXL's LDM names partly exist in SD1, with other widths
    stripped = tmp_path / "nometa.safetensors"
    save_file(load_file(files("sdxl")["a"]), stripped)
    with pytest.raises(AdapterFileError, match="rotates 64 channels .* has 32 .*another model"):
        merge_adapters(files("sd1")["single-file"], [str(stripped)], out)
    # and keys of which none exists in the base
    te_only = tmp_path / "te2_only.safetensors"
    save_file({k: v for k, v in load_file(files("sdxl")["a"]).items() if k.startswith("lora_te2_")}, te_only)
    with pytest.raises(AdapterFileError, match="none of its .* keys .* names a layer of the sd1 base"):
        merge_adapters(files("sd1")["single-file"], [str(te_only)], out)
    _no_output(tmp_path, out, {"nometa.safetensors", "te2_only.safetensors"})


def test_adapter_for_another_model(tmp_path, files):
    """Same family, other widths: the first layer whose size differs is named."""
    wide = tmp_path / "wide.safetensors"
    save_file({"lora_unet_conv_in.oft_blocks": torch.zeros(16, 4, 4)}, wide)  # 64 channels; conv_in has 32
    out = tmp_path / "m.safetensors"
    with pytest.raises(AdapterFileError, match=r"lora_unet_conv_in rotates 64 channels .* has 32.*another model"):
        merge_adapters(files("sd1")["single-file"], [str(wide)], out)
    _no_output(tmp_path, out, {"wide.safetensors"})


def test_partial_match_needs_allow_partial(tmp_path, files):
    f = files("sd1")
    partial = tmp_path / "partial.safetensors"
    t = load_file(f["a"])
    t["lora_unet_no_such_layer.oft_blocks"] = torch.zeros(8, 4, 4)
    save_file(t, partial)
    out = tmp_path / "m.safetensors"
    with pytest.raises(AdapterFileError, match="1 of .* keys match no layer.*lora_unet_no_such_layer.*--allow-partial"):
        merge_adapters(f["single-file"], [str(partial)], out)
    _no_output(tmp_path, out, {"partial.safetensors"})
    report = merge_adapters(f["single-file"], [str(partial)], out, allow_partial=True)
    assert report.unmatched == [["lora_unet_no_such_layer"]] and out.exists()


def test_output_paths(tmp_path, files):
    f = files("sd1")
    base = f["single-file"]
    mtime = os.stat(base).st_mtime_ns
    with pytest.raises(ValueError, match="is the base model itself"):
        merge_adapters(base, [str(f["a"])], base, force=True)
    link = tmp_path / "link.safetensors"
    link.symlink_to(base)
    with pytest.raises(ValueError, match="is the base model itself"):
        merge_adapters(base, [str(f["a"])], link, force=True)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        merge_adapters(base, [str(f["a"])], out)
    assert out.read_bytes() == b"keep me"
    merge_adapters(base, [str(f["a"])], out, force=True)
    assert out.stat().st_size > 1000 and os.stat(base).st_mtime_ns == mtime
    with pytest.raises(ValueError, match="inside the base folder"):
        merge_adapters(f["diffusers"], [str(f["a"])], Path(f["diffusers"]) / "sub")
    assert leftovers(tmp_path, {"link.safetensors", "m.safetensors"}) == set()


def test_failed_verification_leaves_nothing(tmp_path, files, monkeypatch):
    import lycoft.merge as merge_mod

    f = files("sd1")
    real = merge_mod.apply_spec
    monkeypatch.setattr(merge_mod, "apply_spec", lambda w, s, m=1.0: real(w, s, m) * 1.01)  # a wrong merge
    out = tmp_path / "m.safetensors"
    with pytest.raises(RuntimeError, match="verification failed"):
        merge_adapters(f["single-file"], [str(f["a"])], out, verify=2)
    assert leftovers(tmp_path, set()) == set()


# -- the command line -----------------------------------------------------------------------------------
def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli(tmp_path, files, capsys):
    f = files("sdxl")
    merge = _tool("merge")
    out = tmp_path / "m.safetensors"
    assert merge.main(["--base", str(f["single-file"]), "--adapter", str(f["a"]), "--adapter", f"{f['b']}:0.5",
                       "--out", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "merged 2 adapter(s) into sdxl single-file" in text and "verify: 8 layers" in text
    assert merge.main(["--base", str(f["single-file"]), "--adapter", str(f["a"]), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err


def test_strength_zero_writes_the_base_weights_exactly(tmp_path, files):
    """`--adapter file:0` leaves every weight as it was, rescaled BOFT included (the layer at strength 0 is
    the plain layer)."""
    f = files("sd1")
    out = tmp_path / "zero.safetensors"
    merge_adapters(f["single-file"], [AdapterArg(str(f["b"]), 0.0)], out)
    before, _ = read_safetensors(f["single-file"])
    after, _ = read_safetensors(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
