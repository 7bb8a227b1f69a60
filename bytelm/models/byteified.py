"""A byteified subword LM: the source model's decoder blocks are the backbone of a hierarchical byte model.

DESIGN.md §5b (Bolmo, HAT-from-Llama). ``bytelm.distill.byteify`` builds it from any Llama-family Hugging Face
model (weights mapped into bytelm's own blocks by ``bytelm.distill.transplant``) and trains it in two stages;
this file is the pure-torch model that runs, trains, generates and exports like every other bytelm model.

Bytes -> patches -> source blocks -> bytes:

- **Encoder input** = byte embedding + a projection of the source's embedding of the *longest vocabulary token
  that ends at this byte* (Bolmo's / tokenkit's "expanded" embedding; causal: bytes <= t only). The source's
  vocabulary travels with the model as two buffers (``vocab_bytes``, ``vocab_offsets``), so an exported folder
  needs no tokenizer.
- **Patches** end where the boundary predictor's logit on the encoder state is > 0 (causal: decided when the byte
  arrives), at specials, and at the size cap. Stage 1 passes the teacher tokenizer's token ends instead
  (``patch_end=``), so the frozen blocks see the units they were trained on; the predictor is trained against
  them with BCE. A patch is *ready at its own last byte* (``layout_words(closed=...)``): the byte after it is
  predicted from the backbone output of the patch it closes, as the source predicts token i+1 from its hidden
  state at token i.
- **Patch vectors** = projection of the encoder state at the patch's last byte (bias and scale initialised to the
  statistics of the source embeddings); a special (BOS/EOS/PAD) is a patch whose vector is the source's
  document-start embedding (SmolLM2's ``<|endoftext|>``).
- **Sink.** The source always saw its start token at position 0 (an attention sink). A row that begins inside a
  document gets a virtual first patch with that embedding; a row that begins with a special masks it (its BOS
  patch plays the part). The sink's backbone output is the context of bytes before the first ready patch.
- **Decoder** = bytelm's byte decoder (encoder activations + the projected context vector of the latest ready
  patch), and **LM-head prior**: the byte logits get ``prior_scale * log P_naive(next byte)``, the naive
  within-token marginal (DESIGN.md §5) of the source LM head applied to that context vector, given the bytes of
  the open patch so far. The decoder only has to learn the correction; computed without gradient.
- **Stage-1 hooks**: ``context=`` (B, T, D) replaces the backbone outputs by the teacher's final hidden states
  read at each patch's last byte (nothing backpropagates through the backbone), and ``probe_blocks=k`` returns
  the patch vectors after the first k blocks (Bolmo's encoder loss) in ``hidden["probe"]``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from bytelm.data.bytes import PAD_ID
from bytelm.models.chunking import close_chunks, doc_starts, run_lengths
from bytelm.models.config import ModelConfig, ModelOutput
from bytelm.models.hierarchical import HierarchicalByteLM
from bytelm.models.layers import KVCache, RMSNorm
from bytelm.models.vocab_trie import VocabTrie
from bytelm.models.word_layout import _CHAR_LEN, LastPooling, layout_words

SINK_MASKED = -2  # word-doc id of a masked sink: no patch attends to it
PRIOR_FLOOR = -30.0  # log-prior of bytes the naive marginal calls impossible (keeps the sum finite)
SPECIAL_PRIOR = -10.0  # log-prior of specials where the marginal is defined (it says nothing about them)


class BoundaryPredictor(nn.Module):
    """Logit that byte t ends a patch, from the causal encoder states at t and t+1 (one byte of lookahead, as
    Bolmo's predictor): (B, T, d) -> (B, T). The decision for t is used from byte t+1 on (the patch is ready one
    character after it ends), so the model stays causal. The last position sees zeros for t+1."""

    def __init__(self, dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mlp: nn.Module = (
            nn.Sequential(nn.Linear(2 * dim, hidden), nn.SiLU(), nn.Linear(hidden, 1)) if hidden > 0
            else nn.Linear(2 * dim, 1)
        )

    def pairs(self, h: torch.Tensor, h_next: torch.Tensor) -> torch.Tensor:
        """Logits from aligned (..., d) states of byte t and byte t+1."""
        return self.mlp(torch.cat([self.norm(h), self.norm(h_next)], -1)).squeeze(-1).float()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        nxt = torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], 1)
        return self.pairs(h, nxt)


class PatchPooling(LastPooling):
    """``LastPooling`` with a bias, indexed by each patch's last byte: (B, T, d_byte), (B, W) -> (B, W, d_model)."""

    def __init__(self, d_byte: int, d_model: int) -> None:
        super().__init__(d_byte, d_model, bias=True)

    def forward(self, h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(h, last + 1)


@dataclass
class ByteifiedCache:
    """Incremental decoding state (batch 1, one document)."""

    enc: list[KVCache]
    backbone: list[KVCache]
    dec: list[KVCache]
    ids: list[int] = field(default_factory=list)
    patch_start: int = 0  # first byte of the open patch
    buf: list[torch.Tensor] = field(default_factory=list)  # (d_byte,) encoder outputs of the open patch
    n_words: int = 0  # backbone positions used (sink included)
    ctx: torch.Tensor | None = None  # (1, D) backbone output of the latest ready patch
    node: int = 0  # trie node of the open patch's bytes (-1: no token extends them)
    seg_start: int = 0  # start of the current segment (for expanded ids)
    prev_h: torch.Tensor | None = None  # (d,) encoder state of the last byte (its boundary waits for the next)
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (ready time, (1, D)) closed patches
    r_max: int = -1  # running max of ready times

    @property
    def length(self) -> int:
        return len(self.ids)


class ByteifiedLM(HierarchicalByteLM):
    """Hierarchical byte LM around a source LM's blocks (module docstring). ``cfg.arch == 'byteified'``."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.source_vocab <= 0:
            raise ValueError(
                "model.arch=byteified needs the source model's vocabulary (model.source_vocab > 0); build it with "
                "bytelm.distill.byteify.build_byteified, which fills the source fields"
            )
        if cfg.chunker not in ("gate", "words"):
            raise ValueError(f"model.chunker must be 'gate' (learned boundaries) or 'words' for arch=byteified, "
                             f"got {cfg.chunker!r}")
        base = copy.deepcopy(cfg)
        base.chunker, base.pooling = "words", "last"  # the parent builds no gate; the pooling is replaced below
        super().__init__(base)
        self.cfg = cfg
        D, d = cfg.d_model, cfg.d_byte
        self.pool: PatchPooling = PatchPooling(d, D)  # type: ignore[assignment]
        self.boundary = BoundaryPredictor(d, cfg.boundary_hidden)
        self.first_word.requires_grad_(False)  # the sink's output takes its place
        self.source_embed = nn.Embedding(cfg.source_vocab, D)
        self.source_embed.weight.requires_grad_(False)
        self.source_head: nn.Linear | None = None
        if not cfg.source_tied:
            self.source_head = nn.Linear(D, cfg.source_vocab, bias=False)
            self.source_head.weight.requires_grad_(False)
        self.expand_proj = nn.Linear(D, d, bias=False)
        self.next_start = nn.Parameter(torch.zeros(256))  # logits of "the next token starts with byte b" (prior)
        self.prior_scale = nn.Parameter(torch.ones(1))  # (1,): FSDP2's fully_shard refuses scalar parameters
        self.vocab_bytes: torch.Tensor
        self.vocab_offsets: torch.Tensor
        self.register_buffer("vocab_bytes", torch.zeros(cfg.source_vocab_bytes, dtype=torch.uint8))
        self.register_buffer("vocab_offsets", torch.zeros(cfg.source_vocab + 1, dtype=torch.long))
        self._max_token = 1
        self._trie: VocabTrie | None = None
        self._trie_key: tuple[int, int] | None = None

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.ones_(self.prior_scale)
        nn.init.zeros_(self.next_start)
        nn.init.zeros_(self.pool.proj.bias)

    # -- source vocabulary ---------------------------------------------------------------------------------

    def set_vocabulary(self, table: list[bytes | None]) -> None:
        """Store the source's token byte strings (``None`` = special, never matched) in the buffers."""
        if len(table) != self.cfg.source_vocab:
            raise ValueError(f"vocabulary has {len(table)} entries, model.source_vocab is {self.cfg.source_vocab}")
        blob = b"".join(t or b"" for t in table)
        if len(blob) != self.cfg.source_vocab_bytes:
            raise ValueError(f"vocabulary holds {len(blob)} bytes, model.source_vocab_bytes is {self.cfg.source_vocab_bytes}")
        lens = torch.tensor([len(t or b"") for t in table], dtype=torch.long)
        with torch.no_grad():
            self.vocab_bytes.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else self.vocab_bytes)
            self.vocab_offsets.zero_()
            self.vocab_offsets[1:] = lens.cumsum(0)
        self._trie = None

    @property
    def trie(self) -> VocabTrie:
        """The vocabulary trie, rebuilt when the buffers change (loading a checkpoint fills them)."""
        key = (int(self.vocab_offsets[-1]), int(self.vocab_bytes[: 4096].long().sum()) if len(self.vocab_bytes) else 0)
        if self._trie is None or key != self._trie_key:
            blob = bytes(self.vocab_bytes.cpu().numpy().tobytes())
            off = self.vocab_offsets.cpu().tolist()
            table: list[bytes | None] = [blob[a:b] or None for a, b in zip(off[:-1], off[1:], strict=True)]
            self._trie, self._trie_key = VocabTrie(table), key
            self._max_token = max((len(t) for t in table if t), default=1)
        return self._trie

    def head_weight(self) -> torch.Tensor:
        """(V, D) the source's output head."""
        return self.source_embed.weight if self.source_head is None else self.source_head.weight

    # -- pieces shared by the full and the cached path -----------------------------------------------------

    def embed_bytes(self, ids: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
        """Byte embedding + projected source embedding of ``expanded`` (B, T) ids (-1: none) -> (B, T, d)."""
        special = ids >= 256
        ex = torch.where(special, self.cfg.source_start_id, expanded)
        e = self.source_embed(ex.clamp(min=0)) * (ex >= 0).unsqueeze(-1).to(self.source_embed.weight.dtype)
        return self.embed(ids) + self.expand_proj(e)

    def expanded_ids(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) longest source token ending at each byte, within its document (-1: none or special)."""
        starts = doc_starts(doc_ids, ids).cpu().tolist()
        rows = [self.trie.longest_suffix_tokens(r, s) for r, s in zip(ids.cpu().tolist(), starts, strict=True)]
        return torch.tensor(rows, dtype=torch.long, device=ids.device).view_as(ids)

    def patch_tokens(self, ids: list[int], starts: list[bool]) -> list[int]:
        """Per byte of one row: the longest source token that ends at the byte and starts inside its patch
        (``starts`` = patch starts); read at a patch's last byte it is the patch itself when the patch is a
        token, else the patch's longest token suffix (-1: none)."""
        return self.trie.longest_suffix_tokens(ids, starts)

    def patch_vectors(self, h: torch.Tensor, ids: torch.Tensor, last: torch.Tensor,
                      word_start: torch.Tensor) -> torch.Tensor:
        """(B, W, D) patch vectors: with ``model.patch_token_embed`` the source's embedding of the patch's token
        (``patch_tokens``; exactly the teacher's input when the patch is one of its tokens) plus the pooled
        encoder state as a learned correction, else the pooled state alone; a special's patch is the source's
        start embedding."""
        words = self.pool(h, last)
        if self.cfg.patch_token_embed:
            rows = [self.patch_tokens(i, s) for i, s in zip(ids.cpu().tolist(), word_start.cpu().tolist(), strict=True)]
            tok = torch.tensor(rows, dtype=torch.long, device=ids.device).gather(1, last.cpu()).to(ids.device)
            base = self.source_embed(tok.clamp(min=0)) * (tok >= 0).unsqueeze(-1).to(words.dtype)
            words = words + base.to(words.dtype)
        is_special = ids.gather(1, last) >= 256  # (B, W)
        start = self.source_embed.weight[self.cfg.source_start_id].to(words.dtype)
        return torch.where(is_special.unsqueeze(-1), start, words)

    def sink(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.source_embed.weight[self.cfg.source_start_id].to(dtype).expand(batch, 1, -1)  # (B, 1, D)

    def prior(self, table: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Additive log-prior (..., V_bytes) for byte positions: ``rows`` index ``table`` (R, D) context vectors,
        ``nodes`` the trie node of the open patch's bytes ``q`` (0: empty; -1: no token extends ``q``).

        ``P(b) ∝ M(q + b) + M_end(q) * u(b)``: the source head's mass of tokens that continue ``q`` with ``b``
        (the naive within-token marginal) plus the mass of the token ``q`` itself times ``u``, the learned
        distribution of the first byte of the next token (``next_start``), because with boundaries decided one
        byte late the open patch may have ended. Where no token extends ``q`` the prior is ``u``. The masses
        carry no gradient (nothing flows back into the context vectors); ``u`` learns."""
        V = self.cfg.vocab_size
        log_u = torch.log_softmax(self.next_start.float(), -1)  # (256,)
        flat_nodes = nodes.reshape(-1)
        out = log_u.expand(flat_nodes.shape[0], 256)
        valid = flat_nodes >= 0
        if bool(valid.any()):
            with torch.no_grad():
                trie = self.trie.to(table.device)  # built on CPU; the masses are gathered where the logits are
                used, r_of = torch.unique(rows.reshape(-1)[valid], return_inverse=True)
                # the head's vocabulary rows in byte order: probabilities come out sorted, ready for prefix sums;
                # the normaliser cancels in the renormalisation below, so specials need not be in the softmax
                head = self.head_weight().index_select(0, trie.order).float()  # (V', D)
                p = torch.softmax(table.detach()[used].float() @ head.t(), -1)  # (R', V')
                # fp64 sums: masses of deep prefixes are small differences of numbers near 1
                cum = torch.cat([torch.zeros_like(p[:, :1]), p.cumsum(1, dtype=torch.float64)], 1)  # (R', V'+1)
                mass, total = trie.masses_from_cumsum(cum, r_of, flat_nodes[valid])  # (M, 256), (M,)
                cont = mass.sum(-1)
                end = (total - cont).clamp(min=0.0)  # mass of the token q itself
                denom = (cont + end).clamp(min=1e-300)
            mix = (mass + end.unsqueeze(-1) * log_u.double().exp()) / denom.unsqueeze(-1)
            lp = mix.clamp(min=1e-300).log().float()
            out = out.clone()
            out[valid] = lp
        vals = torch.full((flat_nodes.shape[0], V), SPECIAL_PRIOR, device=table.device)
        vals = torch.cat([out.clamp(min=PRIOR_FLOOR), vals[:, 256:]], 1)
        return vals.view(*nodes.shape, V)

    def _closed_at_once(self, ids: torch.Tensor, word_start: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: bytes whose patch is known to end there when they arrive (specials, the size cap); every
        other patch end is decided one byte later (the boundary predictor's lookahead)."""
        closed = ids >= 256
        cap = self.cfg.max_word_bytes
        if cap and cap > 0:
            closed = closed | (run_lengths(word_start) >= cap)
        return closed

    def _nodes(self, ids: torch.Tensor, closed: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        trie = self.trie
        rows = [
            trie.prediction_nodes(i, c, s)
            for i, c, s in zip(ids.cpu().tolist(), closed.cpu().tolist(), starts.cpu().tolist(), strict=True)
        ]
        return torch.tensor(rows, dtype=torch.long, device=ids.device)

    # -- forward -------------------------------------------------------------------------------------------

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,  # (B, T) byte ids
        *,
        doc_ids: torch.Tensor | None = None,  # (B, T)
        patch_end: torch.Tensor | None = None,  # (B, T) bool: given patch ends (stage 1: teacher token ends)
        context: torch.Tensor | None = None,  # (B, T, D): teacher final hidden at each patch's last byte (stage 1)
        probe_blocks: int = 0,  # > 0: also run the patch vectors through this many blocks (hidden["probe"])
        expanded: torch.Tensor | None = None,  # (B, T) precomputed expanded ids
        cache: ByteifiedCache | None = None,
        **_: object,
    ) -> ModelOutput:
        if cache is not None:
            return self._forward_cached(input_ids, cache)
        B, T = input_ids.shape
        dev = input_ids.device
        cos, sin = self._byte_rope(torch.arange(T, device=dev))
        if expanded is None:
            expanded = self.expanded_ids(input_ids, doc_ids)
        x = self.embed_bytes(input_ids, expanded)
        h = self._run(self.encoder, x, cos, sin, stack="byte encoder", doc_ids=doc_ids, window=self.cfg.encoder_window)
        b_logits = self.boundary(h)  # (B, T)
        closed: torch.Tensor | None
        if self.cfg.chunker == "words":  # ablation: HAT words, ready one character after they end
            word_start = self.word_starts_batch(input_ids, doc_ids)
            closed = None
        else:  # patches end where the predictor (or the teacher) says; ready one character later
            ends = (b_logits.detach() > self.cfg.boundary_threshold) if patch_end is None else patch_end.bool()
            word_start = close_chunks(input_ids, ends, self.cfg.max_word_bytes, doc_ids)[1]
            closed = self._closed_at_once(input_ids, word_start)
        lay = layout_words(input_ids, word_start, doc_ids, closed)
        W = lay.start.shape[1]
        last = (lay.end - 1).clamp(0, T - 1)  # (B, W)
        words = torch.cat([self.sink(B, h.dtype), self.patch_vectors(h, input_ids, last, word_start)], 1)  # (B, W+1, D)
        sink_doc = torch.where(input_ids[:, :1] >= 256, SINK_MASKED, 0 if doc_ids is None else doc_ids[:, :1])
        word_doc = lay.word_doc if lay.word_doc is not None else torch.zeros(B, W, dtype=torch.long, device=dev)
        word_doc = torch.cat([sink_doc, word_doc], 1)  # (B, W+1)
        hidden: dict[str, torch.Tensor] = {"boundary_logits": b_logits, "patch_last": last, "word_end": lay.end,
                                           "word_start": lay.start}
        if closed is not None:
            hidden["closed"] = closed
        if probe_blocks > 0:
            hidden["probe"] = self.run_backbone(words, doc_ids=word_doc, n_blocks=probe_blocks, norm=False)[:, 1:]
        if context is None:
            z = self.run_backbone(words, doc_ids=word_doc)  # (B, W+1, D)
        else:
            z_sink = self.run_backbone(words[:, :1])  # (B, 1, D) the sink alone = the source's start state
            zc = context.gather(1, last.unsqueeze(-1).expand(-1, -1, context.shape[-1])).to(z_sink.dtype)
            z = torch.cat([z_sink, zc], 1)
        hidden["words"] = z[:, 1:]
        inject = [p(z).gather(1, lay.ctx_idx.unsqueeze(-1).expand(-1, -1, self.cfg.d_byte)) for p in self.ctx_proj]
        y = self._run(self.decoder, h, cos, sin, inject=inject, stack="byte decoder", doc_ids=doc_ids)  # (B, T, d)
        logits = self.lm_head(self.norm(y))  # (B, T, V)
        if self.cfg.lm_prior:
            rows = lay.ctx_idx + torch.arange(B, device=dev).unsqueeze(1) * (W + 1)  # (B, T) into z.flatten(0, 1)
            nodes = self._nodes(input_ids, torch.zeros_like(word_start) if closed is None else closed, word_start)
            logits = logits + self.prior_scale * self.prior(z.flatten(0, 1), rows, nodes).to(logits.dtype)
        real = input_ids != PAD_ID
        metrics: dict[str, torch.Tensor | float] = {
            "bytes_per_word": (real.sum() / (word_start & real).sum().clamp_min(1)).detach(),
        }
        return ModelOutput(logits=logits, metrics=metrics, hidden=hidden)

    # -- cached decoding -----------------------------------------------------------------------------------

    def new_cache(self) -> ByteifiedCache:  # type: ignore[override]
        return ByteifiedCache(
            enc=[KVCache() for _ in self.encoder],
            backbone=[KVCache() for _ in self.backbone],
            dec=[KVCache() for _ in self.decoder],
        )

    @torch.no_grad()
    def _forward_cached(self, new_ids: torch.Tensor, cache: ByteifiedCache) -> ModelOutput:  # type: ignore[override]
        """Feed ``new_ids`` (1, n) after everything in ``cache``; returns their logits (1, n, V). Applies the
        rules of the full forward byte by byte: a patch ends where the boundary logit of its last byte (known
        with the next byte) is positive, and is then ready one character later; a special or the size cap closes
        a patch at once."""
        if new_ids.shape[0] != 1:
            raise ValueError("cached byteified decoding supports batch size 1")
        if self.cfg.chunker == "words":
            raise NotImplementedError("cached decoding of a byteified model with word patches (the ablation); "
                                      "use model.chunker=gate (learned boundaries) to generate")
        dev = new_ids.device
        new = [int(i) for i in new_ids[0].tolist()]
        p0, n = cache.length, len(new)
        if p0 == 0 and new[0] < 256:  # a row that starts inside a document: the sink comes first
            cache.ctx = self.run_backbone(self.sink(1, self.embed.weight.dtype), torch.zeros(1, dtype=torch.long, device=dev),
                                          caches=cache.backbone)[:, -1]
            cache.n_words = 1
        cache.ids.extend(new)
        trie = self.trie
        lo = max(cache.seg_start, p0 - self._max_token)
        window = cache.ids[lo:]
        starts = [False] * len(window)
        starts[0] = True
        ex = trie.longest_suffix_tokens(window, starts)[p0 - lo :]
        pos = torch.arange(p0, p0 + n, device=dev)
        cos, sin = self._byte_rope(pos)
        x = self.embed_bytes(new_ids, torch.tensor([ex], dtype=torch.long, device=dev))
        h = self._run(self.encoder, x, cos, sin, caches=cache.enc, window=self.cfg.encoder_window)  # (1, n, d)
        # boundary of byte t is decided when byte t+1 is here: pair each state with the next one
        hs = h[0] if cache.prev_h is None else torch.cat([cache.prev_h.unsqueeze(0), h[0]], 0)
        pair_logits = self.boundary.pairs(hs[:-1], hs[1:]).tolist()  # for bytes p0-1.. (or p0..) up to the last-1
        first_pair = p0 - 1 if cache.prev_h is not None else p0
        cache.prev_h = h[0, -1]
        kids = trie._children()
        cap = self.cfg.max_word_bytes
        ctx_rows: list[torch.Tensor] = []
        nodes: list[int] = []
        for j, tok in enumerate(new):
            t = p0 + j
            if tok >= 256:
                if cache.patch_start < t:  # a special ends the open patch before it (ready at the special)
                    self._close_patch(cache, t - 1, max(cache.r_max, t), dev)
                self._close_patch(cache, t, max(cache.r_max, t), dev, special=True)  # its own patch, ready at once
                cache.seg_start = t + 1
                own = True
            else:
                k = t - 1 - first_pair
                if cache.patch_start < t and k >= 0 and pair_logits[k] > self.cfg.boundary_threshold:  # the open patch ended at t-1
                    self._close_patch(cache, t - 1, max(cache.r_max, t + _CHAR_LEN[tok] - 1), dev)
                if cache.patch_start == t:
                    cache.node = 0
                cache.buf.append(h[0, j])
                cur = cache.node
                cache.node = kids.get(cur, {}).get(tok, -1) if cur >= 0 else -1
                own = bool(cap) and cap > 0 and t - cache.patch_start + 1 >= cap
                if own:  # the size cap closes the patch at this byte, known at once
                    self._close_patch(cache, t, max(cache.r_max, t), dev)
            while cache.pending and cache.pending[0][0] <= t:  # patches ready by now
                cache.ctx = cache.pending.pop(0)[1]
            ctx_rows.append(cache.ctx[0] if cache.ctx is not None else self.first_word)
            nodes.append(0 if own else cache.node)
        table = torch.stack(ctx_rows).unsqueeze(0)  # (1, n, D)
        inject = [p(table) for p in self.ctx_proj]
        y = self._run(self.decoder, h, cos, sin, caches=cache.dec, inject=inject)
        logits = self.lm_head(self.norm(y))
        if self.cfg.lm_prior:
            prior = self.prior(table[0], torch.arange(n, device=dev), torch.tensor(nodes, device=dev))
            logits = logits + self.prior_scale * prior.unsqueeze(0).to(logits.dtype)
        return ModelOutput(logits=logits)

    def _close_patch(self, cache: ByteifiedCache, t: int, ready: int, dev: torch.device, special: bool = False) -> None:
        """Pool the open patch (ending at byte t), run one backbone step; its output is the context from byte
        ``ready`` on."""
        hb = torch.stack(cache.buf).unsqueeze(0) if cache.buf else None  # (1, len, d)
        if special or hb is None:
            vec = self.sink(1, self.embed.weight.dtype)
        else:
            vec = self.pool(hb, torch.tensor([[hb.shape[1] - 1]], device=dev))  # (1, 1, D)
            if self.cfg.patch_token_embed:
                patch = cache.ids[cache.patch_start : t + 1]
                tok = self.patch_tokens(patch, [True] + [False] * (len(patch) - 1))[-1]
                if tok >= 0:
                    vec = vec + self.source_embed.weight[tok].to(vec.dtype)
        pos = torch.tensor([cache.n_words], device=dev)
        z = self.run_backbone(vec, pos, caches=cache.backbone)[:, -1]
        cache.pending.append((ready, z))
        cache.r_max = ready
        cache.n_words += 1
        cache.buf = []
        cache.patch_start = t + 1
        cache.node = 0
