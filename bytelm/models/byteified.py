"""A byteified subword LM: the source model's decoder blocks are the backbone of a hierarchical byte model.

docs/byteify.md (Bolmo, HAT-from-Llama). ``bytelm.distill.byteify`` builds it from any Llama-family Hugging
Face model (weights mapped into bytelm's own blocks by ``bytelm.distill.transplant``) and trains it in two
stages; this file is the pure-torch model. Bytes -> patches -> source blocks -> (byte, boundary) symbols:

- **Encoder input** = byte embedding + a projection of the source's embedding of the *longest vocabulary token
  that ends at this byte* (the "expanded" embedding; bytes <= t only). The source vocabulary travels with the
  model as two buffers (``vocab_bytes``, ``vocab_offsets``), so an exported folder needs no tokenizer.
- **Segmentation** (which bytes end a patch) comes from a *segmenter*, which may look ahead: the boundary
  predictor (``chunker=gate``; its logit for byte t reads the encoder states of bytes
  t..t+``boundary_lookahead``), given ends (``patch_end=``: the source tokenizer's token ends, stage 1 and the
  ``tokenizer`` segmenter of ``bytelm.eval``), or HAT words (``chunker=words``, the ablation). Specials and
  the size cap ``max_word_bytes`` always end a patch. The predictor's logits become ends by
  ``boundary_decode``: ``threshold`` (each byte on its own) or ``vocab`` (the most likely segmentation into
  source vocabulary tokens, ``bytelm.models.vocab_segment``: no patch the source never saw).
- **Fused head, no delay.** The decoder predicts at byte t the symbol of byte t+1: (byte, ends-its-patch?), 2
  x V outputs (``[:V]`` continues, ``[V:]`` ends). A patch is ready *at its own last byte*: that byte already
  reads the patch's backbone output, so the next patch's first byte is predicted from it. Because every
  boundary bit is predicted and scored, the segmenter's lookahead leaks nothing: the score is the joint
  cross-entropy of the (byte, bit) symbols, an upper bound on the byte NLL whatever chose the bits
  (``joint_logprobs``). Where the size cap forces the next byte to end its patch, the "continues" half is
  masked.
- **Patch vectors** = the projected encoder state at the patch's last byte; with ``patch_token_embed`` (the
  default) it is a correction, starting at zero, added to the source embedding of the patch's token (the
  longest vocabulary token that ends at the patch's last byte and starts inside the patch: the patch itself
  when it is a token). A special (BOS/EOS/PAD) is a patch whose vector is the source's document-start
  embedding.
- **Sink.** The source always saw its start token at position 0. A row that begins inside a document gets a
  virtual first patch with that embedding (its output is the context before the first patch); a row that
  begins with a special masks it.
- **Exact prior** (``lm_prior``, the default). The logits are ``prior_scale * log P_prior + residual``:
  ``P_prior`` is the source LM head on the context patch's backbone output turned exactly into (byte, bit)
  probabilities (``bytelm.models.byte_prior``), the residual head starts at zero. With the tokenizer's
  segmentation the untrained model scores every text as the source model does. Without ``lm_prior`` the
  logits are the residual head's alone.
- **Training hooks**: ``context=`` (B, T, D) replaces the backbone outputs by the teacher's final hidden
  states read at each patch's last byte (stage 1), ``probe_blocks=k`` returns the patch vectors after the
  first k blocks (the encoder loss) in ``hidden["probe"]``, and ``boundary_only=True`` runs the encoder and
  the boundary predictor alone, its loss the BCE against ``patch_end`` (the boundary phase).

Cached decoding (``byteified_cache.py``) feeds (byte, bit) pairs; a byte fed without its bit gets the bit the
fused head prefers after it (this is how generation decides boundaries, and how the prompt's last byte is
re-decided: Bolmo's rollback). It equals the full forward given the same bits.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bytelm.data.bytes import PAD_ID
from bytelm.models.byte_prior import PRIOR_FLOOR, SPECIAL_LOGP, fused_log_prior
from bytelm.models.byteified_cache import ByteifiedDecoding
from bytelm.models.chunking import close_chunks, doc_starts, run_lengths
from bytelm.models.config import ModelConfig, ModelOutput
from bytelm.models.hierarchical import HierarchicalByteLM
from bytelm.models.layers import RMSNorm
from bytelm.models.vocab_segment import vocab_segment_row
from bytelm.models.vocab_trie import VocabTrie
from bytelm.models.word_layout import LastPooling, layout_words

__all__ = [
    "PRIOR_FLOOR",
    "SPECIAL_LOGP",
    "BoundaryPredictor",
    "ByteifiedLM",
    "fused_marginal",
    "joint_logprobs",
]

IGNORE = (
    -100
)  # target id that is not scored (bytelm.data.packed.IGNORE; not imported: exports ship this file)
SINK_MASKED = -2  # word-doc id of a masked sink: no patch attends to it
MASKED = -1e4  # logit of a symbol a rule forbids (the "continues" half where the size cap ends the patch)


class BoundaryPredictor(nn.Module):
    """Logit that byte t ends a patch, from the encoder states of bytes t, t+1, ..., t+L (L = ``lookahead``;
    zeros past the row's end): (B, T, d) -> (B, T). A segmenter, not a prediction: it may look ahead because
    the fused head pays for every bit it chooses."""

    def __init__(self, dim: int, hidden: int = 0, lookahead: int = 1) -> None:
        super().__init__()
        if lookahead < 0:
            raise ValueError(f"model.boundary_lookahead must be >= 0, got {lookahead}")
        self.lookahead = lookahead
        self.norm = RMSNorm(dim)
        n_in = (1 + lookahead) * dim
        self.mlp: nn.Module = (
            nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            if hidden > 0
            else nn.Linear(n_in, 1)
        )

    def forward(self, h: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """``real`` (B, T) bool: False at padding, which reads as zeros like the row's end (a right-padded row
        gets the bits it gets alone)."""
        x = self.norm(h)  # (B, T, d)
        if real is not None:
            x = x * real.unsqueeze(-1).to(x.dtype)
        parts = [x]
        for k in range(1, self.lookahead + 1):
            parts.append(torch.cat([x[:, k:], torch.zeros_like(x[:, :k])], 1)[:, : x.shape[1]])
        return self.mlp(torch.cat(parts, -1)).squeeze(-1).float()  # (B, T)


SEGMENTER_COPIES = ("embed.", "expand_proj.", "encoder.")  # what the segmenter's own encoder copies


def segmenter_snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors that freeze a model's segmenter (``model.segmenter_encoder``), from a state dict: copies
    of the shared byte embedding, expansion projection and encoder under ``segmenter.`` and
    ``segmenter_ready`` = 1. Applied to a state dict (not to modules) so it loads into plain, ZeRO-3 and
    FSDP2 parameters alike."""
    snap = {f"segmenter.{k}": v.clone() for k, v in state.items() if k.startswith(SEGMENTER_COPIES)}
    if not any(k.startswith("segmenter.encoder.") for k in snap):
        raise ValueError("segmenter snapshot: the state dict holds no encoder.* tensors to copy")
    snap["segmenter_ready"] = torch.ones(1)
    return snap


class PatchPooling(LastPooling):
    """``LastPooling`` with a bias, indexed by each patch's last byte: (B, T, d_byte), (B, W) -> (B, W,
    d_model)."""

    def __init__(self, d_byte: int, d_model: int) -> None:
        super().__init__(d_byte, d_model, bias=True)

    def forward(self, h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(h, last + 1)


def joint_logprobs(
    logits: torch.Tensor,  # (B, T, 2V) fused logits
    input_ids: torch.Tensor,  # (B, T)
    targets: torch.Tensor,  # (B, T) next ids, IGNORE where nothing is predicted
    closed: torch.Tensor,  # (B, T) bool: the byte ends its patch (the bits used)
) -> torch.Tensor:  # (B, T) fp32 log-prob of each target symbol, 0 where ignored
    """Log-probability of each target *symbol*: (byte t+1, bit t+1) where byte t+1 is the next input (its bit
    is known), else the byte with its bit summed out (the row's last position, a padded continuation). Summed
    over a text this is the joint log-likelihood of its bytes and the bits used, a lower bound on log
    P(bytes)."""
    V = logits.shape[-1] // 2
    lf = logits.float()
    logz = torch.logsumexp(lf, -1)  # (B, T)
    valid = targets != IGNORE
    tgt = targets.clamp(min=0)
    nxt_in = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -1)], 1)
    nxt_bit = torch.cat([closed[:, 1:], torch.zeros_like(closed[:, :1])], 1).long()
    known = valid & (nxt_in == targets)
    cont = lf.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    end = lf.gather(-1, (tgt + V).unsqueeze(-1)).squeeze(-1)
    joint = torch.where(nxt_bit.bool(), end, cont)
    marg = torch.logaddexp(cont, end)
    lp = torch.where(known, joint, marg) - logz
    return torch.where(valid, lp, torch.zeros_like(lp))


class ByteifiedLM(ByteifiedDecoding, HierarchicalByteLM):  # type: ignore[misc]
    """Hierarchical byte LM around a source LM's blocks (module docstring). ``cfg.arch == 'byteified'``."""

    fused_head = True  # logits are (B, T, 2V) (byte, ends-patch) symbols; generation and scoring read them so

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.source_vocab <= 0:
            raise ValueError(
                "model.arch=byteified needs the source model's vocabulary (model.source_vocab > 0); build "
                "it with bytelm.distill.byteify.build_byteified, which fills the source fields"
            )
        if cfg.boundary_decode not in ("threshold", "vocab"):
            raise ValueError(
                f"model.boundary_decode must be 'threshold' or 'vocab', got {cfg.boundary_decode!r}"
            )
        if cfg.chunker not in ("gate", "words"):
            raise ValueError(
                f"model.chunker must be 'gate' (learned boundaries) or 'words' for arch=byteified, "
                f"got {cfg.chunker!r}"
            )
        base = copy.deepcopy(cfg)
        base.chunker, base.pooling, base.tie_embeddings = "words", "last", False  # the parent builds no gate
        super().__init__(base)
        self.cfg = cfg
        D, d, V = cfg.d_model, cfg.d_byte, cfg.vocab_size
        self.pool: PatchPooling = PatchPooling(d, D)  # type: ignore[assignment]
        self.lm_head = nn.Linear(d, 2 * V, bias=False)  # the residual of the fused head (starts at zero)
        self.boundary = BoundaryPredictor(d, cfg.boundary_hidden, cfg.boundary_lookahead)
        self.first_word.requires_grad_(False)  # the sink's output takes its place
        self.source_embed = nn.Embedding(cfg.source_vocab, D)
        self.source_embed.weight.requires_grad_(False)
        self.source_head: nn.Linear | None = None
        if not cfg.source_tied:
            self.source_head = nn.Linear(D, cfg.source_vocab, bias=False)
            self.source_head.weight.requires_grad_(False)
        self.expand_proj = nn.Linear(D, d, bias=False)
        self.prior_scale = nn.Parameter(torch.ones(1))  # (1,): FSDP2's fully_shard refuses scalar parameters
        self.vocab_bytes: torch.Tensor
        self.vocab_offsets: torch.Tensor
        self.register_buffer("vocab_bytes", torch.zeros(cfg.source_vocab_bytes, dtype=torch.uint8))
        self.register_buffer("vocab_offsets", torch.zeros(cfg.source_vocab + 1, dtype=torch.long))
        # the segmenter's own byte embedding + encoder (cfg.segmenter_encoder): frozen, filled from the
        # encoder by ``segmenter_snapshot`` when stage 1 starts; until ``segmenter_ready`` is set the
        # predictor reads the shared encoder
        self.segmenter: nn.ModuleDict | None = None
        self.segmenter_ready: torch.Tensor
        if cfg.segmenter_encoder and cfg.chunker == "gate":
            self.segmenter = nn.ModuleDict(
                {
                    "embed": copy.deepcopy(self.embed),
                    "expand_proj": copy.deepcopy(self.expand_proj),
                    "encoder": copy.deepcopy(self.encoder),
                }
            )
            self.segmenter.requires_grad_(False)
            self.register_buffer("segmenter_ready", torch.zeros(1))  # (1,): 1 once the snapshot is in
        self._max_token = 1
        self._trie: VocabTrie | None = None
        self._trie_key: tuple[int, int] | None = None

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.ones_(self.prior_scale)
        if self.segmenter is not None:  # a meta-device build materialises buffers uninitialised
            self.segmenter_ready.zero_()
        nn.init.zeros_(self.lm_head.weight)  # the prior alone at step 0
        nn.init.zeros_(self.pool.proj.bias)
        if self.cfg.patch_token_embed:
            nn.init.zeros_(self.pool.proj.weight)  # patch vector = the token's embedding at step 0

    # -- source vocabulary ---------------------------------------------------------------------------------

    def set_vocabulary(self, table: list[bytes | None]) -> None:
        """Store the source's token byte strings (``None`` = special, never matched) in the buffers."""
        if len(table) != self.cfg.source_vocab:
            raise ValueError(
                f"vocabulary has {len(table)} entries, model.source_vocab is {self.cfg.source_vocab}"
            )
        blob = b"".join(t or b"" for t in table)
        if len(blob) != self.cfg.source_vocab_bytes:
            raise ValueError(
                f"vocabulary holds {len(blob)} bytes, model.source_vocab_bytes is "
                f"{self.cfg.source_vocab_bytes}"
            )
        lens = torch.tensor([len(t or b"") for t in table], dtype=torch.long)
        with torch.no_grad():
            self.vocab_bytes.copy_(
                torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else self.vocab_bytes
            )
            self.vocab_offsets.zero_()
            self.vocab_offsets[1:] = lens.cumsum(0)
        self._trie = None

    @property
    def trie(self) -> VocabTrie:
        """The vocabulary trie, rebuilt when the buffers change (loading a checkpoint fills them)."""
        key = (
            int(self.vocab_offsets[-1]),
            int(self.vocab_bytes[:4096].long().sum()) if len(self.vocab_bytes) else 0,
        )
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

    def embed_bytes(self, ids: torch.Tensor, expanded: torch.Tensor, segmenter: bool = False) -> torch.Tensor:
        """Byte embedding + projected source embedding of ``expanded`` (B, T) ids (-1: none) -> (B, T, d);
        ``segmenter``: the segmenter's own copies of the two."""
        special = ids >= 256
        ex = torch.where(special, self.cfg.source_start_id, expanded)
        e = self.source_embed(ex.clamp(min=0)) * (ex >= 0).unsqueeze(-1).to(self.source_embed.weight.dtype)
        if segmenter and self.segmenter is not None:
            return self.segmenter["embed"](ids) + self.segmenter["expand_proj"](e)
        return self.embed(ids) + self.expand_proj(e)

    def expanded_ids(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) longest source token ending at each byte, within its document (-1: none or special)."""
        starts = doc_starts(doc_ids, ids).cpu().tolist()
        rows = [
            self.trie.longest_suffix_tokens(r, s) for r, s in zip(ids.cpu().tolist(), starts, strict=True)
        ]
        return torch.tensor(rows, dtype=torch.long, device=ids.device).view_as(ids)

    def patch_tokens(self, ids: list[int], starts: list[bool]) -> list[int]:
        """Per byte of one row: the longest source token that ends at the byte and starts inside its patch
        (``starts`` = patch starts); read at a patch's last byte it is the patch itself when the patch is a
        token, else the patch's longest token suffix (-1: none)."""
        return self.trie.longest_suffix_tokens(ids, starts)

    def patch_vectors(
        self, h: torch.Tensor, ids: torch.Tensor, last: torch.Tensor, word_start: torch.Tensor
    ) -> torch.Tensor:
        """(B, W, D) patch vectors (module docstring); ``last`` (B, W) each patch's last byte."""
        words = self.pool(h, last)
        if self.cfg.patch_token_embed:
            rows = [
                self.patch_tokens(i, s)
                for i, s in zip(ids.cpu().tolist(), word_start.cpu().tolist(), strict=True)
            ]
            tok = torch.tensor(rows, dtype=torch.long, device=ids.device).gather(1, last.cpu()).to(ids.device)
            base = self.source_embed(tok.clamp(min=0)) * (tok >= 0).unsqueeze(-1).to(words.dtype)
            words = words + base.to(words.dtype)
        is_special = ids.gather(1, last) >= 256  # (B, W)
        start = self.source_embed.weight[self.cfg.source_start_id].to(words.dtype)
        return torch.where(is_special.unsqueeze(-1), start, words)

    def sink(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.source_embed.weight[self.cfg.source_start_id].to(dtype).expand(batch, 1, -1)  # (B, 1, D)

    def prior(self, table: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """(..., 2V) exact (byte, bit) log-prior: ``rows`` index the context vectors ``table`` (R, D),
        ``nodes`` (same shape) the trie node of the open patch's bytes (``bytelm.models.byte_prior``)."""
        flat = fused_log_prior(
            self.trie, self.head_weight(), table, rows.reshape(-1), nodes.reshape(-1), self.cfg.vocab_size
        )
        return flat.view(*nodes.shape, -1)

    def open_nodes(self, ids: torch.Tensor, closed: torch.Tensor) -> torch.Tensor:
        """(B, T) trie node of the open patch's bytes after each byte (``VocabTrie.open_nodes``)."""
        trie = self.trie
        rows = [trie.open_nodes(i, c) for i, c in zip(ids.cpu().tolist(), closed.cpu().tolist(), strict=True)]
        return torch.tensor(rows, dtype=torch.long, device=ids.device)

    def forced_end(self, closed: torch.Tensor, word_start: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the byte after t must end its patch (its patch reaches the size cap there)."""
        cap = self.cfg.max_word_bytes
        if not cap or cap <= 0:
            return torch.zeros_like(closed)
        nxt_len = torch.where(
            closed, torch.ones_like(word_start, dtype=torch.long), run_lengths(word_start) + 1
        )
        return nxt_len >= cap

    def fuse(self, residual: torch.Tensor, prior: torch.Tensor | None, forced: torch.Tensor) -> torch.Tensor:
        """Fused logits (..., 2V) = prior_scale * prior + residual, the "continues" half masked where
        forced."""
        logits = residual if prior is None else residual + self.prior_scale * prior.to(residual.dtype)
        V = self.cfg.vocab_size
        half = torch.arange(logits.shape[-1], device=logits.device) < V  # (2V,) the "continues" half
        return torch.where(forced.unsqueeze(-1) & half, torch.full_like(logits, MASKED), logits)

    # -- segmentation --------------------------------------------------------------------------------------

    def segment(
        self, input_ids: torch.Tensor, h: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch ends chosen by the model's own segmenter: ``(ends (B, T) bool, boundary logits or None)``.
        ``chunker=gate``: boundary logit > ``boundary_threshold`` (needs the encoder states ``h``; computed
        when not given); ``words``: the last byte of every HAT word."""
        if self.cfg.chunker == "words":
            ws = self.word_starts_batch(input_ids, doc_ids)
            return torch.cat([ws[:, 1:], torch.zeros_like(ws[:, :1])], 1), None
        b_logits = self.boundary_logits(input_ids, h, doc_ids)
        return self.decode_boundaries(input_ids, b_logits, doc_ids), b_logits

    def decode_boundaries(
        self, ids: torch.Tensor, b_logits: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) bool patch ends from boundary logits (B, T): ``boundary_decode=threshold``: each logit
        against ``boundary_threshold``; ``vocab``: the most likely segmentation into source tokens
        (``bytelm.models.vocab_segment``)."""
        if self.cfg.boundary_decode == "threshold":
            return b_logits.detach() > self.cfg.boundary_threshold
        lg = b_logits.detach().float().cpu().numpy()
        docs = doc_ids.cpu().tolist() if doc_ids is not None else [None] * ids.shape[0]
        out = np.ones(tuple(ids.shape), dtype=bool)  # right padding: patches of their own
        for b, (r, d) in enumerate(zip(ids.cpu().tolist(), docs, strict=True)):
            n = len(r)
            while n and r[n - 1] == PAD_ID:  # a right-padded row gets the ends it gets alone
                n -= 1
            out[b, :n] = vocab_segment_row(
                r[:n],
                lg[b, :n],
                self.trie,
                self.cfg.max_word_bytes or 0,
                self.cfg.boundary_patch_cost,
                None if d is None else d[:n],
            )
        return torch.from_numpy(out).to(ids.device)

    def encode(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        expanded: torch.Tensor | None = None,
        segmenter: bool = False,
    ) -> torch.Tensor:
        """(B, T, d) encoder states (``segmenter``: of the segmenter's own encoder)."""
        cos, sin = self._byte_rope(torch.arange(input_ids.shape[1], device=input_ids.device))
        if expanded is None:
            expanded = self.expanded_ids(input_ids, doc_ids)
        x = self.embed_bytes(input_ids, expanded, segmenter)
        stack = self.encoder
        if segmenter and self.segmenter is not None:
            stack = self.segmenter["encoder"]  # type: ignore[assignment]  # a ModuleList, like the encoder
        return self._run(
            stack, x, cos, sin, stack="byte encoder", doc_ids=doc_ids, window=self.cfg.encoder_window
        )

    @property
    def segmenter_frozen(self) -> bool:
        """The boundary predictor reads the segmenter's own (frozen) encoder, not the shared one."""
        return self.segmenter is not None and bool(self.segmenter_ready.item() > 0)

    def boundary_logits(
        self,
        input_ids: torch.Tensor,
        h: torch.Tensor | None,
        doc_ids: torch.Tensor | None = None,
        expanded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) boundary logits: the predictor over the shared encoder's states ``h`` (B, T, d), or over the
        segmenter's own encoder once it is frozen (``segmenter_frozen``; ``h`` is then not read)."""
        if self.segmenter_frozen:
            h = self.encode(input_ids, doc_ids, expanded, segmenter=True)
        elif h is None:
            h = self.encode(input_ids, doc_ids, expanded)
        return self.boundary(h, input_ids != PAD_ID)

    def _boundary_only(self, ids: torch.Tensor, h: torch.Tensor, ends: torch.Tensor | None) -> ModelOutput:
        """The boundary phase's forward: no backbone, no decoder; ``loss`` = BCE of the boundary logits
        against ``ends`` (so ``train/bpb`` reads as bits per byte of the boundary labels)."""
        if ends is None:
            raise ValueError("boundary_only=True needs patch_end (the token ends the predictor learns)")
        b_logits = self.boundary_logits(ids, h)
        loss, _ = _boundary_bce(b_logits, ids, ends.bool())
        return ModelOutput(logits=b_logits.unsqueeze(-1), loss=loss, hidden={"boundary_logits": b_logits})

    # -- forward -------------------------------------------------------------------------------------------

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,  # (B, T) byte ids
        *,
        targets: torch.Tensor | None = None,  # (B, T) next ids (IGNORE where none): adds the joint loss
        doc_ids: torch.Tensor | None = None,  # (B, T)
        patch_end: torch.Tensor | None = None,  # (B, T) bool: given patch ends (the tokenizer's token ends)
        context: torch.Tensor
        | None = None,  # (B, T, D): teacher final hidden at each patch's last byte (stage 1)
        probe_blocks: int = 0,  # > 0: also run the patch vectors through this many blocks (hidden["probe"])
        expanded: torch.Tensor | None = None,  # (B, T) precomputed expanded ids
        cache: object | None = None,
        causal_bits: bool = False,  # with ``cache``: bytes without bits take the head's preferred bit
        boundary_only: bool = False,  # the boundary phase: encoder + boundary logits, loss = BCE vs patch_end
        **_: object,
    ) -> ModelOutput:
        if cache is not None:
            return self._forward_cached(input_ids, cache, patch_end, causal_bits)  # type: ignore[arg-type]
        B, T = input_ids.shape
        dev = input_ids.device
        cos, sin = self._byte_rope(torch.arange(T, device=dev))
        if expanded is None:
            expanded = self.expanded_ids(input_ids, doc_ids)
        h = self.encode(input_ids, doc_ids, expanded)  # (B, T, d)
        if boundary_only:
            return self._boundary_only(input_ids, h, patch_end)
        # also the boundary loss's input
        b_logits = (
            self.boundary_logits(input_ids, h, doc_ids, expanded) if self.cfg.chunker == "gate" else None
        )
        if patch_end is not None:
            ends = patch_end.bool()
        elif b_logits is not None:
            ends = self.decode_boundaries(input_ids, b_logits, doc_ids)
        else:  # word patches: the splitter runs only when no ends are given
            ends = self.segment(input_ids, h, doc_ids)[0]
        closed, word_start = close_chunks(input_ids, ends, self.cfg.max_word_bytes, doc_ids)
        lay = layout_words(input_ids, word_start, doc_ids, closed)  # every patch is ready at its last byte
        W = lay.start.shape[1]
        last = (lay.end - 1).clamp(0, T - 1)  # (B, W)
        words = torch.cat(
            [self.sink(B, h.dtype), self.patch_vectors(h, input_ids, last, word_start)], 1
        )  # (B, W+1, D)
        sink_doc = torch.where(input_ids[:, :1] >= 256, SINK_MASKED, 0 if doc_ids is None else doc_ids[:, :1])
        word_doc = (
            lay.word_doc if lay.word_doc is not None else torch.zeros(B, W, dtype=torch.long, device=dev)
        )
        word_doc = torch.cat([sink_doc, word_doc], 1)  # (B, W+1)
        hidden: dict[str, torch.Tensor] = {
            "patch_last": last,
            "word_end": lay.end,
            "word_start": lay.start,
            "closed": closed,
        }
        if b_logits is not None:
            hidden["boundary_logits"] = b_logits
        if probe_blocks > 0:
            hidden["probe"] = self.run_backbone(words, doc_ids=word_doc, n_blocks=probe_blocks, norm=False)[
                :, 1:
            ]
        if context is None:
            z = self.run_backbone(words, doc_ids=word_doc)  # (B, W+1, D)
        else:
            z_sink = self.run_backbone(words[:, :1])  # (B, 1, D) the sink alone = the source's start state
            zc = context.gather(1, last.unsqueeze(-1).expand(-1, -1, context.shape[-1])).to(z_sink.dtype)
            z = torch.cat([z_sink, zc], 1)
        hidden["words"] = z[:, 1:]
        inject = [
            p(z).gather(1, lay.ctx_idx.unsqueeze(-1).expand(-1, -1, self.cfg.d_byte)) for p in self.ctx_proj
        ]
        y = self._run(
            self.decoder, h, cos, sin, inject=inject, stack="byte decoder", doc_ids=doc_ids
        )  # (B, T, d)
        prior = None
        if self.cfg.lm_prior:
            rows = lay.ctx_idx + torch.arange(B, device=dev).unsqueeze(1) * (
                W + 1
            )  # (B, T) into z.flatten(0, 1)
            prior = self.prior(z.flatten(0, 1), rows, self.open_nodes(input_ids, closed))
        logits = self.fuse(
            self.lm_head(self.norm(y)), prior, self.forced_end(closed, word_start)
        )  # (B, T, 2V)
        real = input_ids != PAD_ID
        metrics: dict[str, torch.Tensor | float] = {
            "bytes_per_word": (real.sum() / (word_start & real).sum().clamp_min(1)).detach(),
        }
        loss = None
        if targets is not None:
            lp = joint_logprobs(logits, input_ids, targets, closed)  # (B, T)
            valid = targets != IGNORE
            is_byte = valid & (targets < 256)
            loss = -lp.sum() / valid.sum().clamp(min=1)
            metrics["nll_sum"] = -(lp.double() * is_byte).sum().detach()
            metrics["n_bytes"] = is_byte.sum()
            hidden["target_logprobs"] = lp
        return ModelOutput(logits=logits, loss=loss, metrics=metrics, hidden=hidden)


def _boundary_bce(
    b_logits: torch.Tensor, ids: torch.Tensor, ends: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE of boundary logits against given ends over real bytes but each row's last, and that mask."""
    mask = ids < 256
    mask[:, -1] = False  # the row's last byte has no next byte to look at
    per = F.binary_cross_entropy_with_logits(b_logits, ends.float(), reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1), mask


def fused_marginal(logits: torch.Tensor) -> torch.Tensor:
    """(..., 2V) fused logits -> (..., V) byte logits with the bit summed out: for *sampling* the next byte
    (its bit then follows from the conditional). Never for scoring a text whose bits a segmenter chose."""
    V = logits.shape[-1] // 2
    return torch.logaddexp(logits[..., :V].float(), logits[..., V:].float())
