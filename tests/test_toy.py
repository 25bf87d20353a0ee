"""The toy world: scenes are reproducible, the shipped judge reads them, the shipped toy model draws what
its prompts name, its pretraining writes the same bytes twice, and OFT training on it teaches a new
concept (judged on samples, not on a loss) with a merged checkpoint that samples like the live adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lycoft.checkpoints.loading import BUILTIN_FILES, load_pipeline
from lycoft.demo import CONCEPT
from lycoft.toy import data
from lycoft.toy.concept import CONCEPTS, compare, old_prompts
from lycoft.toy.judge import JUDGE_FILE, held_out_accuracy, load_judge, read_images
from lycoft.toy.scoring import drift, judge_accuracy, prompt_grid, prompted, sample

SAMPLE_STEPS = 12  # enough for the toy model; the defaults (20) are for the reports


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: one thread is fastest on shared cores, and keeps sampled pixels repeatable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_scenes_are_deterministic_and_captioned():
    first, again = data.random_scenes(6, seed=3, shapes=data.SHAPES), data.random_scenes(6, seed=3, shapes=data.SHAPES)
    assert first == again
    for a, b in zip(first, again):
        assert np.array_equal(np.asarray(data.render_scene(a)), np.asarray(data.render_scene(b)))
    assert data.random_scenes(6, seed=4, shapes=data.SHAPES) != first
    scene = data.Scene("circle", "red", "big")
    assert scene.caption() == "a big red circle"
    assert scene.caption(with_size=False, shape_word="sks") == "a red sks"
    assert scene.caption(colour_word="sks") == "a big sks circle"
    with pytest.raises(ValueError, match="unknown colour 'pink'; use one of red, green"):
        data.render_scene(data.Scene("circle", "pink"))


def test_shipped_judge_reads_fresh_scenes(judge):
    accuracy = held_out_accuracy(judge, n=300, seed=5)
    assert min(accuracy.values()) >= 0.97, accuracy


def test_toy_model_draws_the_prompted_shape_colour_and_size(judge):
    pipe, family, v_prediction = load_pipeline("builtin:toy-sd1")
    assert (family, v_prediction) == ("sd1", False)
    items = prompted(prompt_grid(), seeds=(0,))
    accuracy = judge_accuracy(judge, sample(pipe, items, steps=SAMPLE_STEPS), items)
    assert accuracy["colour"] >= 0.9 and accuracy["shape"] >= 0.7 and accuracy["size"] >= 0.7, accuracy
    # It never saw a cross nor magenta: asked for them under a new word, it draws something else.
    for concept in CONCEPTS.values():
        items = concept.prompts(seeds=(0,))
        seen = read_images(judge, sample(pipe, items, steps=SAMPLE_STEPS))
        assert sum(s[concept.attribute] == concept.value for s in seen) <= len(items) // 4, concept


def test_pretraining_writes_the_same_bytes_twice(tmp_path):
    from lycoft.cli.pretrain_toy import main

    outs = [tmp_path / run / "toy.safetensors" for run in ("a", "b")]
    for out in outs:
        out.parent.mkdir()
        argv = ["--out", str(out), "--steps", "3", "--images", "16", "--eval-seeds", "0",
                "--judge", str(JUDGE_FILE)]
        assert main(argv) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert (outs[0].with_suffix(".json")).is_file() and (outs[0].with_suffix(".md")).is_file()
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's settings are restored


TEACH_STEPS = 80


def _teach(out, judge, prior=True, model="builtin:toy-sd1", **overrides):
    """Train an OFT adapter with the trainer (the demo's settings) on 8 pictures of the demo's concept
    called "sks", with the demo's prior-preservation pictures or without them; returns the run and its
    base-vs-adapted scores."""
    from lycoft.demo import DEMO_SETTINGS
    from lycoft.toy.concept import demo_data
    from lycoft.training.config import config_from_dict
    from lycoft.training.loop import train

    data, reg = demo_data(out / "data", CONCEPT)
    settings = dict(DEMO_SETTINGS, train_data_dir=str(data), output_dir=str(out), max_train_steps=TEACH_STEPS,
                    pretrained_model_name_or_path=model, **({"reg_data_dir": str(reg)} if prior else {}))
    settings.update(overrides)
    result = train(config_from_dict(settings, where="the test settings"))
    result.network.eval()
    with torch.no_grad():
        scores = compare(result.models.pipe, result.network, judge, CONCEPTS[CONCEPT].prompts(seeds=(0,)),
                         old_prompts()[::2], steps=SAMPLE_STEPS)
    return result, scores


@pytest.fixture(scope="module")
def taught(tmp_path_factory, judge):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _teach(tmp_path_factory.mktemp("taught"), judge)
    finally:
        torch.set_num_threads(threads)


def test_oft_training_teaches_the_new_concept(taught):
    """The demo's recipe: the judge sees the new concept in the "sks" prompts' samples after training, not
    before, and most old prompts still show what they name."""
    _, scores = taught
    attribute = CONCEPTS[CONCEPT].attribute
    before, after = scores.concept["base"][attribute], scores.concept["adapted"][attribute]
    assert before <= 0.25 and after >= 0.6, (before, after)
    assert scores.retention["adapted"]["all"] >= 0.5, scores.retention


def test_v_prediction_training_teaches_the_new_concept(judge, tmp_path):
    """The same recipe on the v-prediction toy model (builtin:toy-sd1-v, v read from its file's metadata):
    the trainer trains on v targets, the sampler reads v, and the judge sees the concept afterwards, not
    before, while the old prompts mostly keep what they name. The v model takes its colours from the
    high-noise steps, where a v target is mostly the image: it learns the new colour more slowly and
    needs a higher rate (at the demo's 1e-4 and 120 steps: 0% -> 25%; at 3e-4: -> 67%)."""
    result, scores = _teach(tmp_path, judge, model="builtin:toy-sd1-v", learning_rate=3e-4, max_train_steps=120)
    assert result.models.pipe.scheduler.config.prediction_type == "v_prediction"
    attribute = CONCEPTS[CONCEPT].attribute
    before, after = scores.concept["base"][attribute], scores.concept["adapted"][attribute]
    assert before <= 0.25 and after >= 0.5, (before, after)
    assert scores.retention["base"]["all"] >= 0.7 and scores.retention["adapted"]["all"] >= 0.5, scores.retention


def test_merged_checkpoint_samples_like_the_live_adapter(taught, judge, tmp_path):
    from lycoft.merge import merge_adapters

    result, scores = taught
    merged = tmp_path / "merged.safetensors"
    # float32 output: what is compared is the merge, not float16 rounding of the stored weights.
    merge_adapters(BUILTIN_FILES["toy-sd1"], [str(result.adapter)], merged, dtype="fp32")
    pipe, _, _ = load_pipeline(str(merged))
    items = CONCEPTS[CONCEPT].prompts(seeds=(0,))
    images = sample(pipe, items, steps=SAMPLE_STEPS)
    live = scores.images["adapted"]["concept"]
    assert drift(judge, live, images)["pixel_rms"] < 0.01
    assert read_images(judge, images) == read_images(judge, live)
    assert judge_accuracy(judge, images, items) == scores.concept["adapted"]


@pytest.fixture(scope="module")
def taught_without_prior(tmp_path_factory, judge):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _teach(tmp_path_factory.mktemp("without-prior"), judge, prior=False)
    finally:
        torch.set_num_threads(threads)


def test_prior_preservation_lowers_drift(taught, taught_without_prior):
    """The same run without the pictures of the old shapes (DreamBooth's prior preservation) moves the
    old prompts' samples further and keeps fewer of them right."""
    _, without = taught_without_prior
    _, with_prior = taught
    assert with_prior.drift["features"] < without.drift["features"], (with_prior.drift, without.drift)
    assert with_prior.retention["adapted"]["all"] > without.retention["adapted"]["all"], (with_prior.retention,
                                                                                        without.retention)


def test_the_kohya_module_learns_what_the_trainer_learns(taught_without_prior, judge, tmp_path):
    """`--network_module lycoft.kohya` driven in sd-scripts' call order (create_network, apply_to,
    prepare_optimizer_params_with_multiple_te_lrs, prepare_grad_etc, on_epoch_start, on_step_start) with
    sd-scripts' epsilon loss, on the same pictures, learning rate, batch, steps and gradient clipping as the
    trainer's run without prior preservation: the judge scores the two adapters alike."""
    from diffusers import DDPMScheduler

    from lycoft import kohya
    from lycoft.demo import DEMO_SETTINGS
    from lycoft.toy.data import to_tensor

    pipe, _, _ = load_pipeline("builtin:toy-sd1")
    te, unet = pipe.text_encoder, pipe.unet
    for m in (te, unet, pipe.vae):
        m.requires_grad_(False)
    args = dict(a.split("=", 1) for a in DEMO_SETTINGS["network_args"])
    net = kohya.create_network(1.0, None, None, pipe.vae, te, unet, **args)
    net.apply_to(te, unet, True, True)
    groups, _ = net.prepare_optimizer_params_with_multiple_te_lrs(None, None, DEMO_SETTINGS["learning_rate"])
    net.prepare_grad_etc(te, unet)
    opt = torch.optim.AdamW(groups)
    folder = CONCEPTS[CONCEPT].data(tmp_path / "data")
    images = sorted(folder.rglob("*.png"))
    from PIL import Image

    pixels = to_tensor([Image.open(p) for p in images])
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    batch, warmup = DEMO_SETTINGS["train_batch_size"], DEMO_SETTINGS["lr_warmup_steps"]
    net.on_epoch_start(te, unet)
    for step in range(TEACH_STEPS):
        net.on_step_start(te, unet)
        for group in opt.param_groups:
            group["lr"] = DEMO_SETTINGS["learning_rate"] * min(1.0, (step + 1) / warmup)
        idx = torch.randperm(len(images), generator=g)[:batch]
        noise = torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        hidden = te(ids[idx])[0]
        pred = unet(scheduler.add_noise(latents[idx], noise, t), t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.get_trainable_params(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    net.eval()
    with torch.no_grad():
        scores = compare(pipe, net, judge, CONCEPTS[CONCEPT].prompts(seeds=(0,)), old_prompts()[::2],
                         steps=SAMPLE_STEPS)
    _, trainer = taught_without_prior
    attribute = CONCEPTS[CONCEPT].attribute
    assert scores.concept["base"] == trainer.concept["base"]  # the same base model, prompts and seeds
    assert scores.concept["adapted"][attribute] >= 0.6, scores.concept
    assert abs(scores.concept["adapted"][attribute] - trainer.concept["adapted"][attribute]) <= 0.25
    assert abs(scores.retention["adapted"]["all"] - trainer.retention["adapted"]["all"]) <= 0.25, (
        scores.retention, trainer.retention)
