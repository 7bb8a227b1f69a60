"""Next-byte distributions implied by a subword teacher, and the byte-level KL against a byte student.

``byte_kl_naive`` (DESIGN.md §5) uses the *naive within-token marginal*. At byte ``j`` inside teacher token
``t_i`` (which starts at byte ``s``), with the teacher's next-token distribution ``p`` for position ``i`` and the
prefix ``q = bytes[s:j]`` already emitted inside the token:

    P(b) = M(q + b) / sum_b' M(q + b'),      M(x) = sum of p(v) over tokens v whose bytes start with x.

DESIGN.md writes the denominator as ``M(q)``; ``M(q)`` also counts tokens *equal to* ``q`` (the token ends
here), an event the naive marginal never scores, so with ``M(q)`` the 256 probabilities sum to ``1 - P(end)``.
We renormalise over the 256 bytes by default (``renormalize=True``) so that the target is a distribution, i.e. we
condition on "the token goes on", which is true at every position we score. ``renormalize=False`` gives the
literal ``M(q + b) / M(q)``. The estimate is biased either way: it ignores other segmentations of the prefix
and it treats the current token as known to continue.

Structure. Tokens (special tokens excluded; byte-level BPE ``Ġ`` pieces and ``<0xNN>`` byte-fallback tokens
decoded to bytes) are sorted by their bytes, so every prefix's tokens are one contiguous range ``[lo, hi)``.
Trie nodes (all proper prefixes of tokens) keep that range; the children of a node are consecutive node ids.
On the device: sort each used probability row by that order, take prefix sums (fp64 by default: masses of
deep prefixes are small differences of numbers near 1), and read ``M`` of each child as ``cum[hi] - cum[lo]``;
a scatter writes the children's masses into a (M, 256) table. No Python loop runs per byte.

Exact alternative (Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models"; not
implemented here). It computes ``P(next byte = b | bytes)`` with the *cover* set of the prefix: all token
sequences whose last token straddles the end of the prefix (their bytes start with the prefix and overrun it)
and whose tokens before it are the canonical tokenization of the rest. Then
``P(b | x) = sum_{c in cover(x)} p(c) * [c's bytes continue with b] + p(canon(x)) * M_next(b)`` normalised by the
same sum over all b, where ``M_next(b)`` is the next-token mass of tokens starting with b after the canonical
tokenization of the whole prefix. Each cover needs a teacher forward on a different token prefix, about one
forward per byte, so it is an evaluation tool, not a training loss; its reference code is SentencePiece-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bytelm.distill.teacher import TeacherOutput


class ByteTrie:
    """Vocabulary byte-trie over sorted tokens, built once on CPU and moved to the device with ``to``.

    Inner nodes are the prefixes that some token extends (the root is node 0). Each inner node has one *edge*
    per distinct next byte; an edge covers the range ``[edge_lo, edge_hi)`` of the byte-sorted tokens that start
    with ``prefix + byte`` (including a token equal to it). Tensors: ``order`` (V',) token ids sorted by bytes;
    ``node_lo``/``node_hi`` (K,) range of each node's tokens; ``child_first``/``child_count`` (K,) its edges as
    consecutive edge ids; ``edge_byte``/``edge_lo``/``edge_hi`` (E,); ``token_ptr`` (V+1,) and ``token_nodes``:
    the node of prefix ``v[:d]`` (d < len(v)) is ``token_nodes[token_ptr[v] + d]``; ``token_len`` (V,).
    """

    def __init__(self, table: Sequence[bytes | None]) -> None:
        V = len(table)
        ids = [i for i, tb in enumerate(table) if tb]  # specials (None) and empty tokens are excluded
        ids.sort(key=lambda i: table[i] or b"")
        toks = [table[i] or b"" for i in ids]
        n = len(ids)
        lens = np.array([len(t) for t in toks], dtype=np.int64)
        maxlen = int(lens.max()) if n else 0
        padded = np.full((n, maxlen), -1, dtype=np.int64)
        for k, t in enumerate(toks):
            padded[k, : len(t)] = np.frombuffer(t, dtype=np.uint8)
        node_at = np.full((n, maxlen), -1, dtype=np.int64)  # node_at[k, d]: node of toks[k][:d], d < len
        node_at[:, 0] = 0
        node_lo, node_hi = [np.array([0])], [np.array([n])]
        e_parent, e_byte, e_lo, e_hi = [], [], [], []
        next_id = 1
        for d in range(maxlen):
            m = np.nonzero(lens > d)[0]  # sorted positions of tokens with a byte at index d
            parent, nxt = node_at[m, d], padded[m, d]
            change = np.ones(len(m), dtype=bool)  # an edge starts where (parent, next byte) changes
            change[1:] = (parent[1:] != parent[:-1]) | (nxt[1:] != nxt[:-1])
            first = np.nonzero(change)[0]
            last = np.append(first[1:], len(m)) - 1
            e_parent.append(parent[first])
            e_byte.append(nxt[first])
            e_lo.append(m[first])
            e_hi.append(m[last] + 1)
            edge_of = np.cumsum(change) - 1  # (len(m),) edge of each member
            goes_on = lens[m] > d + 1
            inner = np.zeros(len(first), dtype=bool)
            inner[edge_of[goes_on]] = True  # the edge's prefix is extended: it becomes an inner node
            new_id = np.full(len(first), -1, dtype=np.int64)
            new_id[inner] = next_id + np.arange(int(inner.sum()))
            next_id += int(inner.sum())
            node_lo.append(m[first][inner])
            node_hi.append(m[last][inner] + 1)
            if d + 1 < maxlen:
                node_at[m[goes_on], d + 1] = new_id[edge_of[goes_on]]
        parent_all = np.concatenate(e_parent) if e_parent else np.zeros(0, dtype=np.int64)
        # edges come depth by depth and, within a depth, in sorted order: grouped by increasing parent id
        counts = np.bincount(parent_all, minlength=next_id)
        token_len = np.array([len(tb) if tb else 0 for tb in table], dtype=np.int64)
        token_ptr = np.zeros(V + 1, dtype=np.int64)
        token_ptr[1:] = np.cumsum(token_len)
        token_nodes = np.zeros(int(token_ptr[-1]), dtype=np.int64)
        for k, i in enumerate(ids):
            token_nodes[token_ptr[i] : token_ptr[i] + lens[k]] = node_at[k, : lens[k]]

        def as_long(x: list[np.ndarray] | np.ndarray) -> torch.Tensor:
            arr = (np.concatenate(x) if x else np.zeros(0)) if isinstance(x, list) else x
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))

        self.vocab_size = V
        self.order = as_long(np.asarray(ids, dtype=np.int64))
        self.node_lo, self.node_hi = as_long(node_lo), as_long(node_hi)
        self.child_first = as_long(np.cumsum(counts) - counts)
        self.child_count = as_long(counts)
        self.edge_byte, self.edge_lo, self.edge_hi = as_long(e_byte), as_long(e_lo), as_long(e_hi)
        self.token_len, self.token_ptr, self.token_nodes = (
            as_long(token_len),
            as_long(token_ptr),
            as_long(token_nodes),
        )

    @classmethod
    def from_tokenizer(cls, tokenizer: object, vocab_size: int | None = None) -> ByteTrie:
        """Build from a Hugging Face tokenizer (see ``teacher.token_bytes_table`` for the byte decoding)."""
        from bytelm.distill.teacher import token_bytes_table

        return cls(token_bytes_table(tokenizer, vocab_size))

    def to(self, device: torch.device | str) -> ByteTrie:
        for k, v in list(self.__dict__.items()):
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))
        return self

    # --------------------------------------------------------------------------------------------- queries
    def byte_logprobs(
        self,
        next_logprobs: torch.Tensor,
        rows: torch.Tensor,
        nodes: torch.Tensor,
        renormalize: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """Naive within-token next-byte log-probs for M queries.

        next_logprobs (R, V) teacher next-token log-probs; rows (M,) which row each query uses; nodes (M,) trie
        node of the prefix emitted inside the token. Returns (M, 256) fp32 log-probs (-inf for impossible bytes).
        """
        M = rows.shape[0]
        used, row_of = torch.unique(rows, return_inverse=True)  # only rows that are queried
        p = next_logprobs.index_select(0, used).to(dtype).exp()  # (R', V)
        p = p.index_select(1, self.order)  # (R', V') in byte order
        cum = torch.nn.functional.pad(torch.cumsum(p, dim=1), (1, 0))  # (R', V'+1)
        counts = self.child_count[nodes]  # (M,)
        q = torch.repeat_interleave(torch.arange(M, device=rows.device), counts)  # (E,) query of each edge
        base = torch.cumsum(counts, 0) - counts  # (M,) first edge slot of each query
        e = self.child_first[nodes][q] + (torch.arange(q.shape[0], device=rows.device) - base[q])  # (E,)
        r = row_of[q]
        mass = cum[r, self.edge_hi[e]] - cum[r, self.edge_lo[e]]  # (E,)
        out = torch.zeros(M, 256, dtype=dtype, device=rows.device)
        out.index_put_((q, self.edge_byte[e]), mass.clamp(min=0.0), accumulate=True)
        if renormalize:
            denom = out.sum(-1, keepdim=True)
        else:
            denom = (cum[row_of, self.node_hi[nodes]] - cum[row_of, self.node_lo[nodes]])[:, None]
        return (out.log() - denom.log()).float()  # (M, 256)

    def teacher_byte_logprobs(
        self, teacher: TeacherOutput, n_student_bytes: int | None = None, renormalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-byte teacher distributions for a batch: (B, N, 256) log-probs and a (B, N) mask.

        Byte j uses the teacher token i that contains it (row i-1 of ``next_logprobs``, so the forward must have
        been run with ``next_logprobs=True``). Bytes in inexact tokens (invalid UTF-8), in the first token
        without a prediction, or past the tokenized text are masked.
        """
        if teacher.next_logprobs is None:
            raise ValueError("run the teacher with next_logprobs=True for byte distributions")
        enc = teacher.encoding
        B, L, V = teacher.next_logprobs.shape
        N = int(n_student_bytes if n_student_bytes is not None else int(enc.n_bytes.max()))
        dev = teacher.next_logprobs.device
        spans = enc.spans.to(dev)
        ends = spans[..., 1].contiguous()  # (B, L) non-decreasing over positions
        j = torch.arange(N, device=dev).expand(B, N).contiguous()  # (B, N)
        pos = torch.searchsorted(ends, j, right=True)  # (B, N) first token ending after byte j
        inside = pos < L
        pos_c = pos.clamp(max=L - 1)
        tok = enc.input_ids.to(dev).gather(1, pos_c)  # (B, N)
        tok_end = ends.gather(1, pos_c)
        tok_len = self.token_len[tok.clamp(max=self.vocab_size - 1)]
        depth = tok_len - (tok_end - j)  # handles a dummy-prefix space (token one byte longer than its span)
        mask = (
            inside
            & (pos_c >= 1)
            & enc.exact_mask.to(dev).gather(1, pos_c)
            & (j < enc.n_bytes.to(dev)[:, None])
            & (depth >= 0)
            & (depth < tok_len)
        )
        flat = mask.nonzero(as_tuple=True)
        nodes = self.token_nodes[self.token_ptr[tok[flat]] + depth[flat]]
        rows = flat[0] * L + (pos_c[flat] - 1)  # row i-1 predicts token i
        lp = self.byte_logprobs(teacher.next_logprobs.reshape(B * L, V), rows, nodes, renormalize)
        out = torch.zeros(B, N, 256, device=dev)
        out[flat] = lp
        return out, mask


def byte_kl(
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    student_logits: torch.Tensor,
    num_valid: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """KL(teacher bytes || student bytes) averaged over masked positions.

    teacher_logp (B, N, 256), mask (B, N); student_logits (B, T >= N, V) whose row j predicts byte j. The
    student side is ``log_softmax`` over the 256 byte columns only (the teacher's naive marginal has no EOS), so
    both are distributions over the same 256 events. ``num_valid``: global count of positions (default local).
    """
    N = teacher_logp.shape[1]
    s = torch.log_softmax(student_logits[:, :N, :256].float(), dim=-1)  # (B, N, 256)
    t = teacher_logp.float()
    pt = t.exp()
    kl = torch.where(pt > 0, pt * (t - s), torch.zeros_like(s)).sum(-1)  # (B, N)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    denom = mask.sum().clamp(min=1) if num_valid is None else num_valid
    return kl.sum() / denom


def byte_kl_naive(
    teacher: TeacherOutput,
    trie: ByteTrie,
    student_logits: torch.Tensor,
    renormalize: bool = True,
    num_valid: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Byte-level KL against the teacher's naive within-token marginal (fast, approximate; module docstring).

    teacher: ``Teacher.forward(..., next_logprobs=True)``; trie on the same device; student_logits (B, T, V)
    with row j predicting byte j of each text (T >= the longest text). Returns a scalar.
    """
    N = min(student_logits.shape[1], int(teacher.encoding.n_bytes.max()))
    t_lp, mask = trie.teacher_byte_logprobs(teacher, N, renormalize)
    return byte_kl(t_lp, mask, student_logits, num_valid)
