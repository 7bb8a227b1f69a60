"""Byte-trie over a subword vocabulary: the prefix masses behind a teacher's naive next-byte distribution and
a byteified model's exact (byte, ends-patch) prior, and the vocabulary look-ups of the byteified model.

Pure torch/numpy (no tokenizer import), so byteified models (``bytelm.models.byteified``) can carry a source
vocabulary and use it at inference: prefix masses from one sorted prefix sum per context (``byte_masses``,
``masses_from_cumsum``, ``fused_masses``), the open patch's trie node (``open_nodes``, ``open_step``) and the
longest token ending at each byte (``longest_suffix_tokens``: expanded ids, patch tokens).
``bytelm.distill.byteprobs.ByteTrie`` adds the teacher-side helpers. The formulas are in
``bytelm/distill/byteprobs.py`` (naive within-token marginal, docs/design.md#byte-level-teacher-distributions)
and ``bytelm/models/byte_prior.py`` (the exact prior, docs/design.md#byteification).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class VocabTrie:
    """Vocabulary byte-trie over sorted tokens, built once on CPU and moved to the device with ``to``.

    Inner nodes are the prefixes that some token extends (the root is node 0). Each inner node has one *edge*
    per distinct next byte; an edge covers the range ``[edge_lo, edge_hi)`` of the byte-sorted tokens that
    start with ``prefix + byte`` (including a token equal to it). Tensors: ``order`` (V',) token ids sorted by
    bytes; ``node_lo``/``node_hi`` (K,) range of each node's tokens; ``child_first``/``child_count`` (K,) its
    edges as consecutive edge ids; ``edge_byte``/``edge_lo``/``edge_hi`` (E,); ``edge_xhi`` (E,):
    ``[edge_lo, edge_xhi)`` are the tokens *equal* to ``prefix + byte`` (empty when none is); ``token_ptr``
    (V+1,) and ``token_nodes``: the node of prefix ``v[:d]`` (d < len(v)) is
    ``token_nodes[token_ptr[v] + d]``; ``token_len`` (V,).
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
        e_parent, e_byte, e_lo, e_hi, e_xhi = [], [], [], [], []
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
            # tokens equal to prefix + byte sort first in their edge (a prefix sorts before its extensions);
            # duplicates of that byte string follow it: [edge_lo, edge_xhi) is the exact token(s)
            is_exact = lens[m] == d + 1
            n_exact = (
                np.add.reduceat(is_exact.astype(np.int64), first) if len(first) else np.zeros(0, np.int64)
            )
            e_xhi.append(m[first] + n_exact)
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
        self._table = list(table)
        self._prefix_nodes: dict[bytes, int] | None = None
        self._child_map: dict[int, dict[int, int]] | None = None
        self._rtrie: dict[int, list] | None = None
        self._token_set: set[bytes] | None = None
        self.order = as_long(np.asarray(ids, dtype=np.int64))
        self.node_lo, self.node_hi = as_long(node_lo), as_long(node_hi)
        self.child_first = as_long(np.cumsum(counts) - counts)
        self.child_count = as_long(counts)
        self.edge_byte, self.edge_lo, self.edge_hi = as_long(e_byte), as_long(e_lo), as_long(e_hi)
        self.edge_xhi = as_long(e_xhi)
        self.token_len, self.token_ptr, self.token_nodes = (
            as_long(token_len),
            as_long(token_ptr),
            as_long(token_nodes),
        )

    def to(self, device: torch.device | str) -> VocabTrie:
        for k, v in list(self.__dict__.items()):
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))
        return self

    # --------------------------------------------------------------------------------------------- queries
    def byte_masses(
        self,
        next_logprobs: torch.Tensor,
        rows: torch.Tensor,
        nodes: torch.Tensor,
        dtype: torch.dtype = torch.float64,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised masses for M queries: ``M(q + b)`` (M, 256) and ``M(q)`` (M,), in ``dtype``.

        next_logprobs (R, V) next-token log-probs; rows (M,) the row each query uses; nodes (M,) trie node of
        the prefix ``q``.
        """
        used, row_of = torch.unique(rows, return_inverse=True)  # only rows that are queried
        p = next_logprobs.index_select(0, used).to(dtype).exp()  # (R', V)
        p = p.index_select(1, self.order)  # (R', V') in byte order
        cum = torch.nn.functional.pad(torch.cumsum(p, dim=1), (1, 0))  # (R', V'+1)
        return self.masses_from_cumsum(cum, row_of, nodes)

    def _query_edges(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every edge of every queried node, flattened: (E,) the query of each edge and (E,) its edge id."""
        counts = self.child_count[nodes]  # (M,)
        q = torch.repeat_interleave(torch.arange(nodes.shape[0], device=nodes.device), counts)  # (E,)
        base = torch.cumsum(counts, 0) - counts  # (M,) first edge slot of each query
        e = self.child_first[nodes][q] + (torch.arange(q.shape[0], device=nodes.device) - base[q])  # (E,)
        return q, e

    def masses_from_cumsum(
        self, cum: torch.Tensor, row_of: torch.Tensor, nodes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``byte_masses`` from prefix sums of probabilities already in byte order: cum (R, V'+1) with a
        leading zero column, row_of (M,) the row of each query, nodes (M,). Returns (M, 256) and (M,) in cum's
        dtype."""
        M = row_of.shape[0]
        dtype, rows = cum.dtype, row_of
        q, e = self._query_edges(nodes)
        r = row_of[q]
        mass = cum[r, self.edge_hi[e]] - cum[r, self.edge_lo[e]]  # (E,)
        out = torch.zeros(M, 256, dtype=dtype, device=rows.device)
        out.index_put_((q, self.edge_byte[e]), mass.clamp(min=0.0), accumulate=True)
        total = (cum[row_of, self.node_hi[nodes]] - cum[row_of, self.node_lo[nodes]]).clamp(min=0.0)  # (M,)
        return out, total

    def fused_masses(
        self, cum: torch.Tensor, row_of: torch.Tensor, nodes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For M open prefixes ``s`` (trie ``nodes``) and next bytes ``c``: ``p(s + c)`` (the mass of the
        token that *is* ``s + c``: the patch ends with ``c``), ``M(s + c) - p(s + c)`` (tokens that go on
        after ``s + c``: the patch continues) and their total over ``c``, ``M'(s) = M(s) - p(s)``.

        cum (R, V'+1) prefix sums of probabilities in byte order (leading zero column); row_of (M,) the row of
        each query. Returns end (M, 256), cont (M, 256) and total (M,) in cum's dtype."""
        M = row_of.shape[0]
        dev = row_of.device
        q, e = self._query_edges(nodes)
        r = row_of[q]
        lo = cum[r, self.edge_lo[e]]
        exact = (cum[r, self.edge_xhi[e]] - lo).clamp(min=0.0)  # (E,)
        mass = (cum[r, self.edge_hi[e]] - lo).clamp(min=0.0)
        end = torch.zeros(M, 256, dtype=cum.dtype, device=dev)
        cont = torch.zeros(M, 256, dtype=cum.dtype, device=dev)
        end.index_put_((q, self.edge_byte[e]), exact, accumulate=True)
        cont.index_put_((q, self.edge_byte[e]), (mass - exact).clamp(min=0.0), accumulate=True)
        total = torch.zeros(M, dtype=cum.dtype, device=dev).index_add_(0, q, mass)
        return end, cont, total

    def byte_logprobs(
        self,
        next_logprobs: torch.Tensor,
        rows: torch.Tensor,
        nodes: torch.Tensor,
        renormalize: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """Naive within-token next-byte log-probs for M queries.

        next_logprobs (R, V) teacher next-token log-probs; rows (M,) which row each query uses; nodes (M,)
        trie node of the prefix emitted inside the token. Returns (M, 256) fp32 log-probs (-inf for impossible
        bytes).
        """
        out, total = self.byte_masses(next_logprobs, rows, nodes, dtype)
        denom = out.sum(-1, keepdim=True) if renormalize else total[:, None]
        return (out.log() - denom.log()).float()  # (M, 256)

    def node_of(self, prefix: bytes) -> int | None:
        """Trie node of a byte string that some token strictly extends, else None (CPU dict, built lazily)."""
        if self._prefix_nodes is None:
            ptr, nodes = self.token_ptr.tolist(), self.token_nodes.tolist()
            self._prefix_nodes = {
                tb[:d]: nodes[ptr[v] + d] for v, tb in enumerate(self._table) if tb for d in range(len(tb))
            }
        return self._prefix_nodes.get(prefix)

    # ----------------------------------------------------------------------------- byte-by-byte walking (CPU)
    def _children(self) -> dict[int, dict[int, int]]:
        """``children[node][byte]``: the inner node of ``prefix + byte`` (absent when no token extends it)."""
        if self._child_map is None:
            ptr, nodes = self.token_ptr.tolist(), self.token_nodes.tolist()
            kids: dict[int, dict[int, int]] = {}
            for v, tb in enumerate(self._table):
                if not tb:
                    continue
                base = ptr[v]
                for d in range(len(tb) - 1):  # node(v[:d]) --v[d]--> node(v[:d+1]), an inner node
                    kids.setdefault(nodes[base + d], {})[tb[d]] = nodes[base + d + 1]
            self._child_map = kids
        return self._child_map

    def open_nodes(self, ids: Sequence[int], closed: Sequence[bool]) -> list[int]:
        """For each position ``t`` of one row: the trie node of the *open patch's bytes after byte t* (what
        the prediction at ``t`` continues): the root (0) after a byte that closes its patch or a special, else
        the node of the bytes since the patch began. Where no token strictly extends those bytes the walk
        restarts at the current byte, as if a token began there (the prior then reads that pseudo-token), and
        at the root if no token extends that byte either. Uses bytes and patch ends up to ``t`` only."""
        out: list[int] = []
        cur = 0
        for t, tok in enumerate(ids):
            cur = 0 if tok >= 256 or closed[t] else self.open_step(cur, tok)
            out.append(cur)
        return out

    def open_step(self, node: int, byte: int) -> int:
        """One step of ``open_nodes``'s walk: the node of the open bytes ``node`` + ``byte`` (restarting at
        ``byte``, then at the root, where no token extends them). The cached decoder walks with it too."""
        kids = self._children()
        nxt = kids.get(node, {}).get(byte)
        return nxt if nxt is not None else kids.get(0, {}).get(byte, 0)

    def token_lengths(self, ids: Sequence[int], i: int, limit: int) -> tuple[list[int], int]:
        """Walking ``ids`` from ``i`` (at most ``limit`` bytes, stopping at a special): the lengths ``k`` for
        which ``ids[i:i+k]`` is a vocabulary token, and the largest ``k`` for which it is a token or a prefix
        of one (0 if not even ``ids[i]`` is). The lattice of ``bytelm.models.vocab_segment``."""
        if self._token_set is None:
            self._token_set = {tb for tb in self._table if tb}
        kids, tokens = self._children(), self._token_set
        found: list[int] = []
        node, reach = 0, 0
        for j in range(i, min(len(ids), i + limit)):
            b = ids[j]
            if b >= 256:
                break
            k = j - i + 1
            if bytes(ids[i : j + 1]) in tokens:
                found.append(k)
                reach = k
            nxt = kids.get(node, {}).get(b)
            if nxt is None:  # no token strictly extends ids[i:j+1]
                break
            node, reach = nxt, k
        return found, reach

    def _suffix_trie(self) -> dict[int, list]:
        """Reversed-token trie: ``node[byte] = [children, token id or -1]``, walked from a byte backwards."""
        if self._rtrie is None:
            root: dict[int, list] = {}
            for v, tb in enumerate(self._table):
                if not tb:
                    continue
                node, entry = root, None
                for b in reversed(tb):
                    entry = node.setdefault(b, [{}, -1])
                    node = entry[0]
                assert entry is not None
                if entry[1] < 0:  # one id per byte string (the first wins; duplicates are rare)
                    entry[1] = v
            self._rtrie = root
        return self._rtrie

    def longest_suffix_tokens(self, ids: Sequence[int], starts: Sequence[bool] | None = None) -> list[int]:
        """For each byte ``t`` of one row: the id of the longest vocabulary token whose bytes end at ``t`` and
        lie inside ``t``'s segment (a segment begins at ``starts[j]`` and after a special), -1 for specials
        and where no token matches (Bolmo's / tokenkit's "expanded" input ids). Causal: uses bytes <= t
        only."""
        root = self._suffix_trie()
        n = len(ids)
        seg_start = [0] * n
        s = 0
        for t in range(n):
            if (starts is not None and starts[t]) or (t > 0 and ids[t - 1] >= 256):
                s = t
            seg_start[t] = s
        out = [-1] * n
        for t in range(n):
            if ids[t] >= 256:
                continue
            node, best, j = root, -1, t
            while j >= seg_start[t]:
                b = ids[j]
                if b >= 256 or b not in node:
                    break
                entry = node[b]
                if entry[1] >= 0:
                    best = entry[1]
                node = entry[0]
                j -= 1
            out[t] = best
        return out
