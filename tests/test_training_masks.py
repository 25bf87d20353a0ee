"""Masked training (kohya's ``masked_loss``, ``conditioning_data_dir``, ``alpha_mask``): where masks come from,
how they follow their image to the latent grid, the loss they weight, the latent cache that carries them,
the configuration rules, and short runs whose loss a mask switches off."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from toy_images import make_toy_dataset

from lycoft.training import loop
from lycoft.training.buckets import plan_crop
from lycoft.training.caching import LatentCache, MaskSource
from lycoft.training.config import parse_args
from lycoft.training.dataset import TrainingDataset, build_dataset, load_mask
from lycoft.training.dataset_config import DatasetConfig, SubsetConfig, load_dataset_config
from lycoft.training.errors import ConfigError
from lycoft.training.losses import diffusion_loss, min_snr_weights, resize_mask


def left_white(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    """A mask image: the left quarter white (trained), the rest black."""
    im = Image.new(mode, size, 0 if mode == "L" else (0, 0, 0))
    im.paste(255 if mode == "L" else (255, 255, 255), (0, 0, size[0] // 4, size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def images(folder: Path, n: int, size: tuple[int, int] = (64, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        Image.new("RGB", size, (200, 40, 40)).save(folder / f"img{i}.png")
        out.append(folder / f"img{i}.png")
    return out


def masked_dataset(tmp_path: Path, **subset) -> TrainingDataset:
    """Two 64x32 images with left-quarter masks, written on first use only (rewriting would change mtimes)."""
    if not (tmp_path / "img").exists():
        images(tmp_path / "img", 2)
        for i in range(2):
            left_white(tmp_path / "masks" / f"img{i}.png", (64, 32))
    sub = SubsetConfig(image_dir=tmp_path / "img", conditioning_data_dir=tmp_path / "masks", **subset)
    return TrainingDataset([DatasetConfig(subsets=(sub,), resolution=(64, 32))])


def mean_pool_encoder(pixels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(pixels, 8)


# -- the mask of a sample ---------------------------------------------------------------------------
def test_a_mask_image_follows_its_image_to_the_latent_grid(tmp_path):
    ds = masked_dataset(tmp_path, flip_aug=True)
    s = ds[0]
    # 64x32 pixels -> 8x4 latent cells; the white quarter is the first 2 columns of cells (mirrored when flipped)
    expected = torch.zeros(1, 4, 8)
    expected[..., slice(6, 8) if bool(s["flipped"]) else slice(0, 2)] = 1.0
    assert torch.equal(s["mask"], expected)
    # kohya's rule: red channel / 255, resized with the image, then area-averaged to the loss's grid
    plan = plan_crop((64, 32), (64, 32))
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "masks" / "img0.png"))[..., 0].copy()).float() / 255
    direct = torch.nn.functional.interpolate(pixels[None, None], size=(4, 8), mode="area")[0]
    assert torch.equal(load_mask(MaskSource(tmp_path / "masks" / "img0.png", "R"), plan), direct)
    # a cell half covered gets 0.5: the mask is averaged, not thresholded
    half = Image.new("L", (64, 32))
    half.paste(255, (0, 0, 4, 32))
    half.save(tmp_path / "half.png")
    cells = load_mask(MaskSource(tmp_path / "half.png", "R"), plan)
    assert torch.equal(cells[0, :, 0], torch.full((4,), 0.5)) and cells[0, :, 1:].max() == 0
    left_white(tmp_path / "masks" / "img1.png", (68, 32))
    with pytest.raises(ConfigError, match="img1.png is 68x32 but its image is 64x32"):
        load_mask(MaskSource(tmp_path / "masks" / "img1.png", "R"), plan)


def test_alpha_masks_and_images_without_alpha(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    rgba = Image.new("RGBA", (32, 32), (10, 200, 10, 0))
    rgba.paste((10, 200, 10, 255), (0, 0, 16, 32))  # left half opaque
    rgba.save(folder / "a.png")
    Image.new("RGB", (32, 32)).save(folder / "b.png")
    ds = TrainingDataset([DatasetConfig(subsets=(SubsetConfig(image_dir=folder, alpha_mask=True),),
                                        resolution=(32, 32))])
    by_name = {Path(ds[i]["image_path"]).name: ds[i]["mask"] for i in range(2)}
    assert torch.equal(by_name["a.png"][0, :, :2], torch.ones(4, 2)) and by_name["a.png"][0, :, 2:].max() == 0
    assert torch.equal(by_name["b.png"], torch.ones(1, 4, 4))  # kohya: no alpha channel = train everywhere
    # the pixels are the image's colours, not composited over a background
    assert ds[0]["pixel_values"][1].max() > 0.5


def test_samples_without_a_mask_get_ones_when_others_have_one(tmp_path):
    images(tmp_path / "plain", 1)
    images(tmp_path / "img", 1)
    left_white(tmp_path / "masks" / "img0.png", (64, 32))
    subsets = (SubsetConfig(image_dir=tmp_path / "plain"),
               SubsetConfig(image_dir=tmp_path / "img", conditioning_data_dir=tmp_path / "masks"))
    ds = TrainingDataset([DatasetConfig(subsets=subsets, resolution=(64, 32), batch_size=2)])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=ds.batch_sampler())))
    plain = [i for i, p in enumerate(batch["image_path"]) if "plain" in p][0]
    assert batch["mask"].shape == (2, 1, 4, 8) and torch.equal(batch["mask"][plain], torch.ones(1, 4, 8))
    assert "mask" not in TrainingDataset([DatasetConfig(subsets=subsets[:1], resolution=(64, 32))])[0]


def test_missing_unused_and_wrongly_sized_masks(tmp_path, caplog):
    images(tmp_path / "img", 3)
    left_white(tmp_path / "masks" / "img0.png", (64, 32))
    left_white(tmp_path / "masks" / "img1.jpg", (64, 32))  # any image type, matched by stem
    sub = SubsetConfig(image_dir=tmp_path / "img", conditioning_data_dir=tmp_path / "masks")
    with pytest.raises(ConfigError, match=r"1 image\(s\) of .* have no mask in .*masks \(img2.png\)"):
        TrainingDataset([DatasetConfig(subsets=(sub,), resolution=(64, 32))])
    left_white(tmp_path / "masks" / "img2.png", (64, 32))
    left_white(tmp_path / "masks" / "stray.png", (64, 32))
    TrainingDataset([DatasetConfig(subsets=(sub,), resolution=(64, 32))])
    assert "1 mask(s) in" in caplog.text and "stray.png" in caplog.text
    left_white(tmp_path / "masks" / "img2.png", (32, 32))
    with pytest.raises(ConfigError, match="masks must have their image's size: img2.png is 32x32, img2.png is 64x32"):
        TrainingDataset([DatasetConfig(subsets=(sub,), resolution=(64, 32))])


# -- the loss ----------------------------------------------------------------------------------------
def test_the_mask_weights_each_element_and_is_area_resized():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 8, generator=g), torch.randn(2, 4, 4, 8, generator=g)
    t, reg = torch.tensor([10, 500]), torch.zeros(2)
    kw = dict(scheduler=scheduler, v_prediction=False, min_snr_gamma=5.0)
    plain, plain_per = diffusion_loss(pred, target, t, reg, **kw)
    # all ones: exactly the unmasked loss
    ones, _ = diffusion_loss(pred, target, t, reg, mask=torch.ones(2, 1, 4, 8), **kw)
    assert torch.equal(ones, plain)
    # kohya's apply_masked_loss: element loss * mask, then the mean over all elements (masked ones count as 0)
    mask = torch.rand(2, 1, 4, 8, generator=g)
    loss, per = diffusion_loss(pred, target, t, reg, mask=mask, **kw)
    expected_per = ((pred - target) ** 2 * mask).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per, expected_per)
    torch.testing.assert_close(loss, (expected_per * min_snr_weights(scheduler, t, 5.0, False)).mean())
    # a pixel-resolution mask is averaged over each latent cell (area interpolation)
    fine = torch.rand(2, 1, 32, 64, generator=g)
    coarse = torch.nn.functional.avg_pool2d(fine, 8)
    torch.testing.assert_close(resize_mask(fine, (4, 8)), coarse)
    a, _ = diffusion_loss(pred, target, t, reg, mask=fine, **kw)
    b, _ = diffusion_loss(pred, target, t, reg, mask=coarse, **kw)
    torch.testing.assert_close(a, b)
    zero, _ = diffusion_loss(pred, target, t, reg, mask=torch.zeros(2, 1, 4, 8), **kw)
    assert float(zero) == 0.0


# -- the latent cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("to_disk", [False, True])
def test_cached_latents_carry_their_masks(tmp_path, to_disk):
    ds = masked_dataset(tmp_path, flip_aug=True)
    uncached = [ds[i] for i in range(len(ds))]
    cache = LatentCache(mean_pool_encoder, to_disk=to_disk)
    assert ds.cache_latents(cache) == 4  # 2 images x both orientations
    for i, before in enumerate(uncached):
        after = ds[i]
        assert "pixel_values" not in after and torch.equal(after["mask"], before["mask"])
    if to_disk:
        with np.load(ds.records[0].path.with_name("img0.png.lycoft.npz")) as f:
            assert {"latents", "latents_flipped", "mask", "mask_flipped"} <= set(f.files)
        again = masked_dataset(tmp_path, flip_aug=True)
        assert again.cache_latents(LatentCache(mean_pool_encoder, to_disk=True)) == 0  # warm: masks included
    # editing a mask invalidates its entry: the new mask is served
    mask_file = tmp_path / "masks" / "img0.png"
    Image.new("RGB", (64, 32), (255, 255, 255)).save(mask_file)
    st = mask_file.stat()
    os.utime(mask_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    slot = ds.slots.index(0)
    assert torch.equal(ds[slot]["mask"], torch.ones(1, 4, 8))


# -- configuration ------------------------------------------------------------------------------------
def test_mask_keys_in_a_dataset_toml_and_the_flag_rules(tmp_path):
    images(tmp_path / "img", 1)
    left_white(tmp_path / "masks" / "img0.png", (64, 32))
    toml = tmp_path / "data.toml"
    toml.write_text(f"[general]\nalpha_mask = false\n[[datasets]]\nresolution = [64, 32]\n[[datasets.subsets]]\n"
                    f"image_dir = '{tmp_path / 'img'}'\nconditioning_data_dir = '{tmp_path / 'masks'}'\n")
    (ds,) = load_dataset_config(toml)
    assert ds.subsets[0].conditioning_data_dir == tmp_path / "masks"
    base = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--dataset_config", str(toml)]
    with pytest.raises(ConfigError, match="used with --masked_loss only; add --masked_loss"):
        build_dataset(parse_args(base))
    assert build_dataset(parse_args([*base, "--masked_loss"])).masked
    # kohya's rule: a mask folder is one subset's, not a [general] or [[datasets]] default
    toml.write_text(f"[general]\nconditioning_data_dir = '{tmp_path / 'masks'}'\n[[datasets]]\n[[datasets.subsets]]\n"
                    f"image_dir = '{tmp_path / 'img'}'\n")
    with pytest.raises(ConfigError, match=r"conditioning_data_dir belongs in a \[\[datasets.subsets\]\] entry"):
        load_dataset_config(toml)
    # --masked_loss without any mask, and the command-line folder with a dataset TOML
    train = tmp_path / "train"
    images(train / "1_tok", 1, (64, 64))
    cli = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(train)]
    with pytest.raises(ConfigError, match="--masked_loss has no masks to use"):
        build_dataset(parse_args([*cli, "--masked_loss"]))
    with pytest.raises(ConfigError, match="--conditioning_data_dir is for --train_data_dir"):
        parse_args([*base, "--masked_loss", "--conditioning_data_dir", str(tmp_path / "masks")])
    # --alpha_mask reaches every subset (kohya's flag fallback) and needs no --masked_loss
    assert all(r.mask is not None for r in build_dataset(parse_args([*cli, "--alpha_mask"])).records)
    with pytest.raises(ConfigError, match="alpha_mask and conditioning_data_dir .* both give loss masks; keep one"):
        build_dataset(parse_args([*cli, "--alpha_mask", "--masked_loss", "--conditioning_data_dir",
                                  str(tmp_path / "masks")]))


def test_the_mask_folder_covers_training_folders_not_regularization_ones(tmp_path):
    train, reg, masks = tmp_path / "train", tmp_path / "reg", tmp_path / "masks"
    images(train / "2_tok", 2, (64, 64))
    images(reg / "1_class", 1, (64, 64))
    for i in range(2):
        left_white(masks / f"img{i}.png", (64, 64))
    cfg = parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(train),
                      "--reg_data_dir", str(reg), "--masked_loss", "--conditioning_data_dir", str(masks),
                      "--resolution", "64"])
    ds = build_dataset(cfg)
    assert {r.subset.is_reg: r.mask is not None for r in ds.records} == {False: True, True: False}


# -- runs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n=2, size=64)


def run(toy: Path, out: Path, **extra) -> loop.TrainResult:
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(toy), "--caption_extension",
            ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0", "--seed", "3", "--output_dir", str(out),
            "--max_train_steps", "2", "--network_args", "preset=attn-only"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return loop.train(parse_args(argv))


def test_black_masks_and_transparent_images_train_nothing(toy, tmp_path):
    """The mask reaches the loss on both paths: mask images with pixels, alpha masks with cached latents."""
    masks = tmp_path / "masks"
    masks.mkdir()
    for image in (toy / "1_sks toy").glob("*.png"):
        Image.new("RGB", (64, 64)).save(masks / image.name)
    result = run(toy, tmp_path / "masked", masked_loss="true", conditioning_data_dir=masks)
    assert result.losses == [0.0, 0.0]
    transparent = tmp_path / "alpha" / "1_sks toy"
    transparent.mkdir(parents=True)
    for image in (toy / "1_sks toy").iterdir():
        if image.suffix == ".png":
            rgba = Image.open(image).convert("RGBA")
            rgba.putalpha(0)
            rgba.save(transparent / image.name)
        else:
            (transparent / image.name).write_bytes(image.read_bytes())
    result = run(tmp_path / "alpha", tmp_path / "alpha-out", alpha_mask="true", cache_latents_to_disk="true")
    assert result.losses == [0.0, 0.0]
    assert all(float(p.detach().abs().max()) == 0 for p in result.network.parameters())  # still the identity
