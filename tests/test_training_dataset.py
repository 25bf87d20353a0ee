"""Datasets: folders, captions, kohya dataset TOML, buckets, augmentation, determinism, caches."""

from __future__ import annotations

import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from toy_images import make_toy_dataset

from lycoft.training.buckets import Bucketer, make_buckets, plan_crop
from lycoft.training.caching import LatentCache, TextEmbeddingCache
from lycoft.training.captions import transform_caption
from lycoft.training.config import parse_args
from lycoft.training.dataset import TrainingDataset, build_dataset
from lycoft.training.dataset_config import (
    DatasetConfig,
    SubsetConfig,
    dataset_defaults,
    dreambooth_subsets,
    load_dataset_config,
    parse_dreambooth_folder_name,
)
from lycoft.training.errors import ConfigError


def save_image(path: Path, size: tuple[int, int], color=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def two_tone(path: Path, size: tuple[int, int]) -> Path:
    """Left half red, right half blue: a mirror image is easy to recognise."""
    im = Image.new("RGB", size, (255, 0, 0))
    im.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def one_dataset(image_dir: Path, **kw) -> DatasetConfig:
    sub_keys = {k: kw.pop(k) for k in list(kw) if k in SubsetConfig.__dataclass_fields__}
    return DatasetConfig(subsets=(SubsetConfig(image_dir=image_dir, **sub_keys),), **kw)


def mean_pool_encoder(calls: list[int]):
    """A stand-in VAE: 8x average pooling; records the batch size of each call."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return torch.nn.functional.avg_pool2d(pixels, 8)
    return encode


# --- DreamBooth folders -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("10_sks dog", (10, "sks dog")),
    ("1_sks_dog", (1, "sks_dog")),  # kohya keeps later underscores in the tokens
    ("3_", (3, "")),
    ("sks dog", None),
    ("x10_sks", None),
    ("10sks", None),
])
def test_dreambooth_folder_names(name, expected):
    assert parse_dreambooth_folder_name(name) == expected


def test_dreambooth_folders_repeats_tokens_and_skips(tmp_path, caplog):
    root = tmp_path / "train"
    for i in range(2):
        save_image(root / "3_sks dog" / f"{i}.png", (32, 32))
    save_image(root / "no_number" / "a.png", (32, 32))
    save_image(root / "loose.png", (32, 32))
    with caplog.at_level(logging.WARNING):
        subsets = dreambooth_subsets(root, is_reg=False)
    assert [(s.num_repeats, s.class_tokens, s.is_reg) for s in subsets] == [(3, "sks dog", False)]
    assert any("no_number" in r.getMessage() and "no '<repeats>_' prefix" in r.getMessage() for r in caplog.records)
    assert any("directly inside" in r.getMessage() for r in caplog.records)

    ds = TrainingDataset([DatasetConfig(subsets=tuple(subsets), resolution=(32, 32))])
    assert len(ds) == 6  # 2 images x 3 repeats
    assert {ds[i]["caption"] for i in range(len(ds))} == {"sks dog"}  # no caption files: folder tokens


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"--train_data_dir '{missing}' is not a folder"):
        dreambooth_subsets(missing, is_reg=False)
    with pytest.raises(ConfigError, match="image folder .*nope.* does not exist"):
        TrainingDataset([one_dataset(missing, resolution=(32, 32))])


def test_folder_without_repeat_folders_is_a_clear_error(tmp_path):
    save_image(tmp_path / "train" / "a.png", (32, 32))
    with pytest.raises(ConfigError, match=r"has no '<repeats>_<class tokens>' subfolders.*10_sks dog"):
        dreambooth_subsets(tmp_path / "train", is_reg=False)


def test_empty_dataset_is_a_clear_error(tmp_path):
    folder = tmp_path / "1_sks"
    folder.mkdir()
    (folder / "notes.md").write_text("not an image")
    with pytest.raises(ConfigError, match=f"no usable training images in '{folder}'.*supported: .png"):
        TrainingDataset([one_dataset(folder, resolution=(32, 32))])


def test_unreadable_images_are_skipped_counted_and_named_once(tmp_path, caplog):
    folder = tmp_path / "1_sks"
    save_image(folder / "good.png", (32, 32))
    (folder / "garbage.png").write_bytes(b"this is not a png")
    good = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        ds = TrainingDataset([one_dataset(folder, resolution=(32, 32))])
    assert ds.num_skipped == 2
    assert sorted(p.name for p, _ in ds.skipped_images) == ["garbage.png", "truncated.png"]
    for name in ("garbage.png", "truncated.png"):
        lines = [r for r in caplog.records if name in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0].getMessage()
    assert len(ds) == 1 and ds[0]["pixel_values"].shape == (3, 32, 32)


# --- captions ---------------------------------------------------------------------------------------


def test_caption_extension_rule_and_class_token_fallback(tmp_path, caplog):
    folder = tmp_path / "2_sks toy"
    save_image(folder / "a.png", (32, 32))
    save_image(folder / "b.png", (32, 32))
    (folder / "a.txt").write_text("a txt caption\n")
    (folder / "b.caption").write_text("\n  a caption caption \n")

    def captions(ext: str) -> dict[str, str]:
        ds = TrainingDataset([one_dataset(folder, resolution=(32, 32), caption_extension=ext,
                                          class_tokens="sks toy")])
        return {Path(r.path).stem: r.caption for r in ds.records}

    with caplog.at_level(logging.WARNING):
        # kohya's default '.caption': b has one, a falls back to the class tokens (not to a.txt)
        assert captions(".caption") == {"a": "sks toy", "b": "a caption caption"}
    hint = " ".join(r.getMessage() for r in caplog.records)
    assert "1 of 2 images" in hint and "set caption_extension = '.txt'" in hint
    assert captions(".txt") == {"a": "a txt caption", "b": "sks toy"}
    assert captions("txt") == captions(".txt")  # the dot is optional


def test_empty_caption_file_falls_back_to_class_tokens(tmp_path):
    folder = tmp_path / "1_tok"
    save_image(folder / "a.png", (32, 32))
    (folder / "a.txt").write_text("  \n")
    ds = TrainingDataset([one_dataset(folder, resolution=(32, 32), caption_extension=".txt", class_tokens="tok")])
    assert ds.records[0].caption == "tok"


def test_shuffle_keeps_the_first_keep_tokens_in_place():
    caption = "sks, dog, red collar, grass, sunny, park"
    orders = set()
    for seed in range(50):
        out = transform_caption(caption, random.Random(seed), shuffle=True, keep_tokens=2).split(", ")
        assert out[:2] == ["sks", "dog"]
        assert sorted(out[2:]) == sorted(["red collar", "grass", "sunny", "park"])
        orders.add(tuple(out))
    assert len(orders) > 5  # the rest really is shuffled


def test_keep_tokens_separator_fixes_prefix_and_suffix():
    caption = "sks, dog ||| a, b, c, d ||| masterpiece"
    for seed in range(20):
        out = transform_caption(caption, random.Random(seed), shuffle=True,
                                keep_tokens_separator="|||").split(", ")
        assert out[:2] == ["sks", "dog"] and out[-1] == "masterpiece"
        assert sorted(out[2:-1]) == ["a", "b", "c", "d"]
    # without augmentation the separator is simply removed
    assert transform_caption(caption, random.Random(0), keep_tokens_separator="|||") == \
        "sks, dog, a, b, c, d, masterpiece"


def test_caption_without_augmentation_is_untouched():
    sentence = "A photo of sks dog, sitting  on grass."
    assert transform_caption(sentence, random.Random(0)) == sentence


def test_caption_dropout_rate():
    rng = random.Random(0)
    assert all(transform_caption("a, b", rng, dropout_rate=1.0) == "" for _ in range(10))
    dropped = sum(transform_caption("a, b", rng, dropout_rate=0.3) == "" for _ in range(4000))
    assert abs(dropped / 4000 - 0.3) < 0.03


def test_prefix_suffix_and_secondary_separator_in_kohya_order():
    # prefix and suffix join with a space; ';;;' keeps "red;;;collar" one tag through the shuffle, then
    # becomes the caption separator
    for seed in range(20):
        out = transform_caption("dog, red;;;collar, grass", random.Random(seed), prefix="sks,", suffix=", photo",
                                shuffle=True, keep_tokens=1, secondary_separator=";;;")
        tags = out.split(", ")
        assert tags[0] == "sks" and sorted(tags[1:]) == sorted(["dog", "red,collar", "grass", "photo"])
    # other separators: tags split on it and re-joined with it and a space
    assert transform_caption("a; b; c", random.Random(0), separator=";", tag_dropout_rate=1e-9) == "a; b; c"
    assert transform_caption("sks dog", random.Random(0), prefix="photo of") == "photo of sks dog"
    # a dropped caption is empty, prefix included (kohya drops after adding it)
    assert transform_caption("a, b", random.Random(0), prefix="sks", drop=True) == ""


def test_wildcards_choose_one_line_and_one_option_each_step():
    caption = "a {red|blue|green} {{literal}} {cat|dog}\nsecond line {x|y}"
    seen = set()
    for seed in range(200):
        out = transform_caption(caption, random.Random(seed), wildcard=True)
        seen.add(out)
        assert out in {f"a {c} {{literal}} {a}" for c in ("red", "blue", "green") for a in ("cat", "dog")} | \
            {"second line x", "second line y"}
    assert len(seen) == 8  # every line and every option occurs
    # without wildcards a multi-line caption is its first line, braces untouched
    assert transform_caption(caption, random.Random(0)) == "a {red|blue|green} {{literal}} {cat|dog}"


def test_wildcard_subsets_read_every_line_and_every_nth_epoch_drops_captions(tmp_path):
    folder = tmp_path / "img"
    save_image(folder / "a.png", (32, 32))
    (folder / "a.txt").write_text("sks {dog|puppy}\n\nsks in the {park|snow}\n")
    ds = TrainingDataset([one_dataset(folder, resolution=(32, 32), caption_extension=".txt", num_repeats=1,
                                      enable_wildcard=True, caption_dropout_every_n_epochs=3)])
    assert ds.records[0].caption == "sks {dog|puppy}\nsks in the {park|snow}"
    captions = {epoch: ds[(epoch, 0)]["caption"] for epoch in range(30)}
    # epochs 3, 6, 9... counted from 1 (kohya) are 2, 5, 8... counted from 0
    assert all((captions[e] == "") == (e % 3 == 2) for e in captions)
    assert {c for c in captions.values() if c} == {"sks dog", "sks puppy", "sks in the park", "sks in the snow"}
    assert ds[(4, 0)]["caption"] == captions[4]  # a pure function of (seed, epoch, slot)
    with pytest.raises(ConfigError, match=r"change every step \(shuffle, dropout or wildcards\)"):
        ds.fixed_captions()
    with pytest.raises(ValueError, match="caption_dropout_every_n_epochs must be >= 0"):
        SubsetConfig(image_dir=folder, caption_dropout_every_n_epochs=-1)
    with pytest.raises(ValueError, match="caption_separator must be a visible character"):
        SubsetConfig(image_dir=folder, caption_separator=" ")


def test_caption_options_come_from_dataset_toml_and_trainer_flags(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    toml = tmp_path / "data.toml"
    toml.write_text(f'''[general]
caption_prefix = "sks"
enable_wildcard = true
[[datasets]]
[[datasets.subsets]]
image_dir = "{img.as_posix()}"
caption_suffix = "photo"
caption_separator = ";"
secondary_separator = "^"
caption_dropout_every_n_epochs = 2
''')
    (sub,) = load_dataset_config(toml)[0].subsets
    assert (sub.caption_prefix, sub.caption_suffix, sub.enable_wildcard, sub.caption_separator,
            sub.secondary_separator, sub.caption_dropout_every_n_epochs) == ("sks", "photo", True, ";", "^", 2)
    cfg = parse_args(["--caption_prefix", "sks", "--enable_wildcard", "--caption_dropout_every_n_epochs", "4"],
                     check=False)
    (sub,) = load_dataset_config(toml, defaults=dataset_defaults(cfg))[0].subsets
    assert sub.caption_dropout_every_n_epochs == 2 and sub.caption_prefix == "sks"  # the TOML wins
    with pytest.raises(ConfigError, match=r"--cache_text_encoder_outputs needs fixed captions, but "
                                          r"--enable_wildcard, --caption_dropout_every_n_epochs change them"):
        parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(tmp_path),
                    "--cache_text_encoder_outputs", "--network_train_unet_only", "--enable_wildcard",
                    "--caption_dropout_every_n_epochs", "2"])


def test_tag_dropout_keeps_kept_tokens():
    rng = random.Random(0)
    outs = [transform_caption("sks, a, b, c, d", rng, keep_tokens=1, tag_dropout_rate=0.5).split(", ")
            for _ in range(200)]
    assert all(o[0] == "sks" for o in outs)
    kept = sum(len(o) - 1 for o in outs) / (200 * 4)
    assert 0.4 < kept < 0.6


# --- kohya dataset TOML ------------------------------------------------------------------------------


def test_kohya_dataset_toml_inheritance(tmp_path):
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for d in (a, b, c):
        d.mkdir()
    toml = tmp_path / "data.toml"
    toml.write_text(f"""
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = [640, 512]
batch_size = 4
enable_bucket = true
min_bucket_reso = 320

  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 10
  class_tokens = "sks dog"

  [[datasets.subsets]]
  image_dir = "{b}"
  is_reg = true
  keep_tokens = 0
  caption_extension = ".caption"

[[datasets]]
resolution = 256
shuffle_caption = false

  [[datasets.subsets]]
  image_dir = "{c}"
""")
    d1, d2 = load_dataset_config(toml, defaults={"batch_size": 2, "flip_aug": True, "resolution": (512, 512)})
    assert (d1.resolution, d1.batch_size, d1.enable_bucket, d1.min_bucket_reso) == ((640, 512), 4, True, 320)
    sa, sb = d1.subsets
    assert (sa.num_repeats, sa.class_tokens, sa.shuffle_caption, sa.keep_tokens, sa.caption_extension) == \
        (10, "sks dog", True, 1, ".txt")
    assert (sb.is_reg, sb.keep_tokens, sb.caption_extension, sb.num_repeats) == (True, 0, ".caption", 1)
    assert sa.flip_aug and sb.flip_aug  # trainer flags are the lowest layer
    assert (d2.resolution, d2.batch_size, d2.enable_bucket) == ((256, 256), 2, False)
    assert d2.subsets[0].shuffle_caption is False and d2.subsets[0].keep_tokens == 1


@pytest.mark.parametrize(("body", "expected"), [
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "IMG"\nnum_repeat = 2\n',
     r"unknown key 'num_repeat' in \[\[datasets.subsets\]\] #1 of \[\[datasets\]\] #1 in .*data.toml; "
     r"did you mean 'num_repeats'\?"),
    ('[general]\nshufle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "IMG"\n',
     r"unknown key 'shufle_caption' in \[general\].*did you mean 'shuffle_caption'"),
    ('[[dataset]]\n[[dataset.subsets]]\nimage_dir = "IMG"\n', r"did you mean 'datasets'"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "IMG"\nresolution = 512\n',
     r"'resolution' cannot go in \[\[datasets.subsets\]\].*move it up"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "IMG"\ncolor_aug = true\n',
     r"'color_aug' .* is a kohya option lycoft does not support"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "IMG"\nnum_repeats = "2"\n',
     r"'num_repeats' in .* must be an integer, got '2' \(str\)"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "IMG/missing"\n',
     r"image_dir of \[\[datasets.subsets\]\] #1 .* '.*missing' is not a folder"),
    ('[[datasets]]\nresolution = 512\n', r"has no \[\[datasets.subsets\]\]"),
    ('[[datasets]]\nenable_bucket = true\nmin_bucket_reso = 250\n[[datasets.subsets]]\nimage_dir = "IMG"\n',
     r"\[\[datasets\]\] #1 .*: min_bucket_reso 250 is not a multiple of bucket_reso_steps 64"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "IMG"\nnum_repeats = 0\n',
     r"\[\[datasets.subsets\]\] #1 .*: num_repeats must be >= 1"),
])
def test_kohya_dataset_toml_errors(tmp_path, body, expected):
    img = tmp_path / "img"
    img.mkdir()
    toml = tmp_path / "data.toml"
    toml.write_text(body.replace("IMG", str(img)))
    with pytest.raises(ConfigError, match=expected):
        load_dataset_config(toml)


# --- buckets -----------------------------------------------------------------------------------------


def test_bucket_set_respects_area_steps_and_limits():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w * h <= 512 * 512
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert (h, w) in buckets  # symmetric


@pytest.mark.parametrize(("size", "bucket"), [
    ((512, 512), (512, 512)),
    ((1000, 1000), (512, 512)),
    ((1024, 512), (704, 320)),  # aspect 2 -> 2.2, the nearest available
    ((512, 1024), (320, 704)),
    ((768, 512), (640, 384)),  # 1.5 -> 1.67
    ((600, 800), (448, 576)),  # 0.75 -> 0.78
])
def test_images_go_to_the_bucket_of_nearest_aspect(size, bucket):
    assert Bucketer((512, 512), enable=True).bucket_for(size) == bucket


def test_without_bucketing_everything_trains_at_the_resolution():
    b = Bucketer((512, 768))
    assert b.bucket_for((100, 3000)) == (512, 768) and b.bucket_for((4000, 10)) == (512, 768)


def test_no_upscale_buckets_never_exceed_the_image_or_the_area():
    b = Bucketer((512, 512), enable=True, no_upscale=True)
    assert b.bucket_for((100, 70)) == (64, 64)
    assert b.bucket_for((300, 200)) == (256, 192)
    for size in [(2000, 1000), (5000, 700), (640, 640), (513, 300)]:
        w, h = b.bucket_for(size)
        assert w * h <= 512 * 512 and w <= size[0] and h <= size[1] and w % 64 == 0 and h % 64 == 0


def test_crop_plan_covers_the_target():
    plan = plan_crop((1024, 512), (704, 320))
    assert plan.resized == (704, 352) and plan.left_top == (0, 16)
    rng = random.Random(0)
    tops = set()
    for _ in range(30):
        p = plan_crop((300, 900), (128, 256), rng)
        assert p.resized[0] >= 128 and p.resized[1] >= 256
        assert 0 <= p.left_top[1] <= p.resized[1] - 256
        tops.add(p.left_top[1])
    assert len(tops) > 5


def mixed_aspect_folder(root: Path) -> Path:
    folder = root / "1_mix"
    sizes = [(64, 64), (128, 64), (64, 128), (96, 64), (64, 64), (128, 64), (128, 64), (70, 64)]
    for i, size in enumerate(sizes):
        save_image(folder / f"{i}.png", size, color=(i * 30, 100, 100))
    return folder


def test_batches_are_single_bucket_and_cover_the_epoch(tmp_path):
    folder = mixed_aspect_folder(tmp_path)
    ds = TrainingDataset([one_dataset(folder, resolution=(64, 64), enable_bucket=True, min_bucket_reso=32,
                                      max_bucket_reso=128, bucket_reso_steps=32, batch_size=2, num_repeats=2)])
    assert len(ds.bucket_counts()) >= 3
    for w, h in ds.bucket_counts():
        assert w * h <= 64 * 64
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ds.batch_sampler(seed=1))
    seen = []
    for batch in loader:  # default collate would fail on mixed sizes; also check the recorded sizes
        assert len({tuple(t.tolist()) for t in batch["target_size"]}) == 1
        assert batch["pixel_values"].shape[-2:] == tuple(batch["target_size"][0].tolist())
        seen += batch["image_path"]
    assert len(seen) == len(ds) == 16


def test_sdxl_size_conditioning(tmp_path):
    folder = tmp_path / "1_x"
    save_image(folder / "wide.png", (96, 48))
    ds = TrainingDataset([one_dataset(folder, resolution=(32, 32))])
    s = ds[0]
    assert s["original_size"].tolist() == [48, 96]  # (height, width) of the file
    assert s["target_size"].tolist() == [32, 32]
    assert s["crop_top_left"].tolist() == [0, 16]  # resized to 64x32, centered


# --- augmentation and determinism ---------------------------------------------------------------------


def test_flip_mirrors_pixels_and_crop(tmp_path):
    folder = tmp_path / "1_x"
    two_tone(folder / "a.png", (48, 32))
    ds = TrainingDataset([one_dataset(folder, resolution=(32, 32), flip_aug=True, num_repeats=16)])
    samples = [ds[(0, i)] for i in range(len(ds))]
    flipped = [s for s in samples if s["flipped"]]
    plain = [s for s in samples if not s["flipped"]]
    assert flipped and plain
    torch.testing.assert_close(flipped[0]["pixel_values"], plain[0]["pixel_values"].flip(-1))
    assert plain[0]["pixel_values"][0, 0, 0] > 0.9  # red on the left when not flipped
    # 48x32 resized to 48x32, centred 32-wide crop at left 8; mirrored, the offset from the left is 8 too
    assert plain[0]["crop_top_left"].tolist() == [0, 8] and flipped[0]["crop_top_left"].tolist() == [0, 8]


def test_crop_offset_is_reported_in_the_image_the_pixels_came_from(tmp_path):
    folder = tmp_path / "1_x"
    columns = torch.arange(64, dtype=torch.uint8).mul(4).expand(32, 64)  # every column distinct
    folder.mkdir()
    Image.fromarray(torch.stack([columns] * 3, -1).numpy()).save(folder / "a.png")
    ds = TrainingDataset([one_dataset(folder, resolution=(32, 32), flip_aug=True, random_crop=True,
                                      num_repeats=40)])
    image = torch.stack([columns] * 3).float() / 127.5 - 1  # (3, 32, 64), no resize needed
    lefts = set()
    for i in range(len(ds)):
        s = ds[(0, i)]
        top, left = s["crop_top_left"].tolist()
        source = image.flip(-1) if s["flipped"] else image
        torch.testing.assert_close(s["pixel_values"], source[:, top:top + 32, left:left + 32])
        lefts.add((left, bool(s["flipped"])))
    assert len(lefts) > 10  # random offsets, both orientations


def test_same_seed_same_everything_and_epochs_differ(tmp_path):
    make_toy_dataset(tmp_path / "d", n=6, size=(48, 40), repeats=2)
    folder = next((tmp_path / "d").iterdir())

    def run(seed: int, epoch: int):
        ds = TrainingDataset([one_dataset(folder, resolution=(32, 32), caption_extension=".txt", flip_aug=True,
                                          random_crop=True, shuffle_caption=True, batch_size=3)], seed=seed)
        sampler = ds.batch_sampler()
        sampler.set_epoch(epoch)
        batches = list(sampler)
        items = [ds[k] for b in batches for k in b]
        return batches, [(i["caption"], i["flipped"].item(), i["crop_top_left"].tolist()) for i in items], \
            torch.stack([i["pixel_values"] for i in items])

    b1, m1, p1 = run(0, 0)
    b2, m2, p2 = run(0, 0)
    assert b1 == b2 and m1 == m2 and torch.equal(p1, p2)
    b3, m3, _ = run(0, 1)
    b4, _, _ = run(1, 0)
    assert [k[1] for b in b3 for k in b] != [k[1] for b in b1 for k in b]  # new epoch, new order
    assert m3 != m1
    assert b4 != b1


def test_worker_count_does_not_change_the_data(tmp_path):
    make_toy_dataset(tmp_path / "d", n=4, size=32, repeats=2)
    cfg = parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path / "d"),
                      "--resolution", "32", "--flip_aug", "--caption_extension", ".txt", "--train_batch_size", "2",
                      "--seed", "5"])
    ds = build_dataset(cfg)

    def collect(workers: int) -> list[torch.Tensor]:
        sampler = ds.batch_sampler()
        sampler.set_epoch(2)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        return [b["pixel_values"] for b in loader]

    for a, b in zip(collect(0), collect(2), strict=True):
        assert torch.equal(a, b)


def test_sharding_with_accelerate_keeps_buckets_pure(tmp_path):
    from accelerate.data_loader import prepare_data_loader

    folder = mixed_aspect_folder(tmp_path)
    ds = TrainingDataset([one_dataset(folder, resolution=(64, 64), enable_bucket=True, min_bucket_reso=32,
                                      max_bucket_reso=128, bucket_reso_steps=32, batch_size=2)])
    sampler = ds.batch_sampler()
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=lambda items: items)
    covered = set()
    for rank in range(2):
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        shard.set_epoch(4)
        assert sampler.epoch == 4  # accelerate's set_epoch reaches the sampler through the shard
        for batch in shard:
            buckets = {tuple(reversed(item["target_size"].tolist())) for item in batch}
            assert len(buckets) == 1
            covered |= {p for p in (item["image_path"] for item in batch)}
    assert covered == {str(r.path) for r in ds.records}


def test_regularization_images_are_cycled_to_match_training(tmp_path):
    train = tmp_path / "2_sks dog"
    reg = tmp_path / "1_dog"
    for i in range(4):
        save_image(train / f"{i}.png", (32, 32))
    for i in range(3):
        save_image(reg / f"{i}.png", (32, 32), color=(0, 0, 200))
    ds = TrainingDataset([DatasetConfig(subsets=(SubsetConfig(train, num_repeats=2, class_tokens="sks dog"),
                                                 SubsetConfig(reg, is_reg=True, class_tokens="dog")),
                                        resolution=(32, 32))])
    assert ds.num_train_slots == 8 and ds.num_reg_slots == 8
    is_reg = [ds[i]["is_reg"].item() for i in range(len(ds))]
    assert sum(is_reg) == 8
    reg_counts = {}
    for i in range(len(ds)):
        if ds[i]["is_reg"]:
            reg_counts[ds[i]["image_path"]] = reg_counts.get(ds[i]["image_path"], 0) + 1
    assert sorted(reg_counts.values()) == [2, 3, 3]  # every reg image used, evenly

    many_reg = tmp_path / "1_cat"
    for i in range(20):
        save_image(many_reg / f"{i}.png", (32, 32))
    ds = TrainingDataset([DatasetConfig(subsets=(SubsetConfig(train, num_repeats=2),
                                                 SubsetConfig(many_reg, is_reg=True)), resolution=(32, 32))])
    assert ds.num_reg_slots == 8  # more reg images than needed: only as many as training slots


def test_regularization_only_is_an_error(tmp_path):
    reg = tmp_path / "1_dog"
    save_image(reg / "a.png", (32, 32))
    with pytest.raises(ConfigError, match="regularization images alone"):
        TrainingDataset([DatasetConfig(subsets=(SubsetConfig(reg, is_reg=True),), resolution=(32, 32))])


def test_build_dataset_from_flags_with_reg_dir(tmp_path):
    make_toy_dataset(tmp_path / "train", n=3, size=32, repeats=2)
    make_toy_dataset(tmp_path / "reg", n=2, size=32, token="toy", seed=1)
    cfg = parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path / "train"),
                      "--reg_data_dir", str(tmp_path / "reg"), "--resolution", "32", "--caption_extension",
                      ".txt"])
    ds = build_dataset(cfg)
    assert ds.num_train_slots == 6 and ds.num_reg_slots == 6
    assert ds.dataset_dirs() == {"2_sks toy": {"n_repeats": 2, "img_count": 3},
                                 "1_toy": {"n_repeats": 1, "img_count": 2}}
    assert ds.tag_frequency()["2_sks toy"] == {"a photo of sks toy": 3}


# --- caches ----------------------------------------------------------------------------------------


def toy_dataset(tmp_path: Path, n: int = 3, resolution: int = 32, **kw) -> TrainingDataset:
    """A dataset over toy images in tmp_path/d, generated on first use only (rewriting the files
    would change their mtimes and so invalidate caches)."""
    if not (tmp_path / "d").exists():
        make_toy_dataset(tmp_path / "d", n=n, size=(48, 32))
    folder = next((tmp_path / "d").iterdir())
    return TrainingDataset([one_dataset(folder, resolution=(resolution, resolution), caption_extension=".txt",
                                        **kw)])


def test_memory_latent_cache_encodes_once(tmp_path):
    ds = toy_dataset(tmp_path, flip_aug=True, num_repeats=2)
    calls: list[int] = []
    cache = LatentCache(mean_pool_encoder(calls))
    assert ds.cache_latents(cache, batch_size=4) == 6  # 3 images x both orientations
    assert calls == [4, 2]
    for epoch in range(2):
        sampler = ds.batch_sampler()
        sampler.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(ds, batch_sampler=sampler):
            assert "pixel_values" not in batch and batch["latents"].shape[1:] == (3, 4, 4)
    assert calls == [4, 2]  # epochs read the cache only
    s = ds[0]
    plan = plan_crop(ds.records[0].size, ds.records[0].bucket)
    from lycoft.training.dataset import load_pixels

    expected = torch.nn.functional.avg_pool2d(load_pixels(ds.records[0].path, plan, bool(s["flipped"]))[None], 8)[0]
    torch.testing.assert_close(s["latents"], expected)


def test_disk_latent_cache_survives_runs_and_notices_changes(tmp_path):
    ds = toy_dataset(tmp_path)
    calls: list[int] = []
    assert ds.cache_latents(LatentCache(mean_pool_encoder(calls), to_disk=True)) == 3
    files = sorted(p.name for p in ds.records[0].path.parent.glob("*.lycoft.npz"))
    assert files == ["toy_000.png.lycoft.npz", "toy_001.png.lycoft.npz", "toy_002.png.lycoft.npz"]

    again = toy_dataset(tmp_path)  # a new run: fresh objects, same files
    assert again.cache_latents(LatentCache(mean_pool_encoder(calls), to_disk=True)) == 0
    assert len(calls) == 3

    changed = again.records[1].path
    Image.new("RGB", (48, 32), (0, 255, 0)).save(changed)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime file systems
    cache = LatentCache(mean_pool_encoder(calls), to_disk=True)
    assert again.cache_latents(cache) == 1  # only the edited image
    slot = again.slots.index(1)
    assert again[slot]["latents"][1].mean() > 0.9  # the new, green pixels were encoded
    assert again[slot]["latents"][0].mean() < -0.9

    smaller = toy_dataset(tmp_path, resolution=16)  # another bucket for every image
    assert smaller.cache_latents(LatentCache(mean_pool_encoder(calls), to_disk=True)) == 3


def test_disk_latent_cache_leaves_no_temporaries(tmp_path, monkeypatch, caplog):
    """A run killed while writing a cache file leaves ``<image>.lycoft.npz.<pid>.tmp`` in the image folder: the
    next run removes it and says so (not one of a live process: another rank may be writing it). Ctrl-C in
    the middle of a write leaves none."""
    from lycoft.training import caching

    ds = toy_dataset(tmp_path)
    folder = ds.records[0].path.parent
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    stale = folder / f"toy_000.png.lycoft.npz.{gone.pid}.tmp"
    live = folder / f"toy_001.png.lycoft.npz.{os.getppid()}.tmp"
    for f in (stale, live):
        f.write_bytes(b"half a file")
    caplog.set_level(logging.INFO)
    assert ds.cache_latents(LatentCache(mean_pool_encoder([]), to_disk=True)) == 3
    assert not stale.exists() and live.exists()
    assert f"removed {stale}, left by an interrupted run" in caplog.text

    def interrupted(fh, **arrays):
        fh.write(b"PK half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(caching.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        toy_dataset(tmp_path, resolution=16).cache_latents(LatentCache(mean_pool_encoder([]), to_disk=True))
    assert sorted(folder.glob("*.tmp")) == [live]


def test_latent_cache_dir_and_memory_invalidation(tmp_path):
    ds = toy_dataset(tmp_path, n=2)
    calls: list[int] = []
    cache = LatentCache(mean_pool_encoder(calls), to_disk=True, cache_dir=tmp_path / "cache")
    ds.cache_latents(cache)
    assert len(list((tmp_path / "cache").glob("*.lycoft.npz"))) == 2
    assert not list(ds.records[0].path.parent.glob("*.npz"))

    mem = LatentCache(mean_pool_encoder(calls))
    ds.cache_latents(mem)
    n = len(calls)
    path = ds.records[0].path
    Image.new("RGB", (48, 32), (0, 0, 0)).save(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    slot = ds.slots.index(0)
    assert ds[slot]["latents"].max() < -0.9  # re-encoded on access: black pixels
    assert len(calls) == n + 1


def test_latent_caching_refuses_random_crop(tmp_path):
    ds = toy_dataset(tmp_path, random_crop=True)
    with pytest.raises(ConfigError, match="random_crop .* fixed crop"):
        ds.cache_latents(LatentCache(mean_pool_encoder([])))


def test_text_embedding_cache(tmp_path):
    calls: list[list[str]] = []

    def encode(captions: list[str]):
        calls.append(list(captions))
        hidden = torch.stack([torch.full((2, 4), float(len(c))) for c in captions])
        return hidden, hidden[:, 0]  # SDXL-like: (hidden states, pooled)

    cache = TextEmbeddingCache(encode, to_disk=True, cache_dir=tmp_path / "te", namespace="sd1|clip_skip=1")
    assert cache.fill(["a", "bb", "a"], batch_size=8) == 2
    hidden, pooled = cache.get(["bb", "a", "bb"])
    assert hidden.shape == (3, 2, 4) and pooled.shape == (3, 4)
    assert hidden[:, 0, 0].tolist() == [2.0, 1.0, 2.0]
    assert len(calls) == 1

    later = TextEmbeddingCache(encode, to_disk=True, cache_dir=tmp_path / "te", namespace="sd1|clip_skip=1")
    assert later.fill(["a", "bb"]) == 0
    other = TextEmbeddingCache(encode, to_disk=True, cache_dir=tmp_path / "te", namespace="sd1|clip_skip=2")
    assert other.fill(["a"]) == 1  # another encoder setup is not reused

    mem = TextEmbeddingCache(lambda cs: torch.zeros(len(cs), 3))
    assert mem.get(["x", "y"]).shape == (2, 3)


def test_fixed_captions_for_text_cache(tmp_path):
    ds = toy_dataset(tmp_path)
    assert ds.fixed_captions() == ["a photo of sks toy"]
    with pytest.raises(ConfigError, match="change every step"):
        toy_dataset(tmp_path, shuffle_caption=True).fixed_captions()


# --- toy data ---------------------------------------------------------------------------------------


def test_toy_dataset_layout_and_determinism(tmp_path):
    root = make_toy_dataset(tmp_path / "a", n=3, size=40, seed=3, token="sks toy", repeats=5)
    folder = root / "5_sks toy"
    assert sorted(p.name for p in folder.iterdir()) == [
        "toy_000.png", "toy_000.txt", "toy_001.png", "toy_001.txt", "toy_002.png", "toy_002.txt"]
    assert (folder / "toy_000.txt").read_text().strip() == "a photo of sks toy"
    with Image.open(folder / "toy_000.png") as im:
        assert im.size == (40, 40)
        # the disc is yellow, the background random: some pixel is the toy's yellow
        assert (245, 200, 40) in {im.getpixel((x, y)) for x in range(40) for y in range(40)}
    again = make_toy_dataset(tmp_path / "b", n=3, size=40, seed=3, repeats=5)
    assert (again / "5_sks toy" / "toy_002.png").read_bytes() == (folder / "toy_002.png").read_bytes()
    other = make_toy_dataset(tmp_path / "c", n=3, size=40, seed=4, repeats=5)
    assert (other / "5_sks toy" / "toy_002.png").read_bytes() != (folder / "toy_002.png").read_bytes()


def test_log_aspect_assignment_is_transpose_symmetric():
    b = Bucketer((512, 512), enable=True)
    for ratio in [0.3, 0.5, 0.66, 0.8, 1.25, 1.7, 2.4]:
        w, h = 1000, int(1000 / ratio)
        bw, bh = b.bucket_for((w, h))
        assert b.bucket_for((h, w)) == (bh, bw)
        assert abs(math.log(bw / bh) - math.log(w / h)) < 0.2
