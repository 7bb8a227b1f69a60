"""HAT-style hierarchical byte LM: byte encoder -> word pooling -> latent backbone -> byte decoder.

DESIGN.md §2. Bytes are split into words (rule-based splitter; the boundary source is pluggable through
``cfg.chunker``); a few narrow causal layers encode every byte; one vector per word is pooled; a wide causal
backbone runs over word vectors (most parameters and FLOPs); a few narrow layers decode every byte from the
encoder's byte activations plus exactly one word vector: the backbone output of the *previous* word.

Choices worth knowing (all tested in tests/test_hierarchical.py and tests/test_generate.py):

- **Specials are words of their own.** BOS/EOS/PAD (ids >= 256) each form a one-byte word, and the byte after
  a special starts a new word, whatever ``word_start`` says. So a PAD run at the end of a row is a run of
  one-byte words after every real word; the stacks are causal, so it cannot affect anything before it.
- **When does a byte see a word?** A word is known to be complete only when the first *complete character*
  of the next word exists (DESIGN.md §2: incomplete UTF-8 stays in the current word while generating). For a
  word ``w`` whose successor starts at ``s`` with a character of ``c`` bytes (``c`` from the lead byte), the
  word is *ready* at ``r_w = s + c - 1`` (running max over words, so words become ready in order). Byte ``t``
  receives the backbone output of the latest word with ``r_w <= t`` in its own document, or the learned
  first-word vector when there is none. For ASCII ``c = 1`` and this is exactly "bytes of word w get the
  output of word w-1". For a word that starts with a multi-byte character, its first ``c - 1`` bytes still
  get the older vector: handing them the newer one would tell position ``s`` that the *next* bytes complete
  a character that starts a word, a leak from the future that would also make cached generation disagree
  with the full forward. The last word of a document is ready at the next document's start (never used).
- **Pooling query positions.** The learned query sits at the word's first byte and keys at their byte
  positions, so RoPE sees the within-word offset (0, 1, 2, ...) and the pooled vector does not depend on
  where the word is in the row (packed documents give the same result as alone). Because the query is one
  shared vector, the scores are per-byte quantities and the within-word softmax is a segment softmax
  (scatter max / index_add): O(T * D), no (W, max_word_len) padding.
- **The decoder's one key.** Cross-attending to exactly one key has softmax weight 1, so it reduces to a linear
  map of that key; we apply ``Linear(d_model, d_byte)`` to the word vector and add it to the residual stream
  (first decoder layer, or every layer with ``decoder_cross='all'``, one projection per layer).
- **Learned chunks** (``chunker='gate'``, ``bytelm/models/chunking.py``): the MrT5 delete gate reads the
  encoder output (minus its running mean with ``gate.center``); a kept byte closes its chunk, and the chunk
  is ready *at* that byte (the decision used bytes up to it only), so ``layout_words(closed=...)`` skips the
  lookahead for it. The task loss reaches the gate through a straight-through factor on each chunk vector
  (value 1, gradient of the closing byte's keep probability); the regulariser ``alpha * mean(G)`` with the PI
  controller holds the deletion ratio at ``gate.target_ratio`` and trains the gate only (detached input).
  Cached decoding applies the same rules byte by byte.
- **Cached decoding** (``new_cache()``, ``forward(ids, cache=...)``, batch 1, one document) decides words
  online: after each new byte it re-splits the complete characters from the start of the current rule word
  with the same splitter (bytes of an unfinished UTF-8 character wait, so the size cap never cuts inside a
  character the full forward keeps whole) and applies the same ready rule, pools a word and runs one backbone step once the word is ready.
  It equals the full forward (tested to 1e-4) as long as the splitter is prefix-stable once a character is
  complete and splitting from a word start gives the words of the whole text, the properties HAT's online
  splitting relies on (``bytelm.data.words_online.OnlineWordSplitter`` documents the rare exceptions).
"""

from __future__ import annotations

import codecs
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bytelm.data.bytes import PAD_ID
from bytelm.models.chunking import causal_center, doc_starts, gate_closed, keep_scale
from bytelm.models.config import ModelConfig, ModelOutput
from bytelm.models.gates import DeleteGate, PIController, gate_stats, masked_mean
from bytelm.models.layers import Block, KVCache, RMSNorm, apply_rope, init_linear_, rope_cos_sin

log = logging.getLogger(__name__)

_NEVER = 1 << 40  # ready time of a word whose end is not in the row
_ANCHOR_WINDOW = 512  # cached decoding re-splits at most this far back before the current word


# ----------------------------------------------------------------------------------------------- splitting


def _regex_word_ends(data: bytes, max_word_bytes: int | None = 100) -> np.ndarray:
    """Stand-in for ``bytelm.data.words.word_ends`` if that module is missing: an optional single space + a
    run of letters/digits/non-ASCII bytes + trailing ASCII punctuation, or a space+punctuation run, or one
    other byte. Prefix-stable and compositional, like the real splitter."""
    import re

    pat = re.compile(rb" ?[A-Za-z0-9\x80-\xff]+[!-/:-@\[-`{-~]*| ?[!-/:-@\[-`{-~]+|[\s\S]", re.DOTALL)
    ends: list[int] = []
    for m in pat.finditer(data):
        a, b = m.span()
        while max_word_bytes is not None and b - a > max_word_bytes:
            a += max_word_bytes
            ends.append(a)
        ends.append(b)
    return np.asarray(ends, dtype=np.int64)


def _word_ends_fn() -> Callable[..., np.ndarray]:
    try:
        from bytelm.data.words import word_ends
    except ImportError:  # pragma: no cover - only if bytelm/data/words.py is missing
        log.warning("bytelm.data.words not available; using a regex stand-in splitter")
        return _regex_word_ends
    return word_ends


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
    word_ends = _word_ends_fn()
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
    """Number of bytes (0-3) at the end of ``ids`` that begin a UTF-8 character later bytes may still complete,
    as an incremental UTF-8 decoder holds them back (an invalid sequence is not pending: its bytes are final)."""
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
) -> WordLayout:
    """Vectorised word bookkeeping for the training path (one host sync for W).

    ``closed`` (learned chunker): a word whose last byte is closed is ready at that byte itself (the gate
    decided the end from the bytes up to it); other words keep the lookahead rule of the module docstring."""
    B, T = ids.shape
    dev = ids.device
    pos = torch.arange(T, device=dev).expand(B, T)  # (B, T)
    special = ids >= 256
    doc_start = doc_starts(doc_ids, ids)  # (B, T)
    ws = word_start.bool() | special | doc_start
    ws[:, 1:] |= special[:, :-1]
    word_id = ws.long().cumsum(1) - 1  # (B, T)
    n_words = ws.sum(1)  # (B,)
    W = int(n_words.max())
    # first byte of each word; non-start bytes write into a scratch column W that is dropped
    start = torch.full((B, W + 1), T, dtype=torch.long, device=dev)
    start.scatter_(1, torch.where(ws, word_id, W), pos)
    start = start[:, :W].contiguous()  # (B, W)
    nxt = torch.cat([start[:, 1:], torch.full((B, 1), T, dtype=torch.long, device=dev)], 1)  # (B, W)
    offset = pos - start.gather(1, word_id)  # (B, T)
    # ready time r_w = s_{w+1} + c(s_{w+1}) - 1 (see the module docstring); last word of a doc: s_{w+1}
    clen = torch.cat([utf8_char_len(ids), torch.ones(B, 1, dtype=torch.long, device=dev)], 1)  # (B, T+1)
    ready = nxt + clen.gather(1, nxt) - 1
    nxt_is_doc_start = torch.cat([doc_start, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1).gather(1, nxt)
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


# ----------------------------------------------------------------------------------------------- model


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
    hsum: torch.Tensor | None = None  # (1, 1, d_byte) running sum of encoder outputs (gate.center, chunker=gate)

    @property
    def length(self) -> int:
        return len(self.ids)


class HierarchicalByteLM(nn.Module):
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
        self.encoder = nn.ModuleList([Block(d, cfg.n_heads_byte, cfg.mlp_ratio, be) for _ in range(cfg.encoder_layers)])
        self.pool: nn.Module = (
            QueryPooling(d, D, cfg.n_heads) if cfg.pooling == "query" else LastPooling(d, D)
        )
        # the backbone may be a transplanted Llama-family source model's blocks (bytelm.distill.transplant)
        self.backbone = nn.ModuleList([
            Block(D, cfg.n_heads, cfg.mlp_ratio, be, n_kv_heads=cfg.n_kv_heads or None, head_dim=cfg.head_dim or None,
                  mlp_hidden=cfg.mlp_hidden or None, norm_eps=cfg.norm_eps, qkv_bias=cfg.qkv_bias)
            for _ in range(cfg.n_layers)
        ])
        self.backbone_norm = RMSNorm(D, cfg.norm_eps)
        self.first_word = nn.Parameter(torch.zeros(D))  # context of the bytes before any ready word of a doc
        n_inj = cfg.decoder_layers if cfg.decoder_cross == "all" else 1
        self.ctx_proj = nn.ModuleList([nn.Linear(D, d, bias=False) for _ in range(n_inj)])
        self.decoder = nn.ModuleList([Block(d, cfg.n_heads_byte, cfg.mlp_ratio, be) for _ in range(cfg.decoder_layers)])
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # learned chunker: the MrT5 delete gate on the encoder output decides which bytes close a chunk
        g = cfg.gate
        self.gate = DeleteGate(d, g.k, g.bias_init) if cfg.chunker == "gate" else None
        self.controller = PIController(g.target_ratio, g.kp, g.ki, g.alpha_min) if self.gate is not None else None

    def init_weights(self) -> None:
        """Separate from construction (meta-device / sharded builds init after sharding). Residual output
        projections of each stack are scaled by 1/sqrt(2 * its depth)."""
        std = self.cfg.init_std
        init_linear_(self, std=std)
        n_byte = max(1, self.cfg.encoder_layers + self.cfg.decoder_layers)
        for stack, depth in ((self.encoder, n_byte), (self.decoder, n_byte), (self.backbone, self.cfg.n_layers)):
            init_linear_(stack, std=std, out_std=std / math.sqrt(2 * max(1, depth)))
        nn.init.normal_(self.first_word, std=std)
        if isinstance(self.pool, QueryPooling):
            nn.init.normal_(self.pool.query, std=std)
        if self.gate is not None and self.controller is not None:
            self.gate.reset_parameters()  # xavier w, b = bias_init (init_linear_ gave N(0, std) and b = 0)
            self.controller.reset()

    def new_cache(self) -> HierCache:
        return HierCache(
            enc=[KVCache() for _ in self.encoder],
            backbone=[KVCache() for _ in self.backbone],
            dec=[KVCache() for _ in self.decoder],
        )

    def word_starts_row(
        self, ids: Sequence[int] | np.ndarray, doc_ids: np.ndarray | None = None, capped: bool = True
    ) -> np.ndarray:
        """Boundary source for one row, (n,) bool (pluggable by ``cfg.chunker``; 'words' = rule-based
        splitter). ``capped=False`` gives the rule's words before the size cap cuts long ones."""
        return split_word_starts(ids, self.cfg.max_word_bytes if capped else None, doc_ids)

    def word_starts_batch(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) bool word starts of a batch, row by row with ``word_starts_row`` (CPU splitter)."""
        rows = ids.cpu().numpy()
        docs = doc_ids.cpu().numpy() if doc_ids is not None else [None] * len(rows)
        starts = [self.word_starts_row(r, d) for r, d in zip(rows, docs, strict=True)]
        return torch.from_numpy(np.stack(starts)).to(ids.device)

    # -- stacks ----------------------------------------------------------------------------------------

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, cos, sin, caches=None, inject=None, **kw):
        """Run a stack; ``inject[i]`` (if given) is added before block i (decoder context)."""
        for i, blk in enumerate(blocks):
            if inject is not None and i < len(inject):
                x = x + inject[i]
            c = caches[i] if caches is not None else None
            if self.cfg.activation_checkpointing and self.training and c is None:
                x = checkpoint(lambda x_, b=blk: b(x_, cos, sin, **kw), x, use_reentrant=False)
            else:
                x = blk(x, cos, sin, cache=c, **kw)
        return x

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
        the final norm (only when all blocks ran). With ``caches`` the words continue after the cached ones, at
        ``positions`` (default: from the cache length)."""
        n = len(self.backbone) if n_blocks is None else n_blocks
        if not 0 <= n <= len(self.backbone):
            raise ValueError(f"n_blocks={n_blocks} outside 0..{len(self.backbone)}")
        if positions is None:
            p0 = caches[0].length if caches else 0
            positions = torch.arange(p0, p0 + words.shape[1], device=words.device)
        cos, sin = self._word_rope(positions)
        blocks = self.backbone if n == len(self.backbone) else self.backbone[:n]
        z = self._run(blocks, words, cos, sin, caches=caches, doc_ids=doc_ids, window=self.cfg.backbone_window)
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
        win = self.cfg.encoder_window
        h = self._run(self.encoder, self.embed(input_ids), cos, sin, doc_ids=doc_ids, window=win)  # (B, T, d)

        G = closed = hg = None
        if self.gate is not None:  # learned chunks (a given word_start is ignored)
            hg = causal_center(h, doc_ids) if self.cfg.gate.center else h  # running mean: stays causal
            G = self.gate(hg, input_ids < 256)  # (B, T); specials get k but always close a chunk of their own
            closed, word_start = gate_closed(input_ids, G, self.cfg.gate.tau_del, self.cfg.max_word_bytes, doc_ids)
        elif word_start is None:
            word_start = self.word_starts_batch(input_ids, doc_ids)
        lay = layout_words(input_ids, word_start, doc_ids, closed)
        W = lay.start.shape[1]

        words = self._pool(h, lay.word_id, lay.offset, lay.end, W)  # (B, W, D)
        if G is not None and self.training and torch.is_grad_enabled():
            words = words * keep_scale(G, self.cfg.gate.k, self.cfg.gate.tau_del < G, lay.end).to(words.dtype)
        z = self.run_backbone(words, torch.arange(W, device=dev), doc_ids=lay.word_doc)  # (B, W, D)

        table = torch.cat([self.first_word.to(z.dtype).expand(B, 1, -1), z], 1)  # (B, W+1, D)
        idx = lay.ctx_idx.unsqueeze(-1).expand(-1, -1, self.cfg.d_byte)  # (B, T, d)
        inject = [p(table).gather(1, idx) for p in self.ctx_proj]  # each (B, T, d)
        y = self._run(self.decoder, h, cos, sin, inject=inject, doc_ids=doc_ids)  # (B, T, d)
        logits = self.lm_head(self.norm(y))  # (B, T, V)

        real = input_ids != PAD_ID
        bpw = real.sum() / (lay.word_start & real).sum().clamp_min(1)
        metrics: dict[str, torch.Tensor | float] = {"bytes_per_word": bpw.detach()}
        aux = None
        if G is not None and self.gate is not None and self.controller is not None:
            byte_mask = input_ids < 256
            alpha = self.controller.alpha.clone()  # value set by the previous step
            metrics.update(gate_stats(G, self.cfg.gate.tau_del, byte_mask, alpha))
            if self.training:
                # the regulariser trains the gate only (its input detached; same value as G): through the encoder
                # it shifts every byte's gate together and the ratio swings (docs/mrt5.md, measured)
                assert hg is not None
                aux = alpha * masked_mean(self.gate(hg.detach(), byte_mask), byte_mask)
                self.controller.observe(G, self.cfg.gate.tau_del, byte_mask)  # global ratio, used from the next step
        hidden = {"words": z, "word_start": lay.start, "word_end": lay.end}  # for distillation (bytelm.distill)
        return ModelOutput(logits=logits, aux_loss=aux, metrics=metrics, hidden=hidden)

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
        h = self._run(self.encoder, self.embed(new_ids), cos, sin, caches=cache.enc, window=self.cfg.encoder_window)
        cache.buf = h if cache.buf is None else torch.cat([cache.buf, h], 1)  # (1, len - pend_start, d)
        if self.gate is not None:
            return self._decode_cached(h, cos, sin, pos, cache, *self._gate_chunks_cached(new_ids, h, cache))

        # which words became ready: re-split from the start of the rule word (before the size cap) that holds
        # the oldest unready word, and apply the ready rule of layout_words (running max included)
        # only complete characters are split (DESIGN.md §2: incomplete UTF-8 stays in the current word): the size
        # cap must never cut inside a character that later bytes complete, which the full forward never does
        base = cache.anchor
        done = cache.length - pending_utf8(cache.ids)
        capped = np.flatnonzero(self.word_starts_row(cache.ids[base:done])) + base
        starts = [cache.pend_start] + [int(x) for x in capped if x > cache.pend_start]
        last = p0 + n - 1
        ready_at: list[int] = []
        for s_next in starts[1:]:
            r = max(cache.r_max, s_next + _CHAR_LEN[min(cache.ids[s_next], 256)] - 1)
            if r > last:
                break
            ready_at.append(r)
            cache.r_max = r
        if ready_at:  # move the re-split anchor to the rule word holding the new oldest unready word
            new_pend = starts[len(ready_at)]
            rule = np.flatnonzero(self.word_starts_row(cache.ids[base:done], capped=False)) + base
            cache.anchor = int(rule[rule <= new_pend].max())
            if new_pend - cache.anchor > _ANCHOR_WINDOW:  # bound the re-split (as words_online.py does)
                cache.anchor = new_pend
        return self._decode_cached(h, cos, sin, pos, cache, starts, ready_at)

    def _gate_chunks_cached(self, new_ids: torch.Tensor, h: torch.Tensor, cache: HierCache) -> tuple[list[int], list[int]]:
        """Chunk starts (oldest pending first, then one per closed chunk) and ready times for the new bytes, by
        the rules of ``bytelm.models.chunking.gate_closed`` applied online."""
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

    def _decode_cached(self, h: torch.Tensor, cos, sin, pos: torch.Tensor, cache: HierCache, starts: list[int],
                       ready_at: list[int]) -> ModelOutput:
        """Pool the chunks that became ready (``starts[:k+1]`` bound them), run the backbone on them and decode
        the new bytes; each byte sees the latest chunk with ready time <= its position."""
        dev = h.device
        k = len(ready_at)
        prev = self.first_word.view(1, -1) if cache.ctx is None else cache.ctx  # (1, D)
        table = prev.unsqueeze(0)  # (1, 1, D)
        if k:
            words = self._pool_span(cache, starts, k)  # (1, k, D)
            z = self.run_backbone(words, torch.arange(cache.n_ready, cache.n_ready + k, device=dev), caches=cache.backbone)
            table = torch.cat([table, z], 1)  # (1, k+1, D)
            assert cache.buf is not None
            cache.buf = cache.buf[:, starts[k] - cache.pend_start :]
            cache.pend_start = starts[k]
            cache.n_ready += k
            cache.ctx = z[:, -1]
        sel = (torch.tensor(ready_at, dtype=torch.long, device=dev).view(1, -1) <= pos.view(-1, 1)).sum(1)  # (n,)
        inject = [p(table)[:, sel] for p in self.ctx_proj]  # each (1, n, d)
        y = self._run(self.decoder, h, cos, sin, caches=cache.dec, inject=inject)
        return ModelOutput(logits=self.lm_head(self.norm(y)))

    def _pool_span(self, cache: HierCache, starts: list[int], k: int) -> torch.Tensor:
        """Pool the ``k`` words ``[starts[i], starts[i+1])`` from the buffered encoder outputs -> (1, k, D)."""
        assert cache.buf is not None
        dev = cache.buf.device
        span = starts[k] - cache.pend_start
        ws = torch.zeros(span, dtype=torch.bool, device=dev)
        ws[torch.tensor(starts[:k], device=dev) - cache.pend_start] = True
        word_id = (ws.long().cumsum(0) - 1).unsqueeze(0)  # (1, span)
        st = torch.tensor(starts[: k + 1], device=dev) - cache.pend_start  # (k+1,)
        offset = torch.arange(span, device=dev).unsqueeze(0) - st[word_id]  # (1, span)
        return self._pool(cache.buf[:, :span], word_id, offset, st[1:].unsqueeze(0), k)


def _check_shapes() -> None:  # pragma: no cover - handy when editing: python -m bytelm.models.hierarchical
    cfg = ModelConfig(arch="hierarchical", d_model=64, n_layers=2, n_heads=4, d_byte=32, n_heads_byte=2)
    m = HierarchicalByteLM(cfg)
    m.init_weights()
    out = m(torch.tensor([list(b"hello world, this is a test")]))
    print(out.logits.shape, {k: float(v) for k, v in out.metrics.items()})
    print(F.cross_entropy(out.logits[0, :-1], torch.tensor(list(b"ello world, this is a test"))).item())


if __name__ == "__main__":  # pragma: no cover
    _check_shapes()
