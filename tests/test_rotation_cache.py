"""The network's batched rotation cache (lycoft/rotations.py): same values and gradients as per-layer
rotations, built once per step, rebuilt exactly when a parameter changes or a backward consumed it."""

import copy
import pickle

import pytest
import torch
from conftest import randomise_network
from test_network import rel, run_unet, unet_inputs

import lycoft
from lycoft import AdapterConfig
from lycoft.rotations import RotationCache

# Batched vs per-layer rotations: the same float32 Cayley, except that the product-form inverse takes its
# number of factors from the largest residual of the whole batch, so values agree to float32 rounding, not
# bit for bit.
TOL = 1e-6


def _mixed_network(pipe):
    """Block sizes 4 and 2, a constrained override and a Neumann layer (never batched) in one network."""
    net = lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4), overrides={
        r".*attn1.*": {"constraint": 0.5},
        r".*resnets.*conv.*": {"block_size": 2},
        r".*ff_net_2$": {"neumann_terms": 6},
    })
    return randomise_network(net, std=0.05)


def _uncached(net):
    for layer in net.adapters.values():
        layer.__dict__.pop("rotation_cache", None)


def _restore(net):
    for layer in net.adapters.values():
        layer.rotation_cache = net.rotations


def _loss(pipe, seed=0):
    args, kw = unet_inputs(pipe, seed)
    return pipe.unet(*args, **kw).sample.pow(2).mean()


def _gradients(pipe, net, dtype):
    pipe.unet.to(dtype)
    net.to(dtype)
    args, kw = unet_inputs(pipe, 0)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    pipe.unet(*args, **kw).sample.pow(2).mean().backward()
    return {k: layer.oft_blocks.grad.double() for k, layer in net.adapters.items()
            if layer.oft_blocks.grad is not None}


def _norm_rel(a, b):
    a, b = torch.cat([t.flatten() for t in a.values()]), torch.cat([t.flatten() for t in b.values()])
    return float((a - b).norm() / b.norm())


def test_values_and_gradients_equal_per_layer_rotations(tiny_pipes):
    """float64: bit-identical gradients (the batching changes nothing but the grouping). float32: each
    rotation agrees with the per-layer one to float32 rounding. Whole-model float32 gradients are not compared:
    this random UNet amplifies any rounding difference chaotically (over 5 seeds the per-layer float32
    gradient lands 2e-5 to 9e-3 from float64, whichever way the rotations are computed)."""
    grads = {}
    for cached in (True, False):
        pipe = tiny_pipes("sd1")
        pipe.unet.requires_grad_(False)
        net = _mixed_network(pipe)
        if not cached:
            _uncached(net)
        grads[cached] = _gradients(pipe, net, torch.float64)
        if cached:
            assert net.rotations.builds == 1  # one forward: one build (the TE is not run)
    kinds = {(layer.layout.block_size, layer.constraint, layer.neumann_terms) for layer in net.adapters.values()}
    assert len(kinds) >= 3  # the overrides took effect: several groups and an unbatched layer
    assert grads[True].keys() == grads[False].keys()  # same None gradients
    assert len(grads[True]) > 10
    assert _norm_rel(grads[True], grads[False]) <= 1e-12

    pipe = tiny_pipes("sd1")  # and each float32 rotation itself
    net = _mixed_network(pipe)
    with torch.no_grad():
        _loss(pipe)
        for layer in net.adapters.values():
            cached = layer.rotation()
            layer.__dict__.pop("rotation_cache")
            assert rel(cached, layer.rotation()) <= TOL, layer.name
            layer.rotation_cache = net.rotations


def test_built_once_per_step_and_rebuilt_when_stale(tiny_pipes):
    pipe = tiny_pipes("sd1")
    pipe.unet.requires_grad_(False)
    net = randomise_network(lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4)), std=0.05)
    cache = net.rotations
    opt = torch.optim.SGD(net.trainable_parameters(), lr=1.0)

    # two forwards before one backward share one build, and their gradients add up
    loss = _loss(pipe, 0) + _loss(pipe, 1)
    assert cache.builds == 1
    loss.backward()
    unet_layers = [layer for _, layer in net.items("unet")]
    assert all(layer.oft_blocks.grad is None for _, layer in net.items("te1"))  # the TE was not run
    g_two = [layer.oft_blocks.grad.clone() for layer in unet_layers]
    net.zero_grad()
    # gradient accumulation: a backward consumed the graph, so each micro-batch builds again
    _loss(pipe, 0).backward()
    assert cache.builds == 2
    _loss(pipe, 1).backward()
    assert cache.builds == 3
    for g, layer in zip(g_two, unet_layers):
        r = layer.oft_blocks.grad  # sums in another order: float32 rounding
        assert float((g - r).norm()) <= 1e-5 * float(r.norm()), layer.name

    # an optimizer step changes every parameter: the next forward builds from the new values
    before = _loss(pipe).detach()
    assert cache.builds == 4
    opt.step()
    after = _loss(pipe).detach()
    assert cache.builds == 5 and not torch.equal(before, after)

    # without autograd (sampling): built once, reused until a parameter changes
    with torch.no_grad():
        out1 = _loss(pipe)
        out2 = _loss(pipe)
        assert cache.builds == 6 and torch.equal(out1, out2)
        layer = next(iter(net.adapters.values()))
        layer.oft_blocks.mul_(2.0)  # an in-place change of ONE layer is seen
        out3 = _loss(pipe)
        assert cache.builds == 7 and not torch.equal(out1, out3)
        net.set_multiplier(0.5)  # strength is applied after the cache
        _loss(pipe)
        assert cache.builds == 7
        _uncached(net)
        assert rel(_loss(pipe), _loss(pipe)) == 0.0
        ref = _loss(pipe)
        _restore(net)
        assert rel(_loss(pipe), ref) <= TOL


def test_dropout_draws_a_new_mask_per_build(tiny_pipes):
    pipe = tiny_pipes("sd1")
    pipe.unet.requires_grad_(False)
    net = randomise_network(lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4, dropout=0.5)), std=0.05)
    net.train()
    torch.manual_seed(0)
    a = _loss(pipe)
    b = _loss(pipe)  # same build: same mask
    assert torch.equal(a, b)
    (a + b).backward()
    c = _loss(pipe)  # new build after the backward: a new mask
    assert not torch.equal(a.detach(), c.detach())
    net.eval()  # no dropout in eval: the settings changed, so the train-mode rotations are not reused
    with torch.no_grad():
        e1 = _loss(pipe)
        _uncached(net)
        e2 = _loss(pipe)
    assert rel(e1, e2) <= TOL


def test_frozen_network_under_autograd_and_copies(tiny_pipes):
    pipe = tiny_pipes("sd1")
    pipe.unet.requires_grad_(False)
    net = randomise_network(lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4)), std=0.05)
    net.requires_grad_(False)
    args, kw = unet_inputs(pipe)
    x = args[0].clone().requires_grad_(True)
    out = pipe.unet(x, *args[1:], **kw).sample
    out.pow(2).mean().backward()  # gradient to the input only: the frozen rotations carry no graph
    assert x.grad is not None and all(layer.oft_blocks.grad is None for layer in net.adapters.values())

    twin = copy.deepcopy(net)  # no live rotation is copied, and the copy builds its own
    assert isinstance(twin.rotations, RotationCache) and twin.rotations.adapters is twin.adapters
    assert net.rotations._plain and not twin.rotations._plain and not twin.rotations._grad
    assert twin.rotations.components == net.rotations.components
    with torch.no_grad():
        next(iter(twin.adapters.values())).oft_blocks.zero_()  # the copy is independent
    assert rel(run_unet(pipe), out.detach()) <= 1e-6
    restored = pickle.loads(pickle.dumps(net.rotations))
    assert not restored._plain and restored.builds == 0


@pytest.mark.parametrize("cfg", [AdapterConfig(algo="boft", block_size=4, butterfly_factors=2),
                                 AdapterConfig(block_size=4, rescale=True, constraint=0.1)],
                         ids=["boft", "oft-rescale-constraint"])
def test_merge_equals_forward_with_the_cache(tiny_pipes, cfg):
    pipe = tiny_pipes("sd1")
    net = randomise_network(lycoft.inject(pipe=pipe, config=cfg), std=0.05)
    with torch.no_grad():
        adapted = _loss(pipe)
        net.merge()
        assert rel(_loss(pipe), adapted) <= 1e-4


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_plain_gradients(tiny_pipes, reentrant):
    """Checkpointing recomputes regions inside the backward. Layers there compute their own rotation (the
    recomputation must save what the forward saved; a reentrant one backpropagates on its own), the others
    share the batched build; gradients equal those of the run without checkpointing. In float64: this
    random UNet's float32 gradient lands ~1e-2 from float64 whichever way its rotations are computed."""
    import functools

    from torch.utils.checkpoint import checkpoint

    grads = []
    for checkpointing in (False, True):
        pipe = tiny_pipes("sd1")
        pipe.unet.requires_grad_(False)
        net = randomise_network(lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4)), std=0.05)
        pipe.unet.train()
        if checkpointing:
            pipe.unet.enable_gradient_checkpointing(functools.partial(checkpoint, use_reentrant=reentrant))
        calls = []
        pipe.unet.down_blocks[0].resnets[0].conv1.register_forward_pre_hook(lambda *a, c=calls: c.append(1))
        _gradients(pipe, net, torch.float64)
        assert len(calls) == (2 if checkpointing else 1)  # the recomputation did happen
        # conv_in, outside every region, built for the rest (+1 graph-free build: a reentrant region's
        # first forward runs without autograd)
        assert net.rotations.builds == (2 if checkpointing and reentrant else 1)
        grads.append({k: layer.oft_blocks.grad for k, layer in net.items("unet")})
    assert grads[0].keys() == grads[1].keys()
    assert _norm_rel(grads[1], grads[0]) <= 1e-12  # (time_emb_proj gradients are ~1e-18: compare globally)


def test_gradient_checkpointing_with_dropout_trains(tiny_pipes):
    pipe = tiny_pipes("sd1")
    pipe.unet.requires_grad_(False)
    net = randomise_network(lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4, dropout=0.3)), std=0.05)
    pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    net.train()
    for _ in range(2):  # the recomputed regions redraw the masks their forward drew (checkpoint restores RNG)
        _loss(pipe).backward()
    assert all(torch.isfinite(layer.oft_blocks.grad).all() for _, layer in net.items("unet"))


def test_a_replaced_parameter_is_seen(tiny_pipes):
    """load_state_dict(assign=True) swaps in new Parameter objects (version 0 again): never a stale hit."""
    pipe = tiny_pipes("sd1")
    net = lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4))
    with torch.no_grad():
        base = run_unet(pipe)  # identity rotations cached
        state = {k: v.clone() for k, v in net.state_dict().items()}
        g = torch.Generator().manual_seed(0)
        for k in state:
            if k.endswith("oft_blocks"):
                state[k] = torch.randn(state[k].shape, generator=g) * 0.05
        net.load_state_dict(state, assign=True)
        adapted = run_unet(pipe)
        _uncached(net)
        assert rel(adapted, run_unet(pipe)) <= 1e-4 and rel(adapted, base) > 1e-3
