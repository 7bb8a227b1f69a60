"""Drafted greedy generation of the byteified model (bytelm.models.byteified_draft): the same bytes and logits
as plain one-byte-per-call greedy decoding, drafts accepted and rejected part-way, the cache rewound exactly.

float64 models, so that chunked and single-position arithmetic cannot flip an argmax at a near-tie.
"""

from __future__ import annotations

import pytest
import torch
from test_byteify_model import HAND, SEGMENTERS, randomise_residual, small_model

from bytelm.models.byteified import fused_marginal
from bytelm.models.byteified_draft import (
    close_with,
    draft_patch,
    feed_open,
    iter_drafted,
    iter_greedy_drafted,
    mark,
    rewind,
)
from bytelm.models.generate import generate, iter_generate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = (b"abc ab", "\u00e9t\u00e9 c".encode(), b"ca", b"zz b")


def model(chunker: str = "gate", decode: str = "threshold", residual: float = 3.5, cap: int = 5):
    """``residual`` scales a random residual head: 1 leaves the prior in charge (drafts accepted), 3.5
    overrules it often (drafts rejected part-way)."""
    m = small_model(HAND, chunker=chunker, max_word_bytes=cap, boundary_decode=decode).double()
    randomise_residual(m, 5)
    with torch.no_grad():
        m.lm_head.weight.mul_(residual)
    return m


def run_both(m, prompt: bytes, n: int = 40, min_new: int = 0):
    stats: dict[str, int] = {}
    drafted = list(iter_greedy_drafted(m, list(prompt), max_new_bytes=n, min_new_bytes=min_new, stats=stats))
    plain = list(
        iter_generate(m, list(prompt), max_new_bytes=n, temperature=0, draft=False, min_new_bytes=min_new)
    )
    return drafted, plain, stats


@pytest.mark.parametrize("chunker,decode", SEGMENTERS)
def test_drafted_greedy_generation_equals_plain_greedy(chunker, decode):
    m = model(chunker, decode)
    total: dict[str, int] = {}
    for prompt in PROMPTS:
        drafted, plain, stats = run_both(m, prompt)
        assert [b for b, _ in drafted] == [b for b, _ in plain] and len(plain) > 0  # EOS may end both
        for (_, a), (_, b) in zip(drafted, plain, strict=True):  # each byte's row: the one it came from
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
        for k, v in stats.items():
            total[k] = total.get(k, 0) + v
    assert total["drafted"] > 0
    # the public entry point takes the drafted path for greedy cached generation
    greedy = generate(m, PROMPTS[0], 40, temperature=0)
    assert greedy == generate(m, PROMPTS[0], 40, temperature=0, draft=False)


def test_drafts_are_accepted_and_rejected_and_save_calls():
    """With the prior in charge every draft byte is the model's own greedy byte (fewer calls than bytes);
    with a strong residual drafts fail part-way, the cache is rewound, and the bytes still match."""
    for residual, partial in ((1.0, False), (3.5, True)):
        m = model(residual=residual)
        total = {"calls": 0, "drafted": 0, "accepted": 0}
        n_bytes = 0
        for prompt in PROMPTS:
            drafted, plain, stats = run_both(m, prompt)
            assert [b for b, _ in drafted] == [b for b, _ in plain]
            n_bytes += len(plain)
            for k in total:
                total[k] += stats[k]
        if partial:
            assert 0 < total["accepted"] < total["drafted"]
        else:
            assert total["accepted"] == total["drafted"] > 0
            assert total["calls"] < n_bytes  # one call per drafted patch instead of one per byte


def test_min_new_bytes_and_the_byte_budget_hold_with_drafts():
    m = model(residual=1.0)
    for n in (1, 2, 7):
        drafted, plain, _ = run_both(m, b"abc ab", n=n, min_new=n)
        assert [b for b, _ in drafted] == [b for b, _ in plain] and len(drafted) == n


@pytest.mark.parametrize("keep,then", [(1, None), (2, ord(" ")), (3, ord(" "))])
def test_rewind_restores_the_cache_of_the_kept_bytes(keep, then):
    """Feeding three continuing bytes (and, with ``then``, a closing byte through the encoder only) and
    rewinding to the first ``keep`` leaves the cache that fed those bytes alone: the same state and, for
    everything fed after, the same logits."""
    m = model(residual=1.0, cap=8)
    prompt = torch.tensor([list(b"ab ca")])
    a, b = m.new_cache(), m.new_cache()
    m(prompt, cache=a)
    m(prompt, cache=b)
    at = mark(a)
    h, rows = feed_open(m, a, list(b"abc"), then=then)
    rewind(m, a, at, keep, h, rows)
    feed_open(m, b, list(b"abc")[:keep])
    for key in ("ids", "bits", "plen", "node", "n_words", "patch_start"):
        assert getattr(a, key) == getattr(b, key), key
    assert [c.n for c in (*a.enc, *a.dec)] == [c.n for c in (*b.enc, *b.dec)]
    torch.testing.assert_close(a.last_logits, b.last_logits, rtol=0, atol=1e-9)
    for byte, bit in ((ord("b"), False), (ord("c"), True), (ord(" "), False)):
        x, e = torch.tensor([[byte]]), torch.tensor([[bit]])
        torch.testing.assert_close(m(x, cache=a, patch_end=e).logits, m(x, cache=b, patch_end=e).logits)


def test_close_with_a_precomputed_encoder_state_equals_feeding_the_byte():
    m = model(residual=1.0, cap=8)
    prompt = torch.tensor([list(b"ab ca")])
    a, b = m.new_cache(), m.new_cache()
    m(prompt, cache=a)
    m(prompt, cache=b)
    h, _ = feed_open(m, a, list(b"ab"), then=ord("c"))
    got = close_with(m, a, ord("c"), h[:, -1:])
    feed_open(m, b, list(b"ab"))
    want = m(torch.tensor([[ord("c")]]), cache=b, patch_end=torch.tensor([[True]])).logits[0, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert a.n_words == b.n_words and a.bits == b.bits and a.bits[-1]
    x = torch.tensor([[ord(" ")]])
    torch.testing.assert_close(m(x, cache=a).logits, m(x, cache=b).logits, rtol=0, atol=1e-9)


def test_draft_and_rewind_reject_what_they_cannot_do():
    m = model(residual=1.0, cap=5)
    c = m.new_cache()
    m(torch.tensor([list(b"ab ca")]), cache=c)
    with pytest.raises(ValueError, match="continue the open patch"):
        feed_open(m, c, [ord("a"), 257])
    with pytest.raises(ValueError, match="continue the open patch"):
        feed_open(m, c, list(b"abcab"))  # would reach the size cap of 5
    inner, _, _ = draft_patch(m, c, ord("a"), 50)
    assert len(inner) <= 5 - c.plen - 2  # the draft stops below the cap
    with pytest.raises(ValueError, match="then=258"):
        feed_open(m, c, [ord("a")], then=258)
    at = mark(c)
    h, rows = feed_open(m, c, [ord("a")])
    with pytest.raises(ValueError, match="keep=0"):
        rewind(m, c, at, 0, h, rows)
    m(torch.tensor([[ord("b")]]), cache=c, patch_end=torch.tensor([[True]]))  # closes a patch
    with pytest.raises(RuntimeError, match="closed patch"):
        rewind(m, c, at, 1, h, rows)


def exact_distribution(m, prompt: bytes, n: int, how) -> dict[bytes, float]:
    """The model's distribution over its next ``n`` bytes (EOS masked) under ``how``'s temperature and
    top-k, by walking every path with one-byte-per-call cached decoding."""
    import copy

    out: dict[bytes, float] = {}
    cache = m.new_cache()
    with torch.no_grad():
        m(torch.tensor([list(prompt)]), cache=cache)

    def walk(c, prefix: bytes, prob: float) -> None:
        if len(prefix) == n:
            out[prefix] = out.get(prefix, 0.0) + prob
            return
        row = c.last_logits
        p = how.byte_probs(fused_marginal(row), allow_eos=False)
        V = row.shape[-1] // 2
        for b in torch.nonzero(p > 0).flatten().tolist():
            child = copy.deepcopy(c)
            bit = bool(row[V + b] > row[b])
            with torch.no_grad():
                m(torch.tensor([[b]]), cache=child, patch_end=torch.tensor([[bit]]))
            walk(child, prefix + bytes([b]), prob * float(p[b]))

    walk(cache, b"", 1.0)
    return out


def test_drafted_sampling_draws_the_models_distribution():
    """Speculative sampling over drafted patches: the frequencies of 3-byte continuations (temperature 3,
    top-k 3: 27 continuations, none above 0.52) match the model's exact distribution, as plain sampling's
    do, with drafts both accepted and rejected. The margin is wide both ways: 1,200 draws land ~0.03 from the
    truth in total variation, and keeping every drafted byte without the correction lands ~0.24 away."""
    from bytelm.models.byteified_draft import Sampling

    m = model(residual=2.0)
    prompt = b"abc ab"
    how = Sampling(temperature=3.0, top_k=3)
    exact = exact_distribution(m, prompt, 3, how)
    assert abs(sum(exact.values()) - 1) < 1e-6 and len(exact) > 4
    n = 1200
    for drafted in (True, False):
        gen = torch.Generator().manual_seed(11)
        torch.manual_seed(11)  # plain sampling draws from the global generator
        stats: dict[str, int] = {}
        counts: dict[bytes, int] = {}
        for _ in range(n):
            if drafted:
                s = Sampling(temperature=3.0, top_k=3, generator=gen)
                it = iter_drafted(m, list(prompt), max_new_bytes=3, min_new_bytes=3, how=s, stats=stats)
            else:
                it = iter_generate(
                    m, list(prompt), max_new_bytes=3, min_new_bytes=3, temperature=3.0, top_k=3, draft=False
                )
            got = bytes(b for b, _ in it)
            counts[got] = counts.get(got, 0) + 1
        assert set(counts) <= set(exact), "a continuation of probability 0"
        tv = 0.5 * sum(abs(counts.get(k, 0) / n - p) for k, p in exact.items())
        assert tv < 0.1, (drafted, tv)
        if drafted:
            assert 0 < stats["accepted"] < stats["drafted"]


def test_drafted_greedy_equals_plain_on_a_real_vocabulary(tiny_source):
    """The tiny random Llama with SmolLM2's tokenizer (49k tokens, multi-byte characters): drafts from its
    prior are accepted and rejected, and drafted greedy decoding gives plain greedy's bytes and rows."""
    from bytelm.config import load_config
    from bytelm.lit.strategies import build_model_for

    cfg = load_config(["experiment=byteify_smollm2", "debug=cpu", f"byteify.source={tiny_source}"])
    m = build_model_for(cfg).eval().double()
    randomise_residual(m, 3)
    with torch.no_grad():
        m.lm_head.weight.mul_(0.1)  # a residual that sometimes overrules the prior
    total = {"calls": 0, "drafted": 0, "accepted": 0}
    for prompt in ("The history of", "Caf\u00e9 na\u00efve \u65e5\u672c", "def f(x):\n    return"):
        drafted, plain, stats = run_both(m, prompt.encode(), n=48)
        assert [b for b, _ in drafted] == [b for b, _ in plain] and len(plain) > 0
        for (_, a), (_, b) in zip(drafted, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
        for k in total:
            total[k] += stats[k]
    assert total["drafted"] > 0 and total["accepted"] > 0
