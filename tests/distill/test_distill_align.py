"""Chunk alignment (bytelm.distill.align) against brute-force loops on hand-made and random tilings."""

from __future__ import annotations

import random

import numpy as np
import torch

from bytelm.distill.align import align_chunks, chunk_sum, last_token_in_units, merge_chunks_by_space_prob

# ------------------------------------------------------------------------------------------------ helpers


def spans_of(tokens: list[bytes | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous byte spans of a token list; ``None`` = special token (empty span, not text)."""
    spans, mask, pos = [], [], 0
    for t in tokens:
        n = 0 if t is None else len(t)
        spans.append((pos, pos + n))
        mask.append(t is not None)
        pos += n
    return torch.tensor(spans, dtype=torch.long), torch.tensor(mask)


def brute_chunks(tokens: list[bytes | None], units: list[bytes]) -> list[tuple[list[int], list[int]]]:
    """tokenkit-style two-pointer walk: cut whenever the cumulative byte lengths of both sides agree.

    Returns, per chunk, (teacher token indices, student unit indices); special tokens belong to no chunk.
    """
    text = [i for i, t in enumerate(tokens) if t]
    lens = {i: len(tokens[i] or b"") for i in text}
    chunks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(text) and j < len(units):
        cur_t, cur_u = [text[i]], [j]
        ct, cu = lens[text[i]], len(units[j])
        i, j = i + 1, j + 1
        while ct != cu:
            if ct < cu and i < len(text):
                cur_t.append(text[i])
                ct += lens[text[i]]
                i += 1
            elif cu < ct and j < len(units):
                cur_u.append(j)
                cu += len(units[j])
                j += 1
            else:
                return chunks  # one side ran out: the tail is in no chunk
        chunks.append((cur_t, cur_u))
    return chunks


def check_against_brute(tokens, units, bad_tokens=(), byte_student=False):
    spans, mask = spans_of(tokens)
    ok = mask.clone()
    for b in bad_tokens:
        ok[b] = False
    n = sum(len(u) for u in units)
    unit_ends = None if byte_student else [list(np.cumsum([len(u) for u in units]))]
    al = align_chunks(spans[None], mask[None], ok[None], torch.tensor([n]), unit_ends)
    ref = brute_chunks(tokens, units)
    C = len(ref)
    assert int((al.chunk_end[0] > 0).sum()) == C
    pos = 0
    for k, (toks, us) in enumerate(ref):
        for t in toks:
            assert al.token_chunk[0, t] == k
        nbytes = sum(len(units[u]) for u in us)
        assert (al.byte_chunk[0, pos : pos + nbytes] == k).all()
        assert al.chunk_start[0, k] == pos and al.chunk_end[0, k] == pos + nbytes
        assert al.chunk_last_token[0, k] == max(toks)
        assert bool(al.chunk_valid[0, k]) == all(bool(ok[t]) for t in toks)
        if al.unit_chunk is not None:
            for u in us:
                assert al.unit_chunk[0, u] == k
        pos += nbytes
    # specials and tokens after the last common boundary are in no chunk
    in_chunk = {t for toks, _ in ref for t in toks}
    for t in range(len(tokens)):
        if t not in in_chunk:
            assert al.token_chunk[0, t] == -1
    assert (al.byte_chunk[0, pos:] == -1).all()
    return al


# ------------------------------------------------------------------------------------------------- tests


def test_brute_force_helper_itself():
    """The two-pointer reference on an obvious case: 'Hello world' vs words."""
    tokens = [b"Hel", b"lo", b" wor", b"ld"]
    units = [b"Hello", b" world"]
    assert brute_chunks(tokens, units) == [([0, 1], [0]), ([2, 3], [1])]


def test_byte_student_chunks_are_teacher_tokens():
    tokens = [None, b"Hello", b" w", b"\xc3\xb6r", b"ld"]  # BOS special + leading-space + 2-byte char
    text = b"".join(t for t in tokens if t)
    units = [bytes([c]) for c in text]
    al = check_against_brute(tokens, units, byte_student=True)
    assert al.token_chunk[0].tolist() == [-1, 0, 1, 2, 3]


def test_multibyte_char_split_across_tokens():
    # emoji split as byte-level BPE does ('Ġð..' + last byte) and a CJK char split in three
    tokens = [None, b" \xf0\x9f\x98", b"\x80", b" \xe6", b"\x97", b"\xa5"]
    text = b"".join(t for t in tokens if t)
    # word student: words end only at character boundaries -> pieces of a character merge into one chunk
    units = [b" \xf0\x9f\x98\x80", b" \xe6\x97\xa5"]
    al = check_against_brute(tokens, units)
    assert al.token_chunk[0].tolist() == [-1, 0, 0, 1, 1, 1]
    # byte student: every teacher boundary is a chunk boundary, even inside a character
    check_against_brute(tokens, [bytes([c]) for c in text], byte_student=True)


def test_byte_fallback_tokens_and_specials_inside():
    # byte-fallback tokens (one byte each) for an emoji, a special token between two words
    tokens = [None, b"a", b" ", b"\xf0", b"\x9f", b"\x98", b"\x80", None, b" b"]
    units = [b"a", b" \xf0\x9f\x98\x80", b" b"]
    al = check_against_brute(tokens, units)
    assert al.token_chunk[0, 7] == -1
    assert al.token_chunk[0].tolist() == [-1, 0, 1, 1, 1, 1, 1, -1, 2]


def test_words_not_matching_tokens_merge():
    tokens = [b"(h", b"ello", b")", b" wor", b"ld!"]
    units = [b"(", b"hello)", b" world!"]
    al = check_against_brute(tokens, units)
    assert al.chunk_end[0, : int((al.chunk_end[0] > 0).sum())].tolist() == [7, 14]


def test_invalid_token_invalidates_its_chunk_only():
    tokens = [None, b"ab", b"\xef\xbf\xbd", b"cd", b" e"]
    units = [b"ab\xef\xbf\xbdcd", b" e"]
    al = check_against_brute(tokens, units, bad_tokens=(2,))
    assert al.chunk_valid[0].tolist() == [False, True]


def test_student_shorter_than_teacher_text():
    tokens = [b"abc", b"def", b"gh"]
    spans, mask = spans_of(tokens)
    al = align_chunks(spans[None], mask[None], mask[None], torch.tensor([5]))  # student sees 5 bytes
    assert al.chunk_end[0].tolist() == [3]
    assert al.token_chunk[0].tolist() == [0, -1, -1]
    assert al.byte_chunk[0].tolist() == [0, 0, 0, -1, -1]


def test_random_tilings_match_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 40)
        text = bytes(rng.randrange(256) for _ in range(n))

        def tile(p: float, data: bytes = text) -> list[bytes]:
            cuts = [0] + [i for i in range(1, len(data)) if rng.random() < p] + [len(data)]
            return [data[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

        tokens: list[bytes | None] = [None, *tile(0.4)]
        if rng.random() < 0.5:  # a special token somewhere in the middle
            tokens.insert(rng.randint(1, len(tokens)), None)
        bad = [i for i in range(len(tokens)) if tokens[i] is not None and rng.random() < 0.1]
        check_against_brute(tokens, tile(0.3), bad_tokens=bad)
        check_against_brute(tokens, [bytes([c]) for c in text], bad_tokens=bad, byte_student=True)


def test_batch_padding_and_chunk_sum():
    ex = [[None, b"ab", b"c"], [None, b"x", b"yz", b"w", b"v"]]
    sp = [spans_of(t) for t in ex]
    L = max(len(t) for t in ex)
    spans = torch.zeros(2, L, 2, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.bool)
    for b, (s, m) in enumerate(sp):
        spans[b, : len(s)] = s
        spans[b, len(s) :] = s[-1, 1]
        mask[b, : len(m)] = m
    al = align_chunks(spans, mask, mask, torch.tensor([3, 5]))
    assert al.chunk_valid.tolist() == [[True, True, False, False], [True, True, True, True]]
    vals = torch.arange(10.0).reshape(2, 5)
    sums = chunk_sum(vals, al.byte_chunk, al.num_chunks)
    assert sums.tolist() == [[0 + 1, 2, 0, 0], [5, 6 + 7, 8, 9]]


def test_merge_by_space_prob_matches_loop():
    rng = random.Random(1)
    B, C = 3, 12
    t_space = torch.log(torch.rand(B, C, generator=torch.Generator().manual_seed(2)) * 0.3)
    exists = torch.ones(B, C, dtype=torch.bool)
    exists[1, 9:] = False
    valid = exists & torch.tensor([[rng.random() > 0.15 for _ in range(C)] for _ in range(B)])
    m = merge_chunks_by_space_prob(t_space, exists, valid, threshold=0.1)
    for b in range(B):
        groups: list[list[int]] = [[]]
        for k in range(C):
            if not exists[b, k]:
                continue
            groups[-1].append(k)
            if t_space[b, k].exp() > 0.1:
                groups.append([])
        groups = [g for g in groups if g]
        for g_id, g in enumerate(groups):
            assert all(m.group[b, k] == g_id for k in g)
            assert m.last[b, g_id] == g[-1]
            assert bool(m.valid[b, g_id]) == all(bool(valid[b, k]) for k in g)
        assert not m.valid[b, len(groups) :].any()


def test_last_token_in_units_matches_loop():
    tokens = [None, b"(h", b"ello", b")", b" wor", b"ld", b"!!", b" a"]
    words = [b"(", b"hello)", b" world!!", b" a"]
    spans, mask = spans_of(tokens)
    ends = torch.tensor(np.cumsum([len(w) for w in words]))[None]
    idx, ok = last_token_in_units(spans[None], mask[None], ends, torch.ones_like(ends, dtype=torch.bool))
    exp_idx, exp_ok, start = [], [], 0
    for e in ends[0].tolist():
        cands = [i for i, t in enumerate(tokens) if t and start < spans[i, 1] <= e]
        exp_ok.append(bool(cands))
        exp_idx.append(cands[-1] if cands else 0)
        start = e
    assert ok[0].tolist() == exp_ok == [False, True, True, True]
    assert idx[0].tolist() == exp_idx == [0, 3, 6, 7]
    _, ok_exact = last_token_in_units(spans[None], mask[None], ends, torch.ones_like(ok), exact_end=True)
    assert ok_exact[0].tolist() == [False, True, True, True]
