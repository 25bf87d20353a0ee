"""Gaps the format and merge tests leave: an adapter file holding NaN is refused by both the loader and the
merge tool naming the key (and the merge writes nothing); a diverged adapter (blocks near float32's limit)
still saves a finite ``alpha``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_files import OFT, shared_files

import lycoft
from lycoft.io import AdapterFileError
from lycoft.merge import merge_adapters
from lycoft.network_files import layer_tensors


def test_nan_in_an_adapter_is_refused_by_load_and_merge_naming_the_key(tmp_path):
    files = shared_files("sd1")
    tensors = load_file(str(files["a"]))
    key = sorted(k for k in tensors if k.endswith(".oft_blocks"))[3]
    tensors[key][0, 0, 1] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    out = tmp_path / "merged.safetensors"
    with pytest.raises(AdapterFileError, match=key.replace(".", r"\.") + ".*NaN or inf"):
        merge_adapters(files["single-file"], [str(bad)], out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
    import copy
    with pytest.raises(AdapterFileError, match=key.replace(".", r"\.")):
        lycoft.load(str(bad), pipe=copy.deepcopy(files["pipe"]))


def test_diverged_blocks_still_give_a_finite_alpha():
    layer = lycoft.wrap(torch.nn.Linear(16, 16), OFT)
    with torch.no_grad():
        layer.oft_blocks.copy_(torch.randn_like(layer.oft_blocks) * 1e37)
    out = layer_tensors(layer)
    assert torch.isfinite(out["oft_blocks"]).all()
    assert torch.isfinite(out["alpha"]) and float(out["alpha"]) > 1e37
