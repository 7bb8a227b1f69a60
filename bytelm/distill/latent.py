"""Latent alignment: pull the student's word vectors toward the teacher's hidden states
(docs/design.md#latent-alignment, docs/distill.md).

This is an *adaptation* of Bolmo's stage 1, not a copy of it. Bolmo takes patches = teacher tokens: the patch
vector is the projected local-encoder state at the patch's last byte, run through the first 4 frozen teacher
blocks and compared with the teacher's hidden state after the same 4 blocks, with distance
``||s - t||_2 / sqrt(d)`` (not squared); its stage-1 losses ``[local_encoder, ce, local_decoder, boundary]``
are weighted ``[1, 1, 1, 4]``, so this encoder loss has weight 1 (the 4 is the boundary BCE's). Here the
weight is ``distill.latent_weight`` and the teacher state is the one after ``distill.latent_layer`` blocks
(-1: the final, normed one), both read by ``bytelm.distill.objective``. bytelm's hierarchical students pool
*words*, not teacher tokens, so here each student word vector is compared with the teacher's hidden state at
the last teacher token that ends inside that word (``align.last_token_in_units``), through a learned linear
projection from the student width to the teacher width. Words inside which no teacher token ends (one long
token covering several words) are skipped. The distance is Bolmo's by default; ``metric="cosine"`` uses
``1 - cos(s, t)`` instead.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Metric = Literal["l2", "cosine"]


def latent_distance(s: torch.Tensor, t: torch.Tensor, metric: Metric = "l2") -> torch.Tensor:
    """Per-vector distance, (..., D) x (..., D) -> (...): ``||s - t||_2 / sqrt(D)`` or ``1 - cos(s, t)``."""
    if metric == "l2":
        return torch.linalg.vector_norm(s - t, dim=-1) / math.sqrt(s.shape[-1])
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
    raise ValueError(f"unknown latent metric {metric!r}")


class LatentAlignment(nn.Module):
    """Learned projection student width -> teacher width plus the masked latent distance.

    forward(student_words (B, W, Ds), teacher_hidden (B, L, Dt), token_index (B, W), mask (B, W)) -> scalar:
    the mean over masked words of ``latent_distance(proj(s_w), teacher_hidden[token_index[w]])``. The teacher
    side is detached (the teacher is frozen). ``num_valid`` overrides the denominator (global word count).
    """

    def __init__(self, student_dim: int, teacher_dim: int, metric: Metric = "l2", bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=bias)
        self.metric: Metric = metric

    def forward(
        self,
        student_words: torch.Tensor,
        teacher_hidden: torch.Tensor,
        token_index: torch.Tensor,
        mask: torch.Tensor,
        num_valid: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        Dt = teacher_hidden.shape[-1]
        idx = token_index.clamp(min=0)[..., None].expand(-1, -1, Dt)  # (B, W, Dt)
        target = teacher_hidden.detach().float().gather(1, idx)  # (B, W, Dt)
        pred = self.proj(student_words).float()  # (B, W, Dt)
        dist = latent_distance(pred, target, self.metric)  # (B, W)
        dist = torch.where(mask, dist, torch.zeros_like(dist))
        denom = mask.sum().clamp(min=1) if num_valid is None else num_valid
        return dist.sum() / denom
