"""The ``vocab`` boundary decoder of a byteified model: the most likely segmentation of a row into source
vocabulary tokens under the boundary predictor (docs/byteify.md, "Segmenters").

The ``threshold`` decoder ends a patch wherever byte t's boundary logit exceeds ``boundary_threshold``, each
byte on its own. A patch so made need not be a token of the source; the fused head's exact prior then reads a
token the backbone never saw, at the cost of many bits (the prior gives such patches almost no mass). The
``vocab`` decoder instead maximises, over segmentations whose patches are all source tokens,

    sum over bytes t of  log sigmoid(+l_t) if t ends its patch else log sigmoid(-l_t),  minus  c x #patches

with ``l_t`` the boundary logits and ``c`` = ``boundary_patch_cost`` (nats per patch: > 0 prefers fewer,
longer patches, as BPE's merges do). Dynamic programming over the token lattice (``VocabTrie.token_lengths``):
O(T x longest token) per row. Rules: a special is a patch of its own; no patch spans two documents or exceeds
``max_word_bytes``; a single byte is always allowed (a vocabulary without byte fallback stays feasible); the
row's last patch may stop inside a token (the row cut it; its last bit is then "continues"). It is a
segmenter, so looking at the whole row is allowed: the fused head pays for every bit it chooses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bytelm.models.vocab_trie import VocabTrie


def vocab_segment_row(
    ids: Sequence[int],  # (T,) byte ids of one row (>= 256: specials, padding)
    logits: np.ndarray,  # (T,) boundary logits
    trie: VocabTrie,
    max_len: int,  # patch size cap (0: none)
    patch_cost: float,
    doc_ids: Sequence[int] | None = None,  # (T,) a patch never spans a change
) -> np.ndarray:  # (T,) bool patch ends
    """One row's best segmentation into vocabulary tokens (module docstring)."""
    n = len(ids)
    lt = np.asarray(logits, dtype=np.float64)
    log_end = -np.logaddexp(0.0, -lt)  # log sigmoid(l)
    log_cont = -np.logaddexp(0.0, lt)  # log sigmoid(-l)
    cum_cont = np.concatenate([[0.0], np.cumsum(log_cont)])
    limit = max_len if max_len and max_len > 0 else n
    best = np.full(n + 1, -np.inf)
    best[0] = 0.0
    back = np.zeros(n + 1, dtype=np.int64)
    open_last = np.zeros(n + 1, dtype=bool)  # the piece ending at n was left open (row end only)
    stops = np.empty(n, dtype=np.int64)  # pieces from i end before stops[i] (a special, a document change)
    stop = n
    for i in range(n - 1, -1, -1):
        nxt_breaks = i + 1 < n and (
            ids[i + 1] >= 256 or (doc_ids is not None and doc_ids[i + 1] != doc_ids[i])
        )
        if ids[i] >= 256 or nxt_breaks:
            stop = i + 1
        stops[i] = stop
    for i in range(n):
        if best[i] == -np.inf:
            continue
        if ids[i] >= 256:  # a special (or padding): a patch of its own, no bit scored
            if best[i] > best[i + 1]:
                best[i + 1], back[i + 1] = best[i], i
            continue
        room = min(limit, int(stops[i]) - i)
        lengths, reach = trie.token_lengths(ids, i, room)
        if 1 not in lengths:
            lengths = [1, *lengths]
        for k in lengths:
            j = i + k - 1  # the piece is ids[i..j]
            s = best[i] + (cum_cont[j] - cum_cont[i]) + log_end[j] - patch_cost
            if s > best[j + 1]:
                best[j + 1], back[j + 1], open_last[j + 1] = s, i, False
        if int(stops[i]) == n and n - i <= max(reach, 1) and n - i <= limit:  # row end inside a token
            s = best[i] + (cum_cont[n] - cum_cont[i]) - patch_cost
            if s > best[n]:
                best[n], back[n], open_last[n] = s, i, True
    ends = np.zeros(n, dtype=bool)
    j = n
    while j > 0:
        ends[j - 1] = not (j == n and open_last[n])
        j = int(back[j])
    return ends
