"""FLOPs per byte and parameter counts against brute force (torch's FlopCounterMode, module walks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bytelm.models import ModelConfig, build_model
from bytelm.models.flops import (
    count_params,
    flops_breakdown,
    flops_per_byte,
    mfu,
    param_count_estimate,
)

CFGS = {
    "flat": dict(arch="flat", d_model=64, n_layers=3, n_heads=4),
    "hier_query": dict(arch="hierarchical", d_model=96, n_layers=3, n_heads=4, d_byte=32, n_heads_byte=2),
    "hier_last_all": dict(
        arch="hierarchical",
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_byte=48,
        n_heads_byte=2,
        pooling="last",
        decoder_cross="all",
        encoder_layers=1,
        decoder_layers=3,
    ),
}


@pytest.mark.parametrize("name", list(CFGS))
def test_flops_per_byte_matches_flop_counter(name: str) -> None:
    """3 x the counted forward matmul/attention FLOPs (math SDPA, so attention is counted) equals the
    formula. Words are every 4 bytes (ASCII), so bytes_per_word is exactly 4."""
    cfg = ModelConfig(**CFGS[name])  # type: ignore[arg-type]
    model = build_model(cfg)
    T, bpw = 64, 4
    ids = torch.randint(97, 123, (1, T))
    kw = {}
    if cfg.arch == "hierarchical":
        kw["word_start"] = (torch.arange(T) % bpw == 0).unsqueeze(0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(ids, **kw)
    counted = 3 * fc.get_total_flops() / T
    parts = flops_breakdown(cfg, T, bpw)
    expected = flops_per_byte(cfg, T, bpw) - parts.get("pooling_attention", 0.0)  # elementwise: not counted
    assert counted == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize("name", list(CFGS))
def test_param_counts(name: str) -> None:
    cfg = ModelConfig(**CFGS[name])  # type: ignore[arg-type]
    model = build_model(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert param_count_estimate(cfg) == linear
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert count_params(model, non_embedding=True) == count_params(model) - emb


def test_hierarchical_is_cheaper_per_byte_and_mfu() -> None:
    flat = ModelConfig(arch="flat", d_model=512, n_layers=8, n_heads=8)
    hier = ModelConfig(arch="hierarchical", d_model=512, n_layers=8, n_heads=8, d_byte=256, n_heads_byte=4)
    f, h = flops_per_byte(flat, 2048), flops_per_byte(hier, 2048)
    assert h < f / 2
    assert flops_per_byte(hier, 2048, 8.0) < h  # longer words -> cheaper backbone per byte
    assert mfu(1e9, 1e5, None) is None and mfu(1e9, 1e5, 1e15) == pytest.approx(1e-1)
