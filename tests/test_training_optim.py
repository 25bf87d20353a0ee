"""Optimizers and learning-rate schedules with sd-scripts' names and meanings: each named optimizer's class and
arguments, the `pip install` a missing one needs, Adafactor's own rate, schedule-free train/eval switching,
every schedule's curve against its formula, rebuilding a schedule at a resumed step, and the flag rules."""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import types

import pytest
import torch

from lycoft.training.config import config_from_dict, parse_args
from lycoft.training.errors import ConfigError
from lycoft.training.optimizers import build_optimizer, evaluation_point, resolve_optimizer
from lycoft.training.schedulers import build_lr_scheduler, resolve_lr_scheduler


def cfg(check: bool = False, **values):
    return config_from_dict({"pretrained_model_name_or_path": "builtin:tiny-sd1", **values}, check=check)


def checked(tmp_path, **values):
    (tmp_path / "1_x").mkdir(exist_ok=True)
    return cfg(check=True, train_data_dir=str(tmp_path), **values)


def one_step(name: str, args=(), size: int = 64, **values) -> torch.optim.Optimizer:
    """The optimizer `name` over one parameter of ones, after steps with gradient 1, which must move it down
    (RAdam's rectification holds still for the first few)."""
    p = torch.nn.Parameter(torch.ones(size))
    opt = build_optimizer(cfg(optimizer_type=name, optimizer_args=list(args), **values),
                          [{"params": [p], "lr": values.get("learning_rate", 1e-4), "name": "unet"}])
    for _ in range(6 if "RAdam" in name else 1):
        p.grad = torch.ones(size)
        opt.step()
    assert float(p.detach().mean()) < 1
    return opt


# -- optimizers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "cls", "args", "expect"), [
    ("SGDNesterov", "torch.optim.sgd.SGD", [], {"nesterov": True, "momentum": 0.9}),
    ("SGDNesterov", "torch.optim.sgd.SGD", ["momentum=0.5"], {"nesterov": True, "momentum": 0.5}),
    ("torch.optim.RAdam", "torch.optim.radam.RAdam", ["weight_decay=0.1"], {"weight_decay": 0.1}),
    ("DAdaptation", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint", [], {}),
    ("DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam", ["decouple=True"], {"decouple": True}),
    ("DAdaptAdaGrad", "dadaptation.dadapt_adagrad.DAdaptAdaGrad", [], {}),
    ("DAdaptAdan", "dadaptation.dadapt_adan.DAdaptAdan", [], {}),
    ("DAdaptAdanIP", "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP", [], {}),
    ("DAdaptLion", "dadaptation.dadapt_lion.DAdaptLion", [], {}),
    ("DAdaptSGD", "dadaptation.dadapt_sgd.DAdaptSGD", [], {}),
    ("Prodigy", "prodigyopt.prodigy.Prodigy", ["d_coef=2.0"], {"d_coef": 2.0}),
    ("Lion", "lion_pytorch.lion_pytorch.Lion", [], {}),
    ("AdamWScheduleFree", "schedulefree.adamw_schedulefree.AdamWScheduleFree", ["warmup_steps=5"],
     {"warmup_steps": 5}),
    ("RAdamScheduleFree", "schedulefree.radam_schedulefree.RAdamScheduleFree", [], {}),
    ("SGDScheduleFree", "schedulefree.sgd_schedulefree.SGDScheduleFree", [], {}),
])
def test_named_optimizer_is_the_kohya_class_with_its_arguments(name, cls, args, expect):
    package = cls.split(".")[0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[dev]' brings it)")
    adaptive = name.startswith(("DAdapt", "Prodigy"))
    opt = one_step(name, args, learning_rate=1.0 if adaptive else 0.1)
    assert f"{type(opt).__module__}.{type(opt).__name__}" == cls
    assert {k: opt.param_groups[0][k] for k in expect} == expect


BNB = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit",
       "SGDNesterov8bit"]


@pytest.mark.parametrize("name", BNB)
def test_bitsandbytes_optimizers_where_they_run(name):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install bitsandbytes)")
    import bitsandbytes

    expected = {"SGDNesterov8bit": "SGD8bit"}.get(name, name)
    try:  # 4096 values: the smallest tensor bitsandbytes keeps in 8-bit state
        opt = one_step(name, size=4096, learning_rate=0.1)
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        pytest.skip(f"bitsandbytes {bitsandbytes.__version__} cannot step {name} on this machine (older "
                    f"versions need a CUDA GPU): {type(e).__name__}: {e}")
    assert type(opt).__name__ == expected
    if name == "SGDNesterov8bit":
        assert opt.param_groups[0]["betas"][0] == 0.9  # the momentum sd-scripts sets (bitsandbytes keeps it here)


def _absent(monkeypatch, module: str) -> None:
    """Simulate an uninstalled package: every module on the path imports as missing."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), None)


@pytest.mark.parametrize(("name", "module", "pip"), [
    ("AdamW8bit", "bitsandbytes.optim", "bitsandbytes"),
    ("PagedLion8bit", "bitsandbytes.optim", "bitsandbytes"),
    ("DAdaptAdam", "dadaptation", "dadaptation"),
    ("DAdaptation", "dadaptation.experimental", "dadaptation"),
    ("Prodigy", "prodigyopt", "prodigyopt"),
    ("Lion", "lion_pytorch", "lion-pytorch"),
    ("AdamWScheduleFree", "schedulefree", "schedulefree"),
])
def test_a_missing_package_says_what_to_install(monkeypatch, name, module, pip):
    _absent(monkeypatch, module)
    with pytest.raises(ConfigError) as e:
        resolve_optimizer(name)
    assert str(e.value) == f"--optimizer_type {name} needs {pip}: pip install {pip} (or use --optimizer_type AdamW)"


def test_an_old_package_without_the_class_says_upgrade(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", types.ModuleType("bitsandbytes.optim"))
    with pytest.raises(ConfigError, match=r"the installed bitsandbytes has no PagedLion8bit; upgrade it: "
                                          r"pip install -U bitsandbytes"):
        resolve_optimizer("PagedLion8bit")


def test_kohya_optimizer_spellings(tmp_path):
    assert checked(tmp_path, optimizer_type="dadaptadam").optimizer_type == "DAdaptAdam"
    assert checked(tmp_path, optimizer_type="").optimizer_type == "AdamW"  # sd-scripts' empty default
    assert checked(tmp_path, optimizer_type="RAdam").optimizer_type == "torch.optim.RAdam"  # a bare torch name
    with pytest.raises(ConfigError, match="did you mean 'Prodigy'"):
        checked(tmp_path, optimizer_type="prodigi")


def test_fixed_arguments_cannot_be_overridden():
    with pytest.raises(ConfigError, match="SGDNesterov always uses nesterov=True; drop it from --optimizer_args"):
        one_step("SGDNesterov", ["nesterov=False"])


def test_adaptive_optimizers_want_one_rate_near_1(caplog):
    if importlib.util.find_spec("prodigyopt") is None:
        pytest.skip("prodigyopt is not installed")
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ConfigError, match=r"Prodigy takes one learning rate for all parameters, got 0\.5, 1"):
        build_optimizer(cfg(optimizer_type="Prodigy", learning_rate=1.0),
                        [{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.5}])
    frozen_part = build_optimizer(cfg(optimizer_type="Prodigy", learning_rate=1.0),
                                  [{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.0}])
    assert [g["lr"] for g in frozen_part.param_groups] == [1.0, 0.0]
    with caplog.at_level(logging.WARNING):
        build_optimizer(cfg(optimizer_type="Prodigy", learning_rate=1e-4), [{"params": [p], "lr": 1e-4}])
    assert "use --learning_rate 1" in caplog.text


def lr_curve(sched_cfg, steps: int = 10, base: float = 1.0, optimizer=None) -> list[float]:
    """The first group's learning rate at each of `steps` optimizer steps (read before each step)."""
    opt = optimizer or torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=base)
    sched = build_lr_scheduler(sched_cfg, opt, total_steps=steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_adafactor_computes_its_own_rate_unless_told_not_to():
    p = torch.nn.Parameter(torch.ones(16))
    kohya = cfg(optimizer_type="Adafactor", learning_rate=1e-3, unet_lr=5e-4)
    opt = build_optimizer(kohya, [{"params": [p], "lr": 5e-4}])
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None
    assert opt.param_groups[0]["lr"] is None  # the group's rate is dropped, as sd-scripts does
    sched = build_lr_scheduler(kohya, opt, total_steps=10)
    assert type(sched).__name__ == "AdafactorSchedule" and opt.param_groups[0]["lr"] == 1e-3  # the seed
    for step in range(1, 4):
        # Adafactor's relative step: min(1e-2, 1/sqrt(step)) times the parameters' RMS before the step
        rms = float(p.detach().square().mean().sqrt())
        p.grad = torch.full((16,), 0.1)
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(min(1e-2, 1 / math.sqrt(step)) * max(1e-3, rms), rel=1e-6)
    warm = build_optimizer(cfg(optimizer_type="Adafactor", optimizer_args=["relative_step=False", "warmup_init=True"]),
                           [{"params": [p], "lr": 1e-3}])
    assert warm.defaults["relative_step"] is True  # warmup_init needs it (sd-scripts turns it back on)
    fixed = cfg(optimizer_type="Adafactor", optimizer_args=["relative_step=False", "scale_parameter=False"],
                lr_scheduler="linear", learning_rate=1.0)
    q = torch.nn.Parameter(torch.ones(1))
    opt = build_optimizer(fixed, [{"params": [q], "lr": 1.0}])
    assert opt.defaults["relative_step"] is False
    assert lr_curve(fixed, 4, optimizer=opt) == [1.0, 0.75, 0.5, 0.25]


def test_adafactor_rules(tmp_path, caplog):
    with pytest.raises(ConfigError, match="no effect while Adafactor computes its own rate"):
        checked(tmp_path, optimizer_type="Adafactor", lr_scheduler="constant_with_warmup", lr_warmup_steps=10)
    with caplog.at_level(logging.WARNING):
        checked(tmp_path, optimizer_type="Adafactor", lr_scheduler="cosine", unet_lr=1e-4)
    assert "--lr_scheduler cosine is ignored: Adafactor computes its own rate" in caplog.text
    assert "--unet_lr and --text_encoder_lr are ignored" in caplog.text
    checked(tmp_path, optimizer_type="Adafactor", lr_scheduler="adafactor")
    with pytest.raises(ConfigError, match="--lr_scheduler adafactor is the rate Adafactor computes itself"):
        checked(tmp_path, lr_scheduler="adafactor")


def test_schedule_free_trains_at_one_point_and_shows_the_other():
    pytest.importorskip("schedulefree", reason="schedulefree is not installed (pip install schedulefree)")
    import copy

    opt = one_step("AdamWScheduleFree", learning_rate=0.1)
    assert opt.param_groups[0]["train_mode"] is True  # built in train mode: step() refuses eval mode
    p = opt.param_groups[0]["params"][0]
    for _ in range(2):
        p.grad = torch.randn(p.shape)
        opt.step()
    training_point = p.detach().clone()
    reference = copy.deepcopy(opt)
    reference.eval()
    averaged = reference.param_groups[0]["params"][0].detach()
    assert not torch.equal(averaged, training_point)
    with evaluation_point(opt):
        assert torch.equal(p.detach(), averaged) and opt.param_groups[0]["train_mode"] is False
    assert torch.equal(p.detach(), training_point)  # restored bit for bit, not recomputed
    assert opt.param_groups[0]["train_mode"] is True
    plain = one_step("AdamW")
    with evaluation_point(plain):  # one-point optimizers: nothing happens
        pass


def test_schedule_free_needs_no_schedule(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        sf = checked(tmp_path, optimizer_type="AdamWScheduleFree", lr_scheduler="cosine", lr_warmup_steps=2)
    assert "needs no LR schedule" in caplog.text and "warmup_steps=N" in caplog.text
    assert lr_curve(sf, 5, base=0.1) == [0.1] * 5


# -- schedules ----------------------------------------------------------------------------------------
def cosine_down(progress: float, floor: float = 0.0) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_cosine_with_min_lr_ends_at_the_floor():
    lrs = lr_curve(cfg(lr_scheduler="cosine_with_min_lr", lr_warmup_steps=2, lr_scheduler_min_lr_ratio=0.1))
    assert lrs == pytest.approx([0.0, 0.5] + [cosine_down((s - 2) / 8, 0.1) for s in range(2, 10)])
    assert lrs[-1] > 0.1
    # lr_scheduler_num_cycles counts half waves (sd-scripts halves it): 2 = down to the floor and back up
    two = lr_curve(cfg(lr_scheduler="cosine_with_min_lr", lr_scheduler_num_cycles=2, lr_scheduler_min_lr_ratio=0.0))
    assert two == pytest.approx([cosine_down(2 * s / 10) for s in range(10)])


def test_warmup_stable_decay():
    # 10 steps: 2 warm-up (a ratio), 5 at the peak, 3 of cosine decay to 0.2 (lr_decay_steps as a ratio)
    lrs = lr_curve(cfg(lr_scheduler="warmup_stable_decay", lr_warmup_steps=0.2, lr_decay_steps=0.3,
                       lr_scheduler_min_lr_ratio=0.2))
    assert lrs[0] < lrs[1] < 1.0  # warm-up
    assert lrs[2:7] == [1.0] * 5
    assert lrs[7:] == pytest.approx([cosine_down(k / 3, 0.2) for k in range(3)])
    with pytest.raises(ConfigError, match=r"--lr_warmup_steps \(6\) and --lr_decay_steps \(5\) add up to more"):
        lr_curve(cfg(lr_scheduler="warmup_stable_decay", lr_warmup_steps=6, lr_decay_steps=5))


def test_inverse_sqrt():
    lrs = lr_curve(cfg(lr_scheduler="inverse_sqrt", lr_warmup_steps=2, lr_scheduler_timescale=4))
    assert lrs == pytest.approx([0.0, 0.5] + [1 / math.sqrt((s + 4 - 2) / 4) for s in range(2, 10)])
    default = lr_curve(cfg(lr_scheduler="inverse_sqrt", lr_warmup_steps=2))  # timescale = the warm-up
    assert default[2:] == pytest.approx([1 / math.sqrt(s / 2) for s in range(2, 10)])


def test_piecewise_constant():
    lrs = lr_curve(cfg(lr_scheduler="piecewise_constant", lr_scheduler_args=["step_rules=1:3,0.1:6,0.01"]))
    assert lrs == pytest.approx([1.0] * 3 + [0.1] * 3 + [0.01] * 4)


def test_a_scheduler_class_with_its_arguments():
    step_lr = cfg(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=3", "gamma=0.5"])  # torch's, by name
    assert lr_curve(step_lr) == pytest.approx([1.0] * 3 + [0.5] * 3 + [0.25] * 3 + [0.125])
    path = cfg(lr_scheduler_type="torch.optim.lr_scheduler.CosineAnnealingLR", lr_scheduler_args=["T_max=10"])
    assert lr_curve(path) == pytest.approx([cosine_down(s / 10) for s in range(10)])
    with pytest.raises(ConfigError, match="CosineAnnealingLR rejected its arguments"):
        lr_curve(cfg(lr_scheduler_type="CosineAnnealingLR"))
    with pytest.raises(ConfigError, match="not stepped once per optimizer step"):
        lr_curve(cfg(lr_scheduler_type="ReduceLROnPlateau"))
    with pytest.raises(ConfigError, match="has no class 'NoSuchLR'"):
        resolve_lr_scheduler(cfg(lr_scheduler_type="NoSuchLR"))


def test_warmup_as_a_ratio_or_percentage(tmp_path):
    assert checked(tmp_path, lr_scheduler="cosine", lr_warmup_steps="20%").lr_warmup_steps == 0.2
    with pytest.raises(ConfigError, match="a percentage like '5%', got '100%'"):
        checked(tmp_path, lr_scheduler="cosine", lr_warmup_steps="100%")
    (tmp_path / "d" / "1_x").mkdir(parents=True)
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(tmp_path / "d"),
            "--lr_scheduler", "linear", "--lr_warmup_steps", "20%", "--lr_decay_steps", "0.5"]
    parsed = parse_args(argv)
    assert (parsed.warmup_steps(10), parsed.decay_steps(10)) == (2, 5)
    assert lr_curve(parsed)[:3] == [0.0, 0.5, 1.0]


RESUMABLE = [
    dict(lr_scheduler="cosine", lr_warmup_steps=2),
    dict(lr_scheduler="cosine_with_min_lr", lr_warmup_steps=2, lr_scheduler_min_lr_ratio=0.1),
    dict(lr_scheduler="warmup_stable_decay", lr_warmup_steps=2, lr_decay_steps=4, lr_scheduler_min_lr_ratio=0.1),
    dict(lr_scheduler="inverse_sqrt", lr_warmup_steps=2),
    dict(lr_scheduler="piecewise_constant", lr_scheduler_args=["step_rules=1:3,0.5:6,0.1"]),
    dict(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2", "gamma=0.5"]),  # chainable: replayed
    dict(lr_scheduler_type="torch.optim.lr_scheduler.ExponentialLR", lr_scheduler_args=["gamma=0.8"]),
]


@pytest.mark.parametrize("values", RESUMABLE, ids=lambda v: v.get("lr_scheduler_type") or v["lr_scheduler"])
def test_a_schedule_rebuilt_at_a_resumed_step_continues_the_uninterrupted_one(values):
    full = lr_curve(cfg(**values), base=0.4)
    for step in (1, 3, 7):
        # the resumed optimizer carries the rate of the step its state was saved at; the schedule starts
        # again from the configured rate
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.123)
        sched = build_lr_scheduler(cfg(**values), opt, total_steps=10, base_lrs=[0.4], step=step)
        rest = []
        for _ in range(10 - step):
            rest.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert rest == full[step:], step


# -- flag rules ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("values", "message"), [
    (dict(lr_scheduler="cosine_with_min_lr"), "cosine_with_min_lr needs --lr_scheduler_min_lr_ratio"),
    (dict(lr_scheduler="piecewise_constant"), "piecewise_constant needs --lr_scheduler_args step_rules="),
    (dict(lr_scheduler_type="StepLR", lr_warmup_steps=5), "has no effect with --lr_scheduler_type StepLR"),
    (dict(lr_scheduler="cosine", lr_scheduler_args=["last_epoch=3"]), "last_epoch: the trainer sets it"),
    (dict(lr_scheduler_min_lr_ratio=1.5), r"--lr_scheduler_min_lr_ratio must be in \[0.0, 1.0\]"),
    (dict(lr_scheduler_args=["no_equals"]), "is not key=value"),
])
def test_schedule_flag_errors(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        checked(tmp_path, **values)


def test_schedule_flags_a_schedule_does_not_read_are_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        checked(tmp_path, lr_scheduler="cosine", lr_decay_steps=100, lr_scheduler_timescale=7,
                lr_scheduler_min_lr_ratio=0.1)
        checked(tmp_path, lr_scheduler="warmup_stable_decay")
        checked(tmp_path, lr_scheduler="cosine", lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2"])
    text = caplog.text
    assert "--lr_decay_steps 100 is ignored: only --lr_scheduler warmup_stable_decay uses it" in text
    assert "--lr_scheduler_timescale 7 is ignored: only --lr_scheduler inverse_sqrt uses it" in text
    assert "--lr_scheduler_min_lr_ratio 0.1 is ignored: only --lr_scheduler cosine_with_min_lr and " \
           "warmup_stable_decay use it" in text
    assert "warmup_stable_decay without --lr_decay_steps never decays" in text
    assert "--lr_scheduler cosine is ignored: --lr_scheduler_type StepLR replaces it" in text
    with pytest.raises(ConfigError, match="the trainer sets these for --lr_scheduler cosine"):
        lr_curve(cfg(lr_scheduler="cosine", lr_scheduler_args=["num_warmup_steps=3"]))


def test_kohya_gui_leftovers_mean_unset(tmp_path):
    gui = checked(tmp_path, lr_scheduler_args="", optimizer_args="", lr_scheduler_timescale=0,
                  lr_scheduler_min_lr_ratio=0.0, lr_scheduler_type="")
    assert gui.lr_scheduler_kwargs() == {} and gui.optimizer_kwargs() == {}
    assert lr_curve(gui, 3) == [1.0] * 3


# -- a run --------------------------------------------------------------------------------------------
def test_schedule_free_run_saves_its_average_and_resumes_exactly(tmp_path):
    pytest.importorskip("schedulefree", reason="schedulefree is not installed (pip install schedulefree)")
    from safetensors.torch import load_file
    from toy_images import make_toy_dataset

    from lycoft.training import loop

    toy = make_toy_dataset(tmp_path / "toy", n=2, size=64)

    def run(out, **extra):
        values = dict(pretrained_model_name_or_path="builtin:tiny-sd1", train_data_dir=str(toy),
                      caption_extension=".txt", resolution=64, max_data_loader_n_workers=0, seed=3,
                      output_dir=str(tmp_path / out), learning_rate=1e-2, max_train_steps=4,
                      optimizer_type="AdamWScheduleFree", optimizer_args=["warmup_steps=2"],
                      network_args=["block_size=8", "preset=attn-only"], **extra)
        return loop.train(config_from_dict(values))

    full = run("full", save_every_n_steps=2, save_state=True)
    resumed = run("resumed", resume=str(tmp_path / "full" / "last-step00000002-state"))
    # The state holds the training point and the switch to the evaluation point for the step-2 save is undone
    # exactly, so the resumed run ends bit for bit where the uninterrupted one does.
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-6)
    a, b = load_file(full.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The adapter holds the evaluation point (the average), which is also where the returned network ends.
    full.network.save(tmp_path / "returned.safetensors")
    returned = load_file(tmp_path / "returned.safetensors")
    assert all(torch.equal(a[k], returned[k]) for k in a)
