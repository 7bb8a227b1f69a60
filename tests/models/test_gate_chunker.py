"""Hierarchical model with learned chunks (``model.chunker=gate``): boundary rules against a naive loop,
the straight-through factor, causality by brute force, cached generation == full forward, gate training."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID
from bytelm.models.chunking import gate_closed, keep_scale, run_lengths
from bytelm.models.config import GateConfig
from bytelm.models.generate import iter_generate
from bytelm.models.hierarchical import HierarchicalByteLM, layout_words

pytestmark = pytest.mark.usefixtures("one_thread")


TEXT = (
    "Hi, wörld! 中文字 don't  stop\n\tcafé 🙂 HTTPServer camelCase 3.14 $5 «x» and more words here".encode()
)


GATE = dict(target_ratio=0.6, ki=1e-2, alpha_min=-1.0)


def make(seed: int = 0, bias: float = 0.0, center: bool = True, **kw) -> HierarchicalByteLM:
    """A tiny gate-chunked model (conftest's factory) at the sizes the gate-training test was tuned on."""
    kw.setdefault("gate", GateConfig(bias_init=bias, center=center, **GATE))
    return tiny_model("hier_gate", seed=seed, d_model=64, n_heads=4, decoder_layers=2, **kw).eval()


def naive_closed(ids: list[int], G: list[float], tau: float, cap: int, docs: list[int] | None):
    """One byte at a time, the rules of bytelm.models.chunking written out."""
    closed, starts, length = [], [], 0
    for t, tok in enumerate(ids):
        start = (
            t == 0
            or closed[t - 1]
            or tok >= 256
            or ids[t - 1] >= 256
            or (docs is not None and docs[t] != docs[t - 1])
        )
        length = 1 if start else length + 1
        c = tok >= 256 or G[t] > tau or length >= cap
        closed.append(c)
        starts.append(start)
    return closed, starts


def test_gate_closed_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        T = 60
        ids = torch.randint(0, 256, (3, T), generator=g)
        ids[:, 0] = BOS_ID
        ids[0, 30] = EOS_ID
        ids[1, -5:] = PAD_ID
        docs = torch.zeros(3, T, dtype=torch.long)
        docs[2, 25:] = 1
        # mostly deleted so that the size cap bites
        G = -30 * torch.sigmoid(torch.randn(3, T, generator=g) + (2.0 if trial % 2 else -1.0))
        cap = 5 + trial % 4
        closed, ws = gate_closed(ids, G, -15.0, cap, docs)
        for b in range(3):
            c_ref, s_ref = naive_closed(ids[b].tolist(), G[b].tolist(), -15.0, cap, docs[b].tolist())
            assert closed[b].tolist() == c_ref
            assert ws[b].tolist() == s_ref
        assert int(run_lengths(ws).max()) <= cap


def test_layout_closed_chunks_are_ready_at_their_last_byte() -> None:
    """A chunk the gate closed at byte t is seen by byte t itself; a chunk ended by a special or a document
    start is seen from that next position on (the rule-based lookahead)."""
    ids = torch.tensor([[BOS_ID, 97, 98, 99, 100, 101, EOS_ID, 102]])
    closed = torch.tensor([[True, False, True, False, False, False, True, False]])
    ws = torch.tensor([[True, True, False, True, False, False, True, True]])
    lay = layout_words(ids, ws, closed=closed)
    # chunks: BOS | a b | c d e (ended by EOS, not closed) | EOS | f
    assert lay.word_id[0].tolist() == [0, 1, 1, 2, 2, 2, 3, 4]
    # ctx: byte 0 sees BOS (chunk 0 -> idx 1); byte 2 sees "ab"; byte 6 (EOS) sees EOS's own chunk
    assert lay.ctx_idx[0].tolist() == [1, 1, 2, 2, 2, 2, 4, 4]


def test_keep_scale_value_and_gradient() -> None:
    k = -30.0
    G = torch.tensor([[-2.0, -20.0, -5.0, -1.0, -29.0]], requires_grad=True)
    by_gate = G.detach() > -15.0
    end = torch.tensor([[1, 3, 4, 5, 5]])  # chunk ends (exclusive); last slot is padding-like
    s = keep_scale(G, k, by_gate, end)
    assert torch.equal(s.detach(), torch.ones(1, 5, 1))
    s.sum().backward()
    # d/dG (1 - G/k) = -1/k at closing bytes 0, 3, 4 (byte 4 is not gate-closed: no gradient); byte 2 twice?
    # no: ends 1,3,4,5,5 -> closing bytes 0, 2, 3, 4, 4; gate-closed among them: 0, 2, 3
    assert G.grad is not None
    assert G.grad[0].tolist() == pytest.approx([-1 / k, 0.0, -1 / k, -1 / k, 0.0])


@pytest.mark.parametrize(
    "kw", [dict(pooling="query"), dict(pooling="last", decoder_cross="all", max_word_bytes=6, center=False)]
)
def test_causality_brute_force(kw) -> None:
    """Changing byte t changes no logit before t, with boundaries recomputed by the gate each time."""
    m = make(**kw)
    data = TEXT[:64]
    base_out = m(torch.tensor([list(data)]))
    base = base_out.logits
    ratio = float(base_out.metrics["deletion_ratio"])
    assert 0.2 < ratio < 0.8  # a real mix of kept and deleted bytes
    for t in [1, 3, 8, 15, 16, 22, 30, 41, 50, 63]:
        for r in (ord(" "), ord("x"), 0xE4, 0x85):
            if r == data[t]:
                continue
            var = bytearray(data)
            var[t] = r
            out = m(torch.tensor([list(var)])).logits
            torch.testing.assert_close(out[0, :t], base[0, :t], atol=1e-5, rtol=0, msg=f"t={t} byte={r}")


def test_causality_with_docs_and_padding_and_ignored_word_start() -> None:
    m = make()
    ids = [BOS_ID, *TEXT[:30], EOS_ID, BOS_ID, *TEXT[30:60], EOS_ID, PAD_ID, PAD_ID]
    docs = [0] * 32 + [1] * 32 + [2] * 2
    x, d = torch.tensor([ids]), torch.tensor([docs])
    base = m(x, doc_ids=d).logits
    bogus = torch.ones_like(x, dtype=torch.bool)  # the gate decides: a given word_start is ignored
    torch.testing.assert_close(m(x, doc_ids=d, word_start=bogus).logits, base)
    for t in [1, 12, 31, 32, 33, 47, 63]:
        var = x.clone()
        var[0, t] = ord("z") if ids[t] != ord("z") else ord("q")
        torch.testing.assert_close(m(var, doc_ids=d).logits[0, :t], base[0, :t], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kw", "chunk"), [(dict(), 1), (dict(pooling="last", max_word_bytes=5, center=False), 7)]
)
def test_teacher_forced_cache_equals_full_forward(kw, chunk: int) -> None:
    m = make(**kw)
    ids = [BOS_ID, *TEXT, *TEXT[::-1]]
    full = m(torch.tensor([ids])).logits[0]
    cache = m.new_cache()
    outs = [m(torch.tensor([ids[i : i + chunk]]), cache=cache).logits[0] for i in range(0, len(ids), chunk)]
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-4, rtol=0)
    assert cache.n_ready > 20  # many chunks went through the backbone online


def test_generation_cached_equals_full_forward() -> None:
    m = make(bias=0.5)
    prompt = list(b"ROMEO: But soft, ")
    steps = list(iter_generate(m, prompt, max_new_bytes=120, seed=1, min_new_bytes=120, top_k=64))
    gen = [b for b, _ in steps]
    cached = torch.stack([lg for _, lg in steps])
    full = m(torch.tensor([prompt + gen])).logits[0, len(prompt) - 1 : -1]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


def test_task_gradient_reaches_the_gate_and_metrics_are_logged() -> None:
    """With alpha = 0 (first step) the only path from the loss to the gate is the straight-through factor."""
    m = make().train()
    x = torch.tensor([list(TEXT[:60]), list(TEXT[20:80])])
    out = m(x)
    for key in ("deletion_ratio", "alpha", "gate_mean", "bytes_kept_per_seq", "bytes_per_word"):
        assert key in out.metrics
    assert out.aux_loss is not None and float(out.aux_loss.detach()) == 0.0  # alpha starts at 0
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert m.gate is not None
    assert m.gate.proj.weight.grad is not None and m.gate.proj.weight.grad.abs().sum() > 0
    assert int(m.controller.steps) == 1  # type: ignore[union-attr]
    # eval forward: no straight-through factor, same logits as a no-grad training forward would give
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, out.logits.detach(), atol=1e-5, rtol=0)


def test_controller_drives_deletion_ratio_to_target() -> None:
    """Real text (a Shakespeare play), AdamW at the experiments' learning rate decaying linearly to 10%: the
    PI controller holds the deletion ratio within 5 points of delta = 0.6 (mean of the last 40 of 110 steps;
    measured 0.613 / 0.542 / 0.609 for seeds 0 / 1 / 2 with kp 0.5, ki 1e-2), and the regulariser moves only
    the gate (its input is detached), not the encoder."""
    from bytelm.data.shakespeare import shakespeare_documents

    doc = shakespeare_documents("train")[0].data[:200_000]
    data = torch.frombuffer(bytearray(doc), dtype=torch.uint8).long()
    delta, steps = 0.6, 110
    # b = -1.4 * Phi^-1(delta): the centred gate score spreads with std ~|w| ~ 1.4, so this starts near delta
    m = make(
        gate=GateConfig(bias_init=-0.35, center=True, target_ratio=delta, ki=1e-2, alpha_min=-1.0)
    ).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    hist = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * (1 - 0.9 * step / steps)
        rows = torch.stack(
            [data[i : i + 65] for i in torch.randint(0, len(data) - 65, (8,), generator=g).tolist()]
        )
        out = m(rows[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), rows[:, 1:].flatten())
        assert out.aux_loss is not None
        opt.zero_grad()
        if step == 5:  # the regulariser alone puts no gradient on the encoder
            out.aux_loss.backward(retain_graph=True)
            assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.encoder.parameters())
            assert (
                m.gate is not None and m.gate.proj.bias.grad is not None and m.gate.proj.bias.grad.abs() > 0
            )
            opt.zero_grad()
        (loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        hist.append(float(out.metrics["deletion_ratio"]))
    final = sum(hist[-40:]) / 40
    assert abs(final - delta) < 0.05, (final, hist[::10])


def test_causal_center_matches_loop() -> None:
    from bytelm.models.chunking import causal_center

    h = torch.randn(2, 9, 3)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9])
    got = causal_center(h, docs)
    for b in range(2):
        for t in range(9):
            s = t
            while s > 0 and docs[b, s - 1] == docs[b, t]:
                s -= 1
            torch.testing.assert_close(got[b, t], h[b, t] - h[b, s : t + 1].mean(0))


def test_bad_configs() -> None:
    with pytest.raises(ValueError, match="chunker"):
        make(chunker="bpe")
