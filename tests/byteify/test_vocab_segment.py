"""The ``vocab`` boundary decoder (bytelm.models.vocab_segment, docs/byteify.md#segmenters): its segmentation
scores as well as the best one found by enumerating every segmentation of short random rows under the same
rules, every patch it makes is a vocabulary token (or a single byte, or the row's cut last patch), and a
byteified model built with it never makes a patch outside the vocabulary."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from bytelm.data.bytes import PAD_ID
from bytelm.models.vocab_segment import vocab_segment_row
from bytelm.models.vocab_trie import VocabTrie

TABLE: list[bytes | None] = [b"a", b"ab", b"abc", b"b", b"bca", b"c", b"cab", None, b"\xc3\xa9", b"abcab"]
SPECIAL = 300


def log_sig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def allowed(piece: bytes, at_row_end: bool, tokens: set[bytes], cap: int) -> bool:
    if cap and len(piece) > cap:
        return False
    if len(piece) == 1 or piece in tokens:
        return True
    return at_row_end and any(t.startswith(piece) for t in tokens)


def brute_best(ids: list[int], logits: list[float], docs: list[int] | None, cap: int, cost: float) -> float:
    """Max score over every assignment of ends, checked against the rules one by one."""
    tokens = {t for t in TABLE if t}
    n = len(ids)
    best = -math.inf
    for bits in itertools.product([False, True], repeat=n):
        score, start, ok = 0.0, 0, True
        for t in range(n):
            special = ids[t] >= 256
            forced = special or (
                t + 1 < n and (ids[t + 1] >= 256 or (docs is not None and docs[t + 1] != docs[t]))
            )
            if special:
                if not bits[t] or start != t:
                    ok = False
                    break
                start = t + 1
                continue
            if forced and not bits[t]:
                ok = False
                break
            if bits[t] or t == n - 1:
                piece = bytes(ids[start : t + 1])
                if not allowed(piece, t == n - 1 and not bits[t], tokens, cap):
                    ok = False
                    break
                score -= cost
                start = t + 1
            score += log_sig(logits[t]) if bits[t] else log_sig(-logits[t])
        if ok:
            best = max(best, score)
    return best


def score_of(ends: np.ndarray, ids: list[int], logits: list[float], cost: float) -> float:
    s, n = 0.0, len(ids)
    for t in range(n):
        if ids[t] >= 256:
            continue
        s += log_sig(logits[t]) if ends[t] else log_sig(-logits[t])
        if ends[t] or t == n - 1:
            s -= cost
    return s


@pytest.mark.parametrize("seed", range(6))
def test_vocab_segmentation_is_the_best_under_the_rules(seed):
    rng = random.Random(seed)
    trie = VocabTrie(TABLE)
    pool = [*b"abcabc", 0xC3, 0xA9, SPECIAL, 0x7A]
    for _ in range(25):
        n = rng.randint(1, 11)
        ids = [rng.choice(pool) for _ in range(n)]
        logits = [rng.gauss(0, 2) for _ in range(n)]
        docs = sorted(rng.choice([0, 0, 1]) for _ in range(n)) if rng.random() < 0.4 else None
        cap = rng.choice([0, 3])
        cost = rng.choice([0.0, 1.0, 2.5])
        ends = vocab_segment_row(ids, np.array(logits), trie, cap, cost, docs)
        want = brute_best(ids, logits, docs, cap, cost)
        assert score_of(ends, ids, logits, cost) == pytest.approx(want, abs=1e-9), (ids, logits, docs, cap)
        assert all(ends[t] for t in range(n) if ids[t] >= 256)  # a special is a patch of its own


def test_patch_cost_prefers_fewer_patches_and_strong_logits_win():
    trie = VocabTrie(TABLE)
    ids = list(b"abcab")
    flat = np.zeros(5)
    assert vocab_segment_row(ids, flat, trie, 0, 5.0).tolist() == [
        False,
        False,
        False,
        False,
        True,
    ]  # "abcab"
    # logits that insist on ends after every byte get single bytes (always allowed), whatever the cost
    assert vocab_segment_row(ids, np.full(5, 40.0), trie, 0, 2.0).all()
    # logits that agree with a token segmentation get it: "ab|cab"
    assert vocab_segment_row(ids, np.array([-9.0, 9, -9, -9, 9]), trie, 0, 0.0).tolist() == [
        False,
        True,
        False,
        False,
        True,
    ]
    # the threshold's "abca|b" is no segmentation into tokens: the decoder pays one wrong bit instead
    logits = np.array([-9.0, -9, -9, 9, 9])
    ends = vocab_segment_row(ids, logits, trie, 0, 0.0)
    pieces, s = [], 0
    for t, e in enumerate(ends):
        if e:
            pieces.append(bytes(ids[s : t + 1]))
            s = t + 1
    assert all(p in TABLE for p in pieces) and ends.tolist() != (logits > 0).tolist()
    assert score_of(ends, ids, logits.tolist(), 0.0) == pytest.approx(log_sig(-9.0) + 4 * log_sig(9.0))


def constant_logit_model(tiny_source, logit: float):
    """A byteified model with the vocab decoder whose boundary predictor outputs ``logit`` at every byte."""
    from bytelm.config import load_config
    from bytelm.lit.strategies import build_model_for

    cfg = load_config(
        [
            "experiment=byteify_smollm2",
            "debug=cpu",
            f"byteify.source={tiny_source}",
            "model.boundary_decode=vocab",
        ]
    )
    m = build_model_for(cfg).eval()
    last = m.boundary.mlp[-1] if isinstance(m.boundary.mlp, torch.nn.Sequential) else m.boundary.mlp
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(logit)
    return m


def test_a_byteified_model_with_the_vocab_decoder_makes_only_vocabulary_patches(tiny_source):
    m = constant_logit_model(tiny_source, 1.0)  # the threshold decoder would end a patch at every byte...
    text = "Vocabulary patches: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e and  two  spaces.".encode()
    ids = torch.tensor([list(text)])
    with torch.no_grad():
        ends, logits = m.segment(ids)
        out = m(ids)
    tokens = {t for t in m.trie._table if t}
    closed = out.hidden["closed"][0].tolist()
    s = 0
    for t, c in enumerate(closed[:-1]):
        if c:
            assert text[s : t + 1] in tokens or t == s, text[s : t + 1]
            s = t + 1
    assert torch.equal(ends[0, :-1], out.hidden["closed"][0, :-1])  # forward uses the same decoder
    assert int((logits > 0).sum()) > int(ends.sum())  # ...the vocab decoder merges into tokens


def test_a_right_padded_row_gets_the_ends_it_gets_alone(tiny_source):
    m = constant_logit_model(
        tiny_source, -5.0
    )  # every byte prefers to continue: alone, the last patch stays open
    short = list(b"a row that stops inside a wor")
    longer = list(b"another row, a little longer than it")
    ids = torch.full((2, len(longer)), PAD_ID)
    ids[0, : len(short)] = torch.tensor(short)
    ids[1] = torch.tensor(longer)
    with torch.no_grad():
        batch, _ = m.segment(ids)
        alone, _ = m.segment(ids[:1, : len(short)])
    assert not bool(alone[0, -1])
    assert torch.equal(batch[0, : len(short)], alone[0])
    assert bool(batch[0, len(short) :].all())  # padding: patches of their own
