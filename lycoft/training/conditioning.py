"""What the UNet is conditioned on: captions -> text-encoder states, and SDXL's size/crop `time_ids`.

The family's `FamilyInfo` says which states: ``text_hidden_state = "last"`` (SD1/SD2): the last hidden
state of the one text encoder (or, with ``clip_skip = n``, the n-th from the end passed through the final
layer norm, as the SD1 pipelines do); ``"penultimate"`` (SDXL): ``hidden_states[-2]`` of every encoder
(no final norm) concatenated along the feature axis. ``pooled_text_embeds``: the pooled projection of the
last encoder too. ``uses_time_ids``: ``time_ids = (orig_h, orig_w, crop_top, crop_left, target_h,
target_w)`` per image.
Captions longer than 75 tokens are encoded in 75-token chunks when ``max_token_length`` is 150 or 225
(kohya's scheme): each chunk gets its own BOS/EOS, the states are concatenated, and only the first BOS
and the last EOS are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lycoft.checkpoints.families import family_info

CHUNK = 75  # caption tokens per text-encoder call (77 minus BOS and EOS)


@dataclass
class TextConditioning:
    """Batch-first text conditioning: ``hidden`` ``(B, L, D)``; ``pooled`` ``(B, P)`` for families with
    pooled text embeddings (SDXL), else None."""

    hidden: Tensor
    pooled: Tensor | None = None


def _final_norm(te: nn.Module) -> nn.Module:
    inner = getattr(te, "text_model", te)  # transformers 5 may drop the text_model wrapper
    return inner.final_layer_norm


def _token_chunks(tokenizer, captions: Sequence[str], chunks: int, device: torch.device) -> list[Tensor]:
    """Token ids of each chunk, ``chunks`` tensors of ``(B, 77)``."""
    length = chunks * CHUNK + 2
    ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt").input_ids.to(device)
    if chunks == 1:
        return [ids]
    bos, eos = ids[:, :1], ids[:, -1:]
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    out = []
    for i in range(chunks):
        body = ids[:, 1 + i * CHUNK: 1 + (i + 1) * CHUNK]
        chunk = torch.cat([bos, body, eos], dim=1).clone()
        # A chunk cut in the middle of a caption still ends with EOS; an empty chunk starts with one.
        cut = (chunk[:, -2] != eos_id) & (chunk[:, -2] != pad_id)
        chunk[cut, -1] = eos_id
        chunk[chunk[:, 1] == pad_id, 1] = eos_id
        out.append(chunk)
    return out


def _join_chunks(states: list[Tensor]) -> Tensor:
    if len(states) == 1:
        return states[0]
    middle = [s[:, 1:-1] for s in states]
    return torch.cat([states[0][:, :1], *middle, states[-1][:, -1:]], dim=1)


class TextConditioner:
    """Encodes captions with the pipeline's text encoders the way its family expects.

    Args:
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        text_encoders, tokenizers: in pipeline order.
        clip_skip: kohya's meaning: 1 (or None) = the usual layer, 2 = one layer earlier, ...
        max_token_length: None/75, 150 or 225.
    """

    def __init__(self, family: str, text_encoders: Sequence[nn.Module], tokenizers: Sequence, *,
                 clip_skip: int | None = None, max_token_length: int | None = None) -> None:
        self.family = family
        self.info = family_info(family)
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.clip_skip = clip_skip or 1
        self.chunks = (max_token_length or CHUNK) // CHUNK

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    def namespace(self) -> str:
        """What a cached output depends on besides the caption (for `TextEmbeddingCache`)."""
        return f"{self.family}/clip_skip={self.clip_skip}/chunks={self.chunks}"

    def encode(self, captions: Sequence[str]) -> TextConditioning:
        device = self.device
        if self.info.text_hidden_state == "penultimate":
            return self._encode_penultimate(captions, device)
        te, tok = self.text_encoders[0], self.tokenizers[0]
        states = []
        for ids in _token_chunks(tok, captions, self.chunks, device):
            out = te(ids, output_hidden_states=True)
            if self.clip_skip == 1:
                h = out.last_hidden_state
            else:
                h = _final_norm(te)(out.hidden_states[-self.clip_skip])
            states.append(h)
        return TextConditioning(_join_chunks(states))

    def _encode_penultimate(self, captions: Sequence[str], device: torch.device) -> TextConditioning:
        hidden, pooled = [], None
        layer = -self.clip_skip - 1
        last = len(self.text_encoders) - 1
        for index, (te, tok) in enumerate(zip(self.text_encoders, self.tokenizers)):
            states = []
            for chunk_index, ids in enumerate(_token_chunks(tok, captions, self.chunks, device)):
                out = te(ids, output_hidden_states=True)
                states.append(out.hidden_states[layer])
                if self.info.pooled_text_embeds and index == last and chunk_index == 0:
                    pooled = out.text_embeds
            hidden.append(_join_chunks(states))
        return TextConditioning(torch.cat(hidden, dim=-1), pooled)

    def as_tuple(self, captions: Sequence[str]) -> tuple[Tensor, ...]:
        """`encode` as a tuple of tensors (what `TextEmbeddingCache` stores)."""
        c = self.encode(captions)
        return (c.hidden,) if c.pooled is None else (c.hidden, c.pooled)


def sdxl_time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """``(B, 6)`` ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` from the batch's
    ``(B, 2)`` tensors (already in (h, w) / (top, left) order)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1)
