"""Chunk alignment between teacher tokens and student units (docs/design.md#alm).

Teacher tokens and student units (bytes, or words for a word-level student) tile the same bytes differently.
ALM compares likelihoods of *chunks*: spans whose both ends are boundaries of both tilings. tokenkit's
``unconstrained`` chunks are the smallest such spans: walk both sequences and cut wherever the cumulative byte
lengths agree. With byte-based spans that is simply: the chunk ends are the byte offsets that are both a
teacher token end and a student unit end.

The index construction (``align_chunks``) runs on CPU per example, where the spans come from; everything after
it is index tensors, so chunk log-likelihoods are ``scatter_add`` on the device (``chunk_sum``). The debiased
variant (``merge_chunks_by_space_prob``) needs teacher probabilities and therefore also runs on the device.

Conventions: byte ``j`` is position ``j`` of the original bytes; a unit/token "end" is an exclusive byte
offset; chunk ``k`` of an example covers bytes ``[chunk_start[k], chunk_end[k])``; index ``-1`` means "in no
chunk".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class ChunkAlignment:
    """Index tensors of one batch's chunks; ``C`` = the largest chunk count in the batch.

    token_chunk (B, L): chunk of each teacher position (-1: special/pad/outside every chunk).
    byte_chunk (B, N): chunk of each byte (-1: outside every chunk, e.g. past the last common boundary).
    unit_chunk (B, W) or None: chunk of each student unit when units are words.
    chunk_start, chunk_end (B, C): byte span of each chunk (0 for padding chunks).
    chunk_last_token (B, C): teacher position of the chunk's last token (its row predicts what follows the
    chunk: used for the debiasing term), 0 for padding chunks.
    chunk_valid (B, C): the chunk exists and all its teacher tokens are usable (exact bytes, predicted).
    """

    token_chunk: torch.Tensor  # (B, L)
    byte_chunk: torch.Tensor  # (B, N)
    chunk_start: torch.Tensor  # (B, C)
    chunk_end: torch.Tensor  # (B, C)
    chunk_last_token: torch.Tensor  # (B, C)
    chunk_valid: torch.Tensor  # (B, C)
    unit_chunk: torch.Tensor | None = None  # (B, W)

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_valid.shape[1])

    def to(self, device: torch.device | str) -> ChunkAlignment:
        moved = {k: v.to(device) for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}
        return replace(self, **moved)


def _as_ends(units: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    arr = units.cpu().numpy() if isinstance(units, torch.Tensor) else np.asarray(units, dtype=np.int64)
    return arr[arr > 0].astype(np.int64)


def align_chunks(
    spans: torch.Tensor,
    token_mask: torch.Tensor,
    token_ok: torch.Tensor,
    n_bytes: torch.Tensor | Sequence[int],
    unit_ends: Sequence[Sequence[int] | np.ndarray | torch.Tensor] | torch.Tensor | None = None,
    n_student_bytes: int | None = None,
) -> ChunkAlignment:
    """Unconstrained (smallest common-boundary) chunks for a batch.

    spans (B, L, 2): teacher byte spans; token_mask (B, L): text tokens (specials/pad False; they get no
    chunk); token_ok (B, L): tokens whose log-prob may be used (a chunk with any text token not ok is
    invalid); n_bytes (B,): bytes the student sees per example (its units never go past it);
    unit_ends: per example the exclusive end offsets of student units (words), strictly increasing, padded
    with values <= 0 if given as a tensor; ``None`` means a byte student (every byte is a unit).
    n_student_bytes: width N of ``byte_chunk`` (default: max n_bytes).
    """
    spans_np = spans.cpu().numpy()
    tmask = token_mask.cpu().numpy().astype(bool)
    tok_ok = token_ok.cpu().numpy().astype(bool)
    nb = np.asarray(n_bytes.cpu() if isinstance(n_bytes, torch.Tensor) else n_bytes, dtype=np.int64)
    B, L = tmask.shape
    N = int(n_student_bytes if n_student_bytes is not None else (nb.max() if B else 0))
    per_ex = []
    for b in range(B):
        n = int(nb[b])
        ends = spans_np[b, :, 1]
        is_t = np.zeros(n + 1, dtype=bool)  # is_t[e]: a teacher text token ends at byte offset e
        t_ends = ends[tmask[b] & (spans_np[b, :, 1] > spans_np[b, :, 0])]
        is_t[t_ends[t_ends <= n]] = True
        if unit_ends is None:
            is_u = np.ones(n + 1, dtype=bool)
        else:
            u = _as_ends(unit_ends[b])
            is_u = np.zeros(n + 1, dtype=bool)
            is_u[u[u <= n]] = True
        is_u[0] = is_t[0] = False
        cuts = np.nonzero(is_t & is_u)[0]  # (C_b,) chunk ends, increasing
        starts = np.concatenate([[0], cuts[:-1]]) if len(cuts) else cuts
        # token -> chunk: the first cut at or after its end; tokens past the last cut get none
        tc = np.searchsorted(cuts, ends, side="left")
        tc = np.where(tmask[b] & (tc < len(cuts)), tc, -1)
        # a chunk is invalid if any text token in it cannot be used
        bad = np.zeros(len(cuts) + 1, dtype=bool)
        np.logical_or.at(bad, np.where(tc >= 0, tc, len(cuts)), ~tok_ok[b] & (tc >= 0))
        last_tok = np.zeros(len(cuts), dtype=np.int64)
        has_tok = np.zeros(len(cuts), dtype=bool)
        pos = np.nonzero(tc >= 0)[0]
        last_tok[tc[pos]] = pos  # positions increase, so the last write per chunk is its last token
        has_tok[tc[pos]] = True
        valid = has_tok & ~bad[: len(cuts)]
        bc = np.searchsorted(cuts, np.arange(N) + 1, side="left")
        bc = np.where((bc < len(cuts)) & (np.arange(N) < n), bc, -1)
        uc = None
        if unit_ends is not None:
            u = _as_ends(unit_ends[b])
            uc = np.searchsorted(cuts, u, side="left")
            uc = np.where(uc < len(cuts), uc, -1)
        per_ex.append((tc, bc, starts, cuts, last_tok, valid, uc))
    C = max([len(p[3]) for p in per_ex] + [1])
    token_chunk = torch.full((B, L), -1, dtype=torch.long)
    byte_chunk = torch.full((B, N), -1, dtype=torch.long)
    chunk_start = torch.zeros(B, C, dtype=torch.long)
    chunk_end = torch.zeros(B, C, dtype=torch.long)
    chunk_last = torch.zeros(B, C, dtype=torch.long)
    chunk_valid = torch.zeros(B, C, dtype=torch.bool)
    W = max([len(p[6]) for p in per_ex if p[6] is not None] + [0])
    unit_chunk = torch.full((B, W), -1, dtype=torch.long) if unit_ends is not None else None
    for b, (tc, bc, starts, cuts, last_tok, valid, uc) in enumerate(per_ex):
        c = len(cuts)
        token_chunk[b] = torch.from_numpy(tc)
        byte_chunk[b] = torch.from_numpy(bc)
        chunk_start[b, :c] = torch.from_numpy(starts)
        chunk_end[b, :c] = torch.from_numpy(cuts)
        chunk_last[b, :c] = torch.from_numpy(last_tok)
        chunk_valid[b, :c] = torch.from_numpy(valid)
        if unit_chunk is not None and uc is not None:
            unit_chunk[b, : len(uc)] = torch.from_numpy(uc)
    return ChunkAlignment(
        token_chunk, byte_chunk, chunk_start, chunk_end, chunk_last, chunk_valid, unit_chunk
    )


def chunk_sum(values: torch.Tensor, index: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Per-chunk sums ``out[b, k] = sum of values[b, x] with index[b, x] == k`` (index -1 is dropped).

    values (B, X) float, index (B, X) long -> (B, C). Differentiable wrt ``values`` (scatter_add).
    """
    B = values.shape[0]
    idx = torch.where(index >= 0, index, num_chunks)  # (B, X): -1 -> a dump column
    out = values.new_zeros(B, num_chunks + 1)
    out = out.scatter_add(1, idx, values)
    return out[:, :num_chunks]  # (B, C)


@dataclass
class MergedChunks:
    """Chunks after ``merge_by_space_prob``: group g of example b collects consecutive chunks until one whose
    teacher P(next token starts a word) exceeds the threshold. ``group`` (B, C) maps old chunk -> group (-1
    for padding chunks), ``last`` (B, G) is the last old chunk of each group, ``valid`` (B, G) all members
    valid."""

    group: torch.Tensor  # (B, C)
    last: torch.Tensor  # (B, G)
    valid: torch.Tensor  # (B, G)


def merge_chunks_by_space_prob(
    t_space_logp: torch.Tensor, chunk_exists: torch.Tensor, chunk_valid: torch.Tensor, threshold: float = 0.1
) -> MergedChunks:
    """tokenkit's ``merge_by_space_prob``: a merged chunk ends at the first chunk whose teacher probability
    that the next unit starts a new word (space/newline/tab/special) is above ``threshold``; a tail that never
    gets there stays one group. t_space_logp, chunk_exists, chunk_valid: (B, C). Runs on the device, no sync.
    """
    B, C = t_space_logp.shape
    ends_group = (t_space_logp.exp() > threshold) & chunk_exists  # (B, C)
    before = torch.cumsum(ends_group.long(), dim=1) - ends_group.long()  # groups closed strictly before k
    group = torch.where(chunk_exists, before, torch.full_like(before, -1))  # (B, C)
    G = C
    dump = torch.where(group >= 0, group, G)
    k = torch.arange(C, device=group.device).expand(B, C)
    last = torch.full((B, G + 1), -1, dtype=torch.long, device=group.device)
    last = last.scatter_reduce(1, dump, k, reduce="amax", include_self=True)[:, :G]  # (B, G)
    n_bad = torch.zeros(B, G + 1, dtype=torch.long, device=group.device)
    n_bad = n_bad.scatter_add(1, dump, (chunk_exists & ~chunk_valid).long())[:, :G]
    valid = (last >= 0) & (n_bad == 0)
    return MergedChunks(group=group, last=last.clamp(min=0), valid=valid)


def last_token_in_units(
    spans: torch.Tensor,
    token_mask: torch.Tensor,
    unit_ends: torch.Tensor,
    unit_mask: torch.Tensor,
    exact_end: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each student unit (word), the teacher position of the last text token that ends inside it.

    spans (B, L, 2), token_mask (B, L); unit_ends (B, W) exclusive ends of contiguous units (unit w covers
    ``[unit_ends[w-1], unit_ends[w])``, the first starts at 0), unit_mask (B, W). Returns index (B, W) long
    and mask (B, W) bool (False where no token ends inside the unit). ``exact_end`` also requires that the
    token ends exactly at the unit end (same boundary in both tilings).
    """
    ends = torch.where(token_mask & (spans[..., 1] > spans[..., 0]), spans[..., 1], -1)  # (B, L)
    # teacher ends are non-decreasing over text positions; count tokens ending at or before each unit end
    ends_sorted = torch.where(ends >= 0, ends, torch.iinfo(torch.long).max)  # (B, L)
    ends_sorted, order = torch.sort(ends_sorted, dim=1, stable=True)  # (B, L)
    n_le = torch.searchsorted(ends_sorted, unit_ends.contiguous(), right=True)  # (B, W)
    starts = torch.cat([torch.zeros_like(unit_ends[:, :1]), unit_ends[:, :-1]], dim=1)  # (B, W)
    has = n_le > 0
    pos_sorted = (n_le - 1).clamp(min=0)  # (B, W)
    idx = order.gather(1, pos_sorted)  # (B, W) teacher position
    end_of_idx = ends_sorted.gather(1, pos_sorted)  # (B, W)
    ok = unit_mask & has & (end_of_idx > starts)
    if exact_end:
        ok = ok & (end_of_idx == unit_ends)
    return torch.where(ok, idx, torch.zeros_like(idx)), ok
