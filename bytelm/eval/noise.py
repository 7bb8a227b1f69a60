"""Seeded text noise for the robustness evaluation: byte swaps, deletions, case flips, whitespace changes.

Every kind touches exactly ``k = round(frac * n)`` byte positions of an ``n``-byte input (fewer only when the
input has fewer eligible positions; ``NoisedText.positions`` says which), chosen uniformly without
replacement by ``numpy.random.default_rng(seed)``. Every other byte is kept, in order. Only ASCII bytes are
touched, so valid UTF-8 stays valid UTF-8 and a subword teacher reads exactly the bytes a byte model reads.

- ``swap``: ``round(k / 2)`` disjoint pairs of adjacent, *different* ASCII bytes are swapped (typo
  transpositions), so ``2 * round(k / 2)`` bytes change;
- ``delete``: ``k`` ASCII bytes are removed;
- ``case``: ``k`` ASCII letters change case;
- ``space``: at ``k`` ASCII positions the word spacing changes: a space is removed (two words merge) or,
  before any other byte, a space is inserted (a word splits). This is the noise a word splitter feels most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KINDS = ("swap", "delete", "case", "space")
DEFAULT_LEVELS = (0.05, 0.15)


@dataclass(frozen=True)
class NoisedText:
    data: bytes  # the noised bytes
    positions: tuple[int, ...]  # positions of the *original* input that were changed (sorted)


def _count(n: int, frac: float) -> int:
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"noise fraction must be in [0, 1], got {frac}")
    return int(round(frac * n))


def _choose(rng: np.random.Generator, eligible: np.ndarray, k: int) -> np.ndarray:
    """``min(k, len(eligible))`` positions from ``eligible``, uniformly without replacement, sorted."""
    k = min(k, len(eligible))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(rng.choice(eligible, size=k, replace=False))


def swap_bytes(data: bytes, frac: float, seed: int = 0) -> NoisedText:
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    pairs = _count(len(arr), frac / 2) if len(arr) else 0
    if len(arr) < 2 or pairs == 0:
        return NoisedText(bytes(arr), ())
    rng = np.random.default_rng(seed)
    cand = np.flatnonzero((arr[:-1] < 128) & (arr[1:] < 128) & (arr[:-1] != arr[1:]))  # pair (i, i+1)
    used = np.zeros(len(arr) + 1, dtype=bool)
    chosen: list[int] = []
    for i in rng.permutation(cand):  # greedy over a random order: disjoint pairs, still uniform per pair
        if len(chosen) == pairs:
            break
        if not used[i] and not used[i + 1]:
            used[i] = used[i + 1] = True
            chosen.append(int(i))
    idx = np.asarray(sorted(chosen), dtype=np.int64)
    arr[idx], arr[idx + 1] = arr[idx + 1], arr[idx].copy()
    pos = tuple(sorted([*idx.tolist(), *(idx + 1).tolist()]))
    return NoisedText(bytes(arr), pos)


def delete_bytes(data: bytes, frac: float, seed: int = 0) -> NoisedText:
    arr = np.frombuffer(data, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    idx = _choose(rng, np.flatnonzero(arr < 128), _count(len(arr), frac))
    keep = np.ones(len(arr), dtype=bool)
    keep[idx] = False
    return NoisedText(arr[keep].tobytes(), tuple(idx.tolist()))


def flip_case(data: bytes, frac: float, seed: int = 0) -> NoisedText:
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    rng = np.random.default_rng(seed)
    letters = np.flatnonzero(((arr >= 65) & (arr <= 90)) | ((arr >= 97) & (arr <= 122)))
    idx = _choose(rng, letters, _count(len(arr), frac))
    arr[idx] ^= 0x20  # ASCII upper <-> lower
    return NoisedText(arr.tobytes(), tuple(idx.tolist()))


def change_spaces(data: bytes, frac: float, seed: int = 0) -> NoisedText:
    arr = np.frombuffer(data, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    idx = _choose(rng, np.flatnonzero(arr < 128), _count(len(arr), frac))
    out = bytearray()
    prev = 0
    for i in idx.tolist():
        out += arr[prev:i].tobytes()
        if arr[i] != 0x20:  # a space removed below; anything else gets a space inserted before it
            out.append(0x20)
            out.append(int(arr[i]))
        prev = i + 1
    out += arr[prev:].tobytes()
    return NoisedText(bytes(out), tuple(idx.tolist()))


_FUNCS = {"swap": swap_bytes, "delete": delete_bytes, "case": flip_case, "space": change_spaces}


def apply_noise(data: bytes, kind: str, frac: float, seed: int = 0) -> NoisedText:
    """Noise of ``kind`` (one of ``KINDS``) at fraction ``frac`` of the bytes, reproducible from ``seed``."""
    if kind not in _FUNCS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {KINDS}")
    return _FUNCS[kind](data, frac, seed)


def noise_documents(texts: Sequence[bytes], kind: str, frac: float, seed: int = 0) -> list[bytes]:
    """Noise every text with its own seed ``(seed, index, kind, level)`` so documents are independent."""
    k = KINDS.index(kind) if kind in KINDS else 0
    return [
        apply_noise(
            t,
            kind,
            frac,
            int(np.random.SeedSequence([seed, i, k, int(round(frac * 1e4))]).generate_state(1)[0]),
        ).data
        for i, t in enumerate(texts)
    ]
