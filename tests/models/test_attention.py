"""The attention entry point against a naive softmax(QK^T / sqrt(d) + mask) V; the flash path through a
pure-torch reference kernel and flex forward on CPU against SDPA; how backends are chosen, refused and fallen
back from."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch

from bytelm.models import attention
from bytelm.models.attention import AttentionBackendError, Backend, FlashKernels, attend, flash_available
from bytelm.models.attention_ref import REFERENCE


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
    return (
        torch.randn(B, H, Tq, hd, generator=g),
        torch.randn(B, H, Tk, hd, generator=g),
        torch.randn(B, H, Tk, hd, generator=g),
    )


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


# ------------------------------------------------------------------ flash (reference kernel) and flex on CPU

FLASH_CASES = [
    "causal",
    "full",
    "q_offset",
    "q_offset_window",
    "doc_ids",
    "doc_ids_full",
    "window",
    "window_full",
]


@pytest.fixture
def ref_flash(monkeypatch):
    """The flash path on CPU: flash-attn's two functions replaced by the pure-torch reference kernel."""
    monkeypatch.setattr(attention, "load_flash", lambda: REFERENCE)
    return REFERENCE


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("name", FLASH_CASES)
def test_flash_path_equals_sdpa_dense(ref_flash, name: str, gqa: bool) -> None:
    kw = dict(CASES[name])
    tq = kw.pop("_tq", 9)
    q, k, v = _qkv(Tq=tq, H=4 if gqa else 2)
    if gqa:  # 4 query heads read 2 KV heads
        k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    meta = attention.stack_meta(q.transpose(1, 2), "flash", tk=k.shape[2], **kw)
    assert meta.backend is Backend.FLASH and meta.mask is None
    assert (meta.cu_seqlens is not None) == ("doc_ids" in kw)
    out = attend(q, k, v, meta)
    ref = attend(q, k, v, backend="sdpa", **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_varlen_info_segments_rows_and_documents() -> None:
    cu, m = attention.varlen_info(DOCS)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 7, 9, 15, 18]
    assert m == 6


FLEX_CASES = [
    ("causal", False),
    ("doc_ids", False),
    ("window_full", False),
    ("q_offset_window", False),
    ("key_mask", True),
    ("everything", False),
    ("everything", True),
]  # eager flex traces each: ~1 s


@pytest.mark.parametrize("name,null_key", FLEX_CASES)
def test_flex_forward_equals_sdpa_on_cpu(name: str, null_key: bool) -> None:
    """flex runs forward on CPU (no backward): block mask, per-key bias (score_mod) and softmax1 (lse)."""
    kw = dict(CASES[name])
    tq = kw.pop("_tq", 9)
    q, k, v = _qkv(Tq=tq)
    with torch.no_grad():
        out = attend(q, k, v, backend="flex", null_key=null_key, **kw)
        ref = attend(q, k, v, backend="sdpa", null_key=null_key, **kw)
    _, live = naive(q, k, v, **kw)
    mask = live[:, None, :, None].expand_as(ref)  # fully masked rows are implementation-defined
    torch.testing.assert_close(out[mask], ref[mask], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ choosing a backend


def test_explicit_backend_that_cannot_run_is_an_error_naming_why(monkeypatch) -> None:
    q, k, v = _qkv()
    monkeypatch.setattr(attention, "load_flash", lambda: None)
    with pytest.raises(AttentionBackendError, match="flash-attn is not installed"):
        attend(q, k, v, backend="flash")
    cuda_only = FlashKernels(REFERENCE.func, REFERENCE.varlen_func, devices=("cuda",))
    monkeypatch.setattr(attention, "load_flash", lambda: cuda_only)
    with pytest.raises(AttentionBackendError, match="needs CUDA"):
        attend(q, k, v, backend="flash")
    half_only = FlashKernels(REFERENCE.func, REFERENCE.varlen_func, devices=("cpu",))
    monkeypatch.setattr(attention, "load_flash", lambda: half_only)
    with pytest.raises(AttentionBackendError, match="fp16/bf16"):
        attend(q, k, v, backend="flash")
    monkeypatch.setattr(attention, "load_flash", lambda: REFERENCE)
    with pytest.raises(AttentionBackendError, match="per-key bias"):
        attend(q, k, v, backend="flash", key_bias=KEY_BIAS)
    with pytest.raises(AttentionBackendError, match="null key"):
        attend(q, k, v, backend="flash", null_key=True)
    with pytest.raises(AttentionBackendError, match="no backward on CPU"):
        attend(q.requires_grad_(), k, v, backend="flex")


@pytest.mark.parametrize("backend", ["flash", "flex"])
def test_fallback_is_opt_in_and_logged_once(monkeypatch, caplog, backend: str) -> None:
    monkeypatch.setattr(attention, "load_flash", lambda: None)
    monkeypatch.setattr(attention, "_logged", set())
    q, k, v = _qkv()
    q.requires_grad_()
    kw = dict(CASES["everything"])
    with caplog.at_level(logging.INFO, logger="bytelm.models.attention"):
        out = attend(q, k, v, backend=backend, fallback=True, **kw)
        attend(q, k, v, backend=backend, fallback=True, **kw)
    lines = [r.getMessage() for r in caplog.records if "model.attn_fallback=true" in r.getMessage()]
    assert len(lines) == 1 and backend in lines[0], lines
    assert torch.equal(out, attend(q, k, v, backend="sdpa", **kw))


def test_auto_is_sdpa_on_cpu_and_logged_once(caplog, monkeypatch) -> None:
    monkeypatch.setattr(attention, "_logged", set())
    monkeypatch.setattr(attention, "load_flash", lambda: REFERENCE)  # even with a CPU flash kernel: sdpa
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="bytelm.models.attention"):
        for _ in range(3):
            meta = attention.stack_meta(q.transpose(1, 2), "auto", stack="test stack", doc_ids=DOCS)
    assert meta.backend is Backend.SDPA
    lines = [r.getMessage() for r in caplog.records if "auto -> sdpa for the test stack" in r.getMessage()]
    assert len(lines) == 1


def _needs(**kw: Any) -> attention.Needs:
    base: dict[str, Any] = dict(device="cuda", dtype=torch.bfloat16, grad=True, causal=True, tq=64, tk=64)
    return attention.Needs(**{**base, **kw})


@pytest.mark.parametrize(
    "flash,needs,expected",
    [
        (True, dict(docs=True), Backend.FLASH),  # packed training rows: flash varlen
        (True, dict(), Backend.FLASH),
        (
            True,
            dict(docs=True, dtype=torch.float32),
            Backend.FLEX,
        ),  # fp32: no flash, documents need a block mask
        (False, dict(docs=True), Backend.FLEX),  # flash not installed
        (False, dict(window=8), Backend.FLEX),
        (False, dict(), Backend.SDPA),  # plain causal: SDPA's is_causal kernels, no mask
        (
            True,
            dict(causal=False, key_bias=True, key_mask=True, null_key=True),
            Backend.SDPA,
        ),  # MrT5 encoder: (B,1,1,S)
        (
            True,
            dict(causal=False, tq=32, key_bias=True, key_mask=True, null_key=True),
            Backend.SDPA,
        ),  # cross-attention
        (True, dict(key_bias=True), Backend.FLEX),  # causal + bias: flex's score_mod
        (True, dict(tq=1, tk=65, q_offset=64), Backend.FLASH),  # a cached decoding step
        (False, dict(tq=1, tk=65, q_offset=64), Backend.SDPA),
        (True, dict(device="cpu", docs=True), Backend.SDPA),
    ],
)
def test_auto_choice_on_cuda(monkeypatch, flash: bool, needs: dict, expected: Backend) -> None:
    kernels = FlashKernels(REFERENCE.func, REFERENCE.varlen_func) if flash else None
    monkeypatch.setattr(attention, "load_flash", lambda: kernels)
    assert attention.auto_backend(_needs(**needs))[0] is expected


def test_backend_names() -> None:
    assert attention.ATTN_BACKENDS == ("auto", "sdpa", "flash", "flex")
    from bytelm.models import ModelConfig

    assert ModelConfig().attn_backend == "auto"


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
    out = attend(q, k, v, backend=backend, **kw)  # an explicit backend that cannot run raises
    ref = attend(q, k, v, backend="sdpa", **kw)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
