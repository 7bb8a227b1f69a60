"""Word layout and word pooling of the hierarchical model (docs/design.md#hierarchical-byte-lm; the rules are
in hierarchical.py's docstring): where the words of a batch are, when each byte may see a word, and one vector
per word.

- ``split_word_starts``: the rule-based splitter (``bytelm.data.words``) over one row, specials and document
  changes forced to be word starts (the data layer computes the same starts for training rows);
- ``layout_words``: vectorised bookkeeping for the training path (word ids, offsets, word spans, the ready
  rule that says which word vector each byte receives); its one host sync is the word count W;
- ``decision_times`` (with ``char_emit_times``): when the bytes seen so far decide that a word ends at a
  position, the ready rule of the hierarchical model; no host work, so the training forward stays compilable;
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
    """Number of bytes (0-3) at the end of ``ids`` that begin a UTF-8 character later bytes may still
    complete, as an incremental UTF-8 decoder holds them back (an invalid sequence is not pending: its bytes
    are final)."""
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


def _ahead(x: torch.Tensor, k: int, fill: int | bool) -> torch.Tensor:
    """(B, T) -> (B, T): the value ``k`` positions later (``fill`` past the end of the row)."""
    pad = torch.full((x.shape[0], min(k, x.shape[1])), fill, dtype=x.dtype, device=x.device)
    return torch.cat([x[:, k:], pad], 1)


def _behind(x: torch.Tensor, k: int, fill: int | bool) -> torch.Tensor:
    """(B, T) -> (B, T): the value ``k`` positions earlier (``fill`` before the start of the row)."""
    pad = torch.full((x.shape[0], min(k, x.shape[1])), fill, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x[:, : max(x.shape[1] - k, 0)]], 1)


def _first_at_or_after(flag: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, T) long: the first position ``>= p`` where ``flag`` holds (``_NEVER`` if none)."""
    pos = torch.arange(flag.shape[1], device=flag.device).expand_as(flag)
    return torch.where(flag, pos, _NEVER).flip(1).cummin(1).values.flip(1)


def _at(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T) read at ``idx`` (B, N); ``_NEVER`` where ``idx`` is past the end of the row."""
    T = x.shape[1]
    padded = torch.cat([x, torch.full((x.shape[0], 1), _NEVER, dtype=x.dtype, device=x.device)], 1)
    return padded.gather(1, idx.clamp(max=T))


def char_emit_times(ids: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) long: when an incremental UTF-8 decoder emits the character that holds each byte (the position
    of the byte that settles it; ``_NEVER`` when that is past the end of the row). Bytes are what the word
    splitter reads: complete characters, and the bytes of an invalid sequence one by one.

    A valid character is emitted at its last byte. An invalid sequence (a lead byte with fewer valid
    continuation bytes than it announces, e.g. ``E3 80`` before ``C3``) is emitted when the byte that breaks
    it arrives, so its bytes are settled *later* than their own positions: until then they may still be the
    start of a character. Stray continuation bytes, other invalid bytes, ASCII and specials are emitted at
    once. A document start (and a special) breaks a sequence, as the end of a text does. Python's decoder
    (which the splitter uses) takes the maximal valid prefix of a sequence as one error, so that is what is
    modelled."""
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device).expand(B, T)
    cont = (ids >= 0x80) & (ids < 0xC0)
    if doc_start is not None:
        cont = cont & ~doc_start
    n = utf8_char_len(ids)  # (B, T) bytes a lead byte announces (1 for anything else)
    b1 = _ahead(ids, 1, 0)
    # no overlong forms or code points past U+10FFFF; ED A0..BF (a surrogate) counts as a valid prefix:
    # Python's decoder waits for the third byte before it rejects the whole sequence (at the same time as a
    # valid one)
    second_ok = ~(
        ((ids == 0xE0) & (b1 < 0xA0)) | ((ids == 0xF0) & (b1 < 0x90)) | ((ids == 0xF4) & (b1 > 0x8F))
    )
    got1 = (n >= 2) & _ahead(cont, 1, False) & second_ok
    got2 = got1 & (n >= 3) & _ahead(cont, 2, False)
    got3 = got2 & (n >= 4) & _ahead(cont, 3, False)
    m = 1 + got1.long() + got2.long() + got3.long()  # (B, T) valid prefix of the sequence a lead opens
    lead_emit = torch.where(m == n, pos + n - 1, pos + m)  # complete: last byte; broken: the breaking byte
    lead_emit = torch.where(lead_emit < T, lead_emit, _NEVER)
    out = torch.where(n >= 2, lead_emit, pos)
    for j in (1, 2, 3):  # continuation bytes inside a lead's sequence are emitted with it
        covered = _behind((n >= 2) & (m > j), j, False)
        out = torch.where(covered, _behind(lead_emit, j, 0), out)
    return out


def decision_times(
    ids: torch.Tensor, word_start: torch.Tensor, doc_start: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) long: for a word start at ``s``, the position from which the bytes seen so far decide that a
    word ends at ``s`` (``_NEVER``: not within the row). A word may be read from that position on, never
    before.

    Usually that is when the first character at ``s`` is emitted (``char_emit_times``: for valid UTF-8 its
    last byte). The rule-based splitter looks further ahead in two places, where a later character can still
    remove the word end at ``s`` (the only two: tests/models/test_causality_property.py checks every pair of
    its character classes):

    - U+0009, U+00A0, U+2007 or U+202F right after a single-space word (whitespace that is neither U+0020-like
      nor a line break): a combining mark after it (for U+202F also a letter or digit) makes it part of a
      word, which the space then joins (``_after_single_space``);
    - U+2044 FRACTION SLASH, a UAX #29 separator that is not punctuation: ``1⁄2`` is one word, ``1⁄`` two
      (``_after_fraction_slash``).

    Each rule reads only bytes up to the time it returns, so the result is a stopping time: the model that
    uses it stays causal, and cached decoding computes the same times from the bytes it has."""
    emit = char_emit_times(ids, doc_start)
    within = ids if doc_start is None else ids.masked_fill(doc_start, -1)  # bytes of the same document only
    out = torch.maximum(emit, _after_single_space(ids, within, word_start.bool(), emit))
    return torch.maximum(out, _after_fraction_slash(ids, within, doc_start))


def _after_single_space(
    ids: torch.Tensor, within: torch.Tensor, ws: torch.Tensor, emit: torch.Tensor
) -> torch.Tensor:
    """(B, T): at a word start ``s`` after a single-space word, holding U+0009, U+00A0, U+2007 or U+202F, the
    emission of the character after it (after the whole run, for U+202F), which shows whether anything glues
    on; 0 elsewhere."""
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    b1, b2 = _ahead(within, 1, -1), _ahead(within, 2, -1)
    narrow = (ids == 0xE2) & (b1 == 0x80) & (b2 == 0xAF)  # U+202F
    spaces = (
        (ids == 0x09)
        | ((ids == 0xC2) & (b1 == 0xA0))
        | ((ids == 0xE2) & (b1 == 0x80) & (b2 == 0x87))
        | narrow
    )
    after_space = ws & _behind((ids == 0x20) & ws, 1, False)  # the word before s is a single U+0020
    in_narrow = narrow | _behind(narrow, 1, False) | _behind(narrow, 2, False)
    char_end = torch.where(ids == 0x09, pos + 1, torch.where(ids == 0xC2, pos + 2, pos + 3))
    deciding = torch.where(narrow, _first_at_or_after(~in_narrow), char_end)  # the character that decides
    return torch.where(spaces & after_space, _at(emit, deciding), 0)


def _after_fraction_slash(
    ids: torch.Tensor, within: torch.Tensor, doc_start: torch.Tensor | None
) -> torch.Tensor:
    """(B, T): at U+2044, the next ASCII byte, special or document start after it; 0 elsewhere. The character
    after the slash and its combining marks decides; ASCII is never a combining mark, so this is a
    conservative (never early) stand-in that needs no Unicode tables."""
    b1, b2 = _ahead(within, 1, -1), _ahead(within, 2, -1)
    slash = (ids == 0xE2) & (b1 == 0x81) & (b2 == 0x84)
    stop = (ids < 0x80) | (ids >= 256)
    if doc_start is not None:
        stop = stop | doc_start
    return torch.where(slash, _ahead(_first_at_or_after(stop), 3, _NEVER), 0)


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
    *,
    decided: bool = False,
) -> WordLayout:
    """Vectorised word bookkeeping for the training path (one host sync for W).

    Ready times: with ``decided`` (the hierarchical model) a word is ready when its end is decided by the
    bytes seen so far (``decision_times``: the splitter's lookahead, invalid UTF-8 settled late); without it,
    the older rule "the next word's first character is complete, its length read from its lead byte", which
    ByteifiedLM still uses (with invalid UTF-8 or the splitter's lookahead it lets a word be read too early).
    ``closed`` (learned chunker): a word whose last byte is closed is ready at that byte itself (the gate
    decided the end from the bytes up to it)."""
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
    if decided:  # ready when the end is decided (decision_times); last word of a doc: at the next doc's start
        ready = _at(decision_times(ids, ws, doc_start), nxt)  # (B, W)
    else:  # r_w = s_{w+1} + c(s_{w+1}) - 1, c read from the lead byte
        clen = torch.cat([utf8_char_len(ids), torch.ones(B, 1, dtype=torch.long, device=dev)], 1)  # (B, T+1)
        ready = nxt + clen.gather(1, nxt) - 1
    nxt_is_doc_start = torch.cat([doc_start, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1).gather(
        1, nxt
    )
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
