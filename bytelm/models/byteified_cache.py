"""KV-cached decoding of the byteified model (``bytelm.models.byteified``): (byte, bit) pairs in, fused logits
out.

The cache holds the three stacks' KV caches and the open patch. Each byte arrives with its boundary bit:

- given (``patch_end=``): a prompt segmented by a segmenter, or a symbol the generator sampled;
- not given: a chunk of several bytes is a *prompt*: the model's segmenter (boundary predictor or HAT words)
  sets the bits of all but its last byte, and the last byte's bit is the one the fused head prefers after the
  previous byte (Bolmo's rollback: the head, not the segmenter's lookahead, decides where the prompt's last
  patch ends); a single byte takes the head's preferred bit (how ``transformers``' generation loop feeds the
  sampled byte);
- not given, ``causal=True`` (the ``causal_bits`` of ``ByteifiedLM.forward``): every byte takes the head's
  preferred bit, no segmenter at all, so the byte marginals are an honest causal byte distribution.

A byte whose bit is set closes its patch at once: pooled and run through the backbone, and that output is the
context of the byte itself (no delay); the patches that close within one call share one backbone forward. A
special closes the open patch and then a patch of its own; the size cap closes a patch at ``max_word_bytes``.
The rules are those of the full forward, which the cached logits equal given the same bits
(tests/byteify/test_byteify_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bytelm.models.byte_prior import fused_from_cumsum, prior_cumsum
from bytelm.models.config import ModelOutput
from bytelm.models.layers import KVCache


@dataclass
class ByteifiedCache:
    """Incremental decoding state (batch 1, one document)."""

    enc: list[KVCache]
    backbone: list[KVCache]
    dec: list[KVCache]
    ids: list[int] = field(default_factory=list)
    bits: list[bool] = field(default_factory=list)  # the patch-end bit of every byte fed (rules applied)
    patch_start: int = 0  # first byte of the open patch
    plen: int = 0  # bytes in the open patch
    last_h: torch.Tensor | None = None  # (d,) encoder state of the open patch's latest byte
    n_words: int = 0  # backbone positions used (sink included)
    ctx: torch.Tensor | None = None  # (1, D) backbone output of the latest closed patch
    ctx_cum: torch.Tensor | None = (
        None  # (1, V'+1) its head's prefix sums (prior_cumsum): one matmul per patch
    )
    ctx_inj: list[torch.Tensor] | None = None  # its decoder injections (ctx_proj), (1, d) per decoder layer
    node: int = 0  # trie node of the open patch's bytes (VocabTrie.open_nodes)
    seg_start: int = 0  # start of the current segment (after the latest special), for expanded ids
    last_logits: torch.Tensor | None = None  # (2V,) fused logits of the latest position
    # a prompt's last patch, run through the backbone ahead of its bit (``_forward_cached``): its output
    # (1, D), prefix sums (1, V'+1) or None, decoder injections; the backbone cache holds its position
    ahead: tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]] | None = None

    @property
    def length(self) -> int:
        return len(self.ids)


class ByteifiedDecoding:
    """Cached decoding for ``ByteifiedLM`` (mixed in; uses its encoder, pooling, backbone, decoder and
    prior)."""

    cfg: Any

    def new_cache(self) -> ByteifiedCache:
        m: Any = self
        return ByteifiedCache(
            enc=[KVCache() for _ in m.encoder],
            backbone=[KVCache() for _ in m.backbone],
            dec=[KVCache() for _ in m.decoder],
        )

    def preferred_bit(self, logits: torch.Tensor | None, byte: int) -> bool:
        """The bit the fused head prefers for ``byte`` after the position that gave ``logits`` (2V,)."""
        if logits is None:
            return False
        V = logits.shape[-1] // 2
        return bool(logits[V + byte] > logits[byte])

    @torch.no_grad()
    def prompt_bits(self, ids: list[int]) -> list[bool]:
        """Patch-end bits of a prompt before generation: the segmenter's for all but the last byte, the fused
        head's preferred bit for the last one (what ``forward(prompt, cache=...)`` without bits applies)."""
        m: Any = self
        dev = m.embed.weight.device
        x = torch.tensor([ids], device=dev)
        seg = m.segment(x)[0]  # (1, n)
        bits = [bool(b) for b in seg[0].tolist()]
        if len(ids) >= 2:
            out = m(x[:, :-1], patch_end=seg[:, :-1])  # the last logits read bits <= n-2 only
            bits[-1] = self.preferred_bit(out.logits[0, -1], ids[-1]) if ids[-1] < 256 else True
        elif ids:
            bits[-1] = ids[-1] >= 256
        return bits

    @torch.no_grad()
    def _forward_cached(
        self,
        new_ids: torch.Tensor,
        cache: ByteifiedCache,
        patch_end: torch.Tensor | None = None,
        causal: bool = False,
    ) -> ModelOutput:
        """Feed ``new_ids`` (1, n) after everything in ``cache``; returns their fused logits (1, n, 2V).
        ``causal``: every byte fed without a bit takes the head's preferred bit (no segmenter at all; the
        byte marginals of the result are then an honest causal byte distribution, ``fused_marginal``)."""
        m: Any = self
        if new_ids.shape[0] != 1:
            raise ValueError("cached byteified decoding supports batch size 1")
        new = [int(i) for i in new_ids[0].tolist()]
        n, p0 = len(new), cache.length
        h = self._encode_new(new_ids, cache)  # (1, n, d)
        if patch_end is not None:
            return ModelOutput(
                logits=self._feed(cache, new, h, [bool(b) for b in patch_end.reshape(-1).tolist()], p0)
            )
        if causal:
            outs = []
            for j, tok in enumerate(new):
                bit = self.preferred_bit(cache.last_logits, tok) if tok < 256 else True
                outs.append(self._feed(cache, [tok], h[:, j : j + 1], [bit], p0 + j))
            return ModelOutput(logits=torch.cat(outs, 1))
        bits = [False] * n
        if n > 1:  # a prompt: the segmenter sets the bits of all but the last byte
            if m.cfg.chunker == "words":
                seg = m.word_starts_row(cache.ids[cache.seg_start :] + new)[-n:]
                bits[: n - 1] = [bool(x) for x in seg[1:]]
            else:
                if m.segmenter_frozen:  # its own encoder over the row so far (the cache holds the shared's)
                    row = torch.tensor([cache.ids + new], device=new_ids.device)
                    logits = m.boundary_logits(row, None)[:, -n:]
                else:
                    logits = m.boundary(h)
                ends = m.decode_boundaries(new_ids, logits)  # (1, n)
                bits[: n - 1] = ends[0, : n - 1].tolist()
            # the patch the last byte would close goes through the backbone with the others (one call): its
            # bit is known only from the logits below, and the backbone is causal, so it is dropped if unused
            ahead = (new[-1], h[0, -1]) if new[-1] < 256 else None
            first = self._feed(cache, new[:-1], h[:, :-1], bits[:-1], p0, ahead=ahead)
        bits[-1] = self.preferred_bit(cache.last_logits, new[-1]) if new[-1] < 256 else True
        last = self._feed(cache, new[-1:], h[:, -1:], bits[-1:], p0 + n - 1)
        return ModelOutput(logits=torch.cat([first, last], 1) if n > 1 else last)

    def _encode_new(self, new_ids: torch.Tensor, cache: ByteifiedCache) -> torch.Tensor:
        """Encoder states of the new bytes (1, n, d), the expanded ids read from a window of earlier bytes."""
        m: Any = self
        dev = new_ids.device
        new = new_ids[0].tolist()
        p0 = cache.length
        all_ids = cache.ids + new
        lo = max(cache.seg_start, p0 - m._max_token) if p0 else 0
        window = all_ids[lo:]
        starts = [False] * len(window)
        if window:
            starts[0] = True
        _ = m.trie  # builds the trie and _max_token
        ex = m.trie.longest_suffix_tokens(window, starts)[p0 - lo :]
        cos, sin = m._byte_rope(torch.arange(p0, p0 + len(new), device=dev))
        x = m.embed_bytes(new_ids, torch.tensor([ex], dtype=torch.long, device=dev))
        return m._run(m.encoder, x, cos, sin, caches=cache.enc, window=m.cfg.encoder_window)

    def _feed(
        self,
        cache: ByteifiedCache,
        new: list[int],
        h: torch.Tensor,
        bits: list[bool],
        p0: int,
        ahead: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Apply the patch rules to bytes whose encoder states ``h`` (1, n, d) are computed, run the decoder
        over them; returns fused logits (1, n, 2V). The encoder already holds these bytes; ``cache.ids``
        does not.

        The patches that close among the new bytes go through the backbone together, in one cached forward
        (and their prior's prefix sums in one head matmul): a prompt of P patches costs one backbone call, not
        P. Each byte reads the latest patch closed at or before it, as in the full forward.

        ``ahead`` = (next byte, its encoder state (d,)): also run the patch that this byte would close
        through the backbone, after the patches of this call, and keep the result in ``cache.ahead``. The
        next call uses it if that byte does close its patch, and otherwise drops the position from the
        backbone cache."""
        m: Any = self
        dev = h.device
        trie = m.trie
        cap = m.cfg.max_word_bytes or 0
        pending: list[torch.Tensor] = []  # (1, 1, D) patch vectors waiting for the backbone, in order
        if p0 == 0 and new and new[0] < 256:  # a row that starts inside a document: the sink comes first
            pending.append(m.sink(1, h.dtype))
        reads: list[int] = []  # per byte: the pending patch it reads, -1 = the context before this call
        nodes: list[int] = []
        forced: list[bool] = []
        for j, tok in enumerate(new):
            t = p0 + j
            cache.ids.append(tok)
            if tok >= 256:
                if cache.plen > 0:  # a special ends the open patch (ready at the special)
                    pending.append(self._close_patch(cache, t - 1, dev))
                pending.append(self._close_patch(cache, t, dev, special=True))
                cache.seg_start = t + 1
                closed = True
            else:
                cache.plen += 1
                cache.last_h = h[0, j]
                cache.node = trie.open_step(cache.node, tok)
                closed = bits[j] or (cap > 0 and cache.plen >= cap)
                if closed:
                    pending.append(self._close_patch(cache, t, dev))
            cache.bits.append(closed)
            reads.append(len(pending) - 1)
            nodes.append(cache.node)
            forced.append(cap > 0 and (1 if closed else cache.plen + 1) >= cap)
        held, cache.ahead = cache.ahead, None
        # run ahead by the previous call: used if this call's only patch is that one, else dropped
        if held is not None and (len(pending) != 1 or len(new) != 1 or new[0] >= 256 or not cache.bits[-1]):
            for c in cache.backbone:
                c.n -= 1
            held = None
        extra = []
        if ahead is not None:
            patch = cache.ids[cache.patch_start :] + [ahead[0]]
            extra.append(self._patch_vector(patch, ahead[1], dev))
        old_row = cache.ctx if cache.ctx is not None else m.first_word.view(1, -1)  # (1, D)
        old_cum = cache.ctx_cum
        # the decoder's context injections (one (1, d) per decoder layer) of the old context, kept per patch
        old_inj = cache.ctx_inj if cache.ctx_inj is not None else [p(old_row) for p in m.ctx_proj]
        rows, inj, new_cum = old_row, old_inj, None  # context rows: 0 = the old context, 1 + r = pending r
        if held is not None:
            z, new_cum, new_inj = held
            cache.n_words += 1
        elif pending or extra:
            pos = torch.arange(cache.n_words, cache.n_words + len(pending) + len(extra), device=dev)
            z = m.run_backbone(torch.cat(pending + extra, 1), pos, caches=cache.backbone)[0]  # (k, D)
            new_cum = prior_cumsum(trie, m.head_weight(), z) if m.cfg.lm_prior else None  # (k, V'+1)
            new_inj = [p(z) for p in m.ctx_proj]  # each (k, d)
            if extra:  # the last row is the run-ahead patch: kept for the next call
                cache.ahead = (z[-1:], None if new_cum is None else new_cum[-1:], [x[-1:] for x in new_inj])
                z, new_inj = z[:-1], [x[:-1] for x in new_inj]
                new_cum = None if new_cum is None or not pending else new_cum[:-1]
            cache.n_words += len(pending)
        if pending:
            rows = torch.cat([old_row.to(z.dtype), z])
            inj = [torch.cat([o, x]) for o, x in zip(old_inj, new_inj, strict=True)]
            cache.ctx, cache.ctx_inj = z[-1:], [x[-1:] for x in new_inj]
            cache.ctx_cum = None if new_cum is None else new_cum[-1:]
        idx = torch.tensor([r + 1 for r in reads], device=dev)  # (n,) context row of each byte
        cos, sin = m._byte_rope(torch.arange(p0, p0 + len(new), device=dev))
        inject = [x.index_select(0, idx).unsqueeze(0) for x in inj]  # each (1, n, d)
        y = m._run(m.decoder, h, cos, sin, caches=cache.dec, inject=inject)
        prior = None
        if m.cfg.lm_prior:
            node_t = torch.tensor(nodes, device=dev)
            if any(r < 0 for r in reads) and old_cum is None:  # no context yet (not after the sink)
                prior = m.prior(rows, idx, node_t)
            else:  # the prefix sums of each patch, computed once when it closed
                parts = [c for c in (old_cum, new_cum) if c is not None]
                shift = 0 if old_cum is not None else 1  # without old prefix sums no byte reads row 0
                prior = fused_from_cumsum(m.trie, torch.cat(parts, 0), idx - shift, node_t, m.cfg.vocab_size)
            prior = prior.unsqueeze(0)
        logits = m.fuse(m.lm_head(m.norm(y)), prior, torch.tensor([forced], device=dev))  # (1, n, 2V)
        cache.last_logits = logits[0, -1]
        return logits

    def _close_patch(
        self, cache: ByteifiedCache, t: int, dev: torch.device, special: bool = False
    ) -> torch.Tensor:
        """The vector (1, 1, D) of the open patch (ending at byte t) or of a special's patch, for the
        backbone; resets the open patch."""
        m: Any = self
        if special or cache.last_h is None:
            vec = m.sink(1, m.embed.weight.dtype)
        else:
            vec = self._patch_vector(cache.ids[cache.patch_start : t + 1], cache.last_h, dev)
        cache.patch_start, cache.plen, cache.node, cache.last_h = t + 1, 0, 0, None
        return vec

    def _patch_vector(self, patch: list[int], last_h: torch.Tensor, dev: torch.device) -> torch.Tensor:
        """The backbone input (1, 1, D) of a patch of bytes ``patch`` whose last byte's encoder state is
        ``last_h`` (d,)."""
        m: Any = self
        vec = m.pool(last_h.view(1, 1, -1), torch.zeros(1, 1, dtype=torch.long, device=dev))  # (1, 1, D)
        if m.cfg.patch_token_embed:
            tok = m.patch_tokens(patch, [True] + [False] * (len(patch) - 1))[-1]
            if tok >= 0:
                vec = vec + m.source_embed.weight[tok].to(vec.dtype)
        return vec
