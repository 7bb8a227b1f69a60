"""The attention entry point against a naive softmax(QK^T / sqrt(d) + mask) V, and backend fallbacks."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch

from bytelm.models import attention
from bytelm.models.attention import attend, flash_available


def naive(q, k, v, *, causal=True, q_offset=0, doc_ids=None, key_bias=None, key_mask=None, window=0):
    """Reference with explicit loops over (batch, query, key). Returns the output and the rows that have at
    least one allowed key (fully masked rows are implementation-defined)."""
    B, H, Tq, hd = q.shape
    Tk = k.shape[2]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(hd)  # (B, H, Tq, Tk)
    allowed = torch.ones(B, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for i in range(Tq):
            qi = i + q_offset
            for j in range(Tk):
                ok = True
                if causal and j > qi:
                    ok = False
                if window > 0 and abs(qi - j) >= window:
                    ok = False
                if doc_ids is not None and doc_ids[b, i] != doc_ids[b, j]:
                    ok = False
                if key_mask is not None and not key_mask[b, j]:
                    ok = False
                allowed[b, i, j] = ok
    if key_bias is not None:
        scores = scores + key_bias.double()[:, None, None, :]
    scores = scores.masked_fill(~allowed[:, None], -torch.inf)
    live = allowed.any(-1)  # (B, Tq)
    probs = torch.softmax(scores.masked_fill(~live[:, None, :, None], 0.0), -1)
    return (probs @ v.double()).float(), live


def _qkv(B=2, H=2, Tq=9, Tk=9, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, hd, generator=g), torch.randn(B, H, Tk, hd, generator=g),
            torch.randn(B, H, Tk, hd, generator=g))


DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1]])
KEY_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
KEY_BIAS = torch.linspace(-3, 1, 18).view(2, 9)

CASES: dict[str, dict[str, Any]] = {
    "causal": dict(causal=True),
    "full": dict(causal=False),
    "q_offset": dict(causal=True, q_offset=6, _tq=3),
    "q_offset_window": dict(causal=True, q_offset=6, _tq=3, window=4),
    "doc_ids": dict(causal=True, doc_ids=DOCS),
    "doc_ids_full": dict(causal=False, doc_ids=DOCS),
    "window": dict(causal=True, window=3),
    "window_full": dict(causal=False, window=2),
    "key_bias": dict(causal=True, key_bias=KEY_BIAS),
    "key_mask": dict(causal=False, key_mask=KEY_MASK),
    "everything": dict(causal=True, doc_ids=DOCS, window=3, key_bias=KEY_BIAS, key_mask=KEY_MASK),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_matches_naive(name: str) -> None:
    kw = dict(CASES[name])
    tq = kw.pop("_tq", 9)
    q, k, v = _qkv(Tq=tq)
    out = attend(q, k, v, backend="sdpa", **kw)
    ref, live = naive(q, k, v, **kw)
    assert out.shape == ref.shape
    mask = live[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[mask], ref[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["flash", "flex"])
@pytest.mark.parametrize("name", ["causal", "doc_ids", "everything", "q_offset"])
def test_cpu_fallback_is_logged_and_identical(backend: str, name: str, caplog) -> None:
    kw = dict(CASES[name])
    tq = kw.pop("_tq", 9)
    q, k, v = _qkv(Tq=tq)
    attention._warned.clear()
    with caplog.at_level(logging.WARNING, logger="bytelm.models.attention"):
        out = attend(q, k, v, backend=backend, **kw)
    assert any("falling back to sdpa" in r.getMessage() and backend in r.getMessage() for r in caplog.records)
    assert torch.equal(out, attend(q, k, v, backend="sdpa", **kw))


def test_unknown_backend() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attend(q, k, v, backend="nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "flex"])
@pytest.mark.parametrize("kind", ["causal", "varlen", "window", "varlen_window"])
def test_gpu_backends_agree_with_sdpa(backend: str, kind: str) -> None:
    if backend == "flash" and not flash_available():
        pytest.skip("flash-attn not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, T, hd = 2, 4, 384, 64
    q, k, v = (torch.randn(B, H, T, hd, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    kw: dict = dict(causal=True)
    if "varlen" in kind:
        lens = [[100, 200, 84], [384]]
        kw["doc_ids"] = torch.stack(
            [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lens]
        ).cuda()
    if "window" in kind:
        kw["window"] = 64
    attention._warned.clear()
    out = attend(q, k, v, backend=backend, **kw)
    ref = attend(q, k, v, backend="sdpa", **kw)
    assert not attention._warned, f"{backend} fell back: {attention._warned}"
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
