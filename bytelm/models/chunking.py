"""Learned chunk boundaries for the hierarchical model (``model.chunker=gate``): the MrT5 delete gate decides
which bytes end a chunk, so the backbone runs on the kept positions only (docs/design.md#mrt5-delete-gate,
docs/mrt5.md).

A byte whose gate value ``G`` lies above ``tau_del`` is *kept*: it closes the chunk that holds it, and the
chunk's vector goes to the backbone; the deleted bytes before it are merged into that chunk (the HAT pooling
reads all of them; ``pooling=last`` reads only the kept byte, i.e. exactly MrT5's hard deletion with the
backbone as the "later layers"). Three more rules make every row well formed and keep the model causal:

- specials (BOS/EOS/PAD, ids >= 256) always close a chunk of their own (as with the word splitter);
- a chunk that reaches ``max_word_bytes`` is closed at that byte (a function of earlier decisions only);
- chunks never cross documents (the layout forces a start at each document start).

Every rule reads bytes up to the closing byte only, so a chunk is known complete *at* its last byte, one byte
earlier than a rule-based word (whose end shows only when the next word's first character arrives).
"""

from __future__ import annotations

import torch


def doc_starts(doc_ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at the first position of each packed document (position 0 always); ``like`` (B, T)
    gives the shape and device when ``doc_ids`` is None (one document per row)."""
    out = torch.zeros(like.shape[:2], dtype=torch.bool, device=like.device)
    out[:, 0] = True
    if doc_ids is not None:
        out[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return out


def causal_center(h: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``h_t`` minus the mean of ``h`` over positions ``<= t`` of its document: (B, T, D) -> (B, T, D).

    The causal form of MrT5's ``gate.center`` (gates.py): a freshly trained residual stream is dominated by a
    component every byte shares, so an uncentred gate moves all bytes together and the deletion ratio jumps
    between 0 and 1. The row mean would leak later bytes into a byte's chunk decision; the running mean does
    not, and the cached path keeps it as a running sum."""
    hf = h.float()
    cs = hf.cumsum(1)  # (B, T, D)
    count = run_lengths(doc_starts(doc_ids, h))  # (B, T) positions of the document so far
    first = torch.arange(h.shape[1], device=h.device) - count + 1  # (B, T) start of the document
    before = torch.where(
        (first > 0).unsqueeze(-1),
        cs.gather(1, (first - 1).clamp(min=0).unsqueeze(-1).expand_as(cs)),
        torch.zeros_like(cs),
    )  # (B, T, D) sum of the earlier documents
    return (hf - (cs - before) / count.unsqueeze(-1).to(hf.dtype)).to(h.dtype)


def run_lengths(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) bool chunk starts (position 0 must be a start) -> (B, T) long 1-based offset inside the
    chunk."""
    T = starts.shape[1]
    pos = torch.arange(T, device=starts.device).expand_as(starts)
    last_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), 1).values
    return pos - last_start + 1


def _starts(closed: torch.Tensor, special: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    ws = special | doc_start
    ws[:, 1:] |= closed[:, :-1]
    ws[:, 0] = True
    return ws


def gate_closed(
    ids: torch.Tensor,  # (B, T) byte ids
    G: torch.Tensor,  # (B, T) gate values in (k, 0)
    tau_del: float,
    max_len: int | None,
    doc_ids: torch.Tensor | None = None,  # (B, T)
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(closed, word_start)``, both (B, T) bool: bytes that end a chunk (gate keep, special, size cap) and
    the chunk starts they imply (after each closed byte, at specials, at document starts)."""
    return close_chunks(ids, tau_del < G, max_len, doc_ids)


def close_chunks(
    ids: torch.Tensor,  # (B, T) byte ids
    ends: torch.Tensor,  # (B, T) bool: a learned or given chunk end at this byte
    max_len: int | None,
    doc_ids: torch.Tensor | None = None,  # (B, T)
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(closed, word_start)`` from chunk ends: ``ends``, specials and the size cap close a chunk (see
    ``gate_closed``, which calls this with the gate's decisions)."""
    special = ids >= 256
    closed = ends.bool() | special
    doc_start = doc_starts(doc_ids, ids)
    ws = _starts(closed, special, doc_start)
    # >=: a chunk of exactly max_len bytes closes at its last byte too (when a special, a document end or the
    # row's end would otherwise end it, that byte is not closed; the cached path closes it there)
    if max_len is not None and max_len > 0:
        closed = closed | (run_lengths(ws) % max_len == 0)  # the size cap (see _cap)
        ws = _starts(closed, special, doc_start)
    return closed, ws


def _cap(closed: torch.Tensor, special: torch.Tensor, doc_start: torch.Tensor, max_len: int) -> torch.Tensor:
    """The size cap as a scan over T (the rule, read sequentially): each byte whose chunk reaches ``max_len``
    bytes closes it, and the next chunk starts after it. ``close_chunks`` computes the same in one step: a cap
    only cuts the run between two other chunk starts into pieces of ``max_len``, so the capped bytes are those
    whose 1-based offset from the last other start is a multiple of ``max_len`` (no host sync, no loop:
    compiles). Kept as the reference the tests compare with."""
    closed = closed.clone()
    B, T = closed.shape
    length = torch.zeros(B, dtype=torch.long, device=closed.device)
    for t in range(T):
        start = special[:, t] | doc_start[:, t]  # doc_start[:, 0] is True
        if t > 0:
            start |= closed[:, t - 1] | special[:, t - 1]
        length = torch.where(start, 1, length + 1)
        closed[:, t] |= length >= max_len
    return closed


def keep_scale(G: torch.Tensor, k: float, gate_closed_bytes: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Straight-through factor for each chunk vector, (B, W, 1): value 1, gradient of the keep probability
    ``p = 1 - G / k`` of the chunk's closing byte when the gate closed it (1 with no gradient for chunks
    closed by a special, the size cap or a document end). This is how the task loss reaches the gate: a chunk
    vector the backbone finds useful raises the keep probability of the byte that produced it.

    G: (B, T); gate_closed_bytes: (B, T) bool, G > tau_del; end: (B, W) exclusive chunk ends (T for padding).
    """
    T = G.shape[1]
    last = (end - 1).clamp(0, T - 1)  # (B, W)
    p = 1.0 - G.gather(1, last) / k  # (B, W)
    st = p + (1.0 - p).detach()
    by_gate = gate_closed_bytes.gather(1, last) & (end <= T) & (end > 0)
    return torch.where(by_gate, st, torch.ones_like(st)).unsqueeze(-1)
