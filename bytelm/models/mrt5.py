"""MrT5: a ByT5-style byte encoder-decoder with a learned delete gate in the encoder
(docs/design.md#mrt5-delete-gate).

Architecture (pure torch, Llama-style parts from ``layers.py``):
- shared byte embedding (``vocab_size`` x ``d_byte``);
- encoder: ``encoder_layers`` bidirectional pre-norm blocks, then an RMSNorm;
- delete gate (:class:`~bytelm.models.gates.DeleteGate`) on the *input* of encoder block ``gate.layer``;
  that block and every later one see the deletion: in training as a per-key additive bias ``G`` on the
  attention scores (soft deletion), at inference by compacting the kept positions (hard deletion), so blocks
  ``gate.layer..`` really run on a shorter sequence;
- decoder: ``decoder_layers`` causal blocks (self-attention with a KV cache, cross-attention to the encoder
  output with the same gate bias / compacted mask, SwiGLU MLP), then an RMSNorm and the LM head.

Positions: RoPE instead of T5's bucketed relative bias (one position scheme for every bytelm model; RoPE is
relative too). After hard deletion the kept bytes keep their *original* positions, so relative distances
between kept bytes are the same as under soft deletion. Unlike T5, cross-attention is positional too: the
decoder continues the row's positions (its input ``i`` sits at ``s - 1 + i``) and encoder keys sit at their
prefix positions, so the prefix-LM sees one sequence split in two (copying / phase alignment is a fixed
relative offset). Batched generation should left-pad prefixes so every row's last byte sits at ``s - 1``.

Objective: **prefix-LM** (not T5 span corruption). Each training row of bytes ``x_0..x_{T-1}`` (targets
``x_1..x_T``, the flat LM's convention) is split at ``s = round(prefix_frac * T)``: the encoder reads the
prefix ``x_0..x_{s-1}``, the decoder reads ``[BOS, x_s, .., x_{T-1}]`` and predicts the continuation
``x_s..x_T``. Why: it uses the byte-LM data pipeline unchanged (same rows, same targets), its loss is a
plain next-byte CE whose bits-per-byte are directly comparable with the flat and hierarchical models on the
continuation bytes, and it is exactly the generation task (continue a prefix). Span corruption would need
its own noising pipeline and its loss (sentinel spans) is not comparable as bpb.

softmax1: the encoder blocks from ``gate.layer`` on and the decoder's cross-attention (the layers the gate
bias reaches) use softmax1, an always-present null key with score 0 and value 0 (``attend(null_key=True)``),
as the paper does: a plain softmax is invariant to a uniform shift of ``G``, so the task loss could not resist
"delete a bit more everywhere"; with the null key, lower ``G`` moves attention onto the null key and the
loss pushes back. ``gate.softmax1`` applies with ``gate_enabled=False`` too, so the gate-off twin is the
same network. With softmax1 the paper's ``b = +1`` start (``G`` near -8) already gives almost all attention to
the null key (a scaled-dot-product score is O(1), not T5's large unscaled scores), so the experiments start
at ``b = +3`` (``G`` near -1.4).

From scratch (no pretrained ByT5 to start from), the experiments also centre the gate input over the row
(``gate.center``) and use a two-sided controller (``gate.alpha_min < 0``): see ``gates.py`` and docs/mrt5.md
for the measurements that led there.

Rows are one stream: packed-document ids are ignored (feed unpacked rows). ``PAD`` (256) marks padding: padded
prefix bytes are masked keys (and forced to ``G = k``), ``PAD`` or ``-100`` targets are ignored by the loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from bytelm.models.attention import AttnMeta, attend, stack_meta
from bytelm.models.config import ModelConfig, ModelOutput
from bytelm.models.gates import DeleteGate, PIController, gate_stats, masked_mean
from bytelm.models.gates import hard_delete as _hard_delete
from bytelm.models.layers import (
    Block,
    KVCache,
    RMSNorm,
    SelfAttention,
    SwiGLU,
    apply_rope,
    init_linear_,
    rope_cos_sin,
    swiglu_hidden,
)

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


class CrossAttention(nn.Module):
    """Multi-head attention from decoder queries to encoder keys/values, with RoPE on both sides: queries at
    their absolute row positions (``s - 1 + i``), keys at their original prefix positions (also after hard
    deletion), so the cross-attention sees the relative distance, as one flat sequence would."""

    def __init__(self, dim: int, n_heads: int, backend: str = "auto", null_key: bool = False) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim, self.backend = n_heads, dim // n_heads, backend
        self.null_key = null_key  # softmax1
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def kv(
        self, memory: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated to the memory positions) and values of the encoder output, (B, H, S, hd) each;
        computed once per generation."""
        B, S, _ = memory.shape
        k, v = self.wkv(memory).view(B, S, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # rotary tables of the query positions
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttnMeta,  # MrT5.cross_meta: per-key gate bias / padding mask, null key
    ) -> torch.Tensor:
        B, T, D = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        q = apply_rope(q, cos, sin)
        out = attend(q, kv[0], kv[1], meta)
        return self.wo(out.transpose(1, 2).reshape(B, T, D))


class DecoderBlock(nn.Module):
    """x + self_attn(norm(x)) [causal, cached]; x + cross_attn(norm(x), encoder); x + mlp(norm(x))."""

    def __init__(
        self, dim: int, n_heads: int, mlp_ratio: float, backend: str, null_key: bool = False
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = SelfAttention(dim, n_heads, backend)
        self.cross_norm = RMSNorm(dim)
        self.cross = CrossAttention(dim, n_heads, backend, null_key)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        self_meta: AttnMeta,
        cross_meta: AttnMeta,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, self_meta, cache=cache)
        x = x + self.cross(self.cross_norm(x), cos, sin, kv, cross_meta)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class EncoderOutput:
    """What the decoder needs from the encoder, plus the gate for metrics."""

    memory: torch.Tensor  # (B, S, D) normed encoder states; S < T after hard deletion
    positions: torch.Tensor  # (S,) or (B, S) original prefix positions of the memory rows
    key_mask: torch.Tensor  # (B, S) True = real key for cross-attention
    key_bias: torch.Tensor | None  # (B, S) soft-deletion bias G; None under hard deletion / no gate
    pad_mask: torch.Tensor  # (B, T) True = real prefix byte
    gate: torch.Tensor | None = None  # (B, T) G over the whole prefix (before any compaction)
    kept_idx: torch.Tensor | None = None  # (B, S) original positions of the memory rows (hard deletion)
    hard: bool = False

    @property
    def prefix_len(self) -> int:
        """T, the prefix length before deletion; the decoder's first position is T - 1."""
        return int(self.pad_mask.shape[1])


@dataclass
class DecoderCache:
    """Generation state: the encoder output (set by the first ``forward(prompt, cache=...)``), decoder
    self-attention KV per layer, cross-attention KV per layer (computed once from the encoder output)."""

    self_kv: list[KVCache]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    enc: EncoderOutput | None = None

    @property
    def length(self) -> int:
        return self.self_kv[0].length if self.self_kv else 0


class MrT5(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        g = cfg.gate
        if g.layer < 0:
            raise ValueError(
                f"gate.layer={g.layer} must index an encoder block (encoder_layers={cfg.encoder_layers})"
            )
        self.gate_layer = min(g.layer, cfg.encoder_layers - 1)
        if self.gate_layer != g.layer:  # e.g. debug=cpu shrinks the encoder to one block
            log.warning(
                "gate.layer=%d but only %d encoder blocks: the gate reads the input of block %d",
                g.layer,
                cfg.encoder_layers,
                self.gate_layer,
            )
        if not 0.0 < cfg.prefix_frac <= 1.0:
            raise ValueError(f"prefix_frac={cfg.prefix_frac} must be in (0, 1]")
        d, h = cfg.d_byte, cfg.n_heads_byte
        self.head_dim = d // h
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.encoder = nn.ModuleList(
            [Block(d, h, cfg.mlp_ratio, cfg.attn_backend) for _ in range(cfg.encoder_layers)]
        )
        self.enc_norm = RMSNorm(d)
        self.gate: DeleteGate | None = DeleteGate(d, g.k, g.bias_init, g.center) if cfg.gate_enabled else None
        self.controller = PIController(g.target_ratio, g.kp, g.ki, g.alpha_min)
        self.decoder = nn.ModuleList(
            [
                DecoderBlock(d, h, cfg.mlp_ratio, cfg.attn_backend, g.softmax1)
                for _ in range(cfg.decoder_layers)
            ]
        )
        self.dec_norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_weights(self) -> None:
        cfg = self.cfg
        n = cfg.encoder_layers + cfg.decoder_layers
        init_linear_(self, std=cfg.init_std, out_std=cfg.init_std / math.sqrt(2 * n))
        if self.gate is not None:
            self.gate.reset_parameters()  # xavier w, b = bias_init (init_linear_ would give N(0, std), b = 0)
        self.controller.reset()

    # ------------------------------------------------------------------ encoder

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.head_dim, self.cfg.rope_theta)

    def _run_block(self, blk: nn.Module, x: torch.Tensor, cos, sin, meta: AttnMeta) -> torch.Tensor:
        if self.cfg.activation_checkpointing and self.training:
            return checkpoint(lambda x_: blk(x_, cos, sin, meta), x, use_reentrant=False)
        return blk(x, cos, sin, meta)

    def _meta(self, x: torch.Tensor, stack: str, **kw: object) -> AttnMeta:
        return stack_meta(x, self.cfg.attn_backend, stack=stack, fallback=self.cfg.attn_fallback, **kw)  # type: ignore[arg-type]

    def encode(
        self,
        prefix_ids: torch.Tensor,  # (B, T) byte ids, PAD = padding
        *,
        hard_delete: bool | None = None,
    ) -> EncoderOutput:
        """Run the encoder. ``hard_delete`` None = soft in training, ``gate.hard_eval`` otherwise."""
        hard = self._use_hard(hard_delete)
        B, T = prefix_ids.shape
        pad_mask = prefix_ids != PAD_ID  # (B, T)
        pos = torch.arange(T, device=prefix_ids.device)  # (T,), (B, T') after hard deletion
        cos, sin = self._rope(pos)
        x = self.embed(prefix_ids)  # (B, T, D)
        key_mask, key_bias = pad_mask, None
        G, kept_idx = None, None
        # attention metadata, once per forward: one for the blocks before the gate (padding mask only), one
        # for the gate's block and later ones (+ gate bias G, softmax1; a shorter sequence after hard
        # deletion)
        meta = self._meta(x, "mrt5 encoder", causal=False, key_mask=key_mask) if self.gate_layer > 0 else None
        for i, blk in enumerate(self.encoder):
            if i == self.gate_layer:
                if self.gate is not None:
                    G = self.gate(x, pad_mask)  # (B, T)
                    if hard:
                        x, key_mask, kept_idx = _hard_delete(
                            x, G, self.cfg.gate.tau_del, pad_mask
                        )  # (B, T', D)
                        pos = kept_idx  # kept bytes keep their original positions
                        cos, sin = self._rope(pos)
                    else:
                        key_bias = G
                meta = self._meta(
                    x,
                    "mrt5 encoder after the gate",
                    causal=False,
                    key_bias=key_bias,
                    key_mask=key_mask,
                    null_key=self.cfg.gate.softmax1,
                )
            assert meta is not None
            x = self._run_block(blk, x, cos, sin, meta)
        return EncoderOutput(
            memory=self.enc_norm(x),
            positions=pos,
            key_mask=key_mask,
            key_bias=key_bias,
            pad_mask=pad_mask,
            gate=G,
            kept_idx=kept_idx,
            hard=hard and G is not None,
        )

    def _use_hard(self, hard_delete: bool | None) -> bool:
        if self.gate is None:
            return False
        if hard_delete is None:
            return (not self.training) and self.cfg.gate.hard_eval
        return hard_delete

    # ------------------------------------------------------------------ decoder

    def new_cache(self) -> DecoderCache:
        return DecoderCache(self_kv=[KVCache() for _ in self.decoder], cross_kv=[None for _ in self.decoder])

    def decode(
        self,
        dec_ids: torch.Tensor,  # (B, t) decoder input ids (BOS first)
        enc: EncoderOutput,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:  # (B, t, V) logits
        """Decoder forward. Decoder input ``i`` sits at row position ``T - 1 + i`` (``T`` = prefix length:
        BOS stands in for the last prefix byte, as in the flat LM's input). With ``cache`` it continues from
        ``cache.length`` and stores self-attention keys/values and the (once-computed) cross-attention
        keys/values of the encoder output."""
        _, t = dec_ids.shape
        start = enc.prefix_len - 1 + (cache.length if cache is not None else 0)
        cos, sin = self._rope(torch.arange(start, start + t, device=dec_ids.device))
        x = self.embed(dec_ids)  # (B, t, D)
        q_offset = cache.length if cache is not None else 0
        self_meta = self._meta(x, "mrt5 decoder", q_offset=q_offset)
        cross_meta = self._meta(
            x,
            "mrt5 cross-attention",
            causal=False,
            tk=enc.memory.shape[1],
            key_bias=enc.key_bias,
            key_mask=enc.key_mask,
            null_key=self.cfg.gate.softmax1,
        )
        for i, layer in enumerate(self.decoder):
            blk = cast(DecoderBlock, layer)
            kv = cache.cross_kv[i] if cache is not None else None
            if kv is None:
                kv = blk.cross.kv(enc.memory, *self._rope(enc.positions))
                if cache is not None:
                    cache.cross_kv[i] = kv
            if cache is None and self.cfg.activation_checkpointing and self.training:
                x = checkpoint(
                    lambda x_, b=blk, kv_=kv: b(x_, cos, sin, kv_, self_meta, cross_meta),
                    x,
                    use_reentrant=False,
                )
            else:
                x = blk(x, cos, sin, kv, self_meta, cross_meta, cache.self_kv[i] if cache else None)
        return self.lm_head(self.dec_norm(x))

    # ------------------------------------------------------------------ training / eval entry point

    def split(self, T: int, prefix_len: int | None = None) -> int:
        """Prefix length ``s`` for a row of ``T`` bytes (1 <= s <= T)."""
        s = prefix_len if prefix_len is not None else round(self.cfg.prefix_frac * T)
        return min(max(1, s), T)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) byte ids
        *,
        targets: torch.Tensor
        | None = None,  # (B, T) next bytes (input_ids shifted by one), flat-LM convention
        hard_delete: bool | None = None,
        prefix_len: int | None = None,
        cache: DecoderCache | None = None,
        **_: object,
    ) -> ModelOutput:
        """Prefix-LM step. ``logits`` (B, T-s+1, V) predict ``x_s..x_T`` = ``targets[:, s-1:]``; ``loss`` is
        their CE (PAD / -100 targets ignored); ``aux_loss`` = alpha * mean(G) in training (gate on).

        With ``cache`` (the ``bytelm.models.generate`` protocol): the first call encodes ``input_ids`` as the
        whole prompt and returns the logits (B, 1, V) of the first continuation byte (decoder fed BOS); later
        calls feed new bytes to the decoder and return their logits. The uncached reference for a prompt of
        ``P`` bytes plus ``n`` generated ones is ``forward(prompt + generated, prefix_len=P)``."""
        if cache is not None:
            return self._forward_cached(input_ids, cache, hard_delete)
        B, T = input_ids.shape
        s = self.split(T, prefix_len)
        enc = self.encode(input_ids[:, :s], hard_delete=hard_delete)
        bos = torch.full((B, 1), BOS_ID, dtype=input_ids.dtype, device=input_ids.device)
        dec_in = torch.cat([bos, input_ids[:, s:]], dim=1)  # (B, T-s+1)
        logits = self.decode(dec_in, enc)  # (B, T-s+1, V)

        metrics: dict[str, torch.Tensor | float] = {
            "prefix_len": float(s),
            "encoder_len": float(enc.memory.shape[1]),
        }
        loss = aux = None
        if targets is not None:
            tgt = targets[:, s - 1 :]
            tgt = tgt.masked_fill(tgt == PAD_ID, IGNORE_INDEX)
            # summed, then divided: a batch whose continuation is all padding (a short last tile) gives loss 0
            # and nll_sum 0 instead of the NaN of a mean over no targets
            nll = F.cross_entropy(
                logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            n = (tgt != IGNORE_INDEX).sum()
            loss = nll / n.clamp(min=1)
            if not self.training:  # validation sums NLL over the continuation bytes (val/bpb)
                metrics["nll_sum"] = nll.detach()
                metrics["n_bytes"] = n
        if enc.gate is not None:
            G = enc.gate
            alpha = self.controller.current_alpha()  # value set by the previous step
            stats = gate_stats(G, self.cfg.gate.tau_del, enc.pad_mask, alpha)
            metrics.update(stats)
            if self.training:
                aux = alpha * masked_mean(G, enc.pad_mask)
                self.controller.observe(
                    G, self.cfg.gate.tau_del, enc.pad_mask
                )  # global ratio, used next step
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux, metrics=metrics)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def _forward_cached(
        self, ids: torch.Tensor, cache: DecoderCache, hard_delete: bool | None
    ) -> ModelOutput:
        if cache.enc is None:
            cache.enc = self.encode(ids, hard_delete=hard_delete)
            ids = torch.full((ids.shape[0], 1), BOS_ID, dtype=ids.dtype, device=ids.device)
        metrics: dict[str, torch.Tensor | float] = {"encoder_len": float(cache.enc.memory.shape[1])}
        return ModelOutput(logits=self.decode(ids, cache.enc, cache), metrics=metrics)

    @torch.no_grad()
    def generate(
        self,
        prefix_ids: torch.Tensor,  # (B, T)
        max_new_bytes: int,
        *,
        eos_id: int = EOS_ID,
        hard_delete: bool = True,
    ) -> torch.Tensor:  # (B, n) generated byte ids (PAD after a row's EOS)
        """Greedy continuation of ``prefix_ids`` with the decoder's KV cache (encoder runs once)."""
        enc = self.encode(prefix_ids, hard_delete=hard_delete)
        cache = self.new_cache()
        B = prefix_ids.shape[0]
        tok = torch.full((B, 1), BOS_ID, dtype=torch.long, device=prefix_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=prefix_ids.device)
        out: list[torch.Tensor] = []
        for _ in range(max_new_bytes):
            logits = self.decode(tok, enc, cache)[:, -1].float()  # (B, V)
            logits[:, VOCAB_SIZE:] = float("-inf")  # padded vocab rows
            logits[:, PAD_ID] = logits[:, BOS_ID] = float("-inf")
            nxt = logits.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            out.append(nxt)
            done = done | (nxt == eos_id)
            if bool(done.all()):
                break
            tok = nxt.unsqueeze(1)
        if not out:
            return torch.empty(B, 0, dtype=torch.long, device=prefix_ids.device)
        return torch.stack(out, dim=1)
