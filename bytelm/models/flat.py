"""Flat byte transformer: the baseline every bytelm result is compared with.

A Llama-style decoder (pre-norm RMSNorm, RoPE, SwiGLU, no biases, full multi-head attention) that runs its
full width over every byte. Packed documents never attend to each other (``doc_ids``); ``new_cache`` gives the
per-layer KV caches of cached generation. The Llama-family fields of a transplanted source model
(``n_kv_heads``, ``head_dim``, ``qkv_bias``, ``rope_scaling``, ...) are not used here.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bytelm.models.attention import stack_meta
from bytelm.models.config import ModelConfig, ModelOutput
from bytelm.models.layers import Block, KVCache, RMSNorm, init_linear_, rope_cos_sin


class FlatByteLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            [Block(cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.attn_backend) for _ in range(cfg.n_layers)]
        )
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_weights(self) -> None:
        """Separate from construction so a model built on the meta device (ZeRO-3 / FSDP2) inits after
        sharding."""
        init_linear_(
            self, std=self.cfg.init_std, out_std=self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        )

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) byte ids
        *,
        doc_ids: torch.Tensor | None = None,  # (B, T) packed-document index
        cache: list[KVCache] | None = None,
        **_: object,
    ) -> ModelOutput:
        B, T = input_ids.shape
        offset = cache[0].length if cache is not None else 0
        pos = torch.arange(offset, offset + T, device=input_ids.device)
        cos, sin = rope_cos_sin(pos, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta)
        x = self.embed(input_ids)  # (B, T, D)
        meta = stack_meta(
            x,
            self.cfg.attn_backend,
            stack="flat stack",
            fallback=self.cfg.attn_fallback,
            q_offset=offset,
            doc_ids=doc_ids,
        )  # once per forward, shared by every block
        for i, blk in enumerate(self.blocks):
            c = cache[i] if cache is not None else None
            if self.cfg.activation_checkpointing and self.training and cache is None:
                x = checkpoint(lambda x_, b=blk: b(x_, cos, sin, meta), x, use_reentrant=False)
            else:
                x = blk(x, cos, sin, meta, cache=c)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        return ModelOutput(logits=logits)
