"""Cached (incremental) decoding of the hierarchical model: batch 1, one document, byte by byte.

Words are decided online (docs/design.md#word-splitting): after each new byte the complete characters from the
start of the current rule word are re-split with the same splitter (bytes of an unfinished UTF-8 character
wait, so the size cap never cuts inside a character the full forward keeps whole), the ready rule of
``layout_words(decided=True)`` (``decision_times``) is applied to the bytes seen so far, and a word is pooled
and runs one backbone step once it is ready. With the learned chunker the gate's decisions are applied byte by
byte by the rules of ``bytelm.models.chunking``. The result equals the full forward (tested to 1e-4; see
hierarchical.py's docstring for the splitter properties this relies on).

``CachedDecoding`` is a mixin of ``HierarchicalByteLM`` (and so of ``ByteifiedLM``, which overrides the
cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bytelm.data.words_online import _starts_with_ignorable
from bytelm.models.config import ModelConfig, ModelOutput
from bytelm.models.layers import KVCache
from bytelm.models.word_layout import decision_times, pending_utf8

_ANCHOR_WINDOW = 512  # cached decoding re-splits at most this far back before the current word
_CONTEXT = 16  # bytes before a word that starts with a combining mark, re-split with it (as words_online.py)


def _context_start(ids: list[int], base: int) -> int:
    """Where to start re-splitting so that the word at ``base`` is split with up to ``_CONTEXT`` bytes before
    it when it starts with a combining mark (or other ignorable character), which may be glued to those bytes;
    the context starts at a character and after any special."""
    head = [i for i in ids[base : base + 4] if i < 256]
    if not head or ids[base] >= 256 or not _starts_with_ignorable(bytes(head)):
        return base
    ctx = max(0, base - _CONTEXT)
    specials = [j for j in range(ctx, base) if ids[j] >= 256]
    ctx = specials[-1] + 1 if specials else ctx
    while ctx < base and 0x80 <= ids[ctx] < 0xC0:
        ctx += 1
    return ctx


@dataclass
class HierCache:
    """Incremental-decoding state (batch 1, one document). Words are decided online by re-splitting the bytes
    from the oldest not-yet-ready word on; a word goes to the backbone once it is ready (same rule as
    ``layout_words``), so the cached path reproduces the full forward."""

    enc: list[KVCache]
    backbone: list[KVCache]
    dec: list[KVCache]
    ids: list[int] = field(default_factory=list)
    pend_start: int = 0  # first byte of the oldest word not yet given to the backbone
    anchor: int = 0  # start of the rule word (before the size cap) holding pend_start; re-splits start here
    buf: torch.Tensor | None = None  # (1, n, d_byte) encoder outputs of bytes pend_start..
    n_ready: int = 0  # words given to the backbone
    r_max: int = -1  # running max of ready times
    ctx: torch.Tensor | None = None  # (1, d_model) latest context word vector (None = first-word vector)
    hsum: torch.Tensor | None = (
        None  # (1, 1, d_byte) running sum of encoder outputs (gate.center, chunker=gate)
    )

    @property
    def length(self) -> int:
        return len(self.ids)


class CachedDecoding:
    """``new_cache()`` and ``forward(ids, cache=...)`` of the hierarchical model (module docstring)."""

    if TYPE_CHECKING:  # provided by HierarchicalByteLM
        cfg: ModelConfig
        embed: nn.Embedding
        encoder: nn.ModuleList
        backbone: nn.ModuleList
        decoder: nn.ModuleList
        ctx_proj: nn.ModuleList
        norm: nn.Module
        lm_head: nn.Linear
        first_word: nn.Parameter
        gate: Any

        def _run(
            self,
            blocks: nn.ModuleList,
            x: torch.Tensor,
            cos,
            sin,
            caches=None,
            inject=None,
            meta=None,
            *,
            stack: str = ...,
            doc_ids: torch.Tensor | None = None,
            window: int = 0,
        ) -> torch.Tensor: ...
        def _byte_rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
        def _pool(self, h: torch.Tensor, word_id, offset, end, W: int) -> torch.Tensor: ...
        def word_starts_row(self, ids, doc_ids=None, capped: bool = True) -> np.ndarray: ...
        def run_backbone(
            self,
            words: torch.Tensor,
            positions: torch.Tensor | None = None,
            *,
            doc_ids=None,
            caches=None,
            n_blocks: int | None = None,
            norm: bool = True,
        ) -> torch.Tensor: ...

    def new_cache(self) -> HierCache:
        return HierCache(
            enc=[KVCache() for _ in self.encoder],
            backbone=[KVCache() for _ in self.backbone],
            dec=[KVCache() for _ in self.decoder],
        )

    @torch.no_grad()
    def _forward_cached(self, new_ids: torch.Tensor, cache: HierCache) -> ModelOutput:
        """Feed ``new_ids`` (1, n) after everything in ``cache``; returns their logits (1, n, V)."""
        if new_ids.shape[0] != 1:
            raise ValueError("cached hierarchical decoding supports batch size 1")
        dev = new_ids.device
        n = new_ids.shape[1]
        p0 = cache.length
        cache.ids.extend(int(i) for i in new_ids[0].tolist())
        pos = torch.arange(p0, p0 + n, device=dev)
        cos, sin = self._byte_rope(pos)
        h = self._run(
            self.encoder,
            self.embed(new_ids),
            cos,
            sin,
            caches=cache.enc,
            stack="byte encoder",
            window=self.cfg.encoder_window,
        )
        cache.buf = h if cache.buf is None else torch.cat([cache.buf, h], 1)  # (1, len - pend_start, d)
        if self.gate is not None:
            return self._decode_cached(h, cos, sin, pos, cache, *self._gate_chunks_cached(new_ids, h, cache))

        starts, ready_at = self._words_cached(cache)
        return self._decode_cached(h, cos, sin, pos, cache, starts, ready_at)

    def _words_cached(self, cache: HierCache) -> tuple[list[int], list[int]]:
        """Word starts (oldest pending first) and the ready times of the words that became ready, by the rules
        of ``layout_words(decided=True)`` applied to the bytes seen so far.

        The bytes from the rule word (before the size cap) that holds the oldest unready word are re-split;
        only complete characters are split (incomplete UTF-8 stays in the current word), so the size cap never
        cuts inside a character that later bytes complete. ``decision_times`` on the same bytes says when each
        word end is decided; it reads no byte past the time it returns, so on a prefix it gives the full
        forward's times wherever they are <= the last byte. A word that starts with a combining mark is split
        with a few bytes before it (whether the mark is glued to them decides its words)."""
        base, last = cache.anchor, cache.length - 1
        done = cache.length - pending_utf8(cache.ids)
        ctx = _context_start(cache.ids, base) if base < done else base
        window = cache.ids[ctx:]
        capped = np.zeros(len(window), dtype=bool)
        capped[: done - ctx] = self.word_starts_row(window[: done - ctx])
        capped[base - ctx] = True
        starts = [cache.pend_start] + [
            int(x) + ctx for x in np.flatnonzero(capped) if x + ctx > cache.pend_start
        ]
        ready_at: list[int] = []
        if len(starts) == 1:  # no word end in sight (most bytes): nothing to decide
            return starts, ready_at
        decided = decision_times(torch.tensor([window]), torch.from_numpy(capped).unsqueeze(0))[0].tolist()
        for s_next in starts[1:]:
            r = max(cache.r_max, decided[s_next - ctx] + ctx)  # decision_times counts from the window start
            if r > last:
                break
            ready_at.append(r)
            cache.r_max = r
        if ready_at:  # move the re-split anchor to the rule word holding the new oldest unready word
            new_pend = starts[len(ready_at)]
            rule = np.flatnonzero(self.word_starts_row(window[: done - ctx], capped=False)) + ctx
            cache.anchor = max([base, *rule[rule <= new_pend].tolist()])
            if new_pend - cache.anchor > _ANCHOR_WINDOW:  # bound the re-split (as words_online.py does)
                cache.anchor = new_pend
        return starts, ready_at

    def _gate_chunks_cached(
        self, new_ids: torch.Tensor, h: torch.Tensor, cache: HierCache
    ) -> tuple[list[int], list[int]]:
        """Chunk starts (oldest pending first, then one per closed chunk) and ready times for the new bytes,
        by the rules of ``bytelm.models.chunking.gate_closed`` applied online."""
        assert self.gate is not None
        hg = h
        if self.cfg.gate.center:  # running mean over the document, as causal_center in the full forward
            n = h.shape[1]
            cs = h.float().cumsum(1) + (cache.hsum if cache.hsum is not None else 0.0)  # (1, n, d)
            cache.hsum = cs[:, -1:]
            cnt = torch.arange(cache.length - n + 1, cache.length + 1, device=h.device, dtype=cs.dtype)
            hg = (h.float() - cs / cnt.view(1, -1, 1)).to(h.dtype)
        G = self.gate(hg, new_ids < 256)[0].tolist()  # (n,)
        tau, cap = self.cfg.gate.tau_del, self.cfg.max_word_bytes
        p0 = cache.length - new_ids.shape[1]
        starts, ready_at = [cache.pend_start], []
        cur = cache.pend_start
        for j, tok in enumerate(new_ids[0].tolist()):
            t = p0 + j
            if tok >= 256 and cur < t:  # a special closes the open chunk before it (known when it arrives)
                starts.append(t)
                ready_at.append(t)
                cur = t
            if tok >= 256 or G[j] > tau or (cap and t - cur + 1 >= cap):
                starts.append(t + 1)
                ready_at.append(t)
                cur = t + 1
        return starts, ready_at

    def _decode_cached(
        self,
        h: torch.Tensor,
        cos,
        sin,
        pos: torch.Tensor,
        cache: HierCache,
        starts: list[int],
        ready_at: list[int],
    ) -> ModelOutput:
        """Pool the chunks that became ready (``starts[:k+1]`` bound them), run the backbone on them and
        decode the new bytes; each byte sees the latest chunk with ready time <= its position."""
        dev = h.device
        k = len(ready_at)
        prev = self.first_word.view(1, -1) if cache.ctx is None else cache.ctx  # (1, D)
        table = prev.unsqueeze(0)  # (1, 1, D)
        if k:
            words = self._pool_span(cache, starts, k)  # (1, k, D)
            z = self.run_backbone(
                words, torch.arange(cache.n_ready, cache.n_ready + k, device=dev), caches=cache.backbone
            )
            table = torch.cat([table, z], 1)  # (1, k+1, D)
            assert cache.buf is not None
            cache.buf = cache.buf[:, starts[k] - cache.pend_start :]
            cache.pend_start = starts[k]
            cache.n_ready += k
            cache.ctx = z[:, -1]
        sel = (torch.tensor(ready_at, dtype=torch.long, device=dev).view(1, -1) <= pos.view(-1, 1)).sum(
            1
        )  # (n,)
        inject = [p(table)[:, sel] for p in self.ctx_proj]  # each (1, n, d)
        y = self._run(self.decoder, h, cos, sin, caches=cache.dec, inject=inject, stack="byte decoder")
        return ModelOutput(logits=self.lm_head(self.norm(y)))

    def _pool_span(self, cache: HierCache, starts: list[int], k: int) -> torch.Tensor:
        """Pool the ``k`` words ``[starts[i], starts[i+1])`` from the buffered encoder outputs -> (1, k,
        D)."""
        assert cache.buf is not None
        dev = cache.buf.device
        span = starts[k] - cache.pend_start
        ws = torch.zeros(span, dtype=torch.bool, device=dev)
        ws[torch.tensor(starts[:k], device=dev) - cache.pend_start] = True
        word_id = (ws.long().cumsum(0) - 1).unsqueeze(0)  # (1, span)
        st = torch.tensor(starts[: k + 1], device=dev) - cache.pend_start  # (k+1,)
        offset = torch.arange(span, device=dev).unsqueeze(0) - st[word_id]  # (1, span)
        return self._pool(cache.buf[:, :span], word_id, offset, st[1:].unsqueeze(0), k)
