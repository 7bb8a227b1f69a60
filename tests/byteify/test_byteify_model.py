"""Byteified model (bytelm.models.byteified, byteified_cache, byte_prior, vocab_trie; docs/byteify.md): every
piece against an independent brute-force computation, the exact prior (normalised, telescoping to the source's
token probability), the joint (byte, bit) scoring and its causality on adversarial bytes, cached decoding =
full forward, generation, the transplanted backbone through the model's sink logic = the teacher, trainable
parameters per stage and config errors.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import tiny_config

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID
from bytelm.data.packed import IGNORE
from bytelm.models.byte_prior import PRIOR_FLOOR, SPECIAL_LOGP
from bytelm.models.byteified import ByteifiedLM, joint_logprobs
from bytelm.models.vocab_trie import VocabTrie

pytestmark = pytest.mark.usefixtures("one_thread")

# a hand-made vocabulary: nested prefixes, a duplicate byte string, specials (None), an empty token,
# multi-byte UTF-8 (é = c3 a9) and tokens that nothing extends
HAND = [
    b"a",
    b"ab",
    b"abc",
    b"b",
    b"bc",
    b"c",
    b"ca",
    b"cab",
    None,
    b"\xc3",
    b"\xc3\xa9",
    b"ab",
    b"",
    b" a",
    b" ab",
    b"abcab",
    b"\xc3\xa9t\xc3\xa9",
    b"zz",
    None,
    b"b c",
]


# ------------------------------------------------------------------------------------------ brute force
def brute_suffix(table, ids, starts):
    """Longest token whose bytes end at t inside t's segment (segments begin at starts and after specials)."""
    out = []
    for t in range(len(ids)):
        if ids[t] >= 256:
            out.append(-1)
            continue
        s = 0
        for j in range(t + 1):
            if (starts is not None and starts[j]) or (j > 0 and ids[j - 1] >= 256):
                s = j
        best, blen = -1, 0
        for v, tb in enumerate(table):
            if not tb or len(tb) > t - s + 1:
                continue
            piece = ids[t - len(tb) + 1 : t + 1]
            if all(x < 256 for x in piece) and bytes(piece) == tb and len(tb) > blen:
                best, blen = v, len(tb)
        out.append(best)
    return out


def extends(table, s: bytes) -> bool:
    """Some token strictly extends ``s``."""
    return any(tb and tb.startswith(s) and len(tb) > len(s) for tb in table)


def brute_open_prefixes(table, ids, closed):
    """The open patch's bytes after each byte, by the rule of VocabTrie.open_nodes, as byte strings: empty
    after a closing byte or a special; where no token extends the bytes the walk restarts at the current byte
    (and at the empty string if no token extends that byte either)."""
    out, cur = [], b""
    for t, tok in enumerate(ids):
        if tok >= 256:
            cur = b""
        else:
            nxt = cur + bytes([tok])
            cur = nxt if extends(table, nxt) else (bytes([tok]) if extends(table, bytes([tok])) else b"")
            if closed[t]:
                cur = b""
        out.append(cur)
    return out


def brute_fused_prior(table, ctx, head, s: bytes, vocab_size: int) -> torch.Tensor:
    """P(c, ends | s) = p(s+c) / M'(s), P(c, continues | s) = (M(s+c) - p(s+c)) / M'(s), by enumeration over
    the vocabulary (p = softmax of the head over the byte-spelled tokens); log, floored; specials'
    constants."""
    real = [v for v, tb in enumerate(table) if tb]
    logits = ctx.double() @ head.double().t()
    p = torch.zeros(len(table), dtype=torch.float64)
    p[real] = torch.softmax(logits[real], -1)
    end = torch.zeros(256, dtype=torch.float64)
    cont = torch.zeros(256, dtype=torch.float64)
    for v in real:
        tb = table[v]
        if tb.startswith(s) and len(tb) > len(s):
            c = tb[len(s)]
            if len(tb) == len(s) + 1:
                end[c] += p[v]
            else:
                cont[c] += p[v]
    total = end.sum() + cont.sum()
    out = torch.full((2 * vocab_size,), PRIOR_FLOOR, dtype=torch.float32)
    out[:256] = (cont / total).log().clamp(min=PRIOR_FLOOR).float()
    out[vocab_size : vocab_size + 256] = (end / total).log().clamp(min=PRIOR_FLOOR).float()
    out[vocab_size + 256 : vocab_size + 259] = SPECIAL_LOGP
    return out


def random_vocab(rng: random.Random, n: int, alphabet: bytes = b"abc\xc3\xa9 ") -> list[bytes | None]:
    out: list[bytes | None] = []
    for _ in range(n):
        if rng.random() < 0.08:
            out.append(None)
        else:
            out.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 5))))
    return out


def random_row(rng: random.Random, n: int, alphabet: bytes = b"abc\xc3\xa9 ") -> tuple[list[int], list[bool]]:
    ids = [rng.choice([BOS_ID, EOS_ID]) if rng.random() < 0.07 else rng.choice(alphabet) for _ in range(n)]
    starts = [rng.random() < 0.1 for _ in range(n)]
    return ids, starts


# ----------------------------------------------------------------------------------------------- the trie
def test_longest_suffix_tokens_equal_brute_force():
    trie = VocabTrie(HAND)
    text = list(b"abcab ab c\xc3\xa9t\xc3\xa9zzz b c") + [EOS_ID, BOS_ID] + list(b"cabcab")
    starts = [False] * len(text)
    starts[9] = True  # a segment start inside " c": nothing may reach over it
    for st in (None, starts):
        assert trie.longest_suffix_tokens(text, st) == brute_suffix(HAND, text, st)
    assert trie.longest_suffix_tokens(list(b"ab"))[1] == 1  # duplicate byte strings: the first id
    rng = random.Random(0)
    for _ in range(30):
        table = random_vocab(rng, rng.randint(1, 40))
        trie = VocabTrie(table)
        ids, st = random_row(rng, rng.randint(1, 40))
        assert trie.longest_suffix_tokens(ids, st) == brute_suffix(table, ids, st), (table, ids, st)
        assert trie.longest_suffix_tokens(ids) == brute_suffix(table, ids, None)


def test_open_nodes_equal_brute_force():
    rng = random.Random(1)
    for k in range(40):
        table = HAND if k == 0 else random_vocab(rng, rng.randint(1, 40))
        trie = VocabTrie(table)
        ids, _ = random_row(rng, rng.randint(1, 40))
        closed = [rng.random() < 0.25 or i >= 256 for i in ids]
        got = trie.open_nodes(ids, closed)
        want = [trie.node_of(p) for p in brute_open_prefixes(table, ids, closed)]
        assert got == want, (table, ids, closed)
    trie = VocabTrie(HAND)
    assert trie.node_of(b"") == 0 and trie.node_of(b"zz") is None and trie.node_of(b"q") is None


# ------------------------------------------------------------------------------------- small hand model
def small_model(table: list[bytes | None], seed: int = 0, tied: bool = False, **kw) -> ByteifiedLM:
    kw = {"chunker": "gate", **kw}
    cfg = tiny_config(  # conftest's factory; the source fields come from the hand vocabulary
        "byteified",
        d_model=16,
        d_byte=16,
        encoder_layers=1,
        pooling="last",
        decoder_cross="all",
        source_vocab=len(table),
        source_vocab_bytes=sum(len(t or b"") for t in table),
        source_start_id=table.index(None),
        source_tied=tied,
        **kw,
    )
    torch.manual_seed(seed)
    m = ByteifiedLM(cfg)
    m.init_weights()
    with torch.no_grad():  # a head with real contrast, so that the prior is far from uniform
        m.source_embed.weight.normal_(0, 1.0)
        if m.source_head is not None:
            m.source_head.weight.normal_(0, 1.0)
    m.set_vocabulary(table)
    return m.eval()


def randomise_residual(m: ByteifiedLM, seed: int = 0) -> None:
    """Non-zero residual head and patch correction (the untrained model has both at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.lm_head.weight.copy_(torch.randn(m.lm_head.weight.shape, generator=g) * 0.5)
        m.pool.proj.weight.copy_(torch.randn(m.pool.proj.weight.shape, generator=g) * 0.3)
        m.prior_scale.fill_(0.8)


# ------------------------------------------------------------------------------------------ the exact prior
@pytest.mark.parametrize("tied", [False, True])
def test_fused_prior_equals_brute_force(tied):
    m = small_model(HAND, tied=tied)
    trie = m.trie
    prefixes = [b"", b"a", b"ab", b"c", b"\xc3", b"\xc3\xa9", b" ", b"abca", b"b", b"ca", b"\xc3\xa9t"]
    nodes = [trie.node_of(p) for p in prefixes]
    assert all(n is not None for n in nodes)
    gen = torch.Generator().manual_seed(3)
    ctx = torch.randn(3, 16, generator=gen) * 2
    rows = torch.tensor([i % 3 for i in range(len(prefixes))])
    got = m.prior(ctx, rows, torch.tensor(nodes))
    V = m.cfg.vocab_size
    assert got.shape == (len(prefixes), 2 * V)
    head = m.head_weight().detach()
    for i, p in enumerate(prefixes):
        want = brute_fused_prior(HAND, ctx[rows[i]], head, p, V)
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-5)
    # normalised over the 2 x 256 byte symbols (specials add ~3 e^-12)
    mass = got[:, :256].double().exp().sum(-1) + got[:, V : V + 256].double().exp().sum(-1)
    floor_mass = (got[:, :256] == PRIOR_FLOOR).sum(-1) * math.exp(PRIOR_FLOOR) * 2
    assert ((mass - 1).abs() <= floor_mass + 1e-5).all()
    # no gradient reaches the context vectors
    c = ctx.clone().requires_grad_(True)
    out = m.prior(c, rows, torch.tensor(nodes))
    assert not out.requires_grad


def test_prior_telescopes_to_the_token_probability():
    """Over a patch that is a token, the product of P(byte, bit | bytes so far) = p(token) / (mass of the
    byte-spelled tokens), for every token of the vocabulary (the duplicate "ab" counts twice)."""
    m = small_model(HAND)
    trie = m.trie
    ctx = torch.randn(1, 16, generator=torch.Generator().manual_seed(4)) * 2
    head = m.head_weight().detach()
    real = [v for v, tb in enumerate(HAND) if tb]
    p = torch.softmax(ctx[0].double() @ head.double().t()[:, real], -1)
    p_of = {}
    for k, v in enumerate(real):
        p_of[HAND[v]] = p_of.get(HAND[v], 0.0) + float(p[k])
    V = m.cfg.vocab_size
    for tb, want in p_of.items():
        lp, s = 0.0, b""
        for j, c in enumerate(tb):
            node = trie.node_of(s)
            row = m.prior(ctx, torch.tensor([0]), torch.tensor([node]))[0]
            lp += float(row[V + c] if j == len(tb) - 1 else row[c])
            s += bytes([c])
        assert lp == pytest.approx(math.log(want), abs=1e-4), tb


# ------------------------------------------------------------------------------------------ the forward
def test_forward_adds_the_prior_of_the_latest_closed_patch():
    """logits - residual at byte t = prior_scale * brute prior(context = backbone output of the latest patch
    whose last byte is <= t (the sink before any: no delay), prefix = the open patch's bytes after t)."""
    rng = random.Random(5)
    m = small_model(HAND)
    randomise_residual(m)
    ids = [rng.choice(b"abc\xc3\xa9 ") for _ in range(30)]
    ends = [rng.random() < 0.3 for _ in ids]
    x, pe = torch.tensor([ids]), torch.tensor([ends])
    with torch.no_grad():
        on = m(x, patch_end=pe)
        m.cfg.lm_prior = False
        off = m(x, patch_end=pe)
        m.cfg.lm_prior = True
        sink = m.run_backbone(m.sink(1, torch.float32))[0, 0]
    z = on.hidden["words"][0]  # (W, D)
    head = m.head_weight().detach()
    closed = on.hidden["closed"][0].tolist()
    assert closed[:-1] == ends[:-1] or any(closed)  # given ends (+ the size cap, 100 here: none)
    prefixes = brute_open_prefixes(HAND, ids, closed)
    k = -1  # patches closed so far
    for t in range(len(ids)):
        if closed[t]:
            k += 1
        ctx = sink if k < 0 else z[k]
        want = 0.8 * brute_fused_prior(HAND, ctx, head, prefixes[t], m.cfg.vocab_size)
        torch.testing.assert_close(on.logits[0, t] - off.logits[0, t], want, atol=1e-4, rtol=0)


def test_joint_logprobs_equal_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    V, B, T = 5, 2, 7
    logits = torch.randn(B, T, 2 * V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    closed = torch.rand(B, T, generator=g) < 0.4
    targets = torch.cat([ids[:, 1:], torch.randint(0, V, (B, 1), generator=g)], 1)
    targets[1, 3] = IGNORE
    targets[0, 2] = (int(ids[0, 3]) + 1) % V  # a target that is not the next input: its bit is summed out
    got = joint_logprobs(logits, ids, targets, closed)
    for b in range(B):
        for t in range(T):
            lp = torch.log_softmax(logits[b, t].double(), -1)
            y = int(targets[b, t])
            if y == IGNORE:
                want = 0.0
            elif t + 1 < T and int(ids[b, t + 1]) == y:
                want = float(lp[y + V * int(closed[b, t + 1])])
            else:
                want = float(torch.logaddexp(lp[y], lp[y + V]))
            assert float(got[b, t]) == pytest.approx(want, abs=1e-5), (b, t)


SEGMENTERS = [("gate", "threshold"), ("gate", "vocab"), ("words", "threshold")]


@pytest.mark.parametrize("chunker,decode", SEGMENTERS)
def test_generation_with_cache_equals_full_forwards(chunker, decode):
    """Sampled generation (byte, then the head's bit) is the same with the cache and with full forwards over
    the same bits, for learned patches (either boundary decoder) and for word patches (the ablation generates
    too)."""
    from bytelm.models.generate import generate

    m = small_model(HAND, chunker=chunker, max_word_bytes=5, boundary_decode=decode)
    randomise_residual(m, 4)
    for prompt in (b"abc ab", "\u00e9t\u00e9 c".encode()):
        a = generate(m, prompt, max_new_bytes=20, temperature=1.0, seed=7, use_cache=True)
        b = generate(m, prompt, max_new_bytes=20, temperature=1.0, seed=7, use_cache=False)
        assert a == b and len(a) > 0


# ----------------------------------------------------------------------- causality of the joint scoring
ADVERSARIAL = [
    *b"abc ",
    BOS_ID,
    EOS_ID,
    0xC3,
    0xA9,
    0x80,
    0xFF,
    0xE3,
    0xF0,
    0x9F,
    0x98,
    0x80,
    *"\u00a0\u0332\u4e2d\u3002\u0449".encode(),
]


@pytest.mark.parametrize("chunker,decode", SEGMENTERS)
def test_joint_scoring_is_causal_on_adversarial_bytes(chunker, decode):
    """Change byte t of random adversarial rows: with the given bits fixed, no logit before t moves; with the
    model's own segmenter (the boundary predictor, or HAT words: both look ahead), no logit moves before the
    first position whose byte *or* bit differs, so no symbol's distribution ever reads a later byte (its own
    bit is part of the symbol). The word-patch ablation once leaked exactly here (its prior read whether the
    next byte starts a word)."""
    rng = random.Random(11)
    m = small_model(HAND, max_word_bytes=6, boundary_lookahead=2, chunker=chunker, boundary_decode=decode)
    randomise_residual(m, 1)
    with torch.no_grad():  # a boundary predictor that fires about a third of the time (unused with words)
        m.boundary.mlp.weight.normal_(0, 2.0)
        m.boundary.mlp.bias.fill_(-0.5)
    # the vocab decoder's lattice needs runs of vocabulary bytes for a later byte to move an earlier bit
    pool = ADVERSARIAL + list(b"abcabcabcab") * (decode == "vocab")
    moved = 0
    for _ in range(12):
        ids = [rng.choice(pool) for _ in range(rng.randint(8, 24))]
        x = torch.tensor([ids])
        pe = torch.tensor([[rng.random() < 0.3 for _ in ids]])
        with torch.no_grad():
            base_given, base_own = m(x, patch_end=pe), m(x)
        for t in rng.sample(range(len(ids)), 3):
            y = x.clone()
            y[0, t] = rng.choice([v for v in pool if v != ids[t]])
            with torch.no_grad():
                given, own = m(y, patch_end=pe), m(y)
            if t > 0:
                assert (given.logits[0, :t] - base_given.logits[0, :t]).abs().max() < 1e-5, (ids, t)
            diff = (y[0] != x[0]) | (own.hidden["closed"][0] != base_own.hidden["closed"][0])
            j = int(diff.nonzero()[0])
            assert j <= t
            moved += int(j < t)
            if j > 0:
                assert (own.logits[0, :j] - base_own.logits[0, :j]).abs().max() < 1e-5, (ids, t, j)
    assert moved > 0  # the lookahead did move earlier bits: the check above was not vacuous


# --------------------------------------------------------------------------- the tiny source (real vocab)
@pytest.fixture(scope="module")
def byteified(tiny_source):
    from bytelm.config import load_config
    from bytelm.lit.strategies import build_model_for

    cfg = load_config(["experiment=byteify_smollm2", "debug=cpu", f"byteify.source={tiny_source}"])
    m = build_model_for(cfg).eval()
    return m, cfg


def set_boundary_rate(m: ByteifiedLM, ids: torch.Tensor, rate: float) -> None:
    """Shift the boundary predictor's output bias so that about ``rate`` of the bytes of ``ids`` close."""
    last = m.boundary.mlp[-1] if isinstance(m.boundary.mlp, torch.nn.Sequential) else m.boundary.mlp
    with torch.no_grad():
        h = m.encode(ids)
        raw = m.boundary(h).flatten() - last.bias
        last.weight.mul_(3.0 / float(raw.std()))  # logits spread over a few units: no decision near 0
        raw = m.boundary(h).flatten() - last.bias
        last.bias.fill_(-float(torch.quantile(raw, 1 - rate)) + 0.05)
        assert (m.boundary(h).abs() > 1e-3).all()  # a margin: the full and the cached path decide alike


TEXT = "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e text, \U0001f600 emoji and long_words_here ok"


def _cached_logits(m: ByteifiedLM, ids: list[int], chunks: list[int], bits: list[bool]) -> torch.Tensor:
    cache = m.new_cache()
    outs, p, k = [], 0, 0
    while p < len(ids):
        n = chunks[k % len(chunks)]
        k += 1
        outs.append(
            m(torch.tensor([ids[p : p + n]]), cache=cache, patch_end=torch.tensor([bits[p : p + n]])).logits
        )
        p += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("rate", [0.1, 0.6])
def test_cached_decoding_equals_full_forward(byteified, rate):
    """Given the same bits (the model's own segmentation of the row), the cache's fused logits equal the full
    forward's, for rows that start with BOS, inside a document (the sink) and across specials, with the size
    cap firing; the bits the cache applied equal the full forward's ``closed``."""
    m, _ = byteified
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    cap = m.cfg.max_word_bytes
    body = list(TEXT.encode())
    rows = {
        "bos": [BOS_ID, *body[:40]],
        "inside": body[3:45],  # starts inside a document: the sink
        "specials": [*body[:14], EOS_ID, BOS_ID, *body[20:40]],
    }
    try:
        m.cfg.max_word_bytes = 5  # the size cap triggers
        randomise_residual(m, 2)
        set_boundary_rate(m, torch.tensor([rows["inside"]]), rate)
        with torch.no_grad():
            for name, ids in rows.items():
                x = torch.tensor([ids])
                bits = m.segment(x)[0]
                full = m(x, patch_end=bits)
                closed = full.hidden["closed"][0]
                assert 0 < int(closed.sum()) < len(ids), name
                for chunks in ([1], [3, 1, 7]):
                    got = _cached_logits(m, ids, chunks, bits[0].tolist())
                    err = (got - full.logits).abs().max().item()
                    assert err < 1e-4, (name, rate, chunks, err)
                cache = m.new_cache()
                m(x, cache=cache, patch_end=bits)
                assert cache.bits == closed.tolist()
            # runs of exactly the cap that end at a special or at the row's end (no boundary fires)
            for ids in (body[:5], [BOS_ID, *body[:5], EOS_ID], [*body[:3], EOS_ID, BOS_ID, *body[:10]]):
                bits = torch.zeros(1, len(ids), dtype=torch.bool)
                full = m(torch.tensor([ids]), patch_end=bits).logits
                err = (_cached_logits(m, ids, [1], bits[0].tolist()) - full).abs().max().item()
                assert err < 1e-4, (ids, err)
    finally:
        m.cfg.max_word_bytes = cap
        m.load_state_dict(saved)


def count_backbone_calls(m: ByteifiedLM, monkeypatch) -> list[int]:
    """The number of patches of each ``run_backbone`` call from now on (appended as they happen)."""
    calls: list[int] = []
    real = m.run_backbone

    def counting(words, *a, **kw):
        calls.append(int(words.shape[1]))
        return real(words, *a, **kw)

    monkeypatch.setattr(m, "run_backbone", counting)
    return calls


def test_prompt_prefill_runs_the_backbone_once(byteified, monkeypatch):
    """A prompt of many patches goes through the backbone in one cached forward (not one step per patch,
    which made prefill the larger part of generation's time), and each generated byte that closes a patch
    runs it once more; the logits still equal the full forward's."""
    m, _ = byteified
    calls = count_backbone_calls(m, monkeypatch)
    ids = [BOS_ID, *TEXT.encode()[:40]]
    x = torch.tensor([ids])
    with torch.no_grad():
        bits = m.segment(x)[0]
        full = m(x, patch_end=bits).logits
        calls.clear()
        cache = m.new_cache()
        got = m(x, cache=cache, patch_end=bits).logits
        assert len(calls) == 1 and calls[0] == cache.n_words > 3, calls
        assert (got - full).abs().max() < 1e-4
        calls.clear()
        m(torch.tensor([[ord("a")]]), cache=cache, patch_end=torch.tensor([[True]]))
        m(torch.tensor([[ord("b")]]), cache=cache, patch_end=torch.tensor([[False]]))
        assert calls == [1]


def test_prompt_prefill_without_bits_rolls_back_the_last_byte(byteified):
    """``forward(prompt, cache=...)`` without bits = the segmenter's bits for all but the last byte and the
    fused head's preferred bit for the last one (``prompt_bits``); then generation (cached) equals generation
    that reruns the full forward, byte and bit alike."""
    from bytelm.models.generate import generate

    m, _ = byteified
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        randomise_residual(m, 3)
        ids = [BOS_ID, *TEXT.encode()[:30]]
        set_boundary_rate(m, torch.tensor([ids]), 0.3)
        with torch.no_grad():
            bits = m.prompt_bits(ids)
            seg = m.segment(torch.tensor([ids]))[0][0].tolist()
            assert bits[:-1] == seg[:-1]
            cache = m.new_cache()
            got = m(torch.tensor([ids]), cache=cache).logits
            full = m(torch.tensor([ids]), patch_end=torch.tensor([bits])).logits
            assert (got - full).abs().max() < 1e-4
            assert cache.bits[-1] == bits[-1]
        a = generate(m, TEXT.encode()[:20], max_new_bytes=24, temperature=1.0, seed=5, use_cache=True)
        b = generate(m, TEXT.encode()[:20], max_new_bytes=24, temperature=1.0, seed=5, use_cache=False)
        assert a == b and len(a) > 0
    finally:
        m.load_state_dict(saved)


def test_prompt_without_bits_runs_the_backbone_once_whatever_its_last_bit(byteified, monkeypatch):
    """The patch that a prompt's last byte would close goes through the backbone with the prompt's other
    patches, before the head decides that byte's bit: one backbone call whether the byte closes its patch
    (the result is used) or not (the position is dropped from the backbone cache); the logits, and those of
    the bytes fed after, equal the full forward's."""
    m, _ = byteified
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    calls = count_backbone_calls(m, monkeypatch)
    outcomes = set()
    try:
        randomise_residual(m, 3)
        set_boundary_rate(m, torch.tensor([[BOS_ID, *TEXT.encode()[:40]]]), 0.3)
        with torch.no_grad():
            for k in range(14, 40, 2):
                ids = [BOS_ID, *TEXT.encode()[:k]]
                bits = m.prompt_bits(ids)
                calls.clear()
                cache = m.new_cache()
                got = m(torch.tensor([ids]), cache=cache).logits
                assert len(calls) == 1 and cache.bits == bits, (k, calls)
                assert all(c.n == cache.n_words for c in cache.backbone)
                nxt = torch.tensor([[ord("e")]])
                got = torch.cat([got, m(nxt, cache=cache, patch_end=torch.tensor([[False]])).logits], 1)
                full = m(torch.tensor([[*ids, ord("e")]]), patch_end=torch.tensor([[*bits, False]])).logits
                assert (got - full).abs().max() < 1e-4, k
                outcomes.add(bits[-1])
        assert outcomes == {True, False}
    finally:
        m.load_state_dict(saved)


def test_frozen_segmenter_reads_its_own_encoder_in_every_path(byteified):
    """``model.segmenter_encoder``: after the snapshot the boundary logits come from the segmenter's own
    copy of the encoder, so training the shared encoder leaves them unchanged; the full forward, ``segment``
    and the cached prompt path agree on the bits, and cached logits equal the full forward's."""
    from bytelm.models.byteified import segmenter_snapshot

    m, _ = byteified
    assert m.segmenter is not None and not m.segmenter_frozen  # built from the source: not frozen yet
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        randomise_residual(m, 4)
        ids = [BOS_ID, *TEXT.encode()[:36]]
        x = torch.tensor([ids])
        set_boundary_rate(m, x, 0.3)
        with torch.no_grad():
            before = m.segment(x)[1]
            m.load_state_dict(segmenter_snapshot(m.state_dict()), strict=False)
            assert m.segmenter_frozen
            assert torch.allclose(m.segment(x)[1], before, atol=1e-5)  # a copy: the same logits
            g = torch.Generator().manual_seed(5)
            for p in m.encoder.parameters():  # "stage 1" moves the shared encoder
                p.add_(0.5 * torch.randn(p.shape, generator=g))
            frozen = m.segment(x)[1]
            assert torch.allclose(frozen, before, atol=1e-5)
            shared = m.boundary(m.encode(x), x != PAD_ID)
            assert (shared - before).abs().max() > 1e-2  # what the shared encoder would have given now
            bits = m.segment(x)[0]
            full = m(x, patch_end=bits)
            assert torch.equal(full.hidden["boundary_logits"], frozen)
            cache = m.new_cache()
            got = m(x, cache=cache).logits  # the prompt path: the segmenter's bits for all but the last byte
            assert cache.bits[:-1] == full.hidden["closed"][0, :-1].tolist()
            assert (got[:, :-1] - full.logits[:, :-1]).abs().max() < 1e-4
    finally:
        m.load_state_dict(saved)


def test_backbone_through_the_model_equals_the_teacher(byteified):
    """Patches = the teacher's tokens, patch vectors = the teacher's input embeddings: the byteified backbone
    reproduces the teacher's hidden states, for a row inside a document (sink = start token) and a row that
    starts with BOS (its patch = the start token; the sink is masked)."""
    from bytelm.distill.byteify import load_source_once
    from bytelm.distill.teacher import Teacher

    m, cfg = byteified
    hf, tok = load_source_once(cfg.byteify.source)
    teacher = Teacher(hf, tok)
    text = "The byteified model, caf\u00e9 and \u65e5\u672c, reads raw bytes."
    enc = teacher.encode([text])
    n = int(enc.attention_mask[0].sum())
    tids = enc.input_ids[:, :n]  # (1, L): start token + text tokens
    spans = enc.spans[0, 1:n]
    assert int(tids[0, 0]) == cfg.model.source_start_id
    with torch.no_grad():
        hs = hf(tids, output_hidden_states=True).hidden_states
        emb = hf.get_input_embeddings()(tids)  # (1, L, D)
    data = text.encode()
    for lead in ([], [BOS_ID]):
        ids = torch.tensor([[*lead, *data]])
        pe = torch.zeros_like(ids, dtype=torch.bool)
        pe[0, spans[:, 1] - 1 + len(lead)] = True
        vecs = emb[:, 1:] if not lead else emb  # the BOS patch is the start token itself

        def teacher_vectors(h, ids_, last, *_, vecs=vecs):
            assert last.shape[1] == vecs.shape[1]
            return vecs

        m.patch_vectors = teacher_vectors  # type: ignore[method-assign]
        try:
            with torch.no_grad():
                out = m(ids, patch_end=pe, probe_blocks=1)
        finally:
            del m.patch_vectors
        z, probe = out.hidden["words"], out.hidden["probe"]
        want_z, want_p = (hs[-1][:, 1:], hs[1][:, 1:]) if not lead else (hs[-1], hs[1])
        assert z.shape == want_z.shape
        assert (z - want_z).abs().max() < 1e-4, lead
        assert (probe - want_p).abs().max() < 1e-4, lead


def token_end_bits(teacher, data: bytes, lead: int) -> torch.Tensor:
    """(1, lead + len(data)) bool: the source tokenizer's token ends on ``data`` (after ``lead`` specials)."""
    enc = teacher.encode([data])
    n = int(enc.attention_mask[0].sum())
    bits = torch.zeros(1, lead + len(data), dtype=torch.bool)
    bits[0, enc.spans[0, 1:n, 1] - 1 + lead] = True
    return bits


STEP0_TEXT = (
    "The byteified model, caf\u00e9 and \u65e5\u672c\u8a9e, reads raw bytes.  Spaces   here\n\tand "
    "\u041f\u0440\u0438\u0432\u0435\u0442, def f(x):\n    return x ** 2  # code\n"
)


def test_step0_with_the_tokenizer_segmenter_equals_the_teacher(byteified):
    """Untrained (residual head and patch correction at zero), segmented at the source tokenizer's token ends:
    the joint bits per byte equal the source model's on the same text (the difference is the mass of the
    source's special tokens, which spell no bytes, and of bytelm's specials)."""
    from bytelm.distill.byteify import load_source_once
    from bytelm.distill.teacher import Teacher

    m, cfg = byteified
    assert (
        float(m.lm_head.weight.detach().abs().max()) == 0.0
        and float(m.pool.proj.weight.detach().abs().max()) == 0.0
    )
    teacher = Teacher(*load_source_once(cfg.byteify.source))
    data = STEP0_TEXT.encode()
    with torch.no_grad():
        out = teacher([data])
        t_nll = -float((out.token_logprobs * out.encoding.content_mask)[0].sum())
        ids = torch.tensor([[BOS_ID, *data]])
        targets = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE)], 1)
        got = m(ids, patch_end=token_end_bits(teacher, data, 1), targets=targets)
    assert int(got.metrics["n_bytes"]) == len(data)
    s_nll = float(got.metrics["nll_sum"])
    assert s_nll == pytest.approx(t_nll, rel=1e-4), (s_nll, t_nll)
    assert s_nll <= t_nll + 1e-3  # never worse: the byte model renormalises the specials' mass away


def test_eval_with_the_tokenizer_segmenter_equals_the_teacher_scorer(byteified):
    """bytelm.eval's scorers, untrained model: the corpus bpb (packed rows, BOS doc EOS) and lm-eval-style
    continuation log-probs (context and continuation tokenized separately) equal the teacher's; with the
    learned segmenter the number is a different, still joint, score."""
    from bytelm.distill.byteify import load_source_once
    from bytelm.distill.teacher import Teacher
    from bytelm.eval.scoring import ByteScorer, TeacherScorer, tokenizer_segmenter

    m, cfg = byteified
    hf, tok = load_source_once(cfg.byteify.source)
    teacher = TeacherScorer(Teacher(hf, tok), chunk_bytes=4096)
    ours = ByteScorer.from_config(m, cfg, segmenter=tokenizer_segmenter(tok), seq_len=512, batch_size=2)
    texts = [STEP0_TEXT.encode(), "Second document: \u00e9t\u00e9, 42 apples.".encode()]
    a, b = ours.corpus_nll(texts), teacher.corpus_nll(texts)
    assert a.n_bytes == b.n_bytes == sum(len(t) for t in texts)
    assert a.bpb == pytest.approx(b.bpb, rel=1e-4)
    conts = [b" the cat", b" a dog, twice", "\u00e9t\u00e9".encode()]
    ctx = b"Once upon a time,"
    got = ours.continuation_logprobs(ctx, conts)
    want = teacher.continuation_logprobs(ctx, conts)
    # the byte model sums the last byte's bit out (the continuation as a prefix of what follows): never lower
    assert all(g >= w - 1e-3 for g, w in zip(got, want, strict=True)), (got, want)
    # with the last bit known (an EOS after the continuation), the joint is the teacher's number
    bits = token_end_bits(teacher.teacher, ctx, 1)
    for c, w in zip(conts, want, strict=True):
        ids = torch.tensor([[BOS_ID, *ctx, *c, EOS_ID]])
        pe = torch.cat([bits, token_end_bits(teacher.teacher, c, 0), torch.ones(1, 1, dtype=torch.bool)], 1)
        tgt = torch.full_like(ids, IGNORE)
        tgt[0, len(ctx) : len(ctx) + len(c)] = torch.tensor(list(c))
        with torch.no_grad():
            lp = m(ids, patch_end=pe, targets=tgt).hidden["target_logprobs"]
        assert float(lp.sum()) == pytest.approx(w, rel=1e-4, abs=1e-3)
    learned = ByteScorer.from_config(m, cfg, seq_len=512, batch_size=2).corpus_nll(texts)
    assert learned.n_bytes == a.n_bytes and math.isfinite(learned.bpb) and learned.bpb != pytest.approx(a.bpb)


# ----------------------------------------------------------------------------------- stages and config
def test_set_trainable_per_stage_and_backbone_lr(byteified):
    from bytelm.config import ByteifyConfig
    from bytelm.distill.byteify import set_trainable
    from bytelm.lit.module import backbone_lr_groups, param_groups

    m, _ = byteified

    def trains(prefix: str) -> set[bool]:
        return {p.requires_grad for n, p in m.named_parameters() if n.startswith(prefix)}

    try:
        set_trainable(m, ByteifyConfig(stage=1))
        assert trains("backbone.") == {False} and trains("backbone_norm.") == {False}
        assert trains("boundary.") == {True} and trains("encoder.") == {True} and trains("pool.") == {True}
        assert trains("source_embed.") == {False}
        set_trainable(m, ByteifyConfig(stage=2))
        assert trains("backbone.") == {True} and trains("boundary.") == {
            True
        }  # Bolmo's stage 2 keeps its loss
        set_trainable(m, ByteifyConfig(stage=2, train_boundary=False))
        assert trains("boundary.") == {False}
        set_trainable(m, ByteifyConfig(stage=2))
        assert trains("source_embed.") == {False} and trains("decoder.") == {True}
        groups = backbone_lr_groups(m, param_groups(m, 0.1), 1e-3, 0.25)
        backbone = {id(p) for n, p in m.named_parameters() if n.startswith(("backbone.", "backbone_norm."))}
        seen = 0
        for g in groups:
            for p in g["params"]:
                seen += 1
                assert g["lr"] == pytest.approx(1e-3 * 0.25 if id(p) in backbone else 1e-3)
        assert seen == sum(p.requires_grad for p in m.parameters())
        assert any(id(p) in backbone for g in groups for p in g["params"])
        set_trainable(m, ByteifyConfig(stage=2, freeze_backbone=True, train_boundary=True))
        assert trains("backbone.") == {False} and trains("boundary.") == {True}
        set_trainable(m, ByteifyConfig(stage=2, freeze=["pool.", "encoder."]))  # on top of the stage
        assert trains("pool.") == {False} and trains("encoder.") == {False}
        assert trains("decoder.") == {True} and trains("backbone.") == {True}
        with pytest.raises(ValueError, match=r"byteify.freeze.*'pol\.'"):  # a misspelt prefix is named
            set_trainable(m, ByteifyConfig(stage=2, freeze=["pol."]))
        set_trainable(m, ByteifyConfig(stage=2, freeze_backbone=True, train_only=["pool.", "backbone."]))
        trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
        assert trainable == {"pool"}  # within the stage's rules: the frozen backbone stays frozen
        with pytest.raises(ValueError, match=r"byteify.train_only.*'decoders\.'"):
            set_trainable(m, ByteifyConfig(stage=2, train_only=["decoders."]))
    finally:
        set_trainable(m, ByteifyConfig(stage=1))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("byteify.stage=3", "byteify.stage"),
        ("byteify.encoder_weight=-1", "byteify.encoder_weight"),
        ("byteify.boundary_weight=-0.5", "byteify.boundary_weight"),
        ("byteify.alm_tau=0", "byteify.alm_tau"),
        ("byteify.encoder_blocks=9", "byteify.encoder_blocks"),  # more than the source's 2 blocks
    ],
)
def test_config_errors_name_the_key(tiny_source, override, needle):
    from bytelm.config import load_config
    from bytelm.distill.byteify import ByteifyObjective

    with pytest.raises(ValueError, match=needle):  # byteify.stage already fails when the config is loaded
        cfg = load_config(
            ["experiment=byteify_smollm2", "debug=cpu", f"byteify.source={tiny_source}", override]
        )
        ByteifyObjective(cfg)


def test_padding_reads_as_the_row_end_for_the_segmenter():
    """A right-padded row gets the bits and logits it gets alone, whatever the lookahead: the boundary
    predictor reads padding as the zeros past a row's end (it looks up to ``boundary_lookahead`` bytes
    ahead)."""
    from bytelm.data.bytes import PAD_ID

    m = small_model(HAND, boundary_lookahead=6, boundary_hidden=8)
    randomise_residual(m)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.boundary.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
        short, long_ = list(b"ab ba"), list(b"abba ab a bab")
        batch = torch.tensor([short + [PAD_ID] * (len(long_) - len(short)), long_])
        bits, _ = m.segment(batch)
        alone, _ = m.segment(torch.tensor([short]))
        assert torch.equal(bits[0, : len(short)], alone[0])
        got = m(batch).logits[0, : len(short)]
        torch.testing.assert_close(got, m(torch.tensor([short])).logits[0], atol=1e-5, rtol=0)
        # the unmasked predictor (padding read as bytes) does see the padding: the test can fail
        h = m.encode(batch)
        raw, masked = m.boundary(h)[0, : len(short)], m.boundary(h, batch != PAD_ID)[0, : len(short)]
        assert not torch.allclose(raw, masked)
