"""The benchmark scripts still run and report (no timing is asserted: speed lives in bench/results)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import layers  # noqa: E402
import train_step  # noqa: E402


def test_layers_report_renders_all_three_verdicts_from_the_committed_results(tmp_path):
    out = tmp_path / "layers.md"
    assert layers.main(["--from-json", str(ROOT / "bench/results/layers.json"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Training step: paired ratio" in text
    oft = next(line for line in text.splitlines() if line.startswith("- **lycoft oft** geomean"))
    assert oft.count("PASS") + oft.count("FAIL") == 3  # median, best step, paired
    data = json.loads((ROOT / "bench/results/layers.json").read_text())
    paired = [r for r in data["results"] if "paired" in r and r["method"] != "frozen"]
    assert paired and all(r["paired"] > 0 and r["frozen_paired_ms"] > 0 for r in paired)


def test_train_step_interleaved_on_the_tiny_model(tmp_path):
    out = tmp_path / "train_step.md"
    assert train_step.main(["--model", "tiny-sd1", "--steps", "1", "--warmup", "1", "--batch", "2",
                            "--methods", "frozen,lora-r8,lycoft-oft", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## tiny-sd1 (batch 2, amp no, median of 1 steps)" in text
    assert "stepped in turn (`--interleave`)" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert {"frozen", "lora-r8", "lycoft-oft"} <= set(rows)
    assert "lycoft OFT: it/s" in text
    results = json.loads(out.with_suffix(".json").read_text())["tiny-sd1 batch 2"]
    assert [r["method"] for r in results] == ["frozen", "lora-r8", "lycoft-oft"]
    assert all(r["ms"] > 0 and r["steps"] == 1 for r in results)


def test_train_step_per_process_spawned_with_two_batch_sizes(tmp_path):
    # the CUDA default (one spawned process per method, every batch size in it), run on CPU
    out = tmp_path / "train_step.md"
    assert train_step.main(["--model", "tiny-sd1", "--steps", "1", "--warmup", "1", "--batch", "1,2", "--preset",
                            "full", "--methods", "lycoft-oft,peft-boft", "--no-interleave", "--start", "spawn",
                            "--out", str(out)]) == 0
    text = out.read_text()
    assert "each method in its own process (spawn)" in text
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results) == ["tiny-sd1 batch 1", "tiny-sd1 batch 2"]
    for rows in results.values():
        assert [r["method"] for r in rows] == ["lycoft-oft", "peft-boft"]
        assert all("error" not in r and r["ms"] > 0 for r in rows), rows
        # PEFT BOFT refuses a model with conv_in (fan-in 4 x 3 x 3 = 36) in it: its convs are left out
        assert "left out: convs" in rows[1]["layers"]


def test_full_size_models_build_and_take_every_adapter_on_the_meta_device():
    # what a GPU run builds first (sd15 from the bundled config), without its 4 GB of weights
    import torch

    unet, tes = train_step.build_models("sd15", torch.device("meta"))
    assert sum(p.numel() for p in unet.parameters()) > 800e6 and unet.conv_in.weight.is_meta
    names = train_step.target_names(unet, tes, "full")
    assert len(names[0]) > 250 and len(names[1]) > 50
    for method in ("lycoft-oft", "lora-r8", "lyco-diag-oft-bp"):
        unet, tes = train_step.build_models("sd15", torch.device("meta"))
        params, desc = train_step.inject(method, unet, tes, names, "full")
        assert desc.startswith(f"{len(names[0]) + len(names[1])} layers"), (method, desc)
        assert params and all(p.is_meta for p in params)


def test_quality_on_the_toy_model_measures_what_each_rotation_side_keeps(tmp_path):
    """A rotation of the inputs keeps the angles between the neurons (rows: their energy does not move),
    one of the outputs keeps the columns'; LoRA keeps neither."""
    import quality

    out = tmp_path / "quality.md"
    assert quality.main(["--methods", "lycoft-oft,lycoft-oft-input,lora-r8", "--steps", "3", "--learning-rates",
                         "0.01", "--seeds", "0", "--sample-steps", "2", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    assert abs(rows["lycoft-oft-input"]["energy_rows"]) < 1e-8 < abs(rows["lycoft-oft-input"]["energy_cols"])
    assert abs(rows["lycoft-oft"]["energy_cols"]) < 1e-8 < abs(rows["lycoft-oft"]["energy_rows"])
    assert min(abs(rows["lora-r8"]["energy_rows"]), abs(rows["lora-r8"]["energy_cols"])) > 1e-8
    assert all(0 < rows[m]["drift_pixels"] for m in ("lycoft-oft", "lycoft-oft-input", "lora-r8"))
    assert "| lycoft-oft-input | 0.01 | 3 |" in out.read_text()


def test_quality_takes_a_checkpoint_file_data_folder_prompt_files_and_a_clip_scorer(tmp_path):
    """The path for real models: a checkpoint file, a DreamBooth folder and prompt files, scored by the toy
    judge (prompts written as toy captions) and by a CLIP model folder (here a small random one built from a
    config: the plumbing, not the scores, is what runs)."""
    import quality
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from lycoft.checkpoints.loading import BUILTIN_FILES
    from lycoft.checkpoints.tokenizer import build_clip_tokenizer
    from lycoft.toy.concept import CONCEPTS

    data = CONCEPTS["colour"].data(tmp_path / "data", n=4)
    (tmp_path / "concept.txt").write_text("a big sks circle\na small sks square\n")
    (tmp_path / "old.txt").write_text("a big red circle\na small blue triangle\n")
    common = ["--model", str(BUILTIN_FILES["toy-sd1"]), "--data", str(data), "--concept-prompts",
              str(tmp_path / "concept.txt"), "--old-prompts", str(tmp_path / "old.txt"), "--methods", "lycoft-oft",
              "--steps", "2", "--learning-rates", "0.01", "--seeds", "0", "--sample-steps", "2"]
    out = tmp_path / "judge.md"
    assert quality.main(common + ["--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in rows] == ["base", "lycoft-oft"]
    assert rows[0]["retention"] in (0.0, 0.5, 1.0)  # two old prompts, each right or not

    clip = tmp_path / "clip"
    config = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 16},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                                       "projection_dim": 16}, projection_dim=16)
    CLIPModel(config).save_pretrained(clip)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                  tokenizer=build_clip_tokenizer("real")).save_pretrained(clip)
    out = tmp_path / "clip.md"
    assert quality.main(common + ["--clip", str(clip), "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert all(-1.0 <= r["concept"] <= 1.0 and -1.0 <= r["retention"] <= 1.0 for r in rows)
    assert "scorer: CLIP" in out.read_text()
