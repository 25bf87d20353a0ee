"""kohya sd-scripts' loss and noise options: each formula against a direct computation, the bounds and
draws of the noise and timestep options, their configuration rules, and two short runs with all of them."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from toy_images import make_toy_dataset

from lycoft.training import loop, losses
from lycoft.training.config import parse_args
from lycoft.training.errors import ConfigError
from lycoft.training.losses import diffusion_loss, elementwise_loss, huber_threshold, snr, snr_weights
from lycoft.training.noise import perturb_input_noise, pyramid_noise, sample_noise, sample_timesteps


def sd_scheduler(**kw) -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         **kw)


@pytest.fixture(scope="module")
def scheduler():
    return sd_scheduler()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- per-element losses and the Huber threshold -------------------------------------------------------
def test_loss_types_follow_their_formulas():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    d = pred - target
    assert torch.equal(elementwise_loss(pred, target, "l2"), d**2)
    assert torch.equal(elementwise_loss(pred, target, "l1"), d.abs())
    c = torch.tensor([0.1, 2.0])
    cb, d64 = c.double().reshape(-1, 1, 1, 1), d.double()  # the float64 formula as reference
    soft = (d64**2 + cb**2).sqrt() - cb
    assert torch.allclose(elementwise_loss(pred, target, "huber", c).double(), 2 * cb * soft, rtol=1e-5, atol=1e-7)
    assert torch.allclose(elementwise_loss(pred, target, "smooth_l1", c).double(), 2 * soft, rtol=1e-5, atol=1e-7)
    # a huge threshold makes huber the squared error and smooth_l1 the squared error over c (the quadratic
    # region); a tiny one makes both linear: huber 2c|d|, smooth_l1 2|d|
    big, tiny = torch.full((2,), 1e4), torch.full((2,), 1e-6)
    assert torch.allclose(elementwise_loss(pred, target, "huber", big), d**2, rtol=1e-3, atol=1e-6)
    assert torch.allclose(elementwise_loss(pred, target, "smooth_l1", big), d**2 / 1e4, rtol=1e-3, atol=1e-10)
    assert torch.allclose(elementwise_loss(pred, target, "huber", tiny), 2e-6 * d.abs(), rtol=1e-3, atol=1e-10)
    assert torch.allclose(elementwise_loss(pred, target, "smooth_l1", tiny), 2 * d.abs(), rtol=1e-3, atol=1e-5)


def test_huber_threshold_schedules(scheduler):
    t = torch.tensor([0, 250, 500, 999])
    assert torch.allclose(huber_threshold(scheduler, t, "constant", 0.1, 3.0), torch.full((4,), 0.3))
    expo = huber_threshold(scheduler, t, "exponential", 0.1, 2.0)
    assert torch.allclose(expo, 2.0 * 0.1 ** (t / 1000.0))  # scale at t=0, falling to c * scale at t=T
    abar = scheduler.alphas_cumprod[t].double()
    sigma = ((1 - abar) / abar).sqrt()
    by_snr = huber_threshold(scheduler, t, "snr", 0.1, 5.0)  # the snr schedule ignores the scale (as kohya)
    assert torch.allclose(by_snr.double(), 0.9 / (1 + sigma) ** 2 + 0.1, atol=1e-6)
    assert 0.9 < float(by_snr[0]) <= 1.0 and float(by_snr[-1]) == pytest.approx(0.1, abs=0.01)


def test_huber_loss_in_the_batch_loss(scheduler):
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t, is_reg = torch.tensor([5, 400, 990]), torch.zeros(3, dtype=torch.bool)
    loss, per = diffusion_loss(pred, target, t, is_reg, scheduler=scheduler, v_prediction=False, loss_type="huber",
                               huber_schedule="constant", huber_c=0.5, huber_scale=2.0)
    c = 1.0  # constant: c * scale
    expected = (2 * c * (((pred - target).double() ** 2 + c * c).sqrt() - c)).mean(dim=(1, 2, 3))
    assert torch.allclose(per.double(), expected) and torch.allclose(loss.double(), expected.mean())
    l2, _ = diffusion_loss(pred, target, t, is_reg, scheduler=scheduler, v_prediction=False)
    huge, _ = diffusion_loss(pred, target, t, is_reg, scheduler=scheduler, v_prediction=False, loss_type="huber",
                             huber_schedule="constant", huber_c=1e4)
    assert torch.allclose(huge, l2, rtol=1e-3)


# -- SNR weights ----------------------------------------------------------------------------------------
def test_snr_weight_options_follow_kohya(scheduler):
    t = torch.tensor([0, 100, 500, 999])
    s = snr(scheduler, t).double()
    assert float(s[0]) > 1000  # kohya's cap of 1000 matters at t = 0
    capped = s.clamp(max=1000)
    w = snr_weights(scheduler, t, False, debiased_estimation_loss=True).double()
    assert torch.allclose(w, 1 / capped.sqrt())
    assert torch.allclose(snr_weights(scheduler, t, True, debiased_estimation_loss=True).double(), 1 / (capped + 1))
    assert torch.allclose(snr_weights(scheduler, t, True, scale_v_pred_loss_like_noise_pred=True).double(),
                          capped / (capped + 1))
    # v_pred_like_loss adds x times the loss rescaled like a v loss: loss + loss / (S / (S + 1)) * x
    assert torch.allclose(snr_weights(scheduler, t, False, v_pred_like_loss=0.2).double(),
                          1 + 0.2 * (capped + 1) / capped)
    assert snr_weights(scheduler, t, False) is None
    # the options multiply with min-SNR and the prior weight, per sample
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    is_reg = torch.tensor([False, True, False, False])
    loss, per = diffusion_loss(pred, target, t, is_reg, scheduler=scheduler, v_prediction=False, min_snr_gamma=5.0,
                               prior_loss_weight=0.5, debiased_estimation_loss=True, v_pred_like_loss=0.2)
    weight = (s.clamp(max=5) / s) * torch.tensor([1, 0.5, 1, 1]) / capped.sqrt() * (1 + 0.2 * (capped + 1) / capped)
    assert torch.allclose(loss.double(), (per.double() * weight).mean())


def test_zero_terminal_snr_schedule_and_its_weights():
    plain, zero = sd_scheduler(), sd_scheduler(rescale_betas_zero_snr=True)
    assert float(zero.alphas_cumprod[-1]) == 0.0 and float(plain.alphas_cumprod[-1]) > 0.004
    assert float(zero.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-5)
    t = torch.tensor([0, 999])
    x0, eps = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    assert torch.allclose(zero.add_noise(x0, eps, t)[1], eps[1])  # the last step is pure noise
    # min-SNR stays finite at SNR 0: an epsilon target's weight is its limit 1, a v target's 0
    assert losses.min_snr_weights(zero, t, 5.0, False)[1] == 1.0
    assert losses.min_snr_weights(zero, t, 5.0, True)[1] == 0.0
    assert torch.isfinite(snr_weights(zero, t, True, scale_v_pred_loss_like_noise_pred=True,
                                      debiased_estimation_loss=True)).all()


# -- noise and timesteps ------------------------------------------------------------------------------
def test_default_noise_draws_are_plain_gaussian_and_offset():
    latents = torch.zeros(2, 4, 8, 8)
    g = gen(5)
    z, offset = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 1, 1, generator=g)
    assert torch.equal(sample_noise(latents, gen(5)), z)
    assert torch.equal(sample_noise(latents, gen(5), 0.1), z + 0.1 * offset)


def test_offset_random_strength_and_adaptive_scale():
    latents = torch.zeros(2, 4, 8, 8)
    latents[:, 1] = -2.0  # channel 1 far from zero, the others at zero
    g = gen(7)
    z = torch.randn(2, 4, 8, 8, generator=g)
    u = torch.rand(1, generator=g)
    offset = torch.randn(2, 4, 1, 1, generator=g)
    got = sample_noise(latents, gen(7), 0.1, offset_random_strength=True)
    assert torch.allclose(got, z + (u * 0.1) * offset) and 0 <= float(u) < 1
    g = gen(7)
    z = torch.randn(2, 4, 8, 8, generator=g)
    offset = torch.randn(2, 4, 1, 1, generator=g)
    adaptive = sample_noise(latents, gen(7), 0.1, adaptive_noise_scale=0.5)
    strength = torch.tensor([0.1, 0.1 + 0.5 * 2.0, 0.1, 0.1]).reshape(1, 4, 1, 1)
    assert torch.allclose(adaptive, z + strength * offset)
    # a negative scale cannot make the offset negative
    floored = sample_noise(latents, gen(7), 0.1, adaptive_noise_scale=-1.0)
    assert torch.allclose(floored[:, 1], z[:, 1])


def test_multires_noise_adds_coarse_noise_at_unit_std():
    noise = torch.randn(2, 4, 32, 32, generator=gen(1))
    g = gen(2)
    r_draw = torch.rand((), generator=g)
    z = torch.randn(2, 4, 32, 32, generator=g)
    assert 2.0 <= 2 + 2 * float(r_draw) < 4.0
    one = pyramid_noise(noise, gen(2), 1, 0.3)  # level 0 is full size: noise + z, renormalized
    assert torch.allclose(one, (noise + z) / (noise + z).std())
    many = sample_noise(torch.zeros(16, 4, 32, 32), gen(3), multires_iterations=8, multires_discount=0.8)
    plain = sample_noise(torch.zeros(16, 4, 32, 32), gen(3))
    assert float(many.std()) == pytest.approx(1.0, abs=1e-5)
    # the coarse levels show up as a spread of the per-image channel means that plain noise lacks
    assert float(many.mean(dim=(2, 3)).std()) > 3 * float(plain.mean(dim=(2, 3)).std())


def test_timestep_bounds():
    t = sample_timesteps(4000, 1000, gen(0), torch.device("cpu"), 200, 300)
    assert int(t.min()) == 200 and int(t.max()) == 299
    assert torch.equal(sample_timesteps(8, 1000, gen(0), torch.device("cpu")),
                       torch.randint(0, 1000, (8,), generator=gen(0)))  # the default draw
    g = gen(0)
    fixed = sample_timesteps(3, 1000, g, torch.device("cpu"), 500, 500)
    assert fixed.tolist() == [500] * 3 and torch.equal(g.get_state(), gen(0).get_state())  # drew nothing


def test_input_perturbation_noise():
    noise = torch.randn(2, 4, 4, 4)
    assert perturb_input_noise(noise, gen(0), None) is noise and perturb_input_noise(noise, gen(0), 0.0) is noise
    expected = noise + 0.1 * torch.randn(2, 4, 4, 4, generator=gen(4))
    assert torch.allclose(perturb_input_noise(noise, gen(4), 0.1), expected)
    g = gen(4)
    u = torch.rand(1, generator=g)
    extra = torch.randn(2, 4, 4, 4, generator=g)
    assert torch.allclose(perturb_input_noise(noise, gen(4), 0.1, random_strength=True), noise + u * 0.1 * extra)


# -- configuration ------------------------------------------------------------------------------------
@pytest.fixture
def base(tmp_path: Path) -> list[str]:
    d = tmp_path / "train"
    (d / "1_sks toy").mkdir(parents=True)
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(d)]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--huber_c", "0"], "--huber_c must be > 0, got 0.0"),
    (["--loss_type", "hubr"], "did you mean 'huber'"),
    (["--huber_schedule", "linear"], "choose one of snr, exponential, constant"),
    (["--scale_v_pred_loss_like_noise_pred"], "is for v-prediction models: add --v_parameterization"),
    (["--v_pred_like_loss", "0.1", "--v_parameterization"], "cannot be used with --v_parameterization"),
    (["--zero_terminal_snr", "--debiased_estimation_loss"], "--debiased_estimation_loss infinite"),
    (["--adaptive_noise_scale", "0.01"], "needs --noise_offset > 0"),
    (["--multires_noise_iterations", "0"], "--multires_noise_iterations must be a positive integer"),
    (["--ip_noise_gamma", "-0.1"], "--ip_noise_gamma must be >= 0"),
    (["--min_timestep", "1000"], r"--min_timestep must be in \[0, 999\]"),
    (["--max_timestep", "1001"], r"--max_timestep must be in \[0, 1000\]"),
    (["--min_timestep", "600", "--max_timestep", "500"], "--min_timestep 600 is above --max_timestep 500"),
])
def test_loss_and_noise_rules(base, argv, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_args([*base, *argv])


def test_options_without_effect_warn_as_kohya_ignores_them(base, caplog):
    with caplog.at_level(logging.WARNING):
        parse_args([*base, "--huber_c", "0.3", "--noise_offset_random_strength", "--ip_noise_gamma_random_strength",
                    "--multires_noise_discount", "0.5", "--zero_terminal_snr"])
    text = caplog.text
    assert "--huber_c 0.3 has no effect with --loss_type l2" in text
    assert "--noise_offset_random_strength True has no effect with --noise_offset unset" in text
    assert "--ip_noise_gamma_random_strength True has no effect" in text
    assert "--multires_noise_discount 0.5 has no effect" in text
    assert "--zero_terminal_snr is meant for v-prediction" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # kohya_ss GUI values at their defaults say nothing
        cfg = parse_args([*base, "--huber_c", "0.1", "--huber_schedule", "snr", "--max_timestep", "1000",
                          "--min_timestep", "0"])
    assert not caplog.text and (cfg.min_timestep, cfg.max_timestep) == (0, 1000)


# -- training runs --------------------------------------------------------------------------------------
RUNS = {
    "sd1": dict(pretrained_model_name_or_path="builtin:tiny-sd1", loss_type="huber", huber_schedule="exponential",
                debiased_estimation_loss=None, v_pred_like_loss=0.2, min_snr_gamma=5, noise_offset=0.1,
                noise_offset_random_strength=None, adaptive_noise_scale=0.05, multires_noise_iterations=4,
                multires_noise_discount=0.5, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=None,
                min_timestep=100, max_timestep=400),
    "sd2-v": dict(pretrained_model_name_or_path="builtin:tiny-sd2", v_parameterization=None, zero_terminal_snr=None,
                  loss_type="smooth_l1", scale_v_pred_loss_like_noise_pred=None, debiased_estimation_loss=None,
                  min_timestep=900),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_training_runs_with_every_option(name, tmp_path, monkeypatch):
    toy = make_toy_dataset(tmp_path / "toy", n=2, size=64)
    argv = ["--train_data_dir", str(toy), "--caption_extension", ".txt", "--resolution", "64",
            "--max_data_loader_n_workers", "0", "--seed", "3", "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "2", "--network_args", "block_size=8", "preset=attn-only"]
    for key, value in RUNS[name].items():
        argv += [f"--{key}"] + ([] if value is None else [str(value)])
    seen = []
    real = losses.diffusion_loss

    def recording(pred, target, timesteps, is_reg, **kw):
        seen.append((timesteps.clone(), kw))
        return real(pred, target, timesteps, is_reg, **kw)

    monkeypatch.setattr(losses, "diffusion_loss", recording)
    result = loop.train(parse_args(argv))
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    options = RUNS[name]
    low, high = options.get("min_timestep", 0), options.get("max_timestep", 1000)
    assert all(low <= int(t.min()) and int(t.max()) < high for t, _ in seen)
    assert seen[0][1]["loss_type"] == options["loss_type"] and seen[0][1]["debiased_estimation_loss"]
    abar_last = float(result.models.noise_scheduler.alphas_cumprod[-1])
    assert (abar_last == 0.0) == ("zero_terminal_snr" in options)
    with safe_open(str(result.adapter), "pt") as f:
        md = f.metadata()
    assert md["ss_loss_type"] == options["loss_type"] and md["ss_debiased_estimation"] == "True"
    assert md["ss_zero_terminal_snr"] == str("zero_terminal_snr" in options)


def test_v_pred_like_loss_is_refused_for_a_detected_v_prediction_model(tmp_path):
    toy = make_toy_dataset(tmp_path / "toy", n=1, size=64)
    cfg = parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd2", "--train_data_dir", str(toy),
                      "--resolution", "64", "--output_dir", str(tmp_path / "out"), "--v_pred_like_loss", "0.1"])
    with pytest.raises(ConfigError, match="--v_pred_like_loss is for epsilon models, but builtin:tiny-sd2 predicts v"):
        loop.train(cfg)
