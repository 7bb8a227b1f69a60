"""ALM loss (bytelm.distill.alm) against hand-written per-chunk loops, plus log1mexp stability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID
from bytelm.distill.align import align_chunks
from bytelm.distill.alm import (
    alm_chunk_loss,
    alm_loss,
    binary_ce,
    log1mexp,
    student_space_logprobs,
    student_target_logprobs,
)
from bytelm.distill.teacher import TeacherEncoding, TeacherOutput


def ref_log1mexp(x: float) -> float:
    return math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))


def ref_binary_ce(lt_raw: float, ls_raw: float, tau: float, eps: float = 1e-6) -> float:
    lt, ls = min(lt_raw, 0.0) / tau - eps, min(ls_raw, 0.0) / tau - eps
    return -(math.exp(lt) * ls + (1 - math.exp(lt)) * ref_log1mexp(ls))


# --------------------------------------------------------------------------------------------- log1mexp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_matches_reference_and_is_stable(dtype):
    xs = [-1e-30, -1e-12, -1e-7, -1e-3, -0.5, -math.log(2), -0.7, -1.0, -5.0, -30.0, -100.0, -1e4, -1e30]
    x = torch.tensor(xs, dtype=dtype, requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for xi, yi in zip(xs, y.tolist(), strict=True):
        ref = ref_log1mexp(xi)
        assert yi == pytest.approx(ref, rel=1e-5 if dtype == torch.float32 else 1e-12, abs=1e-30)
    # at exactly 0 the value is -inf (1 - e^0 = 0), but never nan
    z = log1mexp(torch.zeros(1, dtype=dtype))
    assert z.item() == -math.inf


def test_binary_ce_extreme_inputs_finite():
    lt = torch.tensor([0.0, -1e-9, -1.0, -1e3, -1e6, 0.0, -1e6])
    ls = torch.tensor([0.0, -1e-9, -1e6, -1e-9, -1e6, -1e6, 0.0], requires_grad=True)
    out = binary_ce(lt, ls)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(ls.grad).all()


# ------------------------------------------------------------------------------------------ chunk loss


def test_alm_chunk_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    lt = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 40
    ls = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 40
    lt[0, 0] = 1e-7  # rounding above zero is clamped
    valid = torch.rand(3, 7, generator=g) > 0.3
    for tau in (1.0, 5.0, 100.0):
        got = alm_chunk_loss(lt, ls, valid, tau=tau)
        terms = [
            ref_binary_ce(lt[b, k].item(), ls[b, k].item(), tau)
            for b in range(3)
            for k in range(7)
            if valid[b, k]
        ]
        assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
        # a global count replaces the local one
        got_g = alm_chunk_loss(lt, ls, valid, tau=tau, num_valid=100.0)
        assert got_g.item() == pytest.approx(sum(terms) / 100.0, rel=1e-6)


def test_alm_minimum_at_teacher_likelihood():
    lt = torch.tensor([-0.01, -0.5, -3.0, -20.0, -150.0, -800.0], dtype=torch.float64)
    valid = torch.ones(1, 6, dtype=torch.bool)
    for tau in (1.0, 5.0, 100.0):
        ls = lt.clone()[None].requires_grad_(True)
        loss = alm_chunk_loss(lt[None], ls, valid, tau=tau)
        (grad,) = torch.autograd.grad(loss, ls)
        assert grad.abs().max().item() < 1e-9
        for delta in (-1.0, -0.05, 0.05, 1.0):  # moving any chunk away raises the loss (ls stays <= 0)
            moved = (lt + delta).clamp(max=-1e-4)[None]
            if torch.equal(moved, lt[None]):
                continue
            assert alm_chunk_loss(lt[None], moved, valid, tau=tau).item() > loss.item()


def test_alm_gradient_only_on_valid_chunks():
    lt = -torch.rand(2, 5, dtype=torch.float64) * 10
    ls = (-torch.rand(2, 5, dtype=torch.float64) * 10).requires_grad_(True)
    valid = torch.tensor([[True, False, True, False, True], [False] * 5])
    alm_chunk_loss(lt, ls, valid).backward()
    assert (ls.grad[~valid] == 0).all() and (ls.grad[valid] != 0).all()


# ------------------------------------------------------------------------ full alm_loss vs python loops


def make_case(seed: int = 0):
    """Two texts as hand-made teacher tokens (BOS special + text), random teacher/student numbers."""
    ex = [
        [None, b"Hel", b"lo", b" w", b"\xc3\xb6r", b"ld", b"\n", b"\xf0\x9f", b"\x98\x80"],
        [None, b"a", b" b", b"\xef\xbf\xbd", b" c", b"dd", b" e"],
    ]
    exact = [[True] * 9, [True, True, True, False, True, True, True]]
    g = torch.Generator().manual_seed(seed)
    B, L = 2, max(len(t) for t in ex)
    spans = torch.zeros(B, L, 2, dtype=torch.long)
    content = torch.zeros(B, L, dtype=torch.bool)
    exact_m = torch.zeros(B, L, dtype=torch.bool)
    texts = []
    for b, toks in enumerate(ex):
        pos = 0
        for i, t in enumerate(toks):
            n = len(t) if t else 0
            spans[b, i] = torch.tensor([pos, pos + n])
            content[b, i] = t is not None
            exact_m[b, i] = t is not None and exact[b][i]
            pos += n
        spans[b, len(toks) :] = pos
        texts.append(b"".join(t for t in toks if t))
    attn = torch.zeros(B, L, dtype=torch.bool)
    for b, toks in enumerate(ex):
        attn[b, : len(toks)] = True
    n_bytes = torch.tensor([len(t) for t in texts])
    enc = TeacherEncoding(
        texts, torch.zeros(B, L, dtype=torch.long), attn, spans, content, exact_m, n_bytes, n_bytes
    )
    tok_lp = -torch.rand(B, L, generator=g, dtype=torch.float64) * 5
    has = attn.clone()
    has[:, 0] = False
    tok_lp = tok_lp.masked_fill(~has, 0.0).float()
    space_lp = torch.log(torch.rand(B, L, generator=g) * 0.3 + 1e-3)
    out = TeacherOutput(enc, tok_lp, has & exact_m, space_lp)
    N = int(n_bytes.max())
    byte_ids = torch.full((B, N), PAD_ID, dtype=torch.long)
    for b, t in enumerate(texts):
        byte_ids[b, : len(t)] = torch.tensor(list(t))
    logits = torch.randn(B, N + 1, 320, generator=g)
    return ex, out, byte_ids, logits


def ref_alm(ex, out: TeacherOutput, byte_ids, logits, mode, tau, threshold=0.1):
    """Per-chunk python loop: tokenkit's walk, sums, (merge + append space), binary CE, mean."""
    terms = []
    for b, toks in enumerate(ex):
        text = out.encoding.texts[b]
        logp = torch.log_softmax(logits[b, :, :259].double(), -1)
        # chunks for a byte student = text tokens (each token end is a byte boundary)
        chunks = []  # (token idx list, byte start, byte end)
        pos = 0
        for i, t in enumerate(toks):
            if t:
                chunks.append(([i], pos, pos + len(t)))
                pos += len(t)
        rows: list[tuple[float, float, bool, float, float]] = []
        for toks_i, s, e in chunks:
            t_lp = min(sum(float(out.token_logprobs[b, i]) for i in toks_i), 0.0)
            s_lp = min(sum(float(logp[j, text[j]]) for j in range(s, e)), 0.0)
            ok = all(bool(out.logprob_mask[b, i]) for i in toks_i)
            t_sp = float(out.next_space_logprobs[b, toks_i[-1]])
            s_sp = math.log(sum(math.exp(float(logp[e, c])) for c in (32, 10, 9, EOS_ID)))
            rows.append((t_lp, s_lp, ok, t_sp, s_sp))
        if mode == "debiased":
            merged: list[tuple[float, float, bool, float, float]] = []
            cur: tuple[float, float, bool, float, float] | None = None
            for r in rows:
                if cur is None:
                    cur = r
                else:
                    cur = (cur[0] + r[0], cur[1] + r[1], cur[2] and r[2], r[3], r[4])
                if math.exp(r[3]) > threshold:
                    merged.append(cur)
                    cur = None
            if cur is not None:
                merged.append(cur)
            rows = merged
        for t_lp, s_lp, ok, t_sp, s_sp in rows:
            if not ok:
                continue
            if mode != "unconstrained":
                t_lp, s_lp = t_lp + t_sp, s_lp + s_sp
            terms.append(ref_binary_ce(t_lp, s_lp, tau))
    return sum(terms) / len(terms), len(terms)


@pytest.mark.parametrize("mode", ["unconstrained", "append_space", "debiased"])
@pytest.mark.parametrize("tau", [1.0, 100.0])
def test_alm_loss_matches_per_chunk_loop(mode, tau):
    ex, out, byte_ids, logits = make_case()
    enc = out.encoding
    al = align_chunks(enc.spans, enc.content_mask, out.logprob_mask, enc.n_bytes)
    got, stats = alm_loss(out, al, logits, byte_ids, mode=mode, tau=tau)
    ref, n = ref_alm(ex, out, byte_ids, logits, mode, tau)
    assert got.item() == pytest.approx(ref, rel=1e-5)
    assert stats["alm_chunks"].item() == n


def test_debiased_merging_changes_chunks():
    ex, out, byte_ids, logits = make_case(seed=3)
    enc = out.encoding
    al = align_chunks(enc.spans, enc.content_mask, out.logprob_mask, enc.n_bytes)
    out.next_space_logprobs.fill_(math.log(0.05))  # below threshold everywhere: one chunk per text
    _, stats = alm_loss(out, al, logits, byte_ids, mode="debiased")
    assert stats["alm_chunks"].item() == 1  # text 2 holds the invalid token -> only text 1 counts
    assert stats["alm_chunk_bytes"].item() == len(enc.texts[0])


def test_student_helpers_use_259_columns():
    logits = torch.randn(2, 5, 320)
    logits[..., 259:] = 100.0  # padded columns must not take probability mass
    ids = torch.tensor([[1, 2, 3, EOS_ID, PAD_ID], [BOS_ID, 0, 255, 7, 7]])
    lp = student_target_logprobs(logits, ids)
    ref = torch.log_softmax(logits[..., :259], -1)
    assert torch.allclose(lp[0, :4], ref[0, torch.arange(4), ids[0, :4]])
    sp = student_space_logprobs(logits)
    ref_sp = torch.logsumexp(ref[..., [32, 10, 9, EOS_ID]], -1)
    assert torch.allclose(sp, ref_sp, atol=1e-6)
    assert np.isfinite(lp.numpy()).all()
