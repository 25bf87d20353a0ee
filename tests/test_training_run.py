"""Real training runs on the builtin tiny models, in process through the CLI entry point (`loop.main`) or
`loop.train`: every family and algorithm, learning, exact resume, non-finite losses, text-encoder
learning rates, logging, sampling, periodic saves. `test_training_cli.py` has the `accelerate launch` runs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from toy_images import make_toy_dataset

import lycoft
from lycoft.checkpoints.loading import load_pipeline
from lycoft.training import loop
from lycoft.training.config import parse_args


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n=4, size=64)


def flags(toy: Path, out: Path, model: str = "builtin:tiny-sd1", **extra) -> list[str]:
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", str(toy), "--caption_extension", ".txt",
            "--resolution", "64", "--max_data_loader_n_workers", "0", "--seed", "3", "--output_dir", str(out),
            "--learning_rate", "1e-3", "--max_train_steps", "2"]
    for key, value in extra.items():
        argv.append(f"--{key}")
        argv += value if isinstance(value, list) else [str(value)]
    return argv


def run(toy: Path, out: Path, **extra) -> loop.TrainResult:
    return loop.train(parse_args(flags(toy, out, **extra)))


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


FAMILY_RUNS = [
    ("builtin:tiny-sd1", "oft", "sd_v1"),
    ("builtin:tiny-sd1", "boft", "sd_v1"),
    ("builtin:tiny-sd2", "oft", "sd_v2_v"),
    ("builtin:tiny-sd2", "boft", "sd_v2_v"),
    ("builtin:tiny-sdxl", "oft", "sdxl_base_v1-0"),
    ("builtin:tiny-sdxl", "boft", "sdxl_base_v1-0"),
]


@pytest.mark.parametrize(("model", "algo", "base_version"), FAMILY_RUNS)
def test_each_family_and_algo_trains_a_file_the_loader_reads(toy, tmp_path, model, algo, base_version):
    out = tmp_path / "out"
    extra = {}
    if model == "builtin:tiny-sdxl":  # SDXL samples go through pooled embeddings and zeroed negatives
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a photo of sks toy --s 2\nsks toy --n blurry --s 2 --w 64 --h 32\n")
        extra = dict(sample_prompts=prompts, sample_every_n_steps=2)
    code = loop.main(flags(toy, out, model=model, network_args=[f"algo={algo}", "block_size=8", "preset=attn-mlp"],
                           output_name="run", **extra))
    assert code == 0
    if extra:
        assert sorted(p.name for p in (out / "sample").iterdir()) == ["run_000002_00.png", "run_000002_01.png"]
    path = out / "run.safetensors"
    md = metadata(path)
    assert md["ss_base_model_version"] == base_version  # sd2 tiny is v-prediction: "_v"
    assert md["ss_output_name"] == "run" and md["ss_steps"] == "2"
    assert json.loads(md["ss_network_args"])["algo"] == ("diag-oft" if algo == "oft" else "boft")
    tensors = load_file(path)
    blocks = [t for k, t in tensors.items() if k.endswith(".oft_blocks")]
    assert all(t.dim() == (3 if algo == "oft" else 4) for t in blocks)
    assert any(k.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for k in tensors)  # text encoders too
    assert max(float(t.abs().max()) for t in blocks) > 0  # two steps moved the rotations off identity
    pipe, _, v_pred = load_pipeline(model)
    net = lycoft.load(str(path), pipe=pipe)
    assert len(net.adapters) == len(blocks)
    assert v_pred == (model == "builtin:tiny-sd2")


def _fixed_batch_loss(result: loop.TrainResult, toy: Path, multiplier: float, draws: int = 8) -> float:
    """Denoising loss of the model (adapter at `multiplier`) on the whole toy set, with noise and
    timesteps fixed by a seed: the same numbers before and after training."""
    from lycoft.training.buckets import plan_crop
    from lycoft.training.conditioning import TextConditioner
    from lycoft.training.dataset import list_images, load_pixels
    from lycoft.training.losses import diffusion_loss, target_for

    m, net = result.models, result.network
    paths = [p for folder in sorted(toy.iterdir()) for p in list_images(folder)]
    pixels = torch.stack([load_pixels(p, plan_crop((64, 64), (64, 64))) for p in paths])
    cond = TextConditioner(m.family, m.text_encoders, m.tokenizers)
    g = torch.Generator().manual_seed(1234)
    net.eval()
    net.set_multiplier(multiplier)
    total = 0.0
    with torch.no_grad():
        latents = m.vae.encode(pixels).latent_dist.mode() * m.latent_scale
        hidden = cond.encode(["a photo of sks toy"] * len(paths)).hidden
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, 1000, (len(paths),), generator=g)
            pred = m.unet(m.noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
            loss, _ = diffusion_loss(pred, target_for(m.noise_scheduler, latents, noise, t, m.v_prediction), t,
                                     torch.zeros(len(paths)), scheduler=m.noise_scheduler, v_prediction=m.v_prediction)
            total += float(loss)
    net.set_multiplier(1.0)
    return total / draws


def test_learning_happens_on_a_fixed_small_batch(toy, tmp_path):
    # 4 images, batch 4: every step sees the same batch (with fresh noise). 30 steps at lr 1e-2.
    result = run(toy, tmp_path / "out", train_batch_size=4, max_train_steps=30, learning_rate=1e-2,
                 network_args=["block_size=8", "preset=attn-mlp"])
    before = _fixed_batch_loss(result, toy, multiplier=0.0)  # the base model = the adapter at step 0
    after = _fixed_batch_loss(result, toy, multiplier=1.0)
    print(f"fixed-batch loss: {before:.4f} before, {after:.4f} after 30 steps; "
          f"training loss first 5 {sum(result.losses[:5]) / 5:.4f}, last 5 {sum(result.losses[-5:]) / 5:.4f}")
    assert after < 0.8 * before  # measured: 1.11 -> 0.67
    assert sum(result.losses[-5:]) < 0.8 * sum(result.losses[:5])
    # The rotation is non-trivial: R = cayley(Q) moves away from the identity.
    with torch.no_grad():
        sizes = [float(torch.linalg.vector_norm(layer.skew_blocks())) for _, layer in result.network.items()]
    assert sum(sizes) / len(sizes) > 1e-2
    layer = next(layer for _, layer in result.network.items("unet"))
    R = layer.rotation(1.0)
    assert float((R.detach() - torch.eye(R.shape[-1])).abs().max()) > 1e-2
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(R.shape[-1]).expand_as(R), atol=1e-5)


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    keys = [k for k in a if k.endswith(".oft_blocks")]
    num = sum(float((a[k] - b[k]).square().sum()) for k in keys)
    return math.sqrt(num / sum(float(a[k].square().sum()) for k in keys))


def test_resume_continues_the_uninterrupted_run(toy, tmp_path):
    # 2 batches of 2 per epoch, 5 steps = 2.5 epochs; interrupted after step 3 (mid-epoch), with a
    # warmup + cosine LR schedule so a wrong LR on resume would show.
    common = dict(train_batch_size=2, max_train_steps=5, lr_scheduler="cosine", lr_warmup_steps=2,
                  network_args=["block_size=8", "preset=attn-only", "module_dropout=0.1"])
    full = run(toy, tmp_path / "full", save_every_n_steps=3, save_state="true", **common)
    state_dir = tmp_path / "full" / "last-step00000003-state"
    saved = json.loads((state_dir / "train_state.json").read_text())
    assert (saved["global_step"], saved["epoch"], saved["step_in_epoch"]) == (3, 1, 1)
    # the LR schedule is not pickled into the state (it is rebuilt from the step counter)
    assert not list(state_dir.glob("custom_checkpoint_*"))
    resumed = run(toy, tmp_path / "resumed", resume=state_dir, **common)
    assert (resumed.state.global_step, resumed.state.epoch, resumed.state.step_in_epoch) == \
        (full.state.global_step, full.state.epoch, full.state.step_in_epoch) == (5, 2, 1)
    # Exactly the uninterrupted run's learning rates (warmup and cosine both depend on the step) ...
    assert len(set(full.learning_rates)) == 5
    assert resumed.learning_rates == full.learning_rates[3:]
    # ... same data and noise for steps 4-5: the losses agree to float32 rounding ...
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-5)
    a, b = load_file(full.adapter), load_file(resumed.adapter)
    # ... and the adapters are bit-identical: every rotation is a pure function of the parameters (no warm
    # start from the previous step's), and data, noise and LR are functions of the seed and the step.
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert metadata(resumed.adapter)["ss_steps"] == "5" and metadata(resumed.adapter)["ss_epoch"] == "2"


def test_resume_from_a_state_folder_with_a_pickled_lr_scheduler(toy, tmp_path):
    """State folders of older versions carry the LR scheduler as accelerate's `custom_checkpoint_0.pkl`; a
    LambdaLR's state is numbers only, so it loads weights-only (and is superseded by the step counter)."""
    import shutil

    from diffusers.optimization import get_scheduler

    common = dict(max_train_steps=3, lr_scheduler="linear", lr_warmup_steps=1, network_args=["preset=attn-only"])
    full = run(toy, tmp_path / "full", save_every_n_steps=2, save_state="true", **common)
    old = tmp_path / "old-state"
    shutil.copytree(tmp_path / "full" / "last-step00000002-state", old)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=3)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), old / "custom_checkpoint_0.pkl")
    resumed = run(toy, tmp_path / "resumed", resume=old, save_state="true", **common)
    assert resumed.state.global_step == 3
    assert resumed.learning_rates == full.learning_rates[2:]
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5)
    assert not list((tmp_path / "resumed" / "last-state").glob("custom_checkpoint_*"))


def test_nonfinite_loss_stops_with_the_state_before_it(toy, tmp_path, monkeypatch, capsys):
    from lycoft.training import losses

    real = losses.diffusion_loss
    calls = {"n": 0}

    def nan_at_third_step(*args, **kwargs):
        calls["n"] += 1
        loss, per = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), per

    monkeypatch.setattr(losses, "diffusion_loss", nan_at_third_step)
    out = tmp_path / "out"
    assert loop.main(flags(toy, out, max_train_steps=5, network_args=["preset=attn-only"])) == 3
    err = capsys.readouterr().err
    assert "at step 3" in err and "--resume" in err
    # The parameters after step 2 gave the NaN: the state vouched for is the one before that update.
    assert "after the update at step 2 (epoch 1); training stopped" in err
    state = json.loads((out / "last-step00000001-state" / "train_state.json").read_text())
    assert state["global_step"] == 1
    assert (out / "last-step00000001.safetensors").is_file()
    assert not (out / "last.safetensors").exists()

    calls["n"] = 0
    result = run(toy, tmp_path / "skip", max_train_steps=5, skip_nonfinite="true", network_args=["preset=attn-only"])
    assert result.state.global_step == 5 and result.state.nonfinite_skipped == 1
    assert len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)


def test_text_encoder_lr_tensorboard_samples_and_periodic_saves(toy, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na photo of sks toy --w 64 --h 48 --d 7 --s 2 --l 3\nsks toy --n blurry --s 2\n")
    out = tmp_path / "out"
    result = run(toy, out, max_train_steps=4, gradient_accumulation_steps=2, unet_lr=1e-3, text_encoder_lr=2e-4,
                 network_args=["preset=attn-only"],
                 logging_dir=tmp_path / "logs", sample_prompts=prompts, sample_every_n_steps=2,
                 sample_at_first="true", sample_sampler="euler_a", save_every_n_steps=1, save_last_n_steps=1,
                 clip_skip=2, max_token_length=150)  # samples are encoded like training captions
    # separate learning rates reached the optimizer and moved both parts
    acc = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr/unet", "lr/te1", "rotation/unet/mean", "rotation/te1/max"} <= tags
    assert any(t.startswith("rotation_module/lora_unet_") for t in tags)
    assert acc.Scalars("lr/unet")[-1].value == pytest.approx(1e-3)
    assert acc.Scalars("lr/te1")[-1].value == pytest.approx(2e-4)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    for comp in ("unet", "te1"):
        assert max(float(layer.oft_blocks.detach().abs().max()) for _, layer in result.network.items(comp)) > 0
    # samples at step 0 (before training), 2 and 4, with the per-line sizes
    samples = sorted(p.name for p in (out / "sample").iterdir())
    assert samples == [f"last_{s:06d}_{i:02d}.png" for s in (0, 2, 4) for i in (0, 1)]
    from PIL import Image

    assert Image.open(out / "sample" / "last_000002_00.png").size == (64, 48)
    # a save every step, saves more than 1 step older than the newest pruned; the final file is separate
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "last-step00000002.safetensors", "last-step00000003.safetensors", "last.safetensors"]


def test_gradient_checkpointing_and_bf16(toy, tmp_path, caplog):
    common = dict(network_args=["preset=attn-only"], max_train_steps=2)
    plain = run(toy, tmp_path / "plain", **common)
    ckpt = run(toy, tmp_path / "ckpt", gradient_checkpointing="true", **common)
    # Checkpointing changes nothing but float32 rounding: layers inside checkpointed regions compute their
    # own rotation, where the plain run batches all of them (lycoft/rotations.py).
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    difference = _rel(load_file(plain.adapter), load_file(ckpt.adapter))
    print(f"gradient checkpointing vs not: relative adapter difference {difference:.1e}")  # measured 2.3e-4
    assert difference < 5e-3
    # --network_weights starts from a file: with a negligible LR the run ends where the file was
    warm = run(toy, tmp_path / "warm", network_weights=plain.adapter, learning_rate=1e-12,
               **{**common, "max_train_steps": 1})
    assert _rel(load_file(plain.adapter), load_file(warm.adapter)) < 1e-6
    bf16 = run(toy, tmp_path / "bf16", mixed_precision="bf16", **common)
    assert bf16.models.unet.dtype == torch.bfloat16  # frozen weights in bf16 ...
    assert all(p.dtype == torch.float32 for p in bf16.network.parameters())  # ... the adapter in fp32
    assert all(math.isfinite(x) for x in bf16.losses)


def test_epochs_epoch_saves_and_the_xformers_fallback(toy, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    out = tmp_path / "out"
    # 4 images, batch 2, accumulation 2: one optimizer step per epoch; 3 epochs -> 3 steps
    result = run(toy, out, xformers="true", max_train_epochs=3, train_batch_size=2, gradient_accumulation_steps=2,
                 save_every_n_epochs=1, save_last_n_epochs=1, network_args=["preset=attn-only"])
    assert (result.state.global_step, result.state.epoch, result.state.step_in_epoch) == (3, 3, 0)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["last-000002.safetensors", "last.safetensors"]
    assert metadata(out / "last-000002.safetensors")["ss_epoch"] == "2"
    assert result.models.attention == "sdpa"  # xformers needs CUDA: warned, then the default attention
    assert "using PyTorch SDPA attention instead" in caplog.text


def test_a_rescaled_oft_run_says_once_which_uis_misread_it_and_the_fix_works(toy, tmp_path, caplog):
    """Two saves of an oft adapter with rescale: one warning line naming the stock UIs that ignore its
    rescale (from lycoft.compatibility) and a convert command, which runs as printed."""
    from lycoft.cli.convert import main as convert_main
    from lycoft.compatibility import rescaled_oft_misreaders

    caplog.set_level(logging.WARNING)
    out = tmp_path / "out"
    run(toy, out, save_every_n_steps=1, network_args=["preset=attn-only", "rescaled=true"])
    assert len(list(out.glob("*.safetensors"))) == 2  # step 1 and the final file
    lines = [r.getMessage() for r in caplog.records if "--ui-safe" in r.getMessage()]
    assert len(lines) == 1 and all(ui in lines[0] for ui in rescaled_oft_misreaders())
    assert rescaled_oft_misreaders() == ["ComfyUI", "reForge"]
    command = lines[0].split("python tools/convert.py ", 1)[1].split()
    assert convert_main(command) == 0
    fixed = load_file(command[command.index("--out") + 1])
    assert all(t.dim() == 4 for k, t in fixed.items() if k.endswith(".oft_blocks"))


def test_demo_writes_adapter_samples_and_merged_checkpoint(tmp_path, capsys):
    from lycoft import demo

    assert demo.main(["--out", str(tmp_path / "demo"), "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "demo"
    assert (out / "demo-oft.safetensors").is_file() and (out / "samples.png").is_file()
    assert str(out / "demo-oft.safetensors") in printed and "loss:" in printed
    try:
        import lycoft.merge  # noqa: F401
    except ImportError:
        pytest.skip("lycoft.merge is not available: no merged checkpoint expected")
    assert (out / "toy-sd1-demo-oft-merged.safetensors").is_file()


def test_boft_trains_under_bf16_mixed_precision(toy, tmp_path):
    result = run(toy, tmp_path / "out", mixed_precision="bf16", max_train_steps=1,
                 network_args=["algo=boft", "block_size=4", "preset=attn-only"])
    assert all(math.isfinite(x) for x in result.losses)


def test_sdxl_takes_a_learning_rate_per_text_encoder(toy, tmp_path, caplog):
    out = tmp_path / "out"
    result = run(toy, out, model="builtin:tiny-sdxl", max_train_steps=1, unet_lr=1e-3,
                 text_encoder_lr=["2e-4", "3e-4"], network_args=["preset=attn-only"])
    # parameter groups in component order: te1 (CLIP-L), te2 (OpenCLIP-G), unet
    assert result.learning_rates[-1] == pytest.approx((2e-4, 3e-4, 1e-3))
    assert metadata(result.adapter)["ss_text_encoder_lr"] == "[0.0002, 0.0003]"
    # two rates for a one-encoder model (the kohya_ss GUI writes two): the first serves, with a warning
    sd1 = run(toy, tmp_path / "sd1", max_train_steps=1, unet_lr=1e-3, text_encoder_lr=["2e-4", "3e-4"])
    assert sd1.learning_rates[-1] == pytest.approx((2e-4, 1e-3))
    assert "has 2 values (0.0002 0.0003) but this model has 1 text encoder: using 0.0002" in caplog.text


def test_metadata_flags_reach_the_file_and_no_metadata_keeps_only_them(toy, tmp_path):
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG\r\n\x1a\n")  # the bytes travel as they are
    user = dict(metadata_title="Toy OFT", metadata_author="me", metadata_license="CC-BY-4.0",
                metadata_tags="toy,oft", metadata_trigger_phrase="sks toy", metadata_thumbnail=thumb,
                training_comment="for the test")
    common = dict(network_args=["block_size=8", "preset=attn-only"], max_train_steps=1, **user)
    full = metadata(run(toy, tmp_path / "full", **common).adapter)
    assert (full["modelspec.title"], full["modelspec.author"], full["modelspec.license"]) == (
        "Toy OFT", "me", "CC-BY-4.0")
    assert full["modelspec.tags"] == "toy,oft" and full["modelspec.trigger_phrase"] == "sks toy"
    assert full["modelspec.thumbnail"] == "data:image/png;base64,iVBORw0KGgo="
    assert full["ss_training_comment"] == "for the test" and "ss_tag_frequency" in full
    bare = metadata(run(toy, tmp_path / "bare", no_metadata="true", **common).adapter)
    assert not [k for k in bare if k.startswith("ss_") and k not in (
        "ss_training_comment", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
        "ss_base_model_version", "ss_v2", "ss_output_name")]
    assert bare["modelspec.title"] == "Toy OFT" and bare["ss_training_comment"] == "for the test"
    from lycoft.checkpoints.tiny import build_tiny_pipeline

    net = lycoft.load(str(tmp_path / "bare" / "last.safetensors"), pipe=build_tiny_pipeline("sd1"))
    assert len(net.adapters) > 0  # a file without training metadata still loads


def test_samples_at_the_last_step_logged_and_in_tensorboard(toy, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.json"
    prompts.write_text('[{"prompt": "a photo of sks toy", "sample_steps": 2, "width": 64, "height": 64}]')
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        run(toy, out, network_args=["block_size=8", "preset=attn-only"], max_train_steps=3, sample_prompts=prompts,
            sample_every_n_steps=2, logging_dir=tmp_path / "logs", output_name="s")
    assert sorted(p.name for p in (out / "sample").iterdir()) == ["s_000002_00.png", "s_000003_00.png"]
    assert "rendering 1 sample(s) at 000003" in caplog.text and "1 sample(s) at 000003 in" in caplog.text
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("sample/00")] == [2, 3]


def test_steps_and_epochs_together_and_an_overlong_warmup_are_reported(toy, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        result = run(toy, tmp_path / "out", network_args=["block_size=8", "preset=attn-only"], max_train_steps=5,
                     max_train_epochs=1, lr_scheduler="cosine", lr_warmup_steps=10, train_batch_size=2)
    assert result.state.global_step == 2  # 4 images in batches of 2: one epoch
    assert "--max_train_epochs 1 (2 steps) is used, not --max_train_steps 5 (kohya's rule: epochs win)" in caplog.text
    assert "--lr_warmup_steps 10 is 10 steps, longer than the whole run (2)" in caplog.text


def test_class_images_of_other_folders_are_reported(tmp_path, caplog):
    from PIL import Image

    from lycoft.training.prior import missing_class_images

    reg = tmp_path / "reg"
    for folder, count in (("1_a photo of a dog", 2), ("1_a photo of a cat", 3)):
        (reg / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8)).save(reg / folder / f"{i}.png")
    data = tmp_path / "train"
    (data / "1_sks dog").mkdir(parents=True)
    cfg = parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data),
                      "--reg_data_dir", str(reg), "--class_prompt", "a photo of a dog", "--num_class_images", "10"])
    assert missing_class_images(cfg) == 5
    assert "--num_class_images 10 counts 3 image(s) in other folders" in caplog.text
