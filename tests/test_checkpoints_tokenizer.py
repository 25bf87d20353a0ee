"""CLIP tokenizers built in code: real OpenAI ids from the vendored vocabulary, the tiny byte-level
vocabulary, padding conventions, and the file-based construction path used with transformers 4."""

from __future__ import annotations

import hashlib
import json

import pytest

from lycoft.checkpoints import build_clip_tokenizer, load_component_config, real_vocab, tiny_vocab
from lycoft.checkpoints import tokenizer as tokmod

PROMPT = "a photo of sks dog"
REAL_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]


@pytest.fixture(scope="module")
def real():
    return build_clip_tokenizer("real")


def test_vendored_vocabulary_is_the_published_file():
    digest = hashlib.sha256(tokmod.VOCAB_GZ.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert (tokmod.VOCAB_GZ.parent / "NOTICE.txt").read_text().count("MIT") >= 2


def test_real_vocabulary_gives_openai_ids(real):
    assert real(PROMPT).input_ids == REAL_IDS
    assert len(real) == 49408 and real.model_max_length == 77
    assert (real.bos_token_id, real.eos_token_id) == (49406, 49407)
    padded = real(PROMPT, padding="max_length", max_length=real.model_max_length, truncation=True).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70  # SD1 pads with <|endoftext|>
    long = real(" ".join(["dog"] * 100), truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[-1] == 49407


def test_open_clip_padding_uses_exclamation_mark():
    tok = build_clip_tokenizer("real", pad_token="!")
    ids = tok(PROMPT, padding="max_length", max_length=10).input_ids
    assert ids == REAL_IDS + [0, 0, 0]  # "!" is id 0, as in SD2 / SDXL tokenizer_2


def test_tiny_vocabulary_shares_byte_ids_and_knows_prompt_words(real):
    tiny = build_clip_tokenizer("tiny")
    vocab, merges = tiny_vocab()
    real_tokens, _ = real_vocab()
    assert len(tiny) == len(vocab) == 552
    for cfg in ("tiny-sd1", "tiny-sd2", "tiny-sdxl"):  # the bundled tiny text encoders are sized for it
        assert load_component_config(cfg, "text_encoder")["vocab_size"] == len(vocab)
    assert all(real_tokens[t] == i for t, i in vocab.items() if i < 512)  # byte tokens: same ids as CLIP
    for word in tokmod.TINY_WORDS:
        ids = tiny(word).input_ids
        assert len(ids) == 3 and tiny.convert_ids_to_tokens(ids[1]) == word + "</w>"
    unknown = tiny("zebra").input_ids[1:-1]
    assert tiny.convert_ids_to_tokens(unknown) == ["z", "e", "b", "r", "a</w>"]  # bytes, never unk
    assert len(merges) == len(vocab) - 514


def test_tiny_tokenizer_survives_save_and_reload(tmp_path):
    from transformers import CLIPTokenizer

    tiny = build_clip_tokenizer("tiny", pad_token="!")
    tiny.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a painting of the sks toy, zebra!"
    assert again(text).input_ids == tiny(text).input_ids
    assert again.pad_token == "!" and again.model_max_length == 77


def test_file_based_construction_matches(monkeypatch, real):
    """transformers 4 builds CLIPTokenizer from vocab.json + merges.txt; the files we write for it must
    describe the same tokenizer. Emulated with a class that takes files and rebuilds the in-memory one."""
    from transformers import CLIPTokenizer

    class FileOnlyTokenizer:
        def __init__(self, vocab_file, merges_file, **kwargs):
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merges_file, encoding="utf-8") as f:
                lines = f.read().split("\n")
            assert lines[0].startswith("#version")
            merges = [tuple(line.split()) for line in lines[1:] if line]
            self.inner = CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)

    monkeypatch.setattr(tokmod, "_clip_tokenizer_class", lambda: FileOnlyTokenizer)
    emulated = build_clip_tokenizer("real").inner
    for text in (PROMPT, "Ünïcödé, emoji 🐶 and CJK 猫", "it's a   dog's life"):
        assert emulated(text).input_ids == real(text).input_ids


def test_unknown_vocabulary_and_size_are_refused():
    with pytest.raises(ValueError, match="use 'real' or 'tiny'"):
        build_clip_tokenizer("bpe-huge")
    with pytest.raises(ValueError, match="no builtin CLIP vocabulary has 1000 tokens"):
        tokmod.vocab_for_size(1000)
