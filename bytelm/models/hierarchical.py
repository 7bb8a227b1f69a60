"""HAT-style hierarchical byte LM: byte encoder -> word pooling -> latent backbone -> byte decoder.

docs/design.md#hierarchical-byte-lm, docs/hierarchical.md. Bytes are split into words (rule-based splitter;
the boundary source is pluggable through ``cfg.chunker``); a few narrow causal layers encode every byte; one
vector per word is pooled; a wide causal backbone runs over word vectors (most parameters and FLOPs); a few
narrow layers decode every byte from the encoder's byte activations plus exactly one word vector: the backbone
output of the *previous* word.

Choices worth knowing (all tested in tests/models/test_hierarchical.py and tests/models/test_generate.py):

- **Specials are words of their own.** BOS/EOS/PAD (ids >= 256) each form a one-byte word, and the byte after
  a special starts a new word, whatever ``word_start`` says. So a PAD run at the end of a row is a run of
  one-byte words after every real word; the stacks are causal, so it cannot affect anything before it.
- **When does a byte see a word?** Only once the bytes seen so far *decide* where the word ends
  (docs/hierarchical.md). A word ``w`` whose successor starts at ``s`` is *ready* at ``r_w``, the position
  from which no later byte can move or remove that end (``word_layout.decision_times``; running max over
  words, so words become ready in order). Byte ``t`` receives the backbone output of the latest word with
  ``r_w <= t`` in its own document, or the learned first-word vector when there is none. Usually ``r_w`` is
  the last byte of the first character at ``s``: for ASCII this is exactly "bytes of word w get the output of
  word w-1", and a word opening with a multi-byte character hands the newer vector to its bytes only from that
  character's last byte on (earlier, it would tell position ``s`` that the *next* bytes complete a character
  that starts a word). Later than that where the splitter needs more bytes: an invalid UTF-8 sequence is
  settled only when the byte that breaks it arrives (``E3 80`` before ``C3``), and two splitter rules look
  further ahead (a combining mark after U+00A0 removes the end of a single space before it; ``1⁄2`` is one
  word). Reading a word earlier leaked later bytes into earlier predictions and made cached generation
  disagree with the full forward (both were found and are now tests: tests/models/test_causality_property.py).
  The last word of a document is ready at the next document's start (never used).
- **Pooling query positions.** The learned query sits at the word's first byte and keys at their byte
  positions, so RoPE sees the within-word offset (0, 1, 2, ...) and the pooled vector does not depend on
  where the word is in the row (packed documents give the same result as alone). Because the query is one
  shared vector, the scores are per-byte quantities and the within-word softmax is a segment softmax
  (scatter max / index_add): O(T * D), no (W, max_word_len) padding.
- **The decoder's one key.** Cross-attending to exactly one key has softmax weight 1, so it reduces to a
  linear map of that key; we apply ``Linear(d_model, d_byte)`` to the word vector and add it to the residual
  stream (first decoder layer, or every layer with ``decoder_cross='all'``, one projection per layer).
- **Learned chunks** (``chunker='gate'``, ``bytelm/models/chunking.py``): the MrT5 delete gate reads the
  encoder output (minus its running mean with ``gate.center``); a kept byte closes its chunk, and the chunk
  is ready *at* that byte (the decision used bytes up to it only), so ``layout_words(closed=...)`` makes it
  ready there. The task loss reaches the gate through a straight-through factor on each chunk vector
  (value 1, gradient of the closing byte's keep probability); the regulariser ``alpha * mean(G)`` with the PI
  controller holds the deletion ratio at ``gate.target_ratio`` and trains the gate only (detached input).
  Cached decoding applies the same rules byte by byte.
- **Cached decoding** (``new_cache()``, ``forward(ids, cache=...)``, batch 1, one document; ``hier_cache.py``)
  decides words online with the same splitter and the same ready rule (``decision_times`` on the bytes it has
  gives the full forward's ready times up to the last byte), and equals the full forward (tested to 1e-4).
- **Attention metadata** is built once per forward for each of the three stacks (``attention.stack_meta``):
  the byte encoder and decoder share one when their windows agree (same bytes, same documents), the backbone
  has its own over words (documents of words: ``WordLayout.word_doc``).
- **torch.compile**: the training forward has no host work but the word count ``W``, a data-dependent shape
  that ``bytelm.models.compile`` captures as an unbacked size (no graph break; tests/models/test_compile.py);
  word starts come from the data layer (``batch["word_start"]``), and the learned chunker's size cap is
  vectorised (``chunking.close_chunks``).

Files: this one holds the model; ``word_layout.py`` the splitter glue, the word layout and the two poolings;
``hier_cache.py`` cached decoding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bytelm.data.bytes import PAD_ID
from bytelm.models.attention import AttnMeta, stack_meta
from bytelm.models.chunking import causal_center, gate_closed, keep_scale
from bytelm.models.config import ModelConfig, ModelOutput
from bytelm.models.gates import DeleteGate, PIController, gate_stats, masked_mean
from bytelm.models.hier_cache import CachedDecoding, HierCache
from bytelm.models.layers import Block, KVCache, RMSNorm, init_linear_, rope_cos_sin
from bytelm.models.word_layout import (
    _CHAR_LEN,
    LastPooling,
    QueryPooling,
    WordLayout,
    layout_words,
    pending_utf8,
    split_word_starts,
    utf8_char_len,
)

log = logging.getLogger(__name__)

# the layout, pooling and cache names live in word_layout.py / hier_cache.py; importable from here too
__all__ = [
    "_CHAR_LEN",
    "HierCache",
    "HierarchicalByteLM",
    "LastPooling",
    "QueryPooling",
    "WordLayout",
    "layout_words",
    "pending_utf8",
    "split_word_starts",
    "utf8_char_len",
]


class HierarchicalByteLM(CachedDecoding, nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.pooling not in ("query", "last"):
            raise ValueError(f"model.pooling must be 'query' or 'last', got {cfg.pooling!r}")
        if cfg.decoder_cross not in ("first", "all"):
            raise ValueError(f"model.decoder_cross must be 'first' or 'all', got {cfg.decoder_cross!r}")
        if cfg.chunker not in ("words", "gate"):
            raise ValueError(f"model.chunker must be 'words' or 'gate', got {cfg.chunker!r}")
        self.cfg = cfg
        D, d = cfg.d_model, cfg.d_byte
        be = cfg.attn_backend
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.encoder = nn.ModuleList(
            [Block(d, cfg.n_heads_byte, cfg.mlp_ratio, be) for _ in range(cfg.encoder_layers)]
        )
        self.pool: nn.Module = (
            QueryPooling(d, D, cfg.n_heads) if cfg.pooling == "query" else LastPooling(d, D)
        )
        # the backbone may be a transplanted Llama-family source model's blocks (bytelm.distill.transplant)
        self.backbone = nn.ModuleList(
            [
                Block(
                    D,
                    cfg.n_heads,
                    cfg.mlp_ratio,
                    be,
                    n_kv_heads=cfg.n_kv_heads or None,
                    head_dim=cfg.head_dim or None,
                    mlp_hidden=cfg.mlp_hidden or None,
                    norm_eps=cfg.norm_eps,
                    qkv_bias=cfg.qkv_bias,
                )
                for _ in range(cfg.n_layers)
            ]
        )
        self.backbone_norm = RMSNorm(D, cfg.norm_eps)
        self.first_word = nn.Parameter(torch.zeros(D))  # context of the bytes before any ready word of a doc
        n_inj = cfg.decoder_layers if cfg.decoder_cross == "all" else 1
        self.ctx_proj = nn.ModuleList([nn.Linear(D, d, bias=False) for _ in range(n_inj)])
        self.decoder = nn.ModuleList(
            [Block(d, cfg.n_heads_byte, cfg.mlp_ratio, be) for _ in range(cfg.decoder_layers)]
        )
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # learned chunker: the MrT5 delete gate on the encoder output decides which bytes close a chunk
        g = cfg.gate
        self.gate = DeleteGate(d, g.k, g.bias_init) if cfg.chunker == "gate" else None
        self.controller = (
            PIController(g.target_ratio, g.kp, g.ki, g.alpha_min) if self.gate is not None else None
        )

    def init_weights(self) -> None:
        """Separate from construction (meta-device / sharded builds init after sharding). Residual output
        projections of each stack are scaled by 1/sqrt(2 * its depth)."""
        std = self.cfg.init_std
        init_linear_(self, std=std)
        n_byte = max(1, self.cfg.encoder_layers + self.cfg.decoder_layers)
        for stack, depth in (
            (self.encoder, n_byte),
            (self.decoder, n_byte),
            (self.backbone, self.cfg.n_layers),
        ):
            init_linear_(stack, std=std, out_std=std / math.sqrt(2 * max(1, depth)))
        nn.init.normal_(self.first_word, std=std)
        if isinstance(self.pool, QueryPooling):
            nn.init.normal_(self.pool.query, std=std)
        if self.gate is not None and self.controller is not None:
            self.gate.reset_parameters()  # xavier w, b = bias_init (init_linear_ gave N(0, std) and b = 0)
            self.controller.reset()

    def word_starts_row(
        self, ids: Sequence[int] | np.ndarray, doc_ids: np.ndarray | None = None, capped: bool = True
    ) -> np.ndarray:
        """Boundary source for one row, (n,) bool (pluggable by ``cfg.chunker``; 'words' = rule-based
        splitter). ``capped=False`` gives the rule's words before the size cap cuts long ones."""
        return split_word_starts(ids, self.cfg.max_word_bytes if capped else None, doc_ids)

    @torch.compiler.disable
    def word_starts_batch(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) bool word starts of a batch, row by row with ``word_starts_row`` (CPU splitter)."""
        rows = ids.cpu().numpy()
        docs = doc_ids.cpu().numpy() if doc_ids is not None else [None] * len(rows)
        starts = [self.word_starts_row(r, d) for r, d in zip(rows, docs, strict=True)]
        return torch.from_numpy(np.stack(starts)).to(ids.device)

    # -- stacks ----------------------------------------------------------------------------------------

    def _run(
        self,
        blocks: nn.ModuleList,
        x: torch.Tensor,
        cos,
        sin,
        caches=None,
        inject=None,
        meta: AttnMeta | None = None,
        *,
        stack: str = "byte stack",
        doc_ids: torch.Tensor | None = None,
        window: int = 0,
    ) -> torch.Tensor:
        """Run a stack; ``inject[i]`` (if given) is added before block i (decoder context). ``meta``: the
        stack's attention metadata, built here from ``doc_ids`` / ``window`` / the caches when not given."""
        if meta is None:
            meta = self._meta(x, stack, doc_ids=doc_ids, window=window, caches=caches)
        for i, blk in enumerate(blocks):
            if inject is not None and i < len(inject):
                x = x + inject[i]
            c = caches[i] if caches is not None else None
            if self.cfg.activation_checkpointing and self.training and c is None:
                x = checkpoint(lambda x_, b=blk: b(x_, cos, sin, meta), x, use_reentrant=False)
            else:
                x = blk(x, cos, sin, meta, cache=c)
        return x

    def _meta(
        self,
        x: torch.Tensor,
        stack: str,
        *,
        doc_ids: torch.Tensor | None = None,
        window: int = 0,
        caches: Sequence[KVCache] | None = None,
    ) -> AttnMeta:
        """Attention metadata of one causal stack over ``x`` (B, T, .), once per forward."""
        return stack_meta(
            x,
            self.cfg.attn_backend,
            stack=stack,
            fallback=self.cfg.attn_fallback,
            q_offset=caches[0].length if caches else 0,
            doc_ids=doc_ids,
            window=window,
        )

    def _pool(self, h: torch.Tensor, lay_word_id, lay_offset, lay_end, W: int) -> torch.Tensor:
        if isinstance(self.pool, QueryPooling):
            return self.pool(h, lay_word_id, lay_offset, W, self.cfg.rope_theta)
        return self.pool(h, lay_end)

    def _byte_rope(self, pos: torch.Tensor):
        return rope_cos_sin(pos, self.cfg.d_byte // self.cfg.n_heads_byte, self.cfg.rope_theta)

    def _word_rope(self, pos: torch.Tensor):
        hd = self.cfg.head_dim or self.cfg.d_model // self.cfg.n_heads
        return rope_cos_sin(pos, hd, self.cfg.rope_theta, self.cfg.rope_scaling)

    def run_backbone(
        self,
        words: torch.Tensor,  # (B, W, D)
        positions: torch.Tensor | None = None,  # (W,) or (B, W)
        *,
        doc_ids: torch.Tensor | None = None,  # (B, W) document of each word (packed rows)
        caches: Sequence[KVCache] | None = None,
        n_blocks: int | None = None,
        norm: bool = True,
    ) -> torch.Tensor:
        """(B, W, D) patch/word vectors -> backbone outputs (B, W, D). positions (W,) or (B, W) word positions
        (default arange(W)); n_blocks: run only the first n blocks (Bolmo's stage-1 encoder loss); norm: apply
        the final norm (only when all blocks ran). With ``caches`` the words continue after the cached ones,
        at ``positions`` (default: from the cache length)."""
        n = len(self.backbone) if n_blocks is None else n_blocks
        if not 0 <= n <= len(self.backbone):
            raise ValueError(f"n_blocks={n_blocks} outside 0..{len(self.backbone)}")
        if positions is None:
            p0 = caches[0].length if caches else 0
            positions = torch.arange(p0, p0 + words.shape[1], device=words.device)
        cos, sin = self._word_rope(positions)
        blocks = self.backbone if n == len(self.backbone) else self.backbone[:n]
        z = self._run(
            blocks,
            words,
            cos,
            sin,
            caches=caches,
            stack="word backbone",
            doc_ids=doc_ids,
            window=self.cfg.backbone_window,
        )
        return self.backbone_norm(z) if norm and n == len(self.backbone) else z

    # -- forward ---------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) byte ids
        *,
        word_start: torch.Tensor | None = None,  # (B, T) bool, True at the first byte of each word
        doc_ids: torch.Tensor | None = None,  # (B, T) packed-document index
        cache: HierCache | None = None,
        **_: object,
    ) -> ModelOutput:
        if cache is not None:
            return self._forward_cached(input_ids, cache)
        B, T = input_ids.shape
        dev = input_ids.device
        cos, sin = self._byte_rope(torch.arange(T, device=dev))
        x = self.embed(input_ids)  # (B, T, d)
        win = self.cfg.encoder_window
        enc_meta = self._meta(x, "byte encoder", doc_ids=doc_ids, window=win)
        h = self._run(self.encoder, x, cos, sin, meta=enc_meta)  # (B, T, d)

        G = closed = hg = None
        if self.gate is not None:  # learned chunks (a given word_start is ignored)
            hg = causal_center(h, doc_ids) if self.cfg.gate.center else h  # running mean: stays causal
            G = self.gate(hg, input_ids < 256)  # (B, T); specials get k but always close a chunk of their own
            closed, word_start = gate_closed(
                input_ids, G, self.cfg.gate.tau_del, self.cfg.max_word_bytes, doc_ids
            )
        elif (
            word_start is None
        ):  # training rows bring them (data layer); host work, outside any compiled graph
            word_start = self.word_starts_batch(input_ids, doc_ids)
        lay = layout_words(input_ids, word_start, doc_ids, closed, decided=True)
        W = lay.start.shape[1]

        words = self._pool(h, lay.word_id, lay.offset, lay.end, W)  # (B, W, D)
        if G is not None and self.training and torch.is_grad_enabled():
            words = words * keep_scale(G, self.cfg.gate.k, self.cfg.gate.tau_del < G, lay.end).to(words.dtype)
        z = self.run_backbone(words, torch.arange(W, device=dev), doc_ids=lay.word_doc)  # (B, W, D)

        table = torch.cat([self.first_word.to(z.dtype).expand(B, 1, -1), z], 1)  # (B, W+1, D)
        idx = lay.ctx_idx.unsqueeze(-1).expand(-1, -1, self.cfg.d_byte)  # (B, T, d)
        inject = [p(table).gather(1, idx) for p in self.ctx_proj]  # each (B, T, d)
        dec_meta = enc_meta if win == 0 else self._meta(h, "byte decoder", doc_ids=doc_ids)
        y = self._run(self.decoder, h, cos, sin, inject=inject, meta=dec_meta)  # (B, T, d)
        logits = self.lm_head(self.norm(y))  # (B, T, V)

        real = input_ids != PAD_ID
        bpw = real.sum() / (lay.word_start & real).sum().clamp_min(1)
        metrics: dict[str, torch.Tensor | float] = {"bytes_per_word": bpw.detach()}
        aux = None
        if G is not None and self.gate is not None and self.controller is not None:
            byte_mask = input_ids < 256
            alpha = self.controller.current_alpha()  # value set by the previous step
            metrics.update(gate_stats(G, self.cfg.gate.tau_del, byte_mask, alpha))
            if self.training:
                # the regulariser trains the gate only (its input detached; same value as G): through the
                # encoder it shifts every byte's gate together and the ratio swings (docs/mrt5.md, measured)
                assert hg is not None
                aux = alpha * masked_mean(self.gate(hg.detach(), byte_mask), byte_mask)
                self.controller.observe(
                    G, self.cfg.gate.tau_del, byte_mask
                )  # global ratio, used from the next step
        hidden = {
            "words": z,
            "word_start": lay.start,
            "word_end": lay.end,
        }  # for distillation (bytelm.distill)
        return ModelOutput(logits=logits, aux_loss=aux, metrics=metrics, hidden=hidden)


def _check_shapes() -> None:  # pragma: no cover - handy when editing: python -m bytelm.models.hierarchical
    cfg = ModelConfig(arch="hierarchical", d_model=64, n_layers=2, n_heads=4, d_byte=32, n_heads_byte=2)
    m = HierarchicalByteLM(cfg)
    m.init_weights()
    out = m(torch.tensor([list(b"hello world, this is a test")]))
    print(out.logits.shape, {k: float(v) for k, v in out.metrics.items()})
    print(F.cross_entropy(out.logits[0, :-1], torch.tensor(list(b"ello world, this is a test"))).item())


if __name__ == "__main__":  # pragma: no cover
    _check_shapes()
