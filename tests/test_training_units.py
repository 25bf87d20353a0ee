"""The trainer's parts one by one: losses, noise, prompt files and samplers, optimizers, LR schedules,
save naming and pruning, the per-rank batch split, text conditioning, model placement helpers."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from lycoft.training.config import config_from_dict
from lycoft.training.errors import ConfigError


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def cfg(**values):
    return config_from_dict({"pretrained_model_name_or_path": "builtin:tiny-sd1", **values}, check=False)


# -- losses and noise ---------------------------------------------------------------------------------
def test_v_target_is_the_velocity(scheduler):
    from lycoft.training.losses import target_for

    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    abar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(target_for(scheduler, x0, eps, t, True), abar.sqrt() * eps - (1 - abar).sqrt() * x0,
                          atol=1e-6)
    assert target_for(scheduler, x0, eps, t, False) is eps


def test_min_snr_weights_and_prior_weight(scheduler):
    from lycoft.training.losses import diffusion_loss, min_snr_weights, snr

    t = torch.tensor([10, 300, 900])
    s = snr(scheduler, t)
    assert s[0] > 5 > s[2]  # early steps are easy (high SNR), late ones hard
    assert torch.allclose(min_snr_weights(scheduler, t, 5.0, False), torch.clamp(s, max=5) / s)
    assert torch.allclose(min_snr_weights(scheduler, t, 5.0, True), torch.clamp(s, max=5) / (s + 1))
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    is_reg = torch.tensor([False, True, False])
    loss, per = diffusion_loss(pred, target, t, is_reg, scheduler=scheduler, v_prediction=False, min_snr_gamma=5.0,
                               prior_loss_weight=0.25)
    w = torch.clamp(s, max=5) / s * torch.tensor([1.0, 0.25, 1.0])
    assert torch.allclose(per, mse) and torch.allclose(loss, (mse * w).mean())
    plain, _ = diffusion_loss(pred, target, t, is_reg, scheduler=scheduler, v_prediction=False)
    assert torch.allclose(plain, mse.mean())


def test_noise_is_reproducible_and_offset_noise_shifts_channels():
    from lycoft.training.noise import sample_noise, sample_timesteps

    latents = torch.zeros(64, 4, 8, 8)
    a = sample_noise(latents, torch.Generator().manual_seed(1))
    assert torch.equal(a, sample_noise(latents, torch.Generator().manual_seed(1)))
    b = sample_noise(latents, torch.Generator().manual_seed(1), noise_offset=0.5)
    # the offset is one constant per image and channel: the spread of channel means grows by ~0.5^2
    assert float(b.mean(dim=(2, 3)).var()) > float(a.mean(dim=(2, 3)).var()) + 0.1
    t = sample_timesteps(1000, 1000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) < 1000


# -- prompts and samplers -----------------------------------------------------------------------------
def test_prompt_line_options_follow_kohya(caplog):
    from lycoft.training.sampling import parse_prompt_line

    p = parse_prompt_line("a photo of sks dog --n blurry, low quality --w 513 --h 768 --d 42 --s 20 --l 5.5",
                          width=64, height=64, index=3)
    assert (p.prompt, p.negative_prompt, p.width, p.height, p.seed, p.steps, p.scale, p.index) == \
        ("a photo of sks dog", "blurry, low quality", 512, 768, 42, 20, 5.5, 3)
    q = parse_prompt_line("just a prompt", width=64, height=48)
    assert (q.width, q.height, q.seed, q.steps) == (64, 48, None, 30)
    caplog.set_level(logging.WARNING)
    parse_prompt_line("x --zz 3")
    assert "unknown option '--zz'" in caplog.text
    with pytest.raises(ConfigError, match="--w needs a number"):
        parse_prompt_line("x --w wide")


def test_prompt_files(tmp_path):
    from lycoft.training.sampling import read_prompt_file

    f = tmp_path / "p.txt"
    f.write_text("# heading\n\nfirst --d 1\n  # indented comment\nsecond\n")
    prompts = read_prompt_file(f, width=64, height=64)
    assert [(p.prompt, p.index) for p in prompts] == [("first", 0), ("second", 1)]


def test_kohyas_json_and_toml_prompt_files_read_like_the_text_form(tmp_path, caplog):
    from lycoft.training.sampling import SamplePrompt, read_prompt_file

    text = tmp_path / "p.txt"
    text.write_text("a dog --n blurry --w 64 --h 48 --d 5 --s 3 --l 4.5 --ss euler_a\na cat\n")
    as_json = tmp_path / "p.json"
    as_json.write_text('[{"prompt": "a dog", "negative_prompt": "blurry", "width": 64, "height": 48, "seed": 5, '
                       '"sample_steps": 3, "scale": 4.5, "sample_sampler": "euler_a"}, "a cat"]')
    as_toml = tmp_path / "p.toml"
    as_toml.write_text('[prompt]\nwidth = 64\nheight = 48\n[[prompt.subset]]\nprompt = "a dog"\n'
                       'negative_prompt = "blurry"\nseed = 5\nsample_steps = 3\nscale = 4.5\n'
                       'sample_sampler = "euler_a"\n[[prompt.subset]]\nprompt = "a cat"\nwidth = 32\n')
    expected = SamplePrompt("a dog", "blurry", 64, 48, 5, 3, 4.5, 0, "euler_a")
    assert read_prompt_file(text, width=32, height=32)[0] == expected
    assert read_prompt_file(as_json, width=32, height=32) == read_prompt_file(text, width=32, height=32)
    assert read_prompt_file(as_toml, width=32, height=32) == [
        expected, SamplePrompt("a cat", width=32, height=48, index=1)]
    bad = tmp_path / "bad.txt"
    bad.write_text("x --ss fast")
    with pytest.raises(ConfigError, match="unknown sampler 'fast'"):
        read_prompt_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    caplog.set_level(logging.INFO)
    assert read_prompt_file(empty) == []
    assert "holds no prompts: no samples will be rendered" in caplog.text


def test_sample_pngs_carry_their_settings(tmp_path):
    from PIL import Image

    from lycoft.training.sampling import SamplePrompt, save_images

    prompts = [SamplePrompt("a dog", "blurry", 8, 8, 5, 3, 4.5, 0), SamplePrompt("a cat", index=1, sampler="euler")]
    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]
    paths = save_images(images, prompts, tmp_path, "run", "000010", sampler="ddim", run_seed=3)
    assert [p.name for p in paths] == ["run_000010_00.png", "run_000010_01.png"]
    first, second = (Image.open(p).text for p in paths)
    assert first["parameters"] == ("a dog\nNegative prompt: blurry\nSteps: 3, Sampler: ddim, CFG scale: 4.5, "
                                   "Seed: 5, Size: 8x8")
    assert (first["prompt"], first["seed"], first["steps"], first["scale"]) == ("a dog", "5", "3", "4.5")
    assert second["sampler"] == "euler" and int(second["seed"]) == prompts[1].seed_for(3)


def test_every_kohya_sampler_name_maps_to_a_scheduler(scheduler):
    from lycoft.training.flags import SAMPLERS
    from lycoft.training.sampling import make_sampler

    for name in SAMPLERS:
        try:
            s = make_sampler(name, scheduler.config)
        except ConfigError as e:  # the LMS samplers need scipy, which is optional
            assert "lms" in name and "missing" in str(e)
            continue
        assert s.config.num_train_timesteps == 1000
    with pytest.raises(ConfigError, match="unknown sampler"):
        make_sampler("dpm_fast", scheduler.config)


def test_image_grid_lays_out_rows():
    from PIL import Image

    from lycoft.training.sampling import image_grid

    grid = image_grid([[Image.new("RGB", (8, 6))] * 3, [Image.new("RGB", (8, 6))] * 2], pad=1)
    assert grid.size == (3 * 8 + 4, 2 * 6 + 3)


# -- optimizers and schedules -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["AdamW", "Prodigy", "Lion", "Adafactor", "torch.optim.SGD"])
def test_optimizers_build_and_step(name):
    from lycoft.training.optimizers import build_optimizer

    p = torch.nn.Parameter(torch.ones(4))
    args = ["momentum=0.9"] if name == "torch.optim.SGD" else []
    opt = build_optimizer(cfg(optimizer_type=name, optimizer_args=args, learning_rate=0.1),
                          [{"params": [p], "lr": 0.1, "name": "unet"}])
    p.grad = torch.ones(4)
    opt.step()
    assert float(p.detach().sum()) < 4  # moved against the gradient
    if name == "torch.optim.SGD":
        assert opt.param_groups[0]["momentum"] == 0.9


def test_optimizer_errors_say_what_to_do():
    import importlib.util

    from lycoft.training.optimizers import build_optimizer, resolve_optimizer

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="needs bitsandbytes"):
            resolve_optimizer("AdamW8bit")
    with pytest.raises(ConfigError, match="has no class 'Nope'"):
        resolve_optimizer("torch.optim.Nope")
    p = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ConfigError, match="rejected its arguments"):
        build_optimizer(cfg(optimizer_args=["no_such_arg=1"]), [{"params": [p], "lr": 1e-3}])


def test_lr_schedules_warm_up_and_decay():
    from lycoft.training.schedulers import build_lr_scheduler

    def lrs(**kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        sched = build_lr_scheduler(cfg(learning_rate=1.0, **kw), opt, total_steps=10)
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs(lr_scheduler="constant_with_warmup", lr_warmup_steps=4)[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    cosine = lrs(lr_scheduler="cosine", lr_warmup_steps=0.2)  # a fraction: 2 of 10 steps
    assert cosine[:3] == [0.0, 0.5, 1.0] and cosine[-1] < 0.1 and cosine == sorted(cosine[:3]) + cosine[3:]
    assert lrs(lr_scheduler="linear")[5] == pytest.approx(0.5)


# -- saving -------------------------------------------------------------------------------------------
def test_save_names_and_pruning_keep_the_newest(tmp_path):
    from lycoft.training.saving import Saver, adapter_stem, state_name

    assert adapter_stem("x", step=12) == "x-step00000012" and adapter_stem("x", epoch=3) == "x-000003"
    assert state_name("x-000003") == "x-000003-state"
    saver = Saver(SimpleNamespace(is_main_process=True), tmp_path, "x", metadata=lambda s, e: {},
                  keep_last_steps=20, keep_last_epochs=2)
    for step in (10, 20, 30, 40):
        (tmp_path / f"x-step{step:08d}.safetensors").touch()
        (tmp_path / f"x-step{step:08d}-state").mkdir()
    for epoch in (1, 2, 3):
        (tmp_path / f"x-{epoch:06d}.safetensors").touch()
    (tmp_path / "x.safetensors").touch()
    (tmp_path / "other-step00000001.safetensors").touch()
    saver.prune_steps(40)  # drops saves older than step 20
    saver.prune_epochs(3)  # keeps epochs 2 and 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other-step00000001.safetensors", "x-000002.safetensors", "x-000003.safetensors",
        "x-step00000020-state", "x-step00000020.safetensors", "x-step00000030-state",
        "x-step00000030.safetensors", "x-step00000040-state", "x-step00000040.safetensors", "x.safetensors"]
    # with N = 1 the file just written is still never the one removed
    Saver(SimpleNamespace(is_main_process=True), tmp_path, "x", metadata=lambda s, e: {},
          keep_last_epochs=1).prune_epochs(3)
    assert (tmp_path / "x-000003.safetensors").exists() and not (tmp_path / "x-000002.safetensors").exists()


def test_train_state_round_trip_and_errors(tmp_path):
    from lycoft.training.saving import TrainState

    TrainState(global_step=7, epoch=2, step_in_epoch=1, seed=9).write(tmp_path)
    assert TrainState.read(tmp_path) == TrainState(global_step=7, epoch=2, step_in_epoch=1, seed=9)
    with pytest.raises(ConfigError, match="no train_state.json"):
        TrainState.read(tmp_path / "elsewhere")


# -- data split across processes ----------------------------------------------------------------------
class _FakeSampler:
    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.n))
        random.Random(self.epoch).shuffle(order)
        return iter([[(self.epoch, i)] for i in order])

    def __len__(self):
        return self.n


def test_epoch_batches_split_every_batch_once_and_evenly():
    from lycoft.training.loop import EpochBatches

    sampler = _FakeSampler(7)
    ranks = [EpochBatches(sampler, r, 3) for r in range(3)]
    for b in ranks:
        b.set_epoch(2)
    parts = [list(b) for b in ranks]
    assert [len(p) for p in parts] == [3, 3, 3]  # 7 batches padded to 9 with the epoch's first ones
    seen = [x for p in parts for x in p]
    assert sorted({x[0][1] for x in seen}) == list(range(7)) and all(x[0][0] == 2 for x in seen)
    ranks[0].set_epoch(2, skip=2)
    assert list(ranks[0]) == parts[0][2:] and len(ranks[0]) == 1


# -- conditioning and models --------------------------------------------------------------------------
def test_text_conditioning_shapes_long_captions_and_clip_skip(tiny_pipes):
    from lycoft.training.conditioning import TextConditioner, sdxl_time_ids

    sd1 = tiny_pipes("sd1")
    captions = ["a photo of sks toy", " ".join(["word"] * 100)]
    with torch.no_grad():
        base = TextConditioner("sd1", [sd1.text_encoder], [sd1.tokenizer]).encode(captions)
        long = TextConditioner("sd1", [sd1.text_encoder], [sd1.tokenizer], max_token_length=150).encode(captions)
        skip = TextConditioner("sd1", [sd1.text_encoder], [sd1.tokenizer], clip_skip=2).encode(captions)
        ref = sd1.encode_prompt(captions[:1], "cpu", 1, False)[0]  # what the diffusers pipeline computes
        ids = sd1.tokenizer(captions[:1], padding="max_length", max_length=77, return_tensors="pt").input_ids
        te = sd1.text_encoder
        norm = getattr(te, "text_model", te).final_layer_norm
        ref_skip = norm(te(ids, output_hidden_states=True).hidden_states[-2])  # the layer before the last
    assert base.hidden.shape == (2, 77, 32) and base.pooled is None
    assert long.hidden.shape == (2, 152, 32)
    assert torch.allclose(base.hidden[:1], ref, atol=1e-5) and torch.allclose(skip.hidden[:1], ref_skip, atol=1e-5)
    assert not torch.allclose(skip.hidden, base.hidden)
    # the first chunk of a short caption is the caption itself
    assert torch.allclose(long.hidden[0, :76], base.hidden[0, :76], atol=1e-5)

    xl = tiny_pipes("sdxl")
    with torch.no_grad():
        c = TextConditioner("sdxl", [xl.text_encoder, xl.text_encoder_2], [xl.tokenizer, xl.tokenizer_2]).encode(
            captions[:1])
        ref_h, _, ref_pooled, _ = xl.encode_prompt(captions[:1], device="cpu", do_classifier_free_guidance=False)
    assert c.hidden.shape == (1, 77, 96) and c.pooled.shape == (1, 32)  # 32 + 64 wide; TE2 projection 32
    assert torch.allclose(c.hidden, ref_h, atol=1e-5) and torch.allclose(c.pooled, ref_pooled, atol=1e-5)
    ids = sdxl_time_ids(torch.tensor([[128, 48]]), torch.tensor([[0, 8]]), torch.tensor([[96, 32]]))
    assert ids.tolist() == [[128, 48, 0, 8, 96, 32]]


def test_dataset_batches_carry_sdxl_size_conditioning_in_hw_order(tmp_path):
    from toy_images import make_toy_dataset

    from lycoft.training.conditioning import sdxl_time_ids
    from lycoft.training.dataset import build_dataset

    data = make_toy_dataset(tmp_path, n=1, size=(48, 128))
    ds = build_dataset(cfg(train_data_dir=str(data), resolution=64, enable_bucket=True, bucket_reso_steps=32,
                           min_bucket_reso=32, max_bucket_reso=128), family="sdxl")
    item = ds[0]
    assert item["pixel_values"].shape == (3, 96, 32)  # (C, H, W) of the 32x96 bucket
    ids = sdxl_time_ids(item["original_size"][None], item["crop_top_left"][None], item["target_size"][None])
    top, left = ids[0, 2:4].tolist()
    assert ids[0, :2].tolist() == [128, 48] and ids[0, 4:].tolist() == [96, 32] and top >= 0 and left >= 0


def test_family_is_known_before_loading(tmp_path):
    from lycoft.training.models import peek_family

    assert peek_family("builtin:tiny-sdxl") == "sdxl" and peek_family("builtin:tiny-sd2") == "sd2"
    assert peek_family("owner/some-model") is None and peek_family(str(tmp_path / "missing.safetensors")) is None
    assert peek_family("owner/some-model", override="sd1") == "sd1"
    unet = tmp_path / "m" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text('{"addition_embed_type": "text_time"}')
    assert peek_family(str(tmp_path / "m")) == "sdxl"


def test_rank_check_reports_identical_parameters():
    from lycoft.training.loop import _max_rank_difference

    net = torch.nn.Linear(3, 2)
    acc = SimpleNamespace(gather=lambda t: torch.cat([t, t + torch.tensor(0.5) * (torch.arange(t.numel()) == 1)]))
    assert _max_rank_difference(SimpleNamespace(gather=lambda t: torch.cat([t, t])), net) == 0.0
    assert math.isclose(_max_rank_difference(acc, net), 0.5, rel_tol=1e-6)


def test_cli_help_lists_every_flag(capsys):
    from lycoft.training.flags import flag_table
    from lycoft.training.loop import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{name}" in text for name in flag_table())


def test_configs_parse_and_the_demo_matches_its_preset():
    from lycoft.demo import DEMO_SETTINGS
    from lycoft.training.config_files import load_config_toml

    root = Path(__file__).resolve().parents[1] / "configs"
    presets = {p.name: load_config_toml(p) for p in sorted(root.glob("*.toml"))}
    assert {"tiny-demo.toml", "sd15-subject.toml", "sdxl-style.toml", "sd15-boft.toml"} <= set(presets)
    demo = presets["tiny-demo.toml"]
    for key, value in DEMO_SETTINGS.items():
        if key == "resolution":
            value = (value, value)
        assert demo[key] == value, key
    for name, values in presets.items():
        config_from_dict(values, where=name, check=False)  # every key known, every value well typed
