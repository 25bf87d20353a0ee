"""The recipe that makes ``builtin:toy-sd1``: a small SD1 model trained from scratch on toy scenes.

The architecture is the builtin tiny SD1 model's (diffusers ``UNet2DConditionModel`` + ``AutoencoderKL``
+ CLIP text encoder with the tiny byte-level vocabulary, 64x64 images, 8x8 latents), so the checkpoint
loads anywhere the tiny model does. Read top to bottom:

1. render the training scenes: every shape and colour for the VAE (a general image codec, as SD's is),
   `data.BASE_SHAPES` in `data.BASE_COLOURS` for the denoiser (the cross and magenta stay new to it);
2. train the VAE to reconstruct its scenes (first on 32 px crops, cheap, then on whole images);
3. rescale its latents so that ``latents * scaling_factor`` has zero mean and unit variance per channel
   (folded exactly into ``quant_conv`` / ``post_quant_conv``);
4. train the UNet and the text encoder together on the scenes' latents to predict the noise (epsilon),
   with captions sometimes emptied (for classifier-free guidance) or without the size;
5. keep an exponential moving average of their weights; the average is what is saved.

Everything is deterministic: one thread, deterministic algorithms, explicit generators, so the same
recipe on the same machine and torch version writes the same checkpoint bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import BASE_SHAPES, COLOURS, SHAPES, Scene, random_scenes, render_scene, to_tensor

Log = Callable[[str], None]
THREADS = 1  # the toy model's tensors are too small to gain from more, and one thread keeps runs repeatable


@dataclass(frozen=True)
class Recipe:
    """Every setting of a pretraining run (written into the checkpoint's metadata and its report).

    Fields:
        seed: seeds the weights' initialisation, the scenes and every random draw of training.
        images: number of rendered training scenes (of each set: the VAE's and the denoiser's).
        vae_crop_steps, vae_crop_batch: VAE steps on 32x32 crops (a quarter of the cost of whole images).
        vae_steps, vae_batch: VAE steps on whole 64x64 images afterwards (the mid-block attention and the
            borders see what they will see at sampling time).
        vae_lr: peak learning rate of the VAE (one-cycle schedule).
        object_weight: extra weight of coloured (shape) pixels in the VAE's reconstruction loss.
        kl_weight: weight of the VAE's KL term (small, as in SD: latents stay informative).
        unet_steps, unet_batch, unet_lr: denoiser training (UNet and text encoder together).
        caption_dropout: fraction of captions replaced by "" (what classifier-free guidance subtracts).
        size_dropout: fraction of captions without the size ("a red circle"): the model also learns the
            shorter prompts, with the size left to chance.
        min_snr_gamma: Min-SNR loss weighting (faster convergence on few steps).
        ema_decay: decay of the weight average that is saved.
    """

    seed: int = 0
    images: int = 3000
    vae_crop_steps: int = 1000
    vae_crop_batch: int = 8
    vae_steps: int = 1000
    vae_batch: int = 4
    vae_lr: float = 2e-3
    object_weight: float = 5.0
    kl_weight: float = 1e-6
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 2e-3
    caption_dropout: float = 0.1
    size_dropout: float = 0.2
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.995

    def with_steps(self, steps: int) -> Recipe:
        """The same recipe with every training phase cut to `steps` steps (for quick checks)."""
        return replace(self, vae_crop_steps=steps, vae_steps=steps, unet_steps=steps)


@contextmanager
def deterministic(threads: int = THREADS) -> Iterator[None]:
    """Within: a fixed thread count and deterministic kernels (the same run gives the same bytes);
    the caller's settings are restored after."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def _one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.05)


# ------------------------------------------------------------------------------------------ VAE


def _vae_step(vae: nn.Module, x: Tensor, g: torch.Generator, recipe: Recipe) -> Tensor:
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.sample(generator=g)).sample
    # The shapes are a few percent of the pixels but all of the content: weigh pixels by their colour
    # saturation (grey background ~0, shapes 0.5-0.8), so that colours and corners are learnt first.
    saturation = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2
    weight = 1 + recipe.object_weight * saturation
    mse = (weight * (reconstruction - x).pow(2)).mean() / weight.mean()
    return mse + recipe.kl_weight * posterior.kl().mean()


def train_vae(vae: nn.Module, images: Tensor, recipe: Recipe, g: torch.Generator, log: Log) -> float:
    """Steps 2: crops, then whole images. Returns the last whole-image reconstruction loss."""
    vae.train()
    phases = [(recipe.vae_crop_steps, recipe.vae_crop_batch, 32), (recipe.vae_steps, recipe.vae_batch, 64)]
    loss = torch.tensor(float("nan"))
    for steps, batch, crop in phases:
        opt = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
        sched = _one_cycle(opt, recipe.vae_lr, steps)
        for step in range(steps):
            x = images[torch.randint(0, len(images), (batch,), generator=g)]
            if crop < x.shape[-1]:
                # Crops on the 8-px latent grid, so that the encoder sees aligned patches.
                top, left = (torch.randint(0, (x.shape[-1] - crop) // 8 + 1, (2,), generator=g) * 8).tolist()
                x = x[:, :, top:top + crop, left:left + crop]
            loss = _vae_step(vae, x, g, recipe)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == steps - 1:
                log(f"vae {crop}px step {step}/{steps}: loss {loss.item():.4f}")
    vae.eval()
    return float(loss.item())


@torch.no_grad()
def normalise_latents(vae: nn.Module, images: Tensor, batch: int = 64) -> tuple[list[float], list[float]]:
    """Step 3: make ``scaling_factor * latents`` zero-mean, unit-variance per channel on `images`.

    With ``z = s * k * z' + mu`` (k the config's scaling factor, mu/s the channel mean/std of the
    posterior means), the encoder's ``quant_conv`` is changed to output z' (means and log-variances) and
    the decoder's ``post_quant_conv`` to read z': the autoencoder computes exactly what it did before.
    Returns the measured (mean, std) per channel.
    """
    means = torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)])
    mu = means.mean(dim=(0, 2, 3))
    scale = means.std(dim=(0, 2, 3)) * float(vae.config.scaling_factor)
    c = mu.numel()
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= scale.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) / scale
    q.bias[c:] -= 2 * torch.log(scale)
    pq.bias += (pq.weight[:, :, 0, 0] @ mu)
    pq.weight *= scale.view(1, -1, 1, 1)
    return mu.tolist(), (scale / float(vae.config.scaling_factor)).tolist()


@torch.no_grad()
def encode_scenes(vae: nn.Module, images: Tensor, batch: int = 64) -> tuple[Tensor, Tensor]:
    """Posterior (mean, std) of every image, scaled by the VAE's scaling factor (what the UNet sees)."""
    k = float(vae.config.scaling_factor)
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch]).latent_dist
        means.append(dist.mean * k)
        stds.append(dist.std * k)
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------------------ denoiser


def training_caption(scene: Scene, draw: float, recipe: Recipe) -> str:
    """The caption a scene gets at one step, from a uniform `draw` in [0, 1)."""
    if draw < recipe.caption_dropout:
        return ""
    if draw < recipe.caption_dropout + recipe.size_dropout:
        return scene.caption(with_size=False)
    return scene.caption()


class _Average:
    """An exponential moving average of parameters (kept in float32, copied in at the end)."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short warm-up: early weights fade fast
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def train_denoiser(pipe: Any, latents: tuple[Tensor, Tensor], scenes: Sequence[Scene], recipe: Recipe,
                   g: torch.Generator, log: Log) -> list[float]:
    """Step 4 and 5: UNet and text encoder learn to predict what the pipeline's scheduler says
    (``prediction_type``: epsilon, or v for `to_v_prediction`); returns the loss per step."""
    from diffusers import DDPMScheduler

    from lycoft.training.sampling import default_conditioner

    unet, te = pipe.unet, pipe.text_encoder
    conditioner = default_conditioner(pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    params = [*unet.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.0)
    sched = _one_cycle(opt, recipe.unet_lr, recipe.unet_steps)
    average = _Average(params, recipe.ema_decay)
    mean, std = latents
    unet.train()
    te.train()
    losses = []
    for step in range(recipe.unet_steps):
        idx = torch.randint(0, len(scenes), (recipe.unet_batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        draws = torch.rand(len(idx), generator=g).tolist()
        captions = [training_caption(scenes[i], d, recipe) for i, d in zip(idx.tolist(), draws)]
        hidden = conditioner.encode(captions).hidden
        pred = unet(noise_scheduler.add_noise(z, noise, t), t, hidden).sample
        v = noise_scheduler.config.prediction_type == "v_prediction"
        target = noise_scheduler.get_velocity(z, noise, t) if v else noise
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        # min-SNR-gamma (Hang et al. 2023): min(snr, gamma) / snr for epsilon, / (snr + 1) for v
        weight = snr[t].clamp(max=recipe.min_snr_gamma) / (snr[t] + 1 if v else snr[t])
        loss = (per_sample * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        average.update(step)
        losses.append(float(loss.item()))
        if step % 100 == 0 or step == recipe.unet_steps - 1:
            recent = losses[-100:]
            log(f"unet step {step}/{recipe.unet_steps}: loss {sum(recent) / len(recent):.4f}")
    average.copy_to_params()
    unet.eval()
    te.eval()
    return losses


# --------------------------------------------------------------------------------------- recipe


def _loss_summary(losses: Sequence[float]) -> tuple[float, float]:
    """Mean loss over the first 100 steps and over the last 10% of them, rounded for the report."""
    head, tail = losses[:100], losses[-max(1, len(losses) // 10):]
    return round(sum(head) / max(len(head), 1), 4), round(sum(tail) / len(tail), 4)


@dataclass
class Pretrained:
    """A finished run: the pipeline (float32, eval mode) and what was measured on the way."""

    pipe: Any
    metrics: dict[str, Any]


def pretrain(recipe: Recipe = Recipe(), log: Log = print) -> Pretrained:
    """Run the recipe (steps 1-5 of the module docstring) and return the trained pipeline."""
    with deterministic():
        return _pretrain(recipe, log)


def _pretrain(recipe: Recipe, log: Log) -> Pretrained:
    from lycoft.checkpoints.tiny import build_tiny_pipeline

    started, cpu_started = time.perf_counter(), time.process_time()
    pipe = build_tiny_pipeline("sd1", seed=recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    codec_scenes = random_scenes(recipe.images, recipe.seed + 1, SHAPES, colours=list(COLOURS))
    codec_images = to_tensor([render_scene(s) for s in codec_scenes])
    t = time.perf_counter()
    vae_loss = train_vae(pipe.vae, codec_images, recipe, g, log)
    vae_seconds = time.perf_counter() - t
    del codec_images

    scenes = random_scenes(recipe.images, recipe.seed, BASE_SHAPES)
    images = to_tensor([render_scene(s) for s in scenes])
    latent_mean, latent_std = normalise_latents(pipe.vae, images)
    latents = encode_scenes(pipe.vae, images)

    t = time.perf_counter()
    losses = train_denoiser(pipe, latents, scenes, recipe, g, log)
    first, last = _loss_summary(losses)
    metrics = {
        "vae_reconstruction_mse": round(vae_loss, 5),
        "vae_seconds": round(vae_seconds, 1),
        "latent_channel_mean": [round(v, 4) for v in latent_mean],
        "latent_channel_std": [round(v, 4) for v in latent_std],
        "unet_loss_first_100": first,
        "unet_loss_last_10pct": last,
        "unet_seconds": round(time.perf_counter() - t, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "total_cpu_seconds": round(time.process_time() - cpu_started, 1),
    }
    return Pretrained(pipe, metrics)


V_STEPS = 1000  # denoiser steps that turn the epsilon toy into the v-prediction one


def to_v_prediction(pipe: Any, recipe: Recipe, steps: int = V_STEPS, log: Log = print) -> Pretrained:
    """Fine-tune a pretrained toy model (UNet and text encoder; the VAE is kept) to predict v instead of
    epsilon, on the scenes of `recipe`, as SD 2's 768-v model was made from its epsilon base."""
    with deterministic():
        started = time.perf_counter()
        pipe.scheduler.register_to_config(prediction_type="v_prediction")
        g = torch.Generator().manual_seed(recipe.seed + 2)
        scenes = random_scenes(recipe.images, recipe.seed, BASE_SHAPES)
        latents = encode_scenes(pipe.vae, to_tensor([render_scene(s) for s in scenes]))
        losses = train_denoiser(pipe, latents, scenes, replace(recipe, unet_steps=steps), g, log)
        first, last = _loss_summary(losses)
        metrics = {"v_steps": steps, "v_loss_first_100": first, "v_loss_last_10pct": last,
                   "total_seconds": round(time.perf_counter() - started, 1)}
        return Pretrained(pipe, metrics)


def save_toy_checkpoint(pipe: Any, path: str | Path, recipe: Recipe) -> Path:
    """Write the toy model as an SD1 single-file checkpoint in float16, the recipe in its metadata."""
    from lycoft.checkpoints.loading import save_single_file

    metadata = {"lycoft.toy.recipe": json.dumps(asdict(recipe), sort_keys=True),
                "modelspec.description": "lycoft toy SD1 model: small and big coloured shapes, 64x64"}
    path = save_single_file(pipe, path, "sd1", dtype=torch.float16, metadata=metadata)
    _sort_header(path)
    return path


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place: the writer emits the metadata in hash
    order, which differs from run to run; sorted, the same tensors give the same bytes. The header keeps
    its length (same content, padded with spaces), so the tensor data does not move."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise ValueError(f"{path}: the sorted safetensors header is longer than the original; not rewritten")
        f.seek(8)
        f.write(text.ljust(size, b" "))


def file_size_mb(path: str | Path) -> float:
    return round(Path(path).stat().st_size / 2**20, 2)

