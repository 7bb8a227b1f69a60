"""Loss and metric formulas used in training and evaluation (pure torch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bytelm.data.packed import IGNORE


def byte_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood (nats) over real byte targets (ids 0-255) and their count.

    logits: (B, T, V); targets: (B, T) with IGNORE for positions that are not predictions. Special targets
    (EOS) are trained on but not counted in bits-per-byte, which measures text bytes only.
    """
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    is_byte = (targets.flatten() >= 0) & (targets.flatten() < 256)
    return (
        nll.double() * is_byte
    ).sum(), is_byte.sum()  # fp64 sum: the value does not depend on the batching


def bits_per_byte(nll_sum_nats: float | torch.Tensor, n_bytes: int | torch.Tensor) -> float:
    """bpb = total NLL in nats / (number of bytes * ln 2)."""
    return float(nll_sum_nats) / (max(int(n_bytes), 1) * math.log(2))


def z_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of logsumexp(logits)^2 over predicted positions (PaLM): keeps the softmax normaliser near 1."""
    lse = torch.logsumexp(logits.float(), dim=-1)  # (B, T)
    mask = targets != IGNORE
    return (lse.square() * mask).sum() / mask.sum().clamp(min=1)
