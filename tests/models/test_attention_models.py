"""Attention backends inside the models, on CPU: the flash path through the pure-torch reference kernel (and
flex forward) give the SDPA model's outputs; metadata is built once per stack and forward; the flash path
allocates no T x T tensor; MrT5's gate bias keeps flash away unless the fallback is asked for."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bytelm.models import ModelConfig, attention
from bytelm.models.attention import AttentionBackendError
from bytelm.models.attention_ref import REFERENCE

pytestmark = pytest.mark.usefixtures("one_thread")

T = 40  # bytes per row; packed documents are shorter, so a T x T tensor can only come from a dense mask
SMALL = dict(d_byte=16, max_word_bytes=8)  # on top of conftest's TINY
# varlen_info calls (flash) and block masks (flex) per forward: flat 1; hierarchical 2 (bytes: encoder and
# decoder share one; words); MrT5 (flex only) 4: encoder before / after the gate, decoder self- and
# cross-attention
PER_FORWARD = {"flat": 1, "hier_words": 2, "hier_gate": 2, "mrt5": 4}


def _model(kind: str, backend: str, **kw) -> torch.nn.Module:
    return tiny_model(kind, **{**SMALL, "attn_backend": backend, **kw})


def _batch(B: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = b"the quick brown fox jumps over a lazy dog; " * 3
    ids = torch.stack([torch.tensor(list(text[i * 7 : i * 7 + T])) for i in range(B)])
    lens = [[13, 20, 7], [25, 15]]  # documents shorter than the row
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lens[:B]])
    del g
    return {"input_ids": ids, "doc_ids": docs}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"], doc_ids=batch["doc_ids"]).logits


class _Count:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.fn(*a, **kw)


@pytest.fixture
def ref_flash(monkeypatch):
    monkeypatch.setattr(attention, "load_flash", lambda: REFERENCE)
    counter = _Count(attention.varlen_info)
    monkeypatch.setattr(attention, "varlen_info", counter)
    return counter


@pytest.mark.parametrize("kind", ["flat", "hier_words", "hier_gate"])
def test_flash_model_equals_sdpa_and_builds_metadata_once(ref_flash, kind: str) -> None:
    batch = _batch()
    ref = _logits(_model(kind, "sdpa"), batch)
    out = _logits(_model(kind, "flash"), batch)
    assert ref_flash.calls == PER_FORWARD[kind]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flash_refuses_mrt5_masks_and_gate_bias_unless_fallback(ref_flash) -> None:
    batch = _batch()
    with pytest.raises(AttentionBackendError, match="mrt5 encoder: flash-attn takes no padding mask"):
        _logits(_model("mrt5", "flash"), batch)
    with pytest.raises(
        AttentionBackendError, match="mrt5 encoder after the gate: flash-attn cannot add a per-key bias"
    ):
        _logits(_model("mrt5", "flash", gate=dataclasses.replace(ModelConfig().gate, layer=0)), batch)
    ref = _logits(_model("mrt5", "sdpa"), batch)
    out = _logits(
        _model("mrt5", "flash", attn_fallback=True), batch
    )  # the decoder's self-attention runs flash
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hier_words", "mrt5"])
def test_flex_model_forward_equals_sdpa_and_builds_block_masks_once(monkeypatch, kind: str) -> None:
    counter = _Count(attention.make_block_mask)
    monkeypatch.setattr(attention, "make_block_mask", counter)
    batch = _batch()
    with torch.no_grad():  # flex has no backward on CPU
        ref = _logits(_model(kind, "sdpa").eval(), batch)
        out = _logits(_model(kind, "flex").eval(), batch)
    assert counter.calls == PER_FORWARD[kind]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor every op returns (the layer code's allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), tuple(t.shape)))
        return out

    def square(self, n: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f, s) for f, s in self.seen if len(s) >= 2 and s[-2:] == (n, n)]


@pytest.mark.parametrize("kind", ["flat", "hier_words"])
def test_flash_path_allocates_no_t_by_t_tensor(ref_flash, kind: str) -> None:
    batch = _batch()
    model = _model(kind, "flash")
    with _Shapes() as rec:
        loss = _logits(model, batch).float().logsumexp(-1).mean()
        loss.backward()
    assert rec.seen and not rec.square(T), rec.square(T)[:5]
    with _Shapes() as dense:  # the check sees the SDPA path's dense (B, 1, T, T) mask
        _logits(_model(kind, "sdpa"), batch)
    assert dense.square(T)
