"""Coverage-guided fuzzing (atheris/libFuzzer) of the readers that take files from strangers.

Run by `test_fuzz_atheris.py`, or by hand for longer::

    .venv/bin/python tests/fuzz_readers.py CORPUS_DIR -runs=100000 -max_total_time=600

The first byte of an input picks the reader, the rest is the file:

* 0: `read_safetensors_header` (the header validation every safetensors read goes through),
* 1: `read_adapter` (what `lycoft.load` parses a file into, before touching any model),
* 2: `load_torch_checkpoint` on a ``.ckpt`` (pickle checkpoints, read without running code).

Each must return or raise `AdapterFileError` (`UnsafeCheckpointError` is one); any other exception is a
crash the fuzzer reports with the input that caused it.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["lycoft"]):
    from lycoft.formats.lycoris import read_adapter
    from lycoft.io.errors import AdapterFileError
    from lycoft.io.safe_io import read_safetensors_header
    from lycoft.io.torch_checkpoint import load_torch_checkpoint

READERS = (
    (".safetensors", read_safetensors_header),
    (".safetensors", read_adapter),
    (".ckpt", load_torch_checkpoint),
)
WORKDIR = tempfile.mkdtemp(prefix="lycoft-fuzz-")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    suffix, reader = READERS[data[0] % len(READERS)]
    path = os.path.join(WORKDIR, "input" + suffix)
    with open(path, "wb") as f:
        f.write(data[1:])
    try:
        reader(path)
    except AdapterFileError:
        pass


def main() -> None:
    import torch

    torch.set_num_threads(1)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
