"""Safe file I/O: validated safetensors reads, atomic writes, pickle checkpoints that cannot run code.

Every read of a file from a stranger either returns exactly the tensors the file describes or raises
`AdapterFileError` naming the file, the key and the fix; nothing else escapes, nothing hangs, and a
header's claims cannot make us allocate memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import save_file

import lycoft.io.safe_io as safe_io
from lycoft.io import (
    AdapterFileError,
    UnsafeCheckpointError,
    atomic_write,
    load_torch_checkpoint,
    open_safetensors,
    read_safetensors,
    read_safetensors_header,
    refuse_overwrite,
    same_file,
    save_safetensors_atomic,
)
from lycoft.io.safe_io import DTYPE_BITS, torch_dtype_of

try:
    import resource
except ImportError:  # Windows: no peak-memory probe
    resource = None


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_a.oft_blocks": torch.randn(4, 8, 8, generator=g),
        "lora_unet_a.alpha": torch.tensor(3.5),
        "lora_te_b.oft_blocks": torch.randn(2, 3, 4, 4, generator=g).to(torch.bfloat16),
        "half": torch.randn(5, generator=g).half(),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(7, dtype=torch.uint8),
        "fp8": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert (
            torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
            if a[k].dtype == torch.float8_e4m3fn
            else torch.equal(a[k], b[k])
        ), k


def craft(path, header, data: bytes = b"", length: int | None = None):
    """Write a file with a hand-made header (dict -> JSON, or raw str/bytes) and data area."""
    raw = (
        header
        if isinstance(header, bytes)
        else (header if isinstance(header, str) else json.dumps(header)).encode()
    )
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ---------------------------------------------------------------------------------------------- round trips


def test_round_trip_all_dtypes_and_metadata(tmp_path):
    tensors = sample_tensors()
    meta = {"ss_network_module": "lycoft.kohya", "lycoft.algo": "oft", "ss_network_args": '{"a": 1}'}
    out = save_safetensors_atomic(tensors, tmp_path / "a.safetensors", meta)
    loaded, loaded_meta = read_safetensors(out)
    assert_same(loaded, tensors)
    assert loaded_meta == meta
    header, header_meta = read_safetensors_header(out)
    assert header_meta == meta
    assert header["lora_unet_a.oft_blocks"].shape == (4, 8, 8) and header["lora_unet_a.alpha"].shape == ()
    assert header["half"].dtype == "F16" and header["half"].nbytes == 10
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_written_file_is_readable_by_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    tensors = sample_tensors()
    save_safetensors_atomic(tensors, tmp_path / "a.safetensors")
    assert_same(load_file(tmp_path / "a.safetensors"), tensors)


def test_subset_of_keys_and_streaming(tmp_path):
    tensors = sample_tensors()
    path = save_safetensors_atomic(tensors, tmp_path / "a.safetensors", {"k": "v"})
    some, _ = read_safetensors(path, keys=["ints", "mask"])
    assert list(some) == ["ints", "mask"] and torch.equal(some["ints"], tensors["ints"])
    with open_safetensors(path) as f:
        assert set(f.keys()) == set(tensors) and len(f) == len(tensors) and "half" in f
        assert f.metadata() == {"k": "v"}
        assert f.get_shape("lora_te_b.oft_blocks") == (2, 3, 4, 4)
        assert f.get_dtype("lora_te_b.oft_blocks") == torch.bfloat16
        assert torch.equal(f.get_tensor("ints"), tensors["ints"])
        with pytest.raises(AdapterFileError, match="nope"):
            f.get_tensor("nope")
    with pytest.raises(AdapterFileError, match="'nope'.*no tensor named so"):
        read_safetensors(path, keys=["ints", "nope"])


def test_save_makes_views_and_shared_storage_writable(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.t(), "row0": base[0], "row1": base[1], "same": base, "same2": base}
    save_safetensors_atomic(tensors, tmp_path / "v.safetensors")
    loaded, _ = read_safetensors(tmp_path / "v.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_save_refuses_non_string_metadata_naming_the_key(tmp_path):
    target = tmp_path / "a.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(TypeError, match=r"ss_network_dim.*int.*str\(\)"):
        save_safetensors_atomic({"x": torch.ones(1)}, target, {"ok": "1", "ss_network_dim": 16})
    with pytest.raises(TypeError, match="'w'.*not a torch.Tensor"):
        save_safetensors_atomic({"w": [1.0]}, target)
    assert target.read_bytes() == b"old"


def test_header_tolerates_what_the_format_allows(tmp_path):
    # null metadata, extra fields in an entry, whitespace padding, zero-size tensors: all legal.
    header = {
        "__metadata__": None,
        "z": entry("U8", (0, 3), (0, 0)),
        "x": {**entry("U8", (4,), (0, 4)), "extra": 1},
    }
    path = craft(tmp_path / "ok.safetensors", json.dumps(header) + "    ", b"\x01\x02\x03\x04")
    tensors, meta = read_safetensors(path)
    assert meta == {} and tensors["x"].tolist() == [1, 2, 3, 4] and tensors["z"].shape == (0, 3)
    empty = craft(tmp_path / "empty.safetensors", "{}")
    assert read_safetensors(empty) == ({}, {})


# ---------------------------------------------------------------------------------------- malformed files

GOOD_DATA = bytes(range(16))
MALFORMED = {
    # name: (header or raw bytes, data, length override, expected message parts)
    "truncated_data": (
        {"w": entry("F32", (4,), (0, 16))},
        GOOD_DATA[:10],
        None,
        ["'w'", "past the end", "re-download"],
    ),
    "length_beyond_file": ({"w": entry("F32", (4,), (0, 16))}, GOOD_DATA, 10_000, ["exceeds", "truncated"]),
    "length_too_big": ({}, b"", 200_000_000, ["100000000"]),
    "length_too_small": ("{}", b"", 1, ["too small"]),
    "bad_json": ('{"w": {"dtype": "F32",', b"", None, ["not valid JSON"]),
    "json_array": ("[1, 2]", b"", None, ["JSON array, not an object"]),
    "json_object_in_array": ('[{"a": 1}]', b"", None, ["not an object"]),
    "entry_not_object": ('{"w": 5}', b"", None, ["'w'", "JSON number"]),
    "entry_missing_field": ({"w": {"dtype": "F32", "shape": [1]}}, b"", None, ["'w'", "lacks data_offsets"]),
    "duplicate_key": (
        '{"w": {"dtype":"U8","shape":[1],"data_offsets":[0,1]}, '
        '"w": {"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\x00",
        None,
        ["'w'", "twice"],
    ),
    "duplicate_field": (
        '{"w": {"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}}',
        b"\x00",
        None,
        ["'dtype'", "twice"],
    ),
    "unknown_dtype": ({"w": entry("F128", (1,), (0, 16))}, GOOD_DATA, None, ["'w'", "unknown dtype 'F128'"]),
    "dtype_not_string": ({"w": entry(4, (1,), (0, 4))}, GOOD_DATA[:4], None, ["'w'", "unknown dtype 4"]),
    "negative_shape": ({"w": entry("U8", (-4,), (0, 4))}, GOOD_DATA[:4], None, ["'w'", "shape [-4]"]),
    "float_shape": (
        {"w": entry("U8", (4.0,), (0, 4))},
        GOOD_DATA[:4],
        None,
        ["'w'", "non-negative integers"],
    ),
    "bool_shape": (
        {"w": entry("U8", (True,), (0, 1))},
        GOOD_DATA[:1],
        None,
        ["'w'", "non-negative integers"],
    ),
    "shape_not_list": (
        {"w": {"dtype": "U8", "shape": 4, "data_offsets": [0, 4]}},
        GOOD_DATA[:4],
        None,
        ["'w'", "shape 4"],
    ),
    "size_mismatch": (
        {"w": entry("F32", (3,), (0, 16))},
        GOOD_DATA,
        None,
        ["'w'", "needs 12 bytes", "hold 16"],
    ),
    "subbyte_fraction": ({"w": entry("F4", (3,), (0, 2))}, GOOD_DATA[:2], None, ["'w'", "fractional"]),
    "offsets_reversed": (
        {"w": entry("U8", (0,), (8, 4))},
        GOOD_DATA[:8],
        None,
        ["'w'", "end before they begin"],
    ),
    "offsets_not_pair": ({"w": entry("U8", (4,), (0, 4, 8))}, GOOD_DATA[:8], None, ["'w'", "not a pair"]),
    "offsets_negative": ({"w": entry("U8", (4,), (-4, 0))}, GOOD_DATA[:4], None, ["'w'", "not a pair"]),
    "offsets_out_of_range": ({"w": entry("F32", (4,), (4, 20))}, GOOD_DATA, None, ["'w'", "past the end"]),
    "overlap": (
        {"a": entry("F32", (3,), (0, 12)), "b": entry("F32", (2,), (8, 16))},
        GOOD_DATA,
        None,
        ["'b'", "inside tensor 'a'", "overlap"],
    ),
    "gap": (
        {"a": entry("F32", (2,), (0, 8)), "b": entry("U8", (4,), (12, 16))},
        GOOD_DATA,
        None,
        ["'b'", "gap of 4"],
    ),
    "hole_at_start": ({"a": entry("U8", (4,), (12, 16))}, GOOD_DATA, None, ["'a'", "gap of 12"]),
    "trailing_bytes": ({"a": entry("F32", (2,), (0, 8))}, GOOD_DATA, None, ["8 bytes belong to no tensor"]),
    "metadata_not_string": (
        {"__metadata__": {"ok": "1", "ss_network_dim": 16}},
        b"",
        None,
        ["'ss_network_dim'", "only strings"],
    ),
    "metadata_not_object": ({"__metadata__": ["a"]}, b"", None, ["'__metadata__'", "JSON array"]),
    "bad_utf8": (b'{"\xff": 1}', b"", None, ["not valid UTF-8"]),
    "lone_surrogate_name": (
        '{"\\ud800": {"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\x00",
        None,
        ["not valid Unicode"],
    ),
    "deep_nesting": ("{" + '"a":[' * 100_000 + "]" * 100_000 + "}", b"", None, ["not valid JSON"]),
    "huge_int_literal": (
        '{"w": {"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,1]}}',
        b"",
        None,
        ["not valid JSON"],
    ),
    "huge_dim": ({"w": entry("U8", (2**64, 0), (0, 0))}, b"", None, ["'w'", "below 2**63"]),
    "tera_element_claim_small_offsets": (
        {"w": entry("F32", (10**6, 10**6), (0, 16))},
        GOOD_DATA,
        None,
        ["'w'", "needs 4000000000000 bytes"],
    ),
    "tera_element_claim_big_offsets": (
        {"w": entry("F32", (10**6, 10**6), (0, 4 * 10**12))},
        GOOD_DATA,
        None,
        ["'w'", "past the end"],
    ),
    "many_dims_claim": (
        {"w": entry("U8", (2**62,) * 5000, (0, 16))},
        GOOD_DATA,
        None,
        ["'w'", "more than 16 bytes"],
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_header_is_refused_before_loading(case, tmp_path, monkeypatch):
    header, data, length, expected = MALFORMED[case]
    path = craft(tmp_path / f"{case}.safetensors", header, data, length)

    def never(*args, **kwargs):
        raise AssertionError("safe_open reached on an invalid file")

    monkeypatch.setattr(safe_io, "safe_open", never)
    with pytest.raises(AdapterFileError) as info:
        read_safetensors(path)
    message = str(info.value)
    assert str(path) in message and len(message) < 1000
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty"),
        (b"abc", "fewer than the 8-byte header length"),
        (b"PK\x03\x04" + b"\x00" * 100, "PyTorch zip checkpoint"),
        (b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01" + b"\x00" * 40, "Python pickle"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>\n", "text file"),
        (b"hello world, this is a plain text file\n", "not a safetensors file"),
    ],
)
def test_not_a_safetensors_file(content, expected, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterFileError, match=expected) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


def test_real_pickle_checkpoint_is_not_a_safetensors_file(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(2)}}, tmp_path / "m.ckpt")
    with pytest.raises(AdapterFileError, match="not a safetensors file.*load_torch_checkpoint"):
        read_safetensors(tmp_path / "m.ckpt")


def test_missing_path_directory_and_fifo(tmp_path):
    with pytest.raises(AdapterFileError, match="file not found"):
        read_safetensors(tmp_path / "absent.safetensors")
    with pytest.raises(AdapterFileError, match="is a directory"):
        read_safetensors(tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(AdapterFileError, match="not a regular file"):
            read_safetensors(tmp_path / "fifo")


def test_dtype_torch_cannot_hold_is_a_file_error(tmp_path):
    path = craft(tmp_path / "f6.safetensors", {"w": entry("F6_E2M3", (4,), (0, 3))}, b"\x00" * 3)
    assert read_safetensors_header(path)[0]["w"].dtype == "F6_E2M3"  # a valid header ...
    with pytest.raises(AdapterFileError, match="'w'.*F6_E2M3 cannot be represented by torch"):
        read_safetensors(path)  # ... that this torch cannot load


def test_check_finite_names_the_broken_keys(tmp_path):
    tensors = {
        "good": torch.ones(3),
        "nan": torch.tensor([1.0, float("nan")]),
        "inf8": torch.tensor([float("inf")]).to(torch.float8_e5m2),
        "ints": torch.arange(3),
    }
    path = save_safetensors_atomic(tensors, tmp_path / "a.safetensors")
    assert read_safetensors(path)[0].keys() == tensors.keys()  # off by default
    with pytest.raises(AdapterFileError, match=r"'nan', 'inf8' contain NaN or inf"):
        read_safetensors(path, check_finite=True)
    read_safetensors(path, keys=["good", "ints"], check_finite=True)


# ---------------------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def valid_file_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    tensors = {
        "a.oft_blocks": torch.randn(2, 3, 3),
        "a.alpha": torch.tensor(1.0),
        "m": torch.tensor([True, False]),
    }
    save_file({**tensors, "h": torch.arange(3, dtype=torch.int16)}, path, metadata={"k": "v"})
    return path.read_bytes()


def _flip(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


def _structured_files() -> st.SearchStrategy[bytes]:
    """Well-formed JSON with arbitrary (often nonsensical) dtypes, shapes and offsets."""
    small = st.integers(-2, 40)
    entry_st = (
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from([*DTYPE_BITS, "X", "f32"]),
                "shape": st.lists(st.integers(-1, 6), max_size=3),
                "data_offsets": st.lists(small, min_size=2, max_size=2),
            }
        )
        | st.none()
        | st.integers()
        | st.text(max_size=3)
    )
    meta = st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(), max_size=2)
    header = st.tuples(st.dictionaries(st.text(max_size=4), entry_st, max_size=4), st.none() | meta)

    def build(h_data):
        (entries, metadata), data = h_data
        obj = dict(entries) if metadata is None else {"__metadata__": metadata, **entries}
        raw = json.dumps(obj).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    return st.tuples(header, st.binary(max_size=48)).map(build)


def _valid_files() -> st.SearchStrategy[bytes]:
    """Files that should load: consistent offsets for every dtype (incl. packed F4), any names/metadata."""

    def build(spec):
        entries, metadata, seed = spec
        header, data = {}, b""
        for name, (dtype, shape) in entries.items():
            nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
            header[name] = entry(dtype, shape, (len(data), len(data) + nbytes))
            data += bytes((seed + i * 37) % 256 for i in range(nbytes))
        raw = json.dumps({"__metadata__": metadata, **header}).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    dtypes = [d for d in DTYPE_BITS if torch_dtype_of(d) is not None and DTYPE_BITS[d] >= 8]
    tensor = st.tuples(st.sampled_from(dtypes), st.lists(st.integers(0, 4), max_size=3)) | st.just(
        ("F4", [2, 2])
    )
    names = st.text(max_size=6).filter(lambda n: n != "__metadata__")
    meta = st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3)
    return st.tuples(st.dictionaries(names, tensor, max_size=4), meta, st.integers(0, 255)).map(build)


def mutated_files(valid: bytes) -> st.SearchStrategy[bytes]:
    header_end = 8 + int.from_bytes(valid[:8], "little")

    def edits_in(hi: int) -> st.SearchStrategy[list[tuple[int, int]]]:
        return st.lists(st.tuples(st.integers(0, hi - 1), st.integers(0, 255)), min_size=1, max_size=6)

    return st.one_of(
        st.integers(0, len(valid)).map(lambda k: valid[:k]),
        edits_in(header_end).map(lambda e: _flip(valid, e)),
        edits_in(len(valid)).map(lambda e: _flip(valid, e)),
        st.integers(0, 2**64 - 1).map(lambda n: n.to_bytes(8, "little") + valid[8:]),
        st.binary(max_size=300),
        _structured_files(),
        _valid_files(),
    )


@pytest.mark.timeout(120)
def test_fuzzed_files_load_exactly_or_fail_cleanly(valid_file_bytes, tmp_path_factory):
    """Any byte string read as a safetensors file yields exactly the bytes its header describes, or
    an AdapterFileError: no other exception, no hang, no allocation driven by the header's claims."""
    path = tmp_path_factory.mktemp("fuzzed") / "f.safetensors"
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if resource else 0
    outcomes = {"ok": 0, "refused": 0}

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(mutated_files(valid_file_bytes))
    def check(content: bytes) -> None:
        path.write_bytes(content)
        try:
            tensors, metadata = read_safetensors(path)
        except AdapterFileError as e:
            assert str(path) in str(e)
            # our validation caught it, not the safetensors library after the fact
            assert not isinstance(e.__cause__, SafetensorError), e
            outcomes["refused"] += 1
            return
        outcomes["ok"] += 1
        header, meta2 = read_safetensors_header(path)
        assert metadata == meta2 and tensors.keys() == header.keys()
        data_start = 8 + int.from_bytes(content[:8], "little")
        for key, info in header.items():
            t = tensors[key]
            assert t.dtype == torch_dtype_of(info.dtype), key
            if info.dtype != "F4":  # packed two per byte: torch's shape differs from the header's
                assert tuple(t.shape) == info.shape, key
            begin, end = info.data_offsets
            got = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            assert got == content[data_start + begin : data_start + end], key

    check()
    assert outcomes["ok"] > 150 and outcomes["refused"] > 500, outcomes
    # ru_maxrss is KiB on Linux, bytes on macOS; either way far below what a lying header could demand.
    if resource:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
        assert grown < (300 << 20 if sys.platform == "darwin" else 300 << 10), grown


# ---------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous content")
    seen = []

    def fails(tmp):
        seen.append(tmp)
        tmp.write_bytes(b"half-writ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails)
    assert target.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]
    # the temp file lived next to the target, hidden, with the documented name
    assert (
        seen[0].parent == tmp_path
        and seen[0].name.startswith(".out.safetensors.")
        and seen[0].suffix == ".tmp"
    )


def test_atomic_write_interrupt_leaves_no_temp(tmp_path):
    def interrupted(tmp):
        tmp.write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.bin", interrupted)
    assert os.listdir(tmp_path) == []


def test_atomic_write_replaces_and_keeps_mode_and_symlink(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    written = atomic_write(link, lambda tmp: tmp.write_bytes(b"new"))
    assert written == real.resolve() and link.is_symlink() and real.read_bytes() == b"new"
    assert real.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["link.bin", "real.bin"]


def test_atomic_write_bad_targets(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create it"):
        atomic_write(tmp_path / "no" / "dir.bin", lambda tmp: None)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write(tmp_path, lambda tmp: None)


def test_save_failure_keeps_previous_adapter(tmp_path, monkeypatch):
    target = save_safetensors_atomic({"x": torch.ones(2)}, tmp_path / "a.safetensors")

    def broken_save(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(safe_io, "save_file", broken_save)
    with pytest.raises(RuntimeError, match="boom"):
        save_safetensors_atomic({"x": torch.zeros(2)}, target)
    assert torch.equal(read_safetensors(target)[0]["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_refuse_overwrite_and_same_file(tmp_path, monkeypatch):
    existing = tmp_path / "a.safetensors"
    existing.write_bytes(b"x")
    refuse_overwrite(tmp_path / "free.safetensors", force=False)
    with pytest.raises(FileExistsError, match="a.safetensors exists; pass --force to overwrite"):
        refuse_overwrite(existing, force=False)
    refuse_overwrite(existing, force=True)
    with pytest.raises(IsADirectoryError):
        refuse_overwrite(tmp_path, force=True)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.safetensors").symlink_to(existing)
    assert same_file("a.safetensors", existing)
    assert same_file(tmp_path / "link.safetensors", "./a.safetensors")
    assert same_file("sub/../new.safetensors", tmp_path / "new.safetensors")  # neither exists
    assert not same_file(existing, tmp_path / "new.safetensors")


# ---------------------------------------------------------------------------------------- pickle checkpoints

EXECUTED: list[str] = []


def _payload(tag: str) -> None:
    EXECUTED.append(tag)


class _RunsCodeOnLoad:
    def __reduce__(self):
        return (_payload, ("pwned",))


class _CustomThing:
    def __init__(self):
        self.value = 3


def test_plain_and_nested_state_dicts_load(tmp_path):
    sd = {"model.diffusion_model.w": torch.randn(3, 3), "cond_stage_model.b": torch.arange(4)}
    variants = {
        "plain.ckpt": sd,
        "lightning.ckpt": {"state_dict": sd, "global_step": 10, "epoch": 1},
        "model.pt": {"model": sd},
        "both.bin": {"model": {"state_dict": sd}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        loaded = load_torch_checkpoint(tmp_path / name)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd), name
    torch.save({"state_dict": sd}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert load_torch_checkpoint(tmp_path / "legacy.ckpt").keys() == sd.keys()


def test_safetensors_path_is_read_as_safetensors(tmp_path):
    path = save_safetensors_atomic({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    assert torch.equal(load_torch_checkpoint(path)["w"], torch.ones(2))


def test_checkpoint_with_custom_class_is_refused_without_allow_pickle(tmp_path, caplog):
    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": _CustomThing()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_torch_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "_CustomThing" in message
    assert ".safetensors" in message and "allow_pickle=True" in message and "--allow-pickle" not in message
    with caplog.at_level(logging.WARNING, logger="lycoft.io.torch_checkpoint"):
        loaded = load_torch_checkpoint(path, allow_pickle=True)
    assert torch.equal(loaded["w"], torch.ones(2))
    assert "allow_pickle" in caplog.text and str(path) in caplog.text


def test_code_in_a_pickle_is_never_run_without_allow_pickle(tmp_path):
    for legacy in (False, True):
        path = tmp_path / f"evil{legacy}.ckpt"
        torch.save(
            {"w": torch.ones(1), "x": _RunsCodeOnLoad()}, path, _use_new_zipfile_serialization=not legacy
        )
        with pytest.raises(UnsafeCheckpointError, match="_payload"):
            load_torch_checkpoint(path)
    assert EXECUTED == []


def test_sd1_style_lightning_checkpoint_loads_without_allow_pickle(tmp_path, monkeypatch):
    """Original SD 1.x .ckpt files carry Lightning's ModelCheckpoint state and numpy scalars."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score, self.k = "val/loss", torch.tensor(0.5), np.float64(1.5)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    sd = {"model.diffusion_model.w": torch.randn(2, 2)}
    obj = {
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best": 1}},
        "cb": ModelCheckpoint(),
        "s": np.float32(2),
    }
    torch.save(obj, tmp_path / "sd-v1.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # the loader must not need Lightning installed
    loaded = load_torch_checkpoint(tmp_path / "sd-v1.ckpt")
    assert torch.equal(loaded["model.diffusion_model.w"], sd["model.diffusion_model.w"])


# the last: a zip64 end locator claiming two disks, on which `zipfile.is_zipfile` itself raises
@pytest.mark.parametrize("content", [b"", b"hello world\n", b"PK\x03\x04garbage" * 10, b"\x80\x02}q\x00(X",
                                     struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2) + b"PK\x05\x06" + bytes(18)])
def test_damaged_checkpoint_is_a_file_error_not_an_unsafe_one(content, tmp_path):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(AdapterFileError) as info:
        load_torch_checkpoint(path)
    assert not isinstance(info.value, UnsafeCheckpointError) and str(path) in str(info.value)


def test_truncated_checkpoint_is_a_file_error(tmp_path):
    for legacy in (False, True):
        path = tmp_path / f"t{legacy}.ckpt"
        torch.save({"state_dict": {"w": torch.randn(64)}}, path, _use_new_zipfile_serialization=not legacy)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(AdapterFileError, match="truncated") as info:
            load_torch_checkpoint(path)
        assert not isinstance(info.value, UnsafeCheckpointError)


def test_checkpoint_without_tensors(tmp_path):
    torch.save({"step": 3}, tmp_path / "log.pt")
    with pytest.raises(AdapterFileError, match="contains no tensors"):
        load_torch_checkpoint(tmp_path / "log.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(AdapterFileError, match="holds a list"):
        load_torch_checkpoint(tmp_path / "list.pt")
