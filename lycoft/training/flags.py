"""Every trainer flag in one table.

The table is the `TrainConfig` dataclass itself: each field carries its default, help text and group,
so `--help`, TOML checking and the written-back config all read the same source. Flag names follow
kohya sd-scripts wherever kohya has the flag, so kohya configs load unchanged. What each flag's value may
be is checked in `flag_values`.
Nothing here touches a model; torch is imported only to look up a bare torch.optim class name.
"""

from __future__ import annotations

import ast
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import cache
from typing import Any, get_args, get_origin, get_type_hints

from lycoft.checkpoints.families import FAMILIES, SD1, SD2, SDXL, family_info
from lycoft.config import OPTIONS, NetworkOptions, parse_network_args
from lycoft.training.errors import ConfigError

logger = logging.getLogger(__name__)

# kohya's optimizer names (sd-scripts `get_optimizer`); `optimizers.py` says where each comes from.
OPTIMIZERS = (
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit", "PagedLion8bit",
    "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "DAdaptAdamPreprint", "DAdaptAdaGrad", "DAdaptAdam",
    "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Prodigy", "Adafactor", "AdamWScheduleFree",
    "RAdamScheduleFree", "SGDScheduleFree",
)
LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt", "piecewise_constant", "adafactor",
)
# kohya's sample sampler names, so that kohya configs keep working.
SAMPLERS = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)
NETWORK_MODULES = ("lycoft", "lycoft.kohya")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")



def flag(default: Any, help: str, *, group: str, choices: Sequence[str] | None = None,
         kind: str | None = None) -> Any:
    """A `TrainConfig` field: its default plus what `--help` and the checks need to know."""
    meta = {"help": help, "group": group, "choices": tuple(choices) if choices else None, "kind": kind}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """The resolved training configuration. Build it with `parse_args`; change it with `.replace()`."""

    # --- model ---
    pretrained_model_name_or_path: str | None = flag(
        None, "Base model: a single-file .safetensors/.ckpt, a diffusers folder, a hub id, or "
        "'builtin:tiny-sd1' (also tiny-sd2, tiny-sdxl) for the bundled tiny test models. Required.",
        group="model")
    vae: str | None = flag(
        None, "A separate VAE (file, folder or hub id) to use instead of the model's own; a fixed VAE "
        "avoids the black/NaN images of the fp16 SDXL VAE.", group="model")
    model_family: str | None = flag(
        None, "Force the model family instead of detecting it from the checkpoint. Detection is right "
        "for standard checkpoints; force it for renamed or pruned ones.", group="model", choices=FAMILIES)
    v2: bool = flag(False, "kohya spelling of --model_family sd2.", group="model")
    sdxl: bool = flag(False, "kohya spelling of --model_family sdxl.", group="model")
    v_parameterization: bool = flag(
        False, "Train with the v-prediction target (SD2.x 768-v and v-pred SDXL finetunes). Wrong "
        "for epsilon models: the adapter then learns to fight the base.", group="model")
    clip_skip: int | None = flag(
        None, "Use the text encoder's N-th hidden state from the end (2 = skip the last layer, as "
        "anime SD1 models expect). Unset = the model's usual layer.", group="model")
    max_token_length: int | None = flag(
        None, "Caption length in tokens: unset = 75; 150 or 225 encode longer captions in 75-token "
        "chunks (more text kept, slower text encoding).", group="model", choices=("75", "150", "225"))

    # --- data ---
    train_data_dir: str | None = flag(
        None, "Folder of DreamBooth subfolders named '<repeats>_<class tokens>' (e.g. '10_sks dog'); "
        "images directly inside it or in folders without the number are skipped with a warning.",
        group="data")
    reg_data_dir: str | None = flag(
        None, "Regularization (prior preservation) images, same folder layout. They are cycled to "
        "match the number of training images per epoch and weighted by --prior_loss_weight.",
        group="data")
    dataset_config: str | None = flag(
        None, "A kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]]) instead of "
        "--train_data_dir; the flags below act as its lowest-priority defaults.", group="data")
    resolution: tuple[int, int] | None = flag(
        None, "Training size: '512' or 'W,H' (e.g. '512,768'). Unset = 1024 for SDXL, 512 otherwise. "
        "Larger = more detail, quadratically more compute and memory.", group="data", kind="resolution")
    enable_bucket: bool = flag(
        False, "Aspect-ratio bucketing: each image trains at the bucket (area <= resolution^2) closest "
        "to its own aspect ratio instead of being cropped square. Keeps compositions; batches then "
        "hold one bucket each, so small buckets give small batches.", group="data")
    min_bucket_reso: int = flag(256, "Smallest bucket side in pixels.", group="data")
    max_bucket_reso: int = flag(1024, "Largest bucket side in pixels.", group="data")
    bucket_reso_steps: int = flag(
        64, "Bucket sides are multiples of this (a multiple of 8, the VAE's factor). Smaller = buckets "
        "closer to each image's aspect ratio, but more buckets and more partial batches.", group="data")
    bucket_no_upscale: bool = flag(
        False, "Never upscale: each image gets its own bucket no larger than the image (area still "
        "<= resolution^2). Avoids blurry upscales of small images; creates more buckets.", group="data")
    random_crop: bool = flag(
        False, "Crop at a random offset instead of the center when an image is larger than its "
        "bucket. More positional variety; cannot be combined with --cache_latents.", group="data")
    flip_aug: bool = flag(
        False, "Mirror images horizontally at random. Doubles the variety; wrong for asymmetric "
        "subjects (text, logos, a parting on one side).", group="data")
    max_data_loader_n_workers: int = flag(
        8, "Data loader worker processes (0 = load in the training process), capped at the CPU "
        "count. More workers hide image decoding; each costs memory.", group="data")
    persistent_data_loader_workers: bool = flag(
        True, "Keep the data loader's worker processes alive between epochs (no restart pause at each "
        "epoch, a little more memory). lycoft keeps them by default, where kohya's default is off; false "
        "restarts them every epoch, as kohya does without this flag.", group="data")

    # --- captions ---
    caption_extension: str = flag(
        ".caption", "Caption file extension next to each image (kohya's default is '.caption'; most "
        "datasets use '.txt'). Images without a caption file use their folder's class tokens.",
        group="captions")
    shuffle_caption: bool = flag(
        False, "Shuffle the comma-separated tags of each caption every step, so no tag order is "
        "learned. For tag-style captions, not for sentences.", group="captions")
    keep_tokens: int = flag(
        0, "Keep the first N comma-separated tags in place when shuffling (e.g. the trigger word).",
        group="captions")
    keep_tokens_separator: str = flag(
        "", "Alternative to --keep_tokens: everything before this separator (e.g. '|||') stays fixed; "
        "a second separator starts a fixed suffix.", group="captions")
    caption_dropout_rate: float = flag(
        0.0, "Probability of training a sample with an empty caption. A little (0.05-0.1) keeps the "
        "adapter working without its trigger (better CFG); too much weakens the trigger.",
        group="captions")
    caption_tag_dropout_rate: float = flag(
        0.0, "Probability of dropping each non-kept tag. Makes the adapter depend less on any single "
        "tag; too much blurs what the tags mean.", group="captions")
    caption_dropout_every_n_epochs: int = flag(
        0, "Train every N-th epoch (counting from 1) with empty captions only; 0 = off.", group="captions")
    caption_prefix: str = flag(
        "", "Text put before every caption, with a space (e.g. a trigger word the caption files lack).",
        group="captions")
    caption_suffix: str = flag("", "Text put after every caption, with a space.", group="captions")
    enable_wildcard: bool = flag(
        False, "Wildcard captions: each step picks one line of a multi-line caption file and one "
        "option of every {a|b|c} ('{{' and '}}' are literal braces).", group="captions")
    caption_separator: str = flag(
        ",", "What separates the tags that --shuffle_caption, --keep_tokens and tag dropout work on.",
        group="captions")
    secondary_separator: str = flag(
        "", "Joins words that shuffle and tag dropout keep together as one tag (e.g. ';;;'); replaced "
        "by --caption_separator afterwards.", group="captions")

    # --- caching ---
    cache_latents: bool = flag(
        False, "Encode every image with the VAE once and reuse the latents: much faster steps and the "
        "VAE can leave the GPU. Each image's crop is then fixed, so --random_crop cannot be used; "
        "--flip_aug still works (both orientations are cached).", group="caching")
    cache_latents_to_disk: bool = flag(
        False, "Also keep the cached latents on disk ('<image>.lycoft.npz'), reused across runs and "
        "invalidated when an image or its bucket changes. Implies --cache_latents.", group="caching")
    vae_batch_size: int = flag(
        1, "Images per VAE call while caching latents. Larger = faster caching, more memory.",
        group="caching")
    cache_text_encoder_outputs: bool = flag(
        False, "Encode every caption once and reuse it (the text encoder must be frozen: needs "
        "--network_train_unet_only; captions must not change, so no shuffle or dropout). Saves "
        "memory and time, mostly for SDXL.", group="caching")

    # --- training ---
    train_batch_size: int = flag(
        1, "Images per step per device. Larger = smoother gradients and better GPU use, more memory.",
        group="training")
    max_train_steps: int = flag(
        1600, "Total optimizer steps. Ignored when --max_train_epochs is given.", group="training")
    max_train_epochs: int | None = flag(
        None, "Train this many epochs (one epoch = every image times its repeats); overrides "
        "--max_train_steps.", group="training")
    gradient_accumulation_steps: int = flag(
        1, "Accumulate gradients over N batches per optimizer step: a larger effective batch without "
        "more memory, N times slower per step.", group="training")
    gradient_checkpointing: bool = flag(
        False, "Recompute UNet activations in the backward pass: much less memory, ~20-30% slower.",
        group="training")
    seed: int | None = flag(
        None, "Seed for data order, augmentation, noise and init. Unset = a random seed, recorded in "
        "the saved config so the run can be repeated.", group="training")
    skip_nonfinite: bool = flag(
        False, "Skip (and count) steps whose loss is NaN/inf instead of stopping. Rescues a long run "
        "from rare fp16 overflows; a rising count means the setup is unstable.", group="training")
    cpu: bool = flag(False, "Train on the CPU even when a GPU is present (slow; for tests).",
                     group="training")

    # --- precision ---
    mixed_precision: str = flag(
        "no", "Autocast precision: bf16 (Ampere+; safe range) or fp16 (older GPUs; loss scaling "
        "needed). The OFT rotation is always built in fp32.", group="precision",
        choices=("no", "fp16", "bf16"))
    full_fp16: bool = flag(
        False, "Keep the adapter weights themselves in fp16: less memory, risk of underflow.",
        group="precision")
    full_bf16: bool = flag(
        False, "Keep the adapter weights in bf16: less memory, coarser updates.", group="precision")
    save_precision: str | None = flag(
        None, "dtype of the saved adapter; unset = float. fp16/bf16 halve the file; OFT blocks are "
        "small, so float is usually worth it.", group="precision", choices=("float", "fp16", "bf16"))
    no_half_vae: bool = flag(
        False, "Run the VAE in fp32 even with mixed precision (fixes NaN latents of the SDXL VAE).",
        group="precision")
    xformers: bool = flag(False, "Use xformers attention (needs the xformers package).",
                          group="precision")
    sdpa: bool = flag(False, "Use PyTorch scaled-dot-product attention (memory-efficient, no extra "
                      "package).", group="precision")

    # --- memory and speed ---
    fp8_base: bool = flag(
        False, "Store the frozen base model's Linear/Conv weights (UNet and text encoders) in float8, upcast "
        "per layer at use: about half the memory of fp16/bf16 weights. The adapter trains against the "
        "float8-rounded base exactly; norms, biases and embeddings keep --mixed_precision's dtype.",
        group="memory")
    fp8_base_unet: bool = flag(
        False, "Like --fp8_base, for the UNet only (the text encoders keep --mixed_precision's dtype).",
        group="memory")
    highvram: bool = flag(
        False, "Keep the GPU's cached memory while caching latents. By default it is released after every "
        "VAE batch, so that the VAE's activations leave no fragments behind on a small GPU.", group="memory")
    lowram: bool = flag(
        False, "Read a single-file checkpoint tensor by tensor straight onto the GPU, for machines with more "
        "VRAM than RAM (Colab, Kaggle): RAM then holds one tensor of the file at a time. Without it the file is "
        "read the same way onto the CPU, in the training dtype, and moved to the GPU after.", group="memory")
    torch_compile: bool = flag(
        False, "Compile the UNet with torch.compile (--dynamo_backend): faster steps after a slow first step "
        "and one recompilation per new bucket size.", group="memory")
    dynamo_backend: str = flag(
        "inductor", "torch.compile backend of --torch_compile: inductor (fused kernels; needs a C++ "
        "compiler, Triton on GPUs), aot_eager or eager (debugging), or another that torch lists; 'no' = "
        "no compilation.", group="memory")
    cache_text_encoder_outputs_to_disk: bool = flag(
        False, "Also keep the cached text-encoder outputs on disk, one '<image>.lycoft-te.npz' beside each "
        "image, reused across runs while the caption, the text encoders and their settings are unchanged. "
        "Implies --cache_text_encoder_outputs.", group="caching")
    text_encoder_batch_size: int | None = flag(
        None, "Captions per text-encoder call while caching text-encoder outputs; unset = the training "
        "batch size. Larger = faster caching, more memory.", group="caching")

    # --- optimizer ---
    optimizer_type: str = flag(
        "AdamW", "AdamW; AdamW8bit, PagedAdamW(8bit|32bit), Lion8bit, PagedLion8bit, SGDNesterov8bit "
        "(bitsandbytes: less optimizer memory); Lion; SGDNesterov; Prodigy and DAdaptation, DAdaptAdam, "
        "DAdaptAdaGrad, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD (learn their own step size: set "
        "--learning_rate 1); Adafactor (its own relative step size unless optimizer_args relative_step=False); "
        "AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree (no LR schedule needed); or a torch.optim class "
        "name or dotted class path such as mypkg.MyOptimizer.", group="optimizer")
    optimizer_args: list[str] = flag(
        [], "Extra optimizer arguments as key=value (e.g. weight_decay=0.01 'betas=(0.9,0.99)'); "
        "values are Python literals, anything else a string.", group="optimizer")
    learning_rate: float = flag(
        1e-4, "Base learning rate. OFT parameters are rotations, so rates well above LoRA's "
        "(1e-4..1e-3) are usual; too high overshoots the subject.", group="optimizer")
    unet_lr: float | None = flag(None, "UNet learning rate; unset = --learning_rate.", group="optimizer")
    text_encoder_lr: list[float] | None = flag(
        None, "Text encoder learning rate; unset = --learning_rate. Lower than the UNet's keeps the "
        "text encoder from overfitting the trigger. SDXL takes one per text encoder, as in kohya "
        "(--text_encoder_lr 1e-5 2e-5: CLIP-L, then OpenCLIP-G); one value serves both.",
        group="optimizer", kind="floats")
    max_grad_norm: float = flag(
        1.0, "Clip the gradient norm to this (0 = no clipping).", group="optimizer")

    # --- scheduler ---
    lr_scheduler: str = flag(
        "constant", "Learning-rate schedule (docs/training.md has each one's formula). adafactor: the rate "
        "Adafactor computes itself (its relative_step mode).", group="scheduler", choices=LR_SCHEDULERS)
    lr_warmup_steps: int | float = flag(
        0, "Warmup steps (an integer), a fraction of all steps (a number < 1, e.g. 0.05) or a percentage "
        "('5%'). Needs a schedule with warmup (not 'constant').", group="scheduler", kind="warmup")
    lr_scheduler_num_cycles: int = flag(
        1, "Descents of cosine_with_restarts; half cosine waves of cosine_with_min_lr and warmup_stable_decay "
        "(1 = from the peak down to the floor once).", group="scheduler")
    lr_scheduler_power: float = flag(1.0, "Exponent of the polynomial schedule.", group="scheduler")
    lr_decay_steps: int | float = flag(
        0, "Decay steps at the end of warmup_stable_decay (an integer) or a fraction of all steps (< 1); "
        "between warm-up and decay the rate stays at its peak.", group="scheduler", kind="warmup")
    lr_scheduler_min_lr_ratio: float | None = flag(
        None, "The lowest rate as a fraction of the learning rate: where cosine_with_min_lr (required "
        "there) and warmup_stable_decay (unset = 0) end.", group="scheduler")
    lr_scheduler_timescale: int | None = flag(
        None, "Timescale of inverse_sqrt, whose rate after warm-up is 1/sqrt((step + timescale - warmup) / "
        "timescale); unset or 0 = the warm-up steps (10000 without warm-up).", group="scheduler")
    lr_scheduler_type: str | None = flag(
        None, "A scheduler class instead of --lr_scheduler: a torch.optim.lr_scheduler name (e.g. "
        "CosineAnnealingLR) or a dotted class path; it gets the optimizer and --lr_scheduler_args and is "
        "stepped once per optimizer step.", group="scheduler")
    lr_scheduler_args: list[str] = flag(
        [], "Scheduler arguments as key=value (Python literals, anything else a string) for "
        "--lr_scheduler_type (e.g. T_max=1000) or a named schedule (piecewise_constant: "
        "step_rules=1:100,0.1:200,0.01).", group="scheduler")

    # --- loss ---
    noise_offset: float = flag(
        0.0, "Add this much per-channel offset noise (0.05-0.1 typical): lets the model learn very "
        "dark and very bright images; too much washes out mid-tones. 0 = off.", group="loss")
    min_snr_gamma: float | None = flag(
        None, "Min-SNR loss weighting with this gamma (5 is the paper's value): faster, steadier "
        "convergence by down-weighting easy low-noise steps. Unset = plain MSE.", group="loss")
    prior_loss_weight: float = flag(
        1.0, "Loss weight of regularization images. Higher keeps the class closer to the base model; "
        "lower lets the subject dominate.", group="loss")
    loss_type: str = flag(
        "l2", "Per-pixel loss: l2 (squared error), l1 (absolute error), huber or smooth_l1 (squared below a "
        "threshold c, see --huber_schedule, linear above: outliers such as odd images pull less).", group="loss",
        choices=LOSS_TYPES)
    huber_schedule: str = flag(
        "snr", "How huber/smooth_l1's threshold c follows the timestep: snr (c near 1 at low noise, falling to "
        "--huber_c at high noise), exponential (--huber_scale * --huber_c ** (t/1000)), constant "
        "(--huber_c * --huber_scale).", group="loss", choices=HUBER_SCHEDULES)
    huber_c: float = flag(
        0.1, "Huber threshold parameter (> 0): errors smaller than c count squared, larger ones linearly.",
        group="loss")
    huber_scale: float = flag(
        1.0, "Scale of the Huber threshold in the constant and exponential schedules (the snr schedule "
        "ignores it, as in kohya).", group="loss")
    debiased_estimation_loss: bool = flag(
        False, "Weight each sample by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)): less weight on easy "
        "low-noise steps (debiased estimation). An alternative to --min_snr_gamma.", group="loss")
    scale_v_pred_loss_like_noise_pred: bool = flag(
        False, "v-prediction only: weight the loss by SNR/(SNR+1), so it weighs timesteps as an epsilon "
        "loss would. Needs --v_parameterization.", group="loss")
    v_pred_like_loss: float | None = flag(
        None, "Epsilon models only: add this much of a v-prediction-like loss (loss * (1 + x (SNR+1)/SNR)), "
        "more weight on high-noise steps (0.1-0.5). Unset = off.", group="loss")

    # --- noise ---
    noise_offset_random_strength: bool = flag(
        False, "Draw the offset noise's strength uniformly from [0, --noise_offset) at every step.",
        group="noise")
    adaptive_noise_scale: float | None = flag(
        None, "Add this times |the latent's channel mean| to --noise_offset (needs --noise_offset), so "
        "images far from mid-grey get more offset. Unset = off.",
        group="noise")
    multires_noise_iterations: int | None = flag(
        None, "Multi-resolution noise with this many levels (6-10 usual): noise at ever coarser scales "
        "added, so large areas (colour, light) learn faster. Unset = off.", group="noise")
    multires_noise_discount: float = flag(
        0.3, "Weight ratio between successive multi-resolution noise levels (lower = less coarse noise).",
        group="noise")
    ip_noise_gamma: float | None = flag(
        None, "Input perturbation: noise the latents with noise + gamma * extra noise while the target "
        "stays the original noise (about 0.1); a regularizer against exposure bias. Unset = off.",
        group="noise")
    ip_noise_gamma_random_strength: bool = flag(
        False, "Draw the input perturbation's strength uniformly from [0, --ip_noise_gamma) at every step.",
        group="noise")
    min_timestep: int | None = flag(
        None, "Train only on timesteps >= this (0-999; unset = 0). Raising it skips the low-noise steps that "
        "shape fine detail.", group="noise")
    max_timestep: int | None = flag(
        None, "Train only on timesteps < this (up to 1000; unset = 1000). Lowering it skips the high-noise steps "
        "that shape composition. Equal to --min_timestep = that one timestep.", group="noise")
    zero_terminal_snr: bool = flag(
        False, "Rescale the noise schedule so that its last step is pure noise (zero terminal SNR, Lin et al. "
        "2023): lets a v-prediction model make truly dark or bright images. Meant for --v_parameterization.",
        group="noise")

    # --- masked loss ---
    masked_loss: bool = flag(
        False, "Weight the loss by each image's mask from conditioning_data_dir: white trains, black is "
        "ignored, so backgrounds or other people in the picture are not learned.", group="masked loss")
    conditioning_data_dir: str | None = flag(
        None, "Folder of masks for the --train_data_dir images: one per image, with its file stem and size "
        "(e.g. masks/toy_001.png for 10_sks toy/toy_001.jpg; the red channel counts). Needs --masked_loss. "
        "In a dataset TOML, set it per [[datasets.subsets]].", group="masked loss")
    alpha_mask: bool = flag(
        False, "Use each image's alpha channel as its loss mask (opaque trains, transparent is ignored); "
        "images without alpha train everywhere. Works without --masked_loss.", group="masked loss")

    # --- network ---
    network_module: str = flag(
        "lycoft", "Adapter implementation. This trainer trains lycoft OFT/BOFT adapters only ("
        "'lycoft.kohya' is the same network as kohya sees it).", group="network",
        choices=NETWORK_MODULES)
    network_dim: int | None = flag(
        None, "OFT block size (kohya spelling; same as network_args block_size). Bigger blocks: more "
        "expressive, more parameters and compute. Unset = 32 for oft, 8 for boft.", group="network")
    network_alpha: float | None = flag(
        None, "Ignored for OFT/BOFT; accepted so kohya configs load. The constraint is set with "
        "network_args constraint=...", group="network")
    network_args: list[str] = flag(
        [], "Adapter options as key=value, the same keys as --network_module lycoft.kohya takes: "
        + ", ".join(o.key for o in OPTIONS if not o.ignored) + " (README, 'Network args').",
        group="network")
    network_dropout: float | None = flag(
        None, "kohya's neuron dropout (network_args dropout): has no meaning for a rotation, so it is "
        "reported and ignored. Block dropout is network_args module_dropout=<p>.", group="network")
    network_weights: str | None = flag(
        None, "Start from these adapter weights (a warm start, not a resume).", group="network")
    dim_from_weights: bool = flag(
        False, "Build the network the --network_weights file describes (its layers, algo, block size and "
        "butterfly stages) instead of the one --network_dim/--network_args describe; training options "
        "(module_dropout, constraint, path, neumann_terms) still come from --network_args.", group="network")
    base_weights: list[str] = flag(
        [], "OFT/BOFT adapter files merged into the base model before training (the new adapter then "
        "trains on top of them). LoRA files cannot be merged here: merge them into the checkpoint first.",
        group="network", kind="files")
    base_weights_multiplier: list[float] | None = flag(
        None, "Strength of each --base_weights file, in order; missing ones are 1.", group="network",
        kind="numbers")
    network_train_unet_only: bool = flag(
        False, "Adapt the UNet only: faster, less memory, needed to cache text encoder outputs.",
        group="network")
    network_train_text_encoder_only: bool = flag(
        False, "Adapt the text encoder(s) only.", group="network")

    # --- prior preservation ---
    num_class_images: int = flag(
        0, "Generate class images with the base model until --reg_data_dir holds this many "
        "(needs --class_prompt). 0 = use the folder as it is.", group="prior")
    class_prompt: str | None = flag(
        None, "Prompt for generating class images (e.g. 'a photo of a dog').", group="prior")

    # --- saving ---
    output_dir: str = flag("output", "Where adapters, states and the resolved config are written.",
                           group="saving")
    output_name: str = flag(
        "last", "Adapter file name without extension; intermediate saves add '-<epoch or step>'.",
        group="saving")
    save_model_as: str = flag(
        "safetensors", "File format of saved adapters; lycoft writes safetensors only.", group="saving",
        choices=("safetensors",))
    save_every_n_steps: int | None = flag(None, "Also save an adapter every N steps.", group="saving")
    save_every_n_epochs: int | None = flag(None, "Also save an adapter every N epochs.", group="saving")
    save_last_n_steps: int | None = flag(
        None, "Delete step saves older than N steps (keeps disk use bounded).", group="saving")
    save_last_n_epochs: int | None = flag(
        None, "Keep only the last N epoch saves.", group="saving")
    save_state: bool = flag(
        False, "Save the full training state (optimizer, scheduler, RNG, step) with each adapter so "
        "--resume can continue exactly; several times the adapter's size.", group="saving")
    resume: str | None = flag(
        None, "Continue from a state folder written by --save_state (step and epoch carry over); 'auto': "
        "from the newest state of --output_name in --output_dir (by step), or from scratch if there is none, "
        "for restart-until-done loops.", group="saving")
    save_n_epoch_ratio: int | None = flag(
        None, "Save about N adapters over the run, evenly: every floor(epochs / N) epochs (at least every "
        "epoch); replaces --save_every_n_epochs.", group="saving")
    save_last_n_steps_state: int | None = flag(
        None, "Delete step states older than N steps, apart from the adapters (which --save_last_n_steps "
        "prunes); unset = --save_last_n_steps. States are large, adapters small: keep many adapters and "
        "few states.", group="saving")
    save_last_n_epochs_state: int | None = flag(
        None, "Keep only the last N epoch states, apart from the adapters (which --save_last_n_epochs "
        "prunes); unset = --save_last_n_epochs.", group="saving")
    save_state_on_train_end: bool = flag(
        False, "Save the training state with the final adapter ('<output_name>-state'), even without "
        "--save_state: the run can be continued later with --resume and more steps.", group="saving")

    # --- where the step count starts ---
    initial_step: int | None = flag(
        None, "Start counting at this step (0 = the first), as if the steps before it were done: saves, "
        "samples, the LR schedule and the end (--max_train_steps counts them) follow the count. The data "
        "starts at the beginning of that step's epoch unless --skip_until_initial_step. Beats "
        "--initial_epoch; ignored when --resume finds a state (the state's count continues).",
        group="start")
    initial_epoch: int | None = flag(
        None, "Start counting at this epoch (1 = the first): --initial_step at the epoch's first step.",
        group="start")
    skip_until_initial_step: bool = flag(
        False, "With --initial_step: also skip the data of the steps before it, so the run sees the batches "
        "an uninterrupted run would have seen from there (noise draws follow the step count either way).",
        group="start")

    # --- metadata (the adapter file's; kohya's flags, SAI model-spec keys) ---
    no_metadata: bool = flag(
        False, "Write only what loaders need into the adapter (its network keys and the model-spec title "
        "and fields below): no training settings, dataset folders or tag frequencies.", group="metadata")
    training_comment: str | None = flag(
        None, "A comment stored in the adapter (ss_training_comment).", group="metadata")
    metadata_title: str | None = flag(
        None, "modelspec.title of the adapter; unset = --output_name.", group="metadata")
    metadata_author: str | None = flag(None, "modelspec.author of the adapter.", group="metadata")
    metadata_description: str | None = flag(None, "modelspec.description of the adapter.", group="metadata")
    metadata_license: str | None = flag(None, "modelspec.license of the adapter.", group="metadata")
    metadata_tags: str | None = flag(None, "modelspec.tags of the adapter, comma-separated.", group="metadata")
    metadata_usage_hint: str | None = flag(
        None, "modelspec.usage_hint: how to use the adapter (e.g. the trigger word).", group="metadata")
    metadata_thumbnail: str | None = flag(
        None, "modelspec.thumbnail: an image file (stored as a data URL) or a data URL.", group="metadata")
    metadata_merged_from: str | None = flag(
        None, "modelspec.merged_from: the models this one was merged from.", group="metadata")
    metadata_trigger_phrase: str | None = flag(
        None, "modelspec.trigger_phrase: the phrase that triggers the adapter.", group="metadata")
    metadata_preprocessor: str | None = flag(
        None, "modelspec.preprocessor: the preprocessing the training images had.", group="metadata")

    # --- sampling ---
    sample_prompts: str | None = flag(
        None, "File of prompts (one per line, kohya options --w --h --d --s --l --n) to render during "
        "training.", group="sampling")
    sample_every_n_steps: int | None = flag(None, "Render samples every N steps.", group="sampling")
    sample_every_n_epochs: int | None = flag(None, "Render samples every N epochs.", group="sampling")
    sample_sampler: str = flag("ddim", "Scheduler used for samples.", group="sampling", choices=SAMPLERS)
    sample_at_first: bool = flag(False, "Render samples before the first step (the base model's "
                                 "look, for comparison).", group="sampling")

    # --- validation ---
    validation_split: float = flag(
        0.0, "Hold out this fraction of each training folder's images (regularization images excepted) and "
        "report the loss on them: rising while the training loss falls means overfitting. 0 = off.",
        group="validation")
    validation_seed: int | None = flag(
        None, "Seed of which images are held out and of the validation noise; unset = --seed.",
        group="validation")
    validate_every_n_steps: int | None = flag(
        None, "Also compute the validation loss every N steps (it is always computed at each epoch's end "
        "unless --validate_every_n_epochs says otherwise).", group="validation")
    validate_every_n_epochs: int | None = flag(
        None, "Compute the validation loss at the end of every N-th epoch; unset = every epoch.",
        group="validation")
    max_validation_steps: int | None = flag(
        None, "Use at most this many held-out batches per validation; unset = all of them.",
        group="validation")

    # --- logging ---
    logging_dir: str | None = flag(
        None, "Write logs here; unset = no logs.", group="logging")
    log_with: str | None = flag(
        None, "Logger: tensorboard, wandb or all; unset with --logging_dir = tensorboard.",
        group="logging", choices=("tensorboard", "wandb", "all"))
    log_prefix: str | None = flag(
        None, "Log into a new folder per run, <logging_dir>/<log_prefix><YYYYmmddHHMMSS>, as kohya names them; "
        "unset = <logging_dir> itself, where a resumed run continues its logs.", group="logging")
    log_tracker_name: str | None = flag(
        None, "The trackers' project name (TensorBoard's subfolder, the W&B project); unset = --output_name.",
        group="logging")
    log_tracker_config: str | None = flag(
        None, "A TOML file of keyword arguments for the trackers, one table per tracker (e.g. [wandb] "
        "entity = 'me', tags = ['oft']; [tensorboard] flush_secs = 30).", group="logging")
    wandb_run_name: str | None = flag(
        None, "The W&B run's name (unless --log_tracker_config names it).", group="logging")
    log_config: bool = flag(
        False, "Send the training settings to the trackers (TensorBoard hparams, the W&B config), without "
        "paths (model, data, output, files), which may name users and machines. The full settings are "
        "always saved as <output_name>-config.toml.", group="logging")

    # --- the console log (train_network.py's; a Python caller of `train` sets up logging itself) ---
    console_log_level: str | None = flag(
        None, "Log level of the console log; unset = INFO (other processes: WARNING).", group="console",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    console_log_file: str | None = flag(
        None, "Write the log into this file (overwritten) instead of the console; the progress bar and "
        "errors still go to the console.", group="console")
    console_log_simple: bool = flag(
        False, "Log lines with the message only (no time, level and logger name).", group="console")

    # --- the config file itself (command line only) ---
    config: str | None = flag(
        None, "TOML file with any of these flags as keys (flat, or in sections like kohya's "
        "--config_file); the command line overrides it.", group="config")
    output_config: bool = flag(
        False, "Write the flags given on the command line (those not at their defaults) to the --config path "
        "as a TOML file, and exit without training; an existing file is never overwritten.", group="config")

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def family_override(self) -> str | None:
        """The family the user forced ('sd1', 'sd2', 'sdxl'), or None to detect it from the model."""
        if self.model_family:
            return self.model_family
        if self.sdxl:
            return SDXL
        if self.v2:
            return SD2
        return None

    def text_encoder_lrs(self, count: int) -> list[float | None]:
        """The learning rate of each of `count` text encoders (None = --learning_rate): one value of
        --text_encoder_lr serves all of them, two name SDXL's two in order. More values than text encoders
        (the kohya_ss GUI writes two for every model) use the first ones, with a warning."""
        lrs = self.text_encoder_lr
        if not lrs:
            return [None] * count
        if len(lrs) > count:
            used = " ".join(map(str, lrs[:count]))
            logger.warning("--text_encoder_lr has %d values (%s) but this model has %d text encoder%s: using %s",
                           len(lrs), " ".join(map(str, lrs)), count, "s" if count != 1 else "", used)
        return [lrs[i] if i < len(lrs) else lrs[0] for i in range(count)]

    def resolved_resolution(self, family: str | None = None) -> tuple[int, int]:
        """(width, height): the flag if given, else the family's native size."""
        if self.resolution is not None:
            return self.resolution
        side = family_info(family or self.family_override or SD1).resolution
        return (side, side)

    def with_resolved_seed(self) -> TrainConfig:
        """This config with a concrete seed: an unset one is drawn now, so that saving the config
        records the seed that was actually used."""
        if self.seed is not None:
            return self
        return self.replace(seed=random.SystemRandom().randrange(2**31))

    def data_loader_workers(self) -> int:
        """``--max_data_loader_n_workers`` capped at the CPU count (as kohya does)."""
        return min(self.max_data_loader_n_workers, os.cpu_count() or 1)

    def epoch_save_interval(self, num_epochs: int) -> int | None:
        """Epochs between adapter saves: ``--save_n_epoch_ratio`` N saves about N times over `num_epochs`
        (kohya's floor(epochs / N), at least every epoch), else ``--save_every_n_epochs``."""
        if self.save_n_epoch_ratio:
            return max(1, num_epochs // self.save_n_epoch_ratio)
        return self.save_every_n_epochs

    def start_step(self, steps_per_epoch: int) -> int | None:
        """The step count a fresh run starts at: ``--initial_step``, else ``--initial_epoch``'s first step
        ((epoch - 1) x steps per epoch); None when neither is given."""
        if self.initial_step is not None:
            return self.initial_step
        if self.initial_epoch is not None:
            return (self.initial_epoch - 1) * steps_per_epoch
        return None

    def warmup_steps(self, total_steps: int) -> int:
        """`--lr_warmup_steps` in steps: a fraction < 1 is a share of `total_steps`."""
        return _steps(self.lr_warmup_steps, total_steps)

    def decay_steps(self, total_steps: int) -> int:
        """`--lr_decay_steps` in steps: a fraction < 1 is a share of `total_steps`."""
        return _steps(self.lr_decay_steps, total_steps)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """`--optimizer_args` as keyword arguments (values read as Python literals, else strings)."""
        return _kwargs(self.optimizer_args, "optimizer_args")

    def lr_scheduler_kwargs(self) -> dict[str, Any]:
        """`--lr_scheduler_args` as keyword arguments (values read as Python literals, else strings)."""
        return _kwargs(self.lr_scheduler_args, "lr_scheduler_args")

    @property
    def schedule_free(self) -> bool:
        """A schedule-free optimizer: it needs no LR schedule (sd-scripts then ignores --lr_scheduler)."""
        return self.optimizer_type.lower().endswith("schedulefree")

    @property
    def adafactor_relative_step(self) -> bool:
        """Adafactor computing its own rate (sd-scripts' default for it, on unless optimizer_args say
        relative_step=False; warmup_init=True turns it on again): --learning_rate then only seeds the
        logged rate, and the schedule is Adafactor's own."""
        if self.optimizer_type != "Adafactor":
            return False
        kwargs = self.optimizer_kwargs()
        return bool(kwargs.get("relative_step", True) or kwargs.get("warmup_init", False))

    def network_options(self) -> NetworkOptions:
        """`--network_args` with `--network_dim` and `--network_dropout`, read by the one option schema."""
        return parse_network_args(self.network_args, network_dim=self.network_dim,
                                  network_dropout=self.network_dropout, source="--network_args")


@dataclass(frozen=True)
class Flag:
    name: str
    kind: str  # bool, int, float, floats, numbers, str, list, files, resolution, warmup
    nullable: bool
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] | None


@cache
def flag_table() -> dict[str, Flag]:
    """name -> flag description, in declaration order (the order of `--help`)."""
    hints = get_type_hints(TrainConfig)
    table: dict[str, Flag] = {}
    for f in fields(TrainConfig):
        hint = hints[f.name]
        args = get_args(hint)
        nullable = type(None) in args
        base = [a for a in args if a is not type(None)] if args else [hint]
        kind = f.metadata["kind"]
        if kind is None:
            if get_origin(hint) is list:
                kind = "list"
            else:
                kind = {bool: "bool", int: "int", float: "float", str: "str"}[base[0]]
        default = f.default if f.default is not MISSING else f.default_factory()
        table[f.name] = Flag(f.name, kind, nullable, default, f.metadata["help"], f.metadata["group"],
                              f.metadata["choices"])
    return table


def _steps(value: int | float, total_steps: int) -> int:
    """A step count, or a fraction < 1 of `total_steps` (rounded to the nearest step)."""
    if isinstance(value, float):
        return int(round(value * total_steps))
    return int(value)


def _kwargs(items: Sequence[str], flag_name: str) -> dict[str, Any]:
    """key=value items as keyword arguments: values read as Python literals, else kept as strings; empty items
    (what a config writer leaves for "none") are skipped."""
    out: dict[str, Any] = {}
    for item in items:
        if not item.strip():
            continue
        key, value = _split_kv(item, flag_name)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _split_kv(item: str, flag_name: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--{flag_name} item {item!r} is not key=value; write e.g. 'block_size=16'")
    return key.strip(), value.strip()
