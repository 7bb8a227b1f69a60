"""Weight storage for fast one-position decoding on CPU: tall matrices stored transposed ("K-major").

A KV-cached decoding step multiplies one row by every weight matrix (a GEMV). On CPU its speed depends on
how the weight is stored, not only on its size: measured on a 2-core AMD EPYC VM (fp32, 2 threads, weights
streamed from memory; ``docs/byteify.md``, "Speed"), ``F.linear`` of one row with a tall (out > in) weight
runs at 10.7 GB/s for a (1536, 576) projection stored as PyTorch stores it ([out, in], row-major) and at
17.3 GB/s with the same values stored transposed (a (576, 1536) buffer seen as its transpose), and at 12.0
against 24.8 GB/s for a (49152, 576) LM head; wide and square weights are as fast or faster row-major
((576, 1536): 16.2 against 12.6 GB/s). So ``prefer_kmajor`` re-stores the tall ones.

Only the storage changes: every parameter keeps its shape, values, name and ``state_dict`` entry, so outputs
agree to float rounding (the sum order of a dot product may differ) and training, saving and loading work
as before. The layout is a property of the machine: ``bytelm-generate`` applies it on CPU; on GPU it is
left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _restore(p: torch.Tensor) -> bool:
    """Re-store a 2-D CPU float tensor transposed in place; False if it already is or cannot be."""
    if p.dim() != 2 or p.device.type != "cpu" or not p.is_floating_point():
        return False
    if p.stride() == (1, p.shape[0]):  # already K-major
        return False
    p.data = p.data.t().contiguous().t()
    return True


def prefer_kmajor(model: nn.Module, *, min_numel: int = 1 << 14, extra: Sequence[torch.Tensor] = ()) -> int:
    """Store every tall (out_features > in_features) ``nn.Linear`` weight of at least ``min_numel``
    elements, and each tensor of ``extra`` (e.g. a tied LM head that is an embedding table), transposed in
    memory. Returns how many tensors were re-stored. Shared (tied) parameters are re-stored once."""
    tall = [
        mod.weight
        for mod in model.modules()
        if isinstance(mod, nn.Linear)
        and mod.out_features > mod.in_features
        and mod.weight.numel() >= min_numel
    ]
    done: set[int] = set()
    n = 0
    for t in [*tall, *extra]:
        if id(t) not in done:
            done.add(id(t))
            n += _restore(t)
    return n


def decode_layout(model: nn.Module) -> int:
    """``prefer_kmajor`` for a bytelm model on CPU, the byteified model's source LM head included (it is
    read by one GEMV per patch, ``bytelm.models.byte_prior``); a no-op on GPU. Returns the count."""
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        return 0
    if dev.type != "cpu":
        return 0
    head: Any = getattr(model, "head_weight", None)
    extra = [head()] if callable(head) else []
    return prefer_kmajor(model, extra=extra)
