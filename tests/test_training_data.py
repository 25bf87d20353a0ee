"""Data end to end through real training runs: the kohya dataset TOML with buckets and disk caches (on
SDXL, so size conditioning varies per bucket), DreamBooth folders with captions, class-image generation
and an unreadable image, and bad input that must fail before any model is loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from safetensors import safe_open
from toy_images import make_toy_dataset

from lycoft.training import loop
from lycoft.training.config import parse_args


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


COMMON = ["--max_data_loader_n_workers", "0", "--seed", "5", "--learning_rate", "1e-3", "--max_train_steps", "2"]


def test_kohya_dataset_toml_with_buckets_and_caches_on_sdxl(tmp_path, caplog):
    portrait = make_toy_dataset(tmp_path / "portrait", n=2, size=(48, 128)) / "1_sks toy"
    landscape = make_toy_dataset(tmp_path / "landscape", n=2, size=(128, 48)) / "1_sks toy"
    reg = make_toy_dataset(tmp_path / "reg", n=2, size=64, token="toy", caption="a photo of a toy") / "1_toy"
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""
[general]
caption_extension = ".txt"
enable_bucket = true
bucket_reso_steps = 32
min_bucket_reso = 32
max_bucket_reso = 128

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{portrait}"
  num_repeats = 2
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "{landscape}"
  num_repeats = 2
  class_tokens = "sks toy"

  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
""")
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sdxl", "--dataset_config", str(toml), *COMMON,
            "--network_args", "preset=attn-only", "block_size=8", "--network_train_unet_only",
            "--cache_latents_to_disk", "--cache_text_encoder_outputs", "--prior_loss_weight", "0.5",
            "--output_dir", str(tmp_path / "out")]
    caplog.set_level(logging.INFO)
    result = loop.train(parse_args(argv))
    md = metadata(result.adapter)
    # three buckets: portrait 48x128 -> 32x96, landscape -> 96x32, the square reg images -> 64x64;
    # 2 x 2 images x 2 repeats = 8 training samples, and the 2 reg images cycled to as many
    assert json.loads(md["ss_bucket_info"])["buckets"] == {"32x96": 4, "64x64": 8, "96x32": 4}
    assert (md["ss_num_train_images"], md["ss_num_reg_images"]) == ("8", "8")
    assert md["ss_batch_size_per_device"] == "2"  # the TOML's batch_size, not the flag's default
    assert md["ss_prior_loss_weight"] == "0.5" and md["ss_cache_latents"] == "True"
    # latents on disk next to each image (the flipped variant of the flip_aug subset too), reused next run
    npz = sorted(tmp_path.rglob("*.lycoft.npz"))
    assert len(npz) == 6
    with __import__("numpy").load(npz[0]) as f:
        flipped = "latents_flipped" in f.files
    assert flipped == ("portrait" in str(npz[0]))
    assert "latent cache: 8 image(s) encoded, 0 reused" in caplog.text  # 6 images + 2 mirrored portraits
    caplog.clear()
    loop.train(parse_args(argv + ["--max_train_steps", "1", "--output_dir", str(tmp_path / "again")]))
    assert "latent cache: 0 image(s) encoded, 8 reused" in caplog.text


def test_dreambooth_folders_captions_class_images_and_an_unreadable_image(tmp_path, caplog):
    train = make_toy_dataset(tmp_path / "train", n=3, size=64, repeats=2)
    folder = train / "2_sks toy"
    (folder / "toy_002.txt").unlink()  # this one falls back to the folder's tokens
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (train / "notes").mkdir()  # no '<repeats>_' prefix: skipped with a warning
    reg = tmp_path / "reg"
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(train),
            "--reg_data_dir", str(reg), "--class_prompt", "a photo of a toy", "--num_class_images", "2",
            "--caption_extension", ".txt", "--resolution", "64", *COMMON, "--network_args", "preset=attn-only",
            "--output_dir", str(tmp_path / "out")]
    caplog.set_level(logging.INFO)
    result = loop.train(parse_args(argv))
    generated = sorted(p.name for p in (reg / "1_a photo of a toy").iterdir())
    assert generated == ["class_00000.png", "class_00000.txt", "class_00001.png", "class_00001.txt"]
    assert (reg / "1_a photo of a toy" / "class_00000.txt").read_text().strip() == "a photo of a toy"
    assert result.skipped_images == 1 and "broken.png" in caplog.text
    assert "skipping folder" in caplog.text and "notes" in caplog.text
    md = metadata(result.adapter)
    assert md["ss_num_skipped_images"] == "1"
    assert (md["ss_num_train_images"], md["ss_num_reg_images"]) == ("6", "6")  # 3 images x 2 repeats
    dirs = json.loads(md["ss_dataset_dirs"])
    assert dirs["2_sks toy"] == {"n_repeats": 2, "img_count": 3}
    assert dirs["1_a photo of a toy"]["img_count"] == 2
    tags = json.loads(md["ss_tag_frequency"])["2_sks toy"]
    assert tags == {"a photo of sks toy": 2, "sks toy": 1}  # two caption files, one fallback
    # a second run finds the class images and generates none
    loop.train(parse_args(argv + ["--max_train_steps", "1", "--output_dir", str(tmp_path / "again")]))
    assert len(list((reg / "1_a photo of a toy").glob("*.png"))) == 2


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: errors must come before that."""
    import lycoft.checkpoints.loading as loading
    import lycoft.training.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input error was reported")

    monkeypatch.setattr(models, "load_models", refuse)
    monkeypatch.setattr(loading, "load_pipeline", refuse)


def _case(tmp_path: Path, name: str) -> tuple[list[str], str]:
    base = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--resolution", "64",
            "--output_dir", str(tmp_path / "out")]
    good = make_toy_dataset(tmp_path / "good", n=1, size=64)
    if name == "missing image folder":
        return base + ["--train_data_dir", str(tmp_path / "nope")], "is not a folder"
    if name == "missing image_dir in the dataset toml":
        toml = tmp_path / "d.toml"
        toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "gone"}"\n')
        return base + ["--dataset_config", str(toml)], "is not a folder"
    if name == "empty dataset":
        (tmp_path / "empty" / "1_x").mkdir(parents=True)
        return base + ["--train_data_dir", str(tmp_path / "empty")], "no usable training images"
    if name == "only unreadable images":
        (tmp_path / "bad" / "1_x").mkdir(parents=True)
        (tmp_path / "bad" / "1_x" / "a.png").write_bytes(b"garbage")
        return base + ["--train_data_dir", str(tmp_path / "bad")], "1 unreadable ones skipped"
    if name == "unknown flag":
        return base + ["--train_data_dir", str(good), "--learning_rat", "1"], "did you mean '--learning_rate'"
    if name == "typo in the config toml":
        toml = tmp_path / "c.toml"
        toml.write_text(f'train_data_dir = "{good}"\n[optimizer]\nlearning_rat = 1e-4\n')
        return base + ["--config", str(toml)], "unknown key 'learning_rat' in [optimizer]"
    if name == "typo in the dataset toml":
        toml = tmp_path / "d.toml"
        toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{good / "1_sks toy"}"\nnum_repeat = 2\n')
        return base + ["--dataset_config", str(toml)], "unknown key 'num_repeat'"
    if name == "optimizer that cannot be imported":
        return base + ["--train_data_dir", str(good), "--optimizer_type", "nosuchpkg.Opt"], "cannot import"
    if name == "8-bit AdamW without bitsandbytes":
        if __import__("importlib").util.find_spec("bitsandbytes"):
            pytest.skip("bitsandbytes is installed")
        return base + ["--train_data_dir", str(good), "--optimizer_type", "AdamW8bit"], "needs bitsandbytes"
    if name == "prompt file that is not kohya's JSON":
        prompts = tmp_path / "p.json"
        prompts.write_text('{"prompt": "a dog"}')
        return base + ["--train_data_dir", str(good), "--sample_prompts", str(prompts)], "is a list of prompts"
    raise AssertionError(name)


@pytest.mark.parametrize("name", [
    "missing image folder", "missing image_dir in the dataset toml", "empty dataset", "only unreadable images",
    "unknown flag", "typo in the config toml", "typo in the dataset toml", "optimizer that cannot be imported",
    "8-bit AdamW without bitsandbytes", "prompt file that is not kohya's JSON",
])
def test_bad_input_fails_clearly_before_any_model_loads(tmp_path, no_model, capsys, name):
    argv, message = _case(tmp_path, name)
    assert loop.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
