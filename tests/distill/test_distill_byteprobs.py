"""Naive within-token byte distributions (bytelm.distill.byteprobs) against brute-force enumeration."""

from __future__ import annotations

import math
import random

import pytest
import torch

from bytelm.distill.byteprobs import ByteTrie, byte_kl, byte_kl_naive, exact_byte_logprobs
from bytelm.distill.teacher import TeacherEncoding, TeacherOutput, token_bytes_table


def tiny_table(seed: int = 0, size: int = 45) -> list[bytes | None]:
    """<= 50 tokens over a small alphabet with multi-byte chars; two specials (None) and a duplicate."""
    rng = random.Random(seed)
    alpha = [b"a", b"b", b" ", b"\xc3", b"\xa9", b"\n"]
    vocab: set[bytes] = {b"a", b"b", b" ", b"\xc3", b"\xa9", b"\n"}  # every byte alone: any text tokenizes
    while len(vocab) < size - 3:
        vocab.add(b"".join(rng.choice(alpha) for _ in range(rng.randint(2, 5))))
    toks = sorted(vocab)
    rng.shuffle(toks)
    return [None, *toks, b"a", None]  # id 0 and the last: specials; b"a" twice (e.g. byte-fallback + piece)


def brute(table, p: torch.Tensor, prefix: bytes, renormalize: bool) -> torch.Tensor:
    """P(b) = sum p(v) over v starting with prefix+b, / (sum over b) or / sum over v starting with prefix."""
    num = torch.zeros(256, dtype=torch.float64)
    den = 0.0
    for v, tb in enumerate(table):
        if not tb or not tb.startswith(prefix):
            continue
        den += float(p[v])
        if len(tb) > len(prefix):
            num[tb[len(prefix)]] += float(p[v])
    return num / (num.sum() if renormalize else den)


@pytest.mark.parametrize("renormalize", [True, False])
def test_trie_matches_brute_force(renormalize):
    table = tiny_table()
    assert len(table) <= 50
    trie = ByteTrie(table)
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, len(table), generator=g, dtype=torch.float64) * 2, -1)
    queries = [(v, d) for v, tb in enumerate(table) if tb for d in range(len(tb))]
    rows = torch.tensor([k % 4 for k in range(len(queries))])
    nodes = torch.tensor([int(trie.token_nodes[trie.token_ptr[v] + d]) for v, d in queries])
    got = trie.byte_logprobs(logp, rows, nodes, renormalize=renormalize).double().exp()  # (M, 256)
    for k, (v, d) in enumerate(queries):
        ref = brute(table, logp[k % 4].exp(), table[v][:d], renormalize)  # type: ignore[index]
        assert torch.allclose(got[k], ref, atol=1e-6, rtol=0), (table[v], d)
    if renormalize:
        assert torch.allclose(got.sum(-1), torch.ones(len(queries), dtype=torch.float64), atol=1e-6)
    else:
        assert (got.sum(-1) <= 1 + 1e-6).all()


def test_token_bytes_table_byte_fallback_and_sentencepiece():
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for piece in ["\u2581", "a", "b", "\u2581a", "ab", "é"]:
        vocab[piece] = len(vocab)
    merges = [("\u2581", "a"), ("a", "b")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    table = token_bytes_table(hf)
    assert table[0] is None and table[1] is None and table[2] is None
    assert table[3 + 0x41] == b"A" and table[3 + 0xF0] == b"\xf0"
    assert table[vocab["\u2581a"]] == b" a" and table[vocab["é"]] == "é".encode()


def make_teacher_output(table, texts_tokens, seed=0):
    """Hand-tokenized texts (lists of token ids, BOS=0 first) + random next-token log-probs."""
    B, L = len(texts_tokens), max(len(t) for t in texts_tokens)
    ids = torch.zeros(B, L, dtype=torch.long)
    spans = torch.zeros(B, L, 2, dtype=torch.long)
    content = torch.zeros(B, L, dtype=torch.bool)
    attn = torch.zeros(B, L, dtype=torch.bool)
    texts = []
    for b, toks in enumerate(texts_tokens):
        pos = 0
        for i, v in enumerate(toks):
            n = len(table[v]) if table[v] else 0
            ids[b, i], spans[b, i] = v, torch.tensor([pos, pos + n])
            content[b, i], attn[b, i] = table[v] is not None, True
            pos += n
        spans[b, len(toks) :] = pos
        texts.append(b"".join(table[v] or b"" for v in toks))
    n = torch.tensor([len(t) for t in texts])
    enc = TeacherEncoding(texts, ids, attn, spans, content, content.clone(), n, n)
    g = torch.Generator().manual_seed(seed)
    next_lp = torch.log_softmax(torch.randn(B, L, len(table), generator=g), -1)
    zeros = torch.zeros(B, L)
    return TeacherOutput(enc, zeros, content, zeros, next_logprobs=next_lp)


def test_teacher_byte_logprobs_per_position_brute_force():
    table = tiny_table(1)
    ids_by_bytes = {tb: v for v, tb in enumerate(table) if tb}
    rng = random.Random(2)
    multi = [v for v, tb in enumerate(table) if tb and len(tb) > 1]
    seqs = [[0] + [rng.choice(multi) for _ in range(6)], [0] + [rng.choice(multi) for _ in range(3)]]
    seqs[1].append(ids_by_bytes[b"a"])
    out = make_teacher_output(table, seqs)
    out.encoding.exact_mask[1, 2] = False  # an inexact token: its bytes are masked
    trie = ByteTrie(table)
    lp, mask = trie.teacher_byte_logprobs(out)
    for b, toks in enumerate(seqs):
        j = 0
        for i, v in enumerate(toks):
            tb = table[v]
            if not tb:
                continue
            for d in range(len(tb)):
                ok = bool(out.encoding.exact_mask[b, i])
                assert bool(mask[b, j]) == ok
                if ok:
                    ref = brute(table, out.next_logprobs[b, i - 1].double().exp(), tb[:d], True)  # type: ignore[index]
                    assert torch.allclose(lp[b, j].double().exp(), ref, atol=1e-6)
                j += 1
        assert not mask[b, j:].any()


def test_byte_kl_matches_loop_and_is_zero_for_equal_distributions():
    g = torch.Generator().manual_seed(3)
    t = torch.log_softmax(torch.randn(2, 5, 256, generator=g), -1)
    t[0, 1, :128] = -math.inf  # zero-probability bytes contribute nothing
    t[0, 1] = torch.log_softmax(t[0, 1], -1)
    mask = torch.tensor([[True, True, False, True, True], [True, False, False, False, True]])
    logits = torch.randn(2, 6, 320, generator=g)
    got = byte_kl(t, mask, logits)
    s = torch.log_softmax(logits[:, :5, :256].double(), -1)
    terms = []
    for b in range(2):
        for j in range(5):
            if mask[b, j]:
                row = [(float(t[b, j, c]), float(s[b, j, c])) for c in range(256)]
                terms.append(sum(math.exp(tc) * (tc - sc) for tc, sc in row if tc > -math.inf))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    same = torch.cat([t, torch.zeros(2, 5, 64)], -1)
    same = torch.cat([same, torch.zeros(2, 1, 320)], 1)
    assert byte_kl(t, mask, same).item() == pytest.approx(0.0, abs=1e-6)


def test_byte_kl_naive_end_to_end_grad():
    table = tiny_table(4)
    multi = [v for v, tb in enumerate(table) if tb and len(tb) > 1]
    out = make_teacher_output(table, [[0, *multi[:5]], [0, *multi[5:8]]])
    trie = ByteTrie(table)
    N = int(out.encoding.n_bytes.max())
    logits = torch.randn(2, N + 1, 320, requires_grad=True)
    loss = byte_kl_naive(out, trie, logits)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad[..., 256:] == 0).all()  # only the 256 byte columns take part


# ------------------------------------------------------------------------------ exact (Phan et al.) method


def max_munch(table: list[bytes | None], data: bytes) -> list[int]:
    """Greedy longest-match tokenization (canonical for the toy LM below)."""
    by_bytes = {tb: v for v, tb in enumerate(table) if tb}
    out, i = [], 0
    while i < len(data):
        n = max(k for k in range(1, len(data) - i + 1) if data[i : i + k] in by_bytes)
        out.append(by_bytes[data[i : i + n]])
        i += n
    return out


def test_exact_byte_logprobs_matches_enumeration():
    """A toy LM that draws a string s with prob pi(s) and emits max_munch(s) + EOS is supported on canonical
    tokenizations, so the cover sum must equal the true byte marginal, enumerated over all strings."""
    rng = random.Random(5)
    table = tiny_table(6, size=30)  # ids 0 and last are specials; id 0 serves as EOS
    alpha = sorted({tb[:1] for tb in table if tb})
    strings = sorted({b"".join(rng.choice(alpha) for _ in range(rng.randint(1, 7))) for _ in range(40)})
    pi = torch.rand(len(strings), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    pi /= pi.sum()
    toks = [max_munch(table, s) for s in strings]
    V = len(table)

    def score(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        logw, dists = [], []
        for q in seqs:
            k = len(q)
            match = [j for j, t in enumerate(toks) if t[:k] == q]
            mass = float(sum(pi[j] for j in match))
            nxt = torch.zeros(V, dtype=torch.float64)
            for j in match:
                nxt[toks[j][k] if len(toks[j]) > k else 0] += pi[j]
            logw.append(math.log(mass) if mass > 0 else -math.inf)
            dists.append(
                (nxt / mass).log() if mass > 0 else torch.full((V,), -math.log(V), dtype=torch.float64)
            )
        return torch.tensor(logw, dtype=torch.float64), torch.stack(dists)

    trie = ByteTrie(table)
    for x in strings[:8]:
        got = (
            exact_byte_logprobs(x, trie, lambda d, i: max_munch(table, d[:i]), score, batch_size=3)
            .double()
            .exp()
        )
        for n in range(len(x)):
            num = torch.zeros(256, dtype=torch.float64)
            for j, s in enumerate(strings):
                if s.startswith(x[:n]) and len(s) > n:
                    num[s[n]] += pi[j]
            assert torch.allclose(got[n], num / num.sum(), atol=1e-6), (x, n)
