"""Word layout and word pooling of the hierarchical model (DESIGN.md §2; the rules are in hierarchical.py's
docstring): where the words of a batch are, when each byte may see a word, and one vector per word.

- ``split_word_starts``: the rule-based splitter (``bytelm.data.words``) over one row, specials and document
  changes forced to be word starts (the data layer computes the same starts for training rows);
- ``layout_words``: vectorised bookkeeping for the training path (word ids, offsets, word spans, the ready
  rule that says which word vector each byte receives); its one host sync is the word count W;
- ``QueryPooling`` (HAT: one learned query attending within the word) and ``LastPooling`` (Bolmo: the last
  byte's state).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bytelm.data.words import word_ends
from bytelm.models.chunking import doc_starts
from bytelm.models.layers import RMSNorm, apply_rope, rope_cos_sin

_NEVER = 1 << 40  # ready time of a word whose end is not in the row


def split_word_starts(
    ids: Sequence[int] | np.ndarray,
    max_word_bytes: int | None = 100,
    doc_ids: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """(n,) bool word starts of one row of ids. Specials (>= 256) are one-id words; each run of bytes
    between specials (and document changes) is split by the rule-based splitter. Position 0 is a start."""
    a = np.asarray(ids, dtype=np.int64)
    out = np.zeros(len(a), dtype=bool)
    if len(a) == 0:
        return out
    special = a >= 256
    cuts = special.copy()
    cuts[1:] |= special[:-1]  # a run also ends after a special
    if doc_ids is not None:
        d = np.asarray(doc_ids)
        cuts[1:] |= d[1:] != d[:-1]
    cuts[0] = True
    bounds = np.concatenate([np.flatnonzero(cuts), [len(a)]])
    out[bounds[:-1]] = True
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):  # runs of bytes
        if a[lo] < 256 and hi - lo > 1:
            ends = np.asarray(word_ends(a[lo:hi].astype(np.uint8).tobytes(), max_word_bytes), dtype=np.int64)
            out[lo + ends[:-1]] = True
    return out



def utf8_char_len(ids: torch.Tensor) -> torch.Tensor:
    """Length (1-4) of the UTF-8 character a lead byte announces; 1 for ASCII, continuation bytes, invalid
    leads and specials. Same shape as ``ids``. Used for ready times: a function of the lead byte only, so it
    is a stopping time (decided when the byte arrives), which keeps the model causal."""
    ln = torch.ones_like(ids)
    ln = torch.where((ids >= 0xC2) & (ids <= 0xDF), 2, ln)
    ln = torch.where((ids >= 0xE0) & (ids <= 0xEF), 3, ln)
    return torch.where((ids >= 0xF0) & (ids <= 0xF4), 4, ln)


_CHAR_LEN = utf8_char_len(torch.arange(257)).tolist()  # lookup for the cached path (index 256 = specials)


def pending_utf8(ids: Sequence[int]) -> int:
    """Number of bytes (0-3) at the end of ``ids`` that begin a UTF-8 character later bytes may still complete,
    as an incremental UTF-8 decoder holds them back (an invalid sequence is not pending: its bytes are final)."""
    for j in range(1, min(4, len(ids)) + 1):
        b = ids[-j]
        if b >= 256:  # a special: no byte after it is pending unless it is a lead found before this one
            return 0
        if 0x80 <= b < 0xC0:  # continuation byte: look further back for its lead
            continue
        dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        dec.decode(bytes(ids[-j:]))
        return len(dec.getstate()[0])
    return 0


@dataclass
class WordLayout:
    """Where the words of a batch are. W = max words in a row; padded word slots sit after real ones."""

    word_start: torch.Tensor  # (B, T) bool, specials and document starts forced
    word_id: torch.Tensor  # (B, T) long, word index of each byte
    offset: torch.Tensor  # (B, T) long, byte offset inside its word
    start: torch.Tensor  # (B, W) long, first byte of each word (T for padded slots)
    end: torch.Tensor  # (B, W) long, exclusive end (T for padded slots)
    word_doc: torch.Tensor | None  # (B, W) doc id of each word (-1 for padded slots)
    ctx_idx: torch.Tensor  # (B, T) long: 0 = first-word vector, k >= 1 = backbone output of word k-1
    n_words: torch.Tensor  # (B,) long


def layout_words(
    ids: torch.Tensor,  # (B, T)
    word_start: torch.Tensor,  # (B, T) bool
    doc_ids: torch.Tensor | None = None,  # (B, T)
    closed: torch.Tensor | None = None,  # (B, T) bool: a word is known to end at this byte when it arrives
) -> WordLayout:
    """Vectorised word bookkeeping for the training path (one host sync for W).

    ``closed`` (learned chunker): a word whose last byte is closed is ready at that byte itself (the gate
    decided the end from the bytes up to it); other words keep the lookahead rule of the module docstring."""
    B, T = ids.shape
    dev = ids.device
    pos = torch.arange(T, device=dev).expand(B, T)  # (B, T)
    special = ids >= 256
    doc_start = doc_starts(doc_ids, ids)  # (B, T)
    ws = word_start.bool() | special | doc_start
    ws[:, 1:] |= special[:, :-1]
    word_id = ws.long().cumsum(1) - 1  # (B, T)
    n_words = ws.sum(1)  # (B,)
    W = int(n_words.max())  # the host sync; under torch.compile an unbacked size (capture_scalar_outputs)
    torch._check(W >= 1)  # every row has a word at position 0: lets the compiler rule out empty shapes
    # first byte of each word; non-start bytes write into a scratch column W that is dropped
    start = torch.full((B, W + 1), T, dtype=torch.long, device=dev)
    start.scatter_(1, torch.where(ws, word_id, W), pos)
    start = start[:, :W].contiguous()  # (B, W)
    nxt = torch.cat([start[:, 1:], torch.full((B, 1), T, dtype=torch.long, device=dev)], 1)  # (B, W)
    offset = pos - start.gather(1, word_id)  # (B, T)
    # ready time r_w = s_{w+1} + c(s_{w+1}) - 1 (see the module docstring); last word of a doc: s_{w+1}
    clen = torch.cat([utf8_char_len(ids), torch.ones(B, 1, dtype=torch.long, device=dev)], 1)  # (B, T+1)
    ready = nxt + clen.gather(1, nxt) - 1
    nxt_is_doc_start = torch.cat([doc_start, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1).gather(1, nxt)
    ready = torch.where(nxt_is_doc_start, nxt, ready)
    ready = torch.where(nxt >= T, _NEVER, ready)
    if closed is not None:
        last_byte = (nxt - 1).clamp(0, T - 1)  # (B, W)
        ready = torch.where((nxt <= T) & (start < T) & closed.gather(1, last_byte), last_byte, ready)
    ready = torch.cummax(ready, 1).values.contiguous()  # (B, W) non-decreasing
    ctx_word = torch.searchsorted(ready, pos.contiguous(), right=True) - 1  # (B, T) latest ready word
    doc_first_word = torch.cummax(torch.where(doc_start, word_id, 0), 1).values  # (B, T)
    ctx_idx = torch.where(ctx_word >= doc_first_word, ctx_word + 1, 0)
    word_doc = None
    if doc_ids is not None:
        word_doc = doc_ids.gather(1, start.clamp(max=T - 1))
        word_doc = torch.where(start < T, word_doc, -1)
    return WordLayout(ws, word_id, offset, start, nxt, word_doc, ctx_idx, n_words)


# ----------------------------------------------------------------------------------------------- pooling


class QueryPooling(nn.Module):
    """HAT pooling: one shared learned query (backbone width) attends to the bytes of its word only.

    RoPE with the query at the word's first byte and keys at byte positions is the same as rotating each key
    by its within-word offset and leaving the query unrotated (only the difference of positions enters)."""

    def __init__(self, d_byte: int, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.norm = RMSNorm(d_byte)
        self.query = nn.Parameter(torch.zeros(d_model))
        self.wk = nn.Linear(d_byte, d_model, bias=False)
        self.wv = nn.Linear(d_byte, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        h: torch.Tensor,  # (B, T, d_byte) encoder output
        word_id: torch.Tensor,  # (B, T) long
        offset: torch.Tensor,  # (B, T) long within-word offset
        n_slots: int,  # W
        rope_theta: float = 10000.0,
    ) -> torch.Tensor:  # (B, W, d_model)
        B, T, _ = h.shape
        H, hd = self.n_heads, self.head_dim
        x = self.norm(h)
        k = self.wk(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        v = self.wv(x).view(B, T, H, hd)  # (B, T, H, hd)
        cos, sin = rope_cos_sin(offset, hd, rope_theta)  # (B, 1, T, hd/2)
        k = apply_rope(k, cos, sin).transpose(1, 2)  # (B, T, H, hd)
        q = self.query.view(H, hd).to(k.dtype)
        s = (k * q).sum(-1).float().reshape(B * T, H) / math.sqrt(hd)  # (B*T, H) scores, fp32 softmax
        idx = (word_id + torch.arange(B, device=h.device).unsqueeze(1) * n_slots).reshape(B * T)  # (B*T,)
        m = torch.full((B * n_slots, H), -torch.inf, device=h.device)
        m = m.scatter_reduce(0, idx.unsqueeze(1).expand(-1, H), s.detach(), "amax", include_self=True)
        e = torch.exp(s - m[idx])  # (B*T, H)
        den = torch.zeros(B * n_slots, H, device=h.device).index_add(0, idx, e)  # (B*W, H)
        num = torch.zeros(B * n_slots, H, hd, device=h.device)
        num = num.index_add(0, idx, e.unsqueeze(-1) * v.reshape(B * T, H, hd).float())  # (B*W, H, hd)
        pooled = (num / den.clamp_min(1e-30).unsqueeze(-1)).to(h.dtype).view(B, n_slots, H * hd)
        return self.out(pooled)  # (B, W, d_model)


class LastPooling(nn.Module):
    """Bolmo-style pooling: the last byte's encoder state, projected to backbone width."""

    def __init__(self, d_byte: int, d_model: int, bias: bool = False) -> None:
        super().__init__()
        self.norm = RMSNorm(d_byte)
        self.proj = nn.Linear(d_byte, d_model, bias=bias)

    def forward(self, h: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        # h: (B, T, d_byte); end: (B, W) exclusive word ends -> (B, W, d_model)
        last = (end - 1).clamp(0, h.shape[1] - 1)
        return self.proj(self.norm(h.gather(1, last.unsqueeze(-1).expand(-1, -1, h.shape[-1]))))
