"""A toy model kind for tests/models/test_registry.py: a bigram byte LM (next-byte logits from the current
byte only).

A module of its own, importing only torch and ``bytelm.models`` module files, because ``bytelm.hf.export``
ships the module of a kind registered outside bytelm with the exported folder (docs/extending.md).
"""

from __future__ import annotations

import torch
from torch import nn

from bytelm.models.config import ModelConfig, ModelOutput


class BigramByteLM(nn.Module):
    """logits[t] = table[input_ids[t]]; the cache holds nothing (the next byte depends on the last one
    only)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=self.cfg.init_std)
        nn.init.normal_(self.lm_head.weight, std=self.cfg.init_std)

    def new_cache(self) -> dict[str, int]:
        return {"seen": 0}

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: dict[str, int] | None = None,
        **_: object,
    ) -> ModelOutput:
        if cache is not None:
            cache["seen"] += input_ids.shape[1]
        return ModelOutput(logits=self.lm_head(self.embed(input_ids)))
