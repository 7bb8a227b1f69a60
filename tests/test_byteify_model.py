"""Byteified model (bytelm.models.byteified, bytelm.models.vocab_trie; DESIGN.md §5b): every piece against an
independent brute-force computation, causality, cached decoding = full forward, the transplanted backbone
through the model's sink logic = the teacher, trainable parameters per stage and config errors.
"""

from __future__ import annotations

import random

import pytest
import torch

from bytelm.data.bytes import BOS_ID, EOS_ID
from bytelm.models.byteified import PRIOR_FLOOR, SPECIAL_PRIOR, ByteifiedLM
from bytelm.models.config import ModelConfig
from bytelm.models.vocab_trie import VocabTrie

pytestmark = pytest.mark.usefixtures("one_thread")

# a hand-made vocabulary: nested prefixes, a duplicate byte string (the first id wins), specials (None), an
# empty token, multi-byte UTF-8 (é = c3 a9) and tokens that nothing extends
HAND = [b"a", b"ab", b"abc", b"b", b"bc", b"c", b"ca", b"cab", None, b"\xc3", b"\xc3\xa9", b"ab", b"",
        b" a", b" ab", b"abcab", b"\xc3\xa9t\xc3\xa9", b"zz", None, b"b c"]


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


def brute_nodes(trie, ids, closed, starts):
    """Root after a closing byte, else node_of(open patch bytes), -1 where no token extends them."""
    out = []
    for t in range(len(ids)):
        if closed[t]:
            out.append(0)
            continue
        p = max(j for j in range(t + 1) if starts[j] or j == 0)
        piece = ids[p : t + 1]
        node = trie.node_of(bytes(piece)) if all(x < 256 for x in piece) else None
        out.append(-1 if node is None else node)
    return out


def brute_prior(table, ctx, head, prefix, vocab_size, u=None):
    """Naive marginal through the head plus the end of the open token: P(b) ∝ M(prefix + b) + M(token ==
    prefix) * u(b), with u uniform unless given; u alone where no token extends the prefix; floored; specials
    get SPECIAL_PRIOR."""
    u = torch.full((256,), 1 / 256, dtype=torch.float64) if u is None else u.double()
    p = torch.softmax(ctx.double() @ head.double().t(), -1)
    mass = torch.zeros(256, dtype=torch.float64)
    end = 0.0
    for v, tb in enumerate(table):
        if tb and tb == prefix:
            end += float(p[v])
        for b in range(256):
            if tb and tb.startswith(prefix + bytes([b])):
                mass[b] += p[v]
    if not any(tb and tb.startswith(prefix) and len(tb) > len(prefix) for tb in table):
        probs = u
    else:
        probs = (mass + end * u) / (mass.sum() + end)
    lp = probs.log().clamp(min=PRIOR_FLOOR).float()
    return torch.cat([lp, torch.full((vocab_size - 256,), SPECIAL_PRIOR)])


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


def test_prediction_nodes_equal_brute_force():
    rng = random.Random(1)
    for k in range(30):
        table = HAND if k == 0 else random_vocab(rng, rng.randint(1, 40))
        trie = VocabTrie(table)
        ids, starts = random_row(rng, rng.randint(1, 40))
        starts[0] = True
        closed = [rng.random() < 0.25 or i >= 256 for i in ids]
        for j in range(1, len(ids)):  # starts after closing bytes, as close_chunks makes them
            starts[j] = starts[j] or closed[j - 1]
        got = trie.prediction_nodes(ids, closed, starts)
        assert got == brute_nodes(trie, ids, closed, starts), (table, ids, closed, starts)
    trie = VocabTrie(HAND)
    assert trie.node_of(b"") == 0 and trie.node_of(b"zz") is None and trie.node_of(b"q") is None


# ------------------------------------------------------------------------------------- small hand model
def small_model(table: list[bytes | None], seed: int = 0, tied: bool = False, **kw) -> ByteifiedLM:
    cfg = ModelConfig(arch="byteified", d_model=16, n_layers=2, n_heads=2, d_byte=16, n_heads_byte=2,
                      encoder_layers=1, decoder_layers=1, pooling="last", decoder_cross="all", chunker="gate",
                      source_vocab=len(table), source_vocab_bytes=sum(len(t or b"") for t in table),
                      source_start_id=table.index(None), source_tied=tied, **kw)
    torch.manual_seed(seed)
    m = ByteifiedLM(cfg)
    m.init_weights()
    with torch.no_grad():  # a head with real contrast, so that the prior is far from uniform
        m.source_embed.weight.normal_(0, 1.0)
        if m.source_head is not None:
            m.source_head.weight.normal_(0, 1.0)
    m.set_vocabulary(table)
    return m.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_prior_equals_brute_force_marginal(tied):
    m = small_model(HAND, tied=tied)
    trie = m.trie
    prefixes = [b"", b"a", b"ab", b"c", b"\xc3", b"\xc3\xa9", b" ", b"abca", b"b"]
    nodes = [trie.node_of(p) for p in prefixes]
    assert all(n is not None for n in nodes)
    gen = torch.Generator().manual_seed(3)
    ctx = torch.randn(3, 16, generator=gen) * 2
    rows = torch.tensor([i % 3 for i in range(len(prefixes))] + [1])
    node_t = torch.tensor([*nodes, -1])  # the last query: no token extends its prefix
    with torch.no_grad():
        m.next_start.copy_(torch.randn(256, generator=gen))  # a non-uniform first-byte distribution u
    u = torch.softmax(m.next_start.detach().double(), -1)
    got = m.prior(ctx, rows, node_t)
    assert got.shape == (len(prefixes) + 1, m.cfg.vocab_size)
    head = m.head_weight().detach()
    for i, p in enumerate(prefixes):
        want = brute_prior(HAND, ctx[rows[i]], head, p, m.cfg.vocab_size, u)
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=0)
    want_u = torch.cat([u.log().clamp(min=PRIOR_FLOOR).float(), torch.full((m.cfg.vocab_size - 256,), SPECIAL_PRIOR)])
    torch.testing.assert_close(got[-1], want_u, atol=1e-5, rtol=0)
    assert (got[0, :256] == PRIOR_FLOOR).sum() > 200  # most bytes start no token: the floor
    # no gradient reaches the context vectors; u learns
    c = ctx.clone().requires_grad_(True)
    m.prior(c, rows, node_t)[:, :256].sum().backward()
    assert c.grad is None
    assert m.next_start.grad is not None and m.next_start.grad.abs().sum() > 0
    m.next_start.grad = None


def test_forward_adds_the_prior_of_the_latest_ready_patch():
    """Wiring of the full forward: with given patch ends, logits(prior on) - logits(prior off) at byte t =
    prior_scale * brute prior(context = backbone output of the latest *ready* patch (the sink before any; a
    patch is ready one character after its last byte), prefix = the open patch's bytes up to t)."""
    rng = random.Random(5)
    m = small_model(HAND)
    with torch.no_grad():
        m.prior_scale.fill_(0.7)
    ids = [rng.choice(b"abc\xc3\xa9 ") for _ in range(30)]
    ends = [rng.random() < 0.3 for _ in ids]
    x = torch.tensor([ids])
    pe = torch.tensor([ends])
    with torch.no_grad():
        on = m(x, patch_end=pe)
        m.cfg.lm_prior = False
        off = m(x, patch_end=pe)
        m.cfg.lm_prior = True
        sink = m.run_backbone(m.sink(1, torch.float32))[0, 0]
    z = on.hidden["words"][0]  # (W, D)
    head = m.head_weight().detach()
    # a patch ending at e is ready one character later: at e + len(character starting at e + 1) (running max)
    ready, r_max = [], -1
    for e in [t for t in range(len(ids)) if ends[t]]:
        nxt = e + 1
        r = nxt + (2 if nxt < len(ids) and ids[nxt] == 0xC3 else 1) - 1 if nxt < len(ids) else 1 << 30
        r_max = max(r_max, r)
        ready.append(r_max)
    p_start = 0
    for t in range(len(ids)):
        if t > 0 and ends[t - 1]:
            p_start = t
        done = [k for k, r in enumerate(ready) if r <= t]
        ctx = sink if not done else z[done[-1]]
        prefix = bytes(ids[p_start : t + 1])  # the open patch's bytes (its end, if any, is known one byte later)
        want = 0.7 * brute_prior(HAND, ctx, head, prefix, m.cfg.vocab_size)
        torch.testing.assert_close(on.logits[0, t] - off.logits[0, t], want, atol=1e-4, rtol=0)


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
        h = m._run(m.encoder, m.embed_bytes(ids, m.expanded_ids(ids)), *m._byte_rope(torch.arange(ids.shape[1])))
        raw = m.boundary(h).flatten() - last.bias
        last.weight.mul_(3.0 / float(raw.std()))  # logits spread over a few units: no decision near 0
        raw = m.boundary(h).flatten() - last.bias
        last.bias.fill_(-float(torch.quantile(raw, 1 - rate)) + 0.05)
        assert (m.boundary(h).abs() > 1e-3).all()  # a margin: the full and the cached path decide alike


TEXT = "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e text, \U0001F600 emoji and long_words_here ok"


def test_causal_with_predicted_patches(byteified):
    m, _ = byteified
    x = torch.tensor([list(TEXT.encode())[:48]])
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        set_boundary_rate(m, x, 0.3)
        with torch.no_grad():
            m.prior_scale.fill_(0.8)
            base = m(x)
            assert 2 < int((base.hidden["boundary_logits"] > 0).sum()) < 40  # some patches close, not every byte
            for t in (0, 5, 17, 30, 47):
                y = x.clone()
                y[0, t] = (int(y[0, t]) + 37) % 256
                out = m(y)
                if t > 0:
                    assert (out.logits[0, :t] - base.logits[0, :t]).abs().max() < 1e-5, t
                assert (out.logits[0, t:] - base.logits[0, t:]).abs().max() > 1e-4, t  # the change shows
    finally:
        m.load_state_dict(saved)


def _cached_logits(m: ByteifiedLM, ids: list[int], chunks: list[int]) -> torch.Tensor:
    cache = m.new_cache()
    outs, p, k = [], 0, 0
    while p < len(ids):
        n = chunks[k % len(chunks)]
        k += 1
        outs.append(m(torch.tensor([ids[p : p + n]]), cache=cache).logits)
        p += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("rate", [0.1, 0.6])
def test_cached_decoding_equals_full_forward(byteified, rate):
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
        set_boundary_rate(m, torch.tensor([rows["inside"]]), rate)
        with torch.no_grad():
            m.prior_scale.fill_(0.8)
            for name, ids in rows.items():
                full = m(torch.tensor([ids]))
                closed = (full.hidden["boundary_logits"][0] > 0) | full.hidden["closed"][0]  # predicted | at once
                assert 0 < int(closed.sum()) < len(ids), name
                for chunks in ([1], [3, 1, 7]):
                    got = _cached_logits(m, ids, chunks)
                    err = (got - full.logits).abs().max().item()
                    assert err < 1e-4, (name, rate, chunks, err)
            # runs of exactly the cap that end at a special or at the row's end (no boundary fires)
            last = m.boundary.mlp[-1] if isinstance(m.boundary.mlp, torch.nn.Sequential) else m.boundary.mlp
            last.bias.fill_(-1e4)
            for ids in (body[:5], [BOS_ID, *body[:5], EOS_ID], [*body[:3], EOS_ID, BOS_ID, *body[:10]]):
                full = m(torch.tensor([ids])).logits
                err = (_cached_logits(m, ids, [1]) - full).abs().max().item()
                assert err < 1e-4, (ids, err)
    finally:
        m.cfg.max_word_bytes = cap
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
        assert trains("backbone.") == {True} and trains("boundary.") == {False}
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
    finally:
        set_trainable(m, ByteifyConfig(stage=1))


@pytest.mark.parametrize(("override", "needle"), [
    ("byteify.stage=3", "byteify.stage"),
    ("byteify.encoder_weight=-1", "byteify.encoder_weight"),
    ("byteify.boundary_weight=-0.5", "byteify.boundary_weight"),
    ("byteify.alm_tau=0", "byteify.alm_tau"),
    ("byteify.encoder_blocks=9", "byteify.encoder_blocks"),  # more than the source's 2 blocks
])
def test_config_errors_name_the_key(tiny_source, override, needle):
    from bytelm.config import load_config
    from bytelm.distill.byteify import ByteifyObjective

    with pytest.raises(ValueError, match=needle):  # byteify.stage already fails when the config is loaded
        cfg = load_config(["experiment=byteify_smollm2", "debug=cpu", f"byteify.source={tiny_source}", override])
        ByteifyObjective(cfg)
