"""Noise functions change exactly the requested fraction of bytes (seeded) and keep every other byte."""

from __future__ import annotations

import pytest

from bytelm.eval.noise import KINDS, apply_noise, noise_documents

TEXT = (
    b"To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    b"The slings and arrows of outrageous fortune. "
) * 8 + "Caf\u00e9 \u4f60\u597d".encode()
N = len(TEXT)


def _is_subsequence(small: bytes, big: bytes) -> bool:
    it = iter(big)
    return all(b in it for b in small)


@pytest.mark.parametrize("frac", [0.05, 0.15])
def test_swap(frac):
    r = apply_noise(TEXT, "swap", frac, seed=1)
    pairs = round(frac * N / 2)
    assert len(r.positions) == 2 * pairs
    assert abs(len(r.positions) / N - frac) <= 1.0 / N
    assert len(r.data) == N and sorted(r.data) == sorted(TEXT)  # a permutation of the same bytes
    changed = [i for i in range(N) if r.data[i] != TEXT[i]]
    assert changed == list(r.positions)  # exactly the reported positions differ, every other byte is kept
    for i in r.positions[::2]:
        assert r.data[i] == TEXT[i + 1] and r.data[i + 1] == TEXT[i]


@pytest.mark.parametrize("frac", [0.05, 0.15])
def test_delete(frac):
    r = apply_noise(TEXT, "delete", frac, seed=2)
    k = round(frac * N)
    assert len(r.positions) == k and len(r.data) == N - k
    kept = bytes(b for i, b in enumerate(TEXT) if i not in set(r.positions))
    assert r.data == kept
    assert all(TEXT[i] < 128 for i in r.positions)


@pytest.mark.parametrize("frac", [0.05, 0.15])
def test_case(frac):
    r = apply_noise(TEXT, "case", frac, seed=3)
    k = round(frac * N)
    assert len(r.positions) == k and len(r.data) == N
    changed = [i for i in range(N) if r.data[i] != TEXT[i]]
    assert changed == list(r.positions)
    assert all(r.data[i : i + 1].swapcase() == TEXT[i : i + 1] for i in changed)


@pytest.mark.parametrize("frac", [0.05, 0.15])
def test_space(frac):
    r = apply_noise(TEXT, "space", frac, seed=4)
    k = round(frac * N)
    assert len(r.positions) == k
    removed = sum(TEXT[i] == 0x20 for i in r.positions)
    assert len(r.data) == N - removed + (k - removed)
    # undoing the edits gives the input back: every other byte is kept in order
    pos = set(r.positions)
    rebuilt, j = bytearray(), 0
    for i, b in enumerate(TEXT):
        if i in pos and b == 0x20:
            rebuilt.append(b)  # it was removed
            continue
        if i in pos:
            assert r.data[j] == 0x20 and r.data[j + 1] == b  # a space was inserted before it
            j += 1
        assert r.data[j] == b
        rebuilt.append(b)
        j += 1
    assert bytes(rebuilt) == TEXT and j == len(r.data)
    assert _is_subsequence(bytes(b for b in TEXT if b != 0x20), r.data)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_and_utf8_safe(kind):
    a = apply_noise(TEXT, kind, 0.15, seed=7)
    assert a == apply_noise(TEXT, kind, 0.15, seed=7)
    assert a != apply_noise(TEXT, kind, 0.15, seed=8)
    a.data.decode("utf-8")  # only ASCII bytes are touched: valid UTF-8 stays valid
    assert apply_noise(TEXT, kind, 0.0, seed=7).data == TEXT
    docs = noise_documents([TEXT, TEXT], kind, 0.05, seed=0)
    assert docs == noise_documents([TEXT, TEXT], kind, 0.05, seed=0) and docs[0] != docs[1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown noise kind"):
        apply_noise(TEXT, "shuffle", 0.1)
    with pytest.raises(ValueError, match="fraction"):
        apply_noise(TEXT, "delete", 1.5)
