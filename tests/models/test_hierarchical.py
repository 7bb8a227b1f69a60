"""HAT-style hierarchical model: shapes, causality (brute force), padding, packed documents, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID
from bytelm.models.hierarchical import HierarchicalByteLM, layout_words, split_word_starts

pytestmark = pytest.mark.usefixtures("one_thread")


TEXT = "Hi, wörld! 中文字 don't  stop\n\tcafé 🙂 HTTPServer camelCase 3.14 $5 «x»".encode()


def ids_of(data: bytes | list[int]) -> torch.Tensor:
    return torch.tensor([list(data)])


def test_shapes_and_metrics() -> None:
    m = tiny_model("hierarchical").eval()
    x = torch.tensor([list(TEXT[:40]), list(TEXT[10:50])])
    out = m(x)
    assert out.logits.shape == (2, 40, 320)
    assert torch.isfinite(out.logits).all()
    bpw = float(out.metrics["bytes_per_word"])
    assert 1.0 < bpw < 10.0


def test_layout_ready_times() -> None:
    """ASCII: bytes of word w see word w-1. A word opening with a 3-byte character: its first 2 bytes still
    see the word before the previous one (the boundary is known once the character is complete)."""
    data = list(b"ab cd") + list("中".encode()) + list(b"e")
    ws = torch.from_numpy(split_word_starts(data)).unsqueeze(0)
    lay = layout_words(torch.tensor([data]), ws)
    # words: "ab" | " cd" | "中" | "e"  -> word ids 0 0 1 1 1 2 2 2 3
    assert lay.word_id[0].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    # ctx index: 0 = first-word vector, k = output of word k-1
    assert lay.ctx_idx[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 2, 3]


def test_specials_are_words_and_pad_mask() -> None:
    data = [BOS_ID, *b"ab cd", EOS_ID, PAD_ID, PAD_ID]
    ws = torch.zeros(1, len(data), dtype=torch.bool)  # even with no word starts given
    lay = layout_words(torch.tensor([data]), ws)
    assert lay.word_start[0].tolist() == [True, True, False, False, False, False, True, True, True]
    m = tiny_model("hierarchical").eval()
    out = m(torch.tensor([data]), word_start=ws)
    assert float(out.metrics["bytes_per_word"]) == pytest.approx(7 / 3)  # BOS | ab cd | EOS; PAD excluded


def _positions(data: bytes) -> list[int]:
    """Several kinds of positions: word starts, the byte after a start, lead/continuation bytes, the end."""
    ws = split_word_starts(list(data))
    starts = [i for i in range(1, len(data)) if ws[i]]
    lead = [i for i, b in enumerate(data) if b >= 0xC2][:3]
    cont = [i for i, b in enumerate(data) if 0x80 <= b < 0xC0][:3]
    pos = set(starts[::3] + [s + 1 for s in starts[1::4]] + [s - 1 for s in starts[2::5]] + lead + cont)
    pos |= {1, len(data) - 1}
    return sorted(p for p in pos if 0 < p < len(data))


REPLACEMENTS = [ord(" "), ord("x"), ord("."), 0xE4, 0x85, ord("\n")]


@pytest.mark.parametrize(
    "kw",
    [
        dict(pooling="query", decoder_cross="first"),
        dict(pooling="last", decoder_cross="all"),
        dict(pooling="query", decoder_cross="all", encoder_window=8),
    ],
)
def test_causality_brute_force(kw) -> None:
    """Changing byte t changes no logit at any position < t (word starts recomputed from the bytes)."""
    m = tiny_model("hierarchical", **kw).eval()
    data = TEXT[:70]
    base = m(ids_of(data)).logits
    for t in _positions(data):
        for r in REPLACEMENTS:
            if r == data[t]:
                continue
            var = bytearray(data)
            var[t] = r
            out = m(ids_of(bytes(var))).logits
            torch.testing.assert_close(out[0, :t], base[0, :t], atol=1e-5, rtol=0, msg=f"t={t} byte={r}")


def test_causality_fixed_words_padding_and_docs() -> None:
    """Same with word_start held fixed, PAD at the end of the row, and two packed documents."""
    m = tiny_model("hierarchical", pooling="query").eval()
    doc1, doc2 = TEXT[:30], TEXT[30:60]
    ids = [BOS_ID, *doc1, EOS_ID, BOS_ID, *doc2, EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    docs = [0] * (len(doc1) + 2) + [1] * (len(doc2) + 2) + [2] * 3
    x = torch.tensor([ids])
    d = torch.tensor([docs])
    ws = torch.from_numpy(split_word_starts(ids, doc_ids=docs)).unsqueeze(0)
    base = m(x, doc_ids=d, word_start=ws).logits
    for t in [1, 5, 12, 31, 32, 33, 40, 47, 60, 63, len(ids) - 2]:
        for r in (ord("z"), ord(" "), 0xE6):
            var = x.clone()
            var[0, t] = r
            for w in (ws, None):
                out = m(var, doc_ids=d, word_start=w).logits
                torch.testing.assert_close(out[0, :t], base[0, :t], atol=1e-5, rtol=0)


def test_padding_does_not_change_real_positions() -> None:
    m = tiny_model("hierarchical").eval()
    a, b = list(TEXT[:50]), list(TEXT[5:30])
    alone = m(torch.tensor([b])).logits
    batch = torch.tensor([a, b + [PAD_ID] * (len(a) - len(b))])
    out = m(batch).logits
    torch.testing.assert_close(out[1, : len(b)], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0], m(torch.tensor([a])).logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("specials", [True, False])
def test_doc_isolation(specials: bool) -> None:
    """A packed row gives each document the logits it gets alone (first word vector at each doc start)."""
    m = tiny_model("hierarchical", pooling="query", decoder_cross="all").eval()
    d1, d2 = list(TEXT[:33]), list(TEXT[20:70])
    if specials:
        d1, d2 = [BOS_ID, *d1, EOS_ID], [BOS_ID, *d2, EOS_ID]
    x = torch.tensor([d1 + d2])
    docs = torch.tensor([[0] * len(d1) + [1] * len(d2)])
    packed = m(x, doc_ids=docs).logits[0]
    torch.testing.assert_close(packed[: len(d1)], m(torch.tensor([d1])).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[len(d1) :], m(torch.tensor([d2])).logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["query", "last"])
def test_loss_decreases(pooling: str) -> None:
    m = tiny_model("hierarchical", pooling=pooling)
    x = torch.tensor([list(TEXT[:64]), list(TEXT[8:72])])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = m(x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses  # a wide margin: ~5.8 -> ~3 nats here


def test_activation_checkpointing_same_result() -> None:
    x = torch.tensor([list(TEXT[:48])])
    outs = []
    for ckpt in (False, True):
        m = tiny_model("hierarchical", activation_checkpointing=ckpt)
        loss = m(x).logits.square().mean()
        loss.backward()
        grad = m.embed.weight.grad
        assert grad is not None
        outs.append((loss.detach(), grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_given_word_start_matches_splitter() -> None:
    m = tiny_model("hierarchical").eval()
    x = ids_of(TEXT[:60])
    ws = torch.from_numpy(split_word_starts(list(TEXT[:60]))).unsqueeze(0)
    torch.testing.assert_close(m(x, word_start=ws).logits, m(x).logits)


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="pooling"):
        HierarchicalByteLM(tiny_config("hierarchical", pooling="mean"))
