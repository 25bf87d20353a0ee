"""A kohya SDXL LoRA config of the usual shape, as the kohya_ss GUI writes it (`data/kohya_gui_sdxl_lora.toml`:
Prodigy, bucketing, latents cached to disk, gradient checkpointing, min-SNR, noise offset, sample prompts,
epoch saves, `network_dim` as the block size), runs unchanged apart from the model and the network module.

Prodigy, not AdamW8bit: bitsandbytes has no CPU kernels, and the tests run on a CPU."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

from safetensors import safe_open
from toy_images import draw_toy

from lycoft.training import loop

DATA = Path(__file__).parent / "data"


def test_a_kohya_gui_sdxl_lora_config_trains_and_saves(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # the config's paths are relative, like a GUI project folder
    folder = tmp_path / "img" / "1_sks toy"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i, size in enumerate([(320, 256), (256, 320)]):  # two aspect ratios: two buckets
        draw_toy(size, rng).save(folder / f"toy_{i}.png")
        (folder / f"toy_{i}.txt").write_text("a photo of sks toy\n", encoding="utf-8")
    (tmp_path / "model" / "sample").mkdir(parents=True)
    shutil.copy(DATA / "kohya_gui_sample_prompts.txt", tmp_path / "model" / "sample" / "prompt.txt")
    argv = ["--config", str(DATA / "kohya_gui_sdxl_lora.toml"),
            "--pretrained_model_name_or_path", "builtin:tiny-sdxl", "--network_module", "lycoft",
            # Only to keep the test short on a CPU: 256 pixels instead of 1024 (the config's minimum bucket,
            # so the buckets stay valid) and 2 of the 10 epochs (2 steps each; epoch saves still happen).
            "--resolution", "256", "--max_train_epochs", "2"]
    with caplog.at_level(logging.INFO):
        assert loop.main(argv) == 0
    out = tmp_path / "model"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["sks_sdxl_lora-000001.safetensors",
                                                                  "sks_sdxl_lora.safetensors"]
    assert sorted(p.name for p in folder.glob("*.lycoft.npz")) == ["toy_0.png.lycoft.npz", "toy_1.png.lycoft.npz"]
    with safe_open(str(out / "sks_sdxl_lora.safetensors"), "pt") as f:
        md = f.metadata()
        blocks = [f.get_tensor(k) for k in f.keys() if k.endswith(".oft_blocks")]
    assert md["ss_steps"] == "4" and md["ss_optimizer"].startswith("Prodigy")
    assert md["ss_min_snr_gamma"] == "5.0" and md["ss_noise_offset"] == "0.0357"
    assert {b.shape[-1] for b in blocks} == {32}  # network_dim = 32 is the block size
    assert max(float(b.abs().max()) for b in blocks) > 0  # it trained
    log = caplog.text
    assert "holds no prompts: no samples will be rendered" in log
    assert "ignored (as sd-scripts ignores them): epoch, noise_offset_type" in log
