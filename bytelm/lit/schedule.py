"""Learning-rate schedules as multipliers of the peak LR (used through ``LambdaLR``)."""

from __future__ import annotations

import math


def lr_multiplier(
    step: int, *, schedule: str, warmup: int, total: int, min_ratio: float, decay_fraction: float
) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based).

    cosine: linear warmup, then cosine from 1 to ``min_ratio`` at ``total``.
    wsd:    linear warmup, constant, then linear decay to ``min_ratio`` over the last ``decay_fraction``.
    constant: linear warmup, then 1.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    total = max(total, warmup + 1)
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, int(round(decay_fraction * total)))
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown optim.schedule {schedule!r}; choose cosine, wsd or constant")
