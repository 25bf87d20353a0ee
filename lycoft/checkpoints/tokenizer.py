"""CLIP BPE tokenizers built in code, with no tokenizer files and no hub.

Two vocabularies:
* ``"real"``: the OpenAI CLIP vocabulary of SD1.x/SD2.x/SDXL (49408 tokens, bos 49406, eos 49407),
  rebuilt from the vendored MIT ``tokenizer/bpe_simple_vocab_16e6.txt.gz`` (see ``tokenizer/NOTICE.txt``).
* ``"tiny"``: a byte-level vocabulary for the builtin tiny models: the 256 byte symbols, the same with
  ``</w>``, merges for a few prompt words, then the two specials. Single-character ids equal the real
  ones (``a</w>`` = 320) and unknown words fall back to byte tokens, never to ``unk``.

Layout of the real vocabulary (the CLIP recipe): bytes, bytes + ``</w>``, one token per merge (merge
list lines 1..48894 of the .gz), ``<|startoftext|>``, ``<|endoftext|>``.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import json
from pathlib import Path
from typing import Any

from ..io.atomic import scratch_directory

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
REAL_VOCAB_SIZE = 49408
VOCAB_GZ = Path(__file__).resolve().parent / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"

# Words the tiny vocabulary knows whole (everything else is spelled with byte tokens).
TINY_WORDS = (
    "a",
    "photo",
    "of",
    "sks",
    "dog",
    "toy",
    "cat",
    "in",
    "the",
    "style",
    "painting",
    "person",
    "picture",
)
_N_MERGES_REAL = REAL_VOCAB_SIZE - 256 - 256 - 2


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP byte -> printable-character table (256 entries, in CLIP vocabulary order)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _base_tokens() -> list[str]:
    symbols = list(bytes_to_unicode().values())
    return symbols + [s + "</w>" for s in symbols]


def _assemble(merges: list[tuple[str, str]]) -> dict[str, int]:
    tokens = _base_tokens() + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("BPE merges produce duplicate tokens; the merge list is malformed")
    return vocab


@functools.lru_cache(maxsize=1)
def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the tiny byte-level vocabulary: whole-word merges for :data:`TINY_WORDS`."""
    merges: list[tuple[str, str]] = []
    seen: set[str] = set(_base_tokens())
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        # Merge left to right: each word adds the chain (w0,w1), (w0w1,w2), ... to the merge list.
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = "".join(pair)
            if merged not in seen:
                merges.append(pair)
                seen.add(merged)
            pieces = [merged, *pieces[2:]]
    return _assemble(merges), merges


@functools.lru_cache(maxsize=1)
def real_vocab(path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the OpenAI CLIP vocabulary, read from `path` (default: the vendored .gz)."""
    gz = Path(path) if path else VOCAB_GZ
    if not gz.is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found at {gz}; reinstall lycoft (it ships this file)"
        )
    lines = gzip.open(gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _N_MERGES_REAL]]
    if len(merges) != _N_MERGES_REAL or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{gz} is not the CLIP merge list (expected {_N_MERGES_REAL} 'a b' lines after the header)"
        )
    return _assemble(merges), merges  # type: ignore[arg-type]


def _clip_tokenizer_class() -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer


def _from_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], **kwargs: Any) -> Any:
    cls = _clip_tokenizer_class()
    params = inspect.signature(cls.__init__).parameters
    if "vocab" in params:
        # transformers >= 5: the tokenizers-backed class accepts the vocabulary in memory.
        return cls(vocab=dict(vocab), merges=list(merges), **kwargs)
    # transformers 4.x: the (slow) class reads vocab.json + merges.txt once in __init__, so a temporary
    # folder is enough; it keeps everything in memory afterwards.
    with scratch_directory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text(
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
        )
        return cls(vocab_file=str(vocab_file), merges_file=str(merges_file), **kwargs)


def build_clip_tokenizer(
    vocab: str = "real", pad_token: str = EOS, model_max_length: int = MODEL_MAX_LENGTH
) -> Any:
    """A ``transformers.CLIPTokenizer`` with the ``"real"`` or ``"tiny"`` vocabulary.

    `pad_token`: ``"<|endoftext|>"`` for SD1.x and SDXL's first tokenizer, ``"!"`` for SD2.x and SDXL's
    ``tokenizer_2`` (the OpenCLIP convention). Prompts are padded/truncated to `model_max_length` (77).
    """
    if vocab == "real":
        tokens, merges = real_vocab()
    elif vocab == "tiny":
        tokens, merges = tiny_vocab()
    else:
        raise ValueError(f"unknown tokenizer vocabulary {vocab!r}; use 'real' or 'tiny'")
    return _from_vocab(
        tokens,
        merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def vocab_for_size(vocab_size: int) -> str:
    """Which builtin vocabulary (``"real"`` / ``"tiny"``) has `vocab_size` tokens (a text encoder's
    ``vocab_size`` / token-embedding rows)."""
    if vocab_size == REAL_VOCAB_SIZE:
        return "real"
    if vocab_size == len(tiny_vocab()[0]):
        return "tiny"
    raise ValueError(
        f"no builtin CLIP vocabulary has {vocab_size} tokens (real: {REAL_VOCAB_SIZE}, tiny: "
        f"{len(tiny_vocab()[0])}); load the model from a diffusers folder that includes its tokenizer"
    )


def tokenizer_for_config(config_dir: str | Path, component: str, vocab_size: int) -> Any:
    """The tokenizer for `component` (``tokenizer`` / ``tokenizer_2``) of a diffusers config folder, built in
    code: vocabulary chosen by `vocab_size`, pad token and max length read from its ``tokenizer_config.json``
    when present (defaults: ``<|endoftext|>``, 77)."""
    cfg_path = Path(config_dir) / component / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    pad = cfg.get("pad_token", EOS)
    if isinstance(pad, dict):  # transformers writes AddedToken dicts in some versions
        pad = pad.get("content", EOS)
    return build_clip_tokenizer(
        vocab_for_size(vocab_size),
        pad_token=pad,
        model_max_length=int(cfg.get("model_max_length", MODEL_MAX_LENGTH)),
    )
