import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: tiny models gain nothing from two, and two threads under any other load are 10x slower.
torch.set_num_threads(1)
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread and leaves it so: the tiny models gain nothing from a second, and on
    a shared 2-core machine a second OpenMP thread makes their forward passes 10-30x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipes():
    """Builder of the builtin tiny pipelines (fresh each call: tests mutate weights)."""
    from lycoft.checkpoints.tiny import build_tiny_pipeline

    return build_tiny_pipeline


def randomise(layer, std=0.1, seed=0):
    """One adapted layer away from the identity: blocks ~ N(0, std), rescale ~ 1 + N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.oft_blocks.copy_(torch.randn(layer.oft_blocks.shape, generator=g) * std)
        if layer.rescale is not None:
            layer.rescale.copy_(1 + 0.2 * torch.randn(layer.rescale.shape, generator=g))
    return layer


def randomise_network(net, std=0.05, seed=0, rescale_std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.adapters.values():
            layer.oft_blocks.copy_(torch.randn(layer.oft_blocks.shape, generator=g) * std)
            if layer.rescale is not None:
                layer.rescale.copy_(1 + rescale_std * torch.randn(layer.rescale.shape, generator=g))
    return net


class Planted:
    """Unpickling this creates `marker` (by calling `open`): what a malicious pickle would do, harmlessly."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))
