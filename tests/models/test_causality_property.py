"""Causality of every model kind, by brute force on adversarial bytes: the prediction made at position j (of
byte j+1) depends on bytes <= j only, and KV-cached decoding equals the full forward.

A model kind is one entry of ``KINDS``: how to build a tiny model through bytelm's config/build path, which
row positions its logits belong to, and how to run it cached. Adding a kind is adding an entry; every test
below then covers it. The byteified model predicts (byte, boundary) symbols whose bits a segmenter may choose
with lookahead, so its property is stated over symbols and lives with its exact prior in
tests/byteify/test_byteify_model.py (``test_joint_scoring_is_causal_on_adversarial_bytes``: the same
adversarial bytes, learned and word patches).

The byte sequences are seeded and adversarial for a word splitter: specials (BOS/EOS), invalid and truncated
UTF-8, 2/3/4-byte characters, combining marks (U+0300-U+036F, U+0332), U+00A0, CJK, Cyrillic, runs of spaces
and runs of letters that hit the size cap (``max_word_bytes=6``). The two leaks an independent check found in
the hierarchical model (its word vectors were read before the splitter had decided where the word ends) are
regression cases; the rule that fixed them is ``bytelm.models.word_layout.decision_times``
(docs/hierarchical.md).

What causality means for MrT5: it is a prefix-LM (``bytelm.models.mrt5``). With the split ``s`` held fixed,
the encoder reads bytes ``0..s-1`` bidirectionally and every logit is a prediction made at a row position
``>= s - 1``, after the whole prefix; decoder logit ``i`` is made at row position ``s - 1 + i`` and must not
depend on later continuation bytes. So the rule is the same as for the causal models once logits are placed
at their row positions: changing byte ``t`` changes no prediction made at a position ``< t`` (for ``t < s``
there is none). The split itself is a function of the row length (``prefix_frac``), so it is given
explicitly (``prefix_len``), as generation does.
"""

from __future__ import annotations

import codecs
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import tiny_model
from torch import nn

from bytelm.data.bytes import BOS_ID, EOS_ID
from bytelm.data.word_tables import _tables
from bytelm.data.words import split_words
from bytelm.models.config import GateConfig
from bytelm.models.word_layout import char_emit_times, decision_times, layout_words, split_word_starts

pytestmark = pytest.mark.usefixtures("one_thread")

CAP = 6  # max_word_bytes of the hierarchical kinds: runs of letters below reach it
CAUSAL_TOL = 1e-5  # relative to the row's largest |logit|: a leak moves logits by ~0.1-3 here, noise is ~1e-7
CACHE_TOL = 1e-4


# --------------------------------------------------------------------------------------------- model kinds


@dataclass(frozen=True)
class Kind:
    """How one model kind is built, where its logits sit and how it decodes with a cache."""

    config: dict  # ModelConfig fields
    first: int = 0  # row position of the first logit (the first position that predicts a byte)
    kwargs: dict = field(default_factory=dict)  # extra forward arguments
    prompt: int = 1  # ids fed to the cache in its first call (MrT5 encodes the whole prefix at once)

    def build(self, seed: int = 0) -> nn.Module:
        return tiny_model(seed=seed, **self.config).eval()


BASE = dict(init_std=0.1)  # on conftest's TINY
HIER = dict(BASE, arch="hierarchical", encoder_layers=1, decoder_layers=2, max_word_bytes=CAP)
MRT5 = dict(BASE, arch="mrt5", decoder_layers=2)
S = 8  # MrT5's prefix length (fixed, so that rows of any length split alike): logits from position S - 1 on


def prefix_lm(config: dict) -> Kind:
    """A prefix-LM kind: split at S, first logit at position S - 1, the cache encodes the prefix at once."""
    return Kind(config, first=S - 1, kwargs={"prefix_len": S}, prompt=S)


KINDS: dict[str, Kind] = {
    "flat": Kind(dict(BASE, arch="flat")),
    "hier_words_query": Kind(dict(HIER, pooling="query")),
    "hier_words_last": Kind(dict(HIER, pooling="last", decoder_cross="all")),
    "hier_gate": Kind(
        dict(HIER, chunker="gate", gate=GateConfig(bias_init=1.0, center=True))
    ),  # G away from tau
    "mrt5_soft": prefix_lm(dict(MRT5, gate=GateConfig(layer=1, bias_init=3.0, center=True))),
    "mrt5_hard": prefix_lm(dict(MRT5, gate=GateConfig(layer=1, bias_init=0.5, center=True, hard_eval=True))),
}
HIER_WORDS = ["hier_words_query", "hier_words_last"]


def logits_of(kind: Kind, m: nn.Module, ids: list[int], docs: bool = False) -> torch.Tensor:
    """(T, V) logits by row position (positions before ``kind.first`` are NaN: no prediction is made there).
    ``docs``: packed documents, a new one at each BOS (``doc_ids``, a causal function of the ids)."""
    x = torch.tensor([ids])
    kw = dict(kind.kwargs, doc_ids=(x == BOS_ID).cumsum(1)) if docs else kind.kwargs
    with torch.no_grad():
        out = m(x, **kw).logits[0].float()
    return _by_position(out, len(ids))


def _by_position(out: torch.Tensor, T: int) -> torch.Tensor:
    """(L, V) logits of the last L positions -> (T, V), NaN before them."""
    full = torch.full((T, out.shape[-1]), float("nan"))
    full[T - len(out) :] = out
    return full


def cached_logits(kind: Kind, m: nn.Module, ids: list[int]) -> torch.Tensor:
    """The same positions through ``new_cache()`` / ``forward(ids, cache=...)``: the prompt, then byte by
    byte."""
    cache = m.new_cache()  # type: ignore[operator]
    with torch.no_grad():
        outs = [m(torch.tensor([ids[: kind.prompt]]), cache=cache).logits[0][-1:]]
        outs += [m(torch.tensor([[i]]), cache=cache).logits[0] for i in ids[kind.prompt :]]
    return _by_position(torch.cat(outs).float(), len(ids))


def assert_same_before(a: torch.Tensor, b: torch.Tensor, t: int, msg: str, tol: float = CAUSAL_TOL) -> None:
    """Logits at every position < t agree to ``tol`` times the largest |logit| (NaN rows: no prediction)."""
    scale = max(1.0, float(torch.nan_to_num(a).abs().max()))
    diff = torch.nan_to_num((a[:t] - b[:t]).abs(), nan=0.0)
    worst = float(diff.max()) if diff.numel() else 0.0
    assert worst <= tol * scale, f"{msg}: logits before t={t} moved by {worst:.3g} (scale {scale:.3g})"


# ------------------------------------------------------------------------------------ adversarial bytes

COMBINING = [chr(c) for c in (0x0300, 0x0301, 0x0308, 0x0332, 0x036F)]
PIECES = [
    "a",
    "e",
    "Z",
    "1",
    "9",
    " ",
    "  ",
    "   ",
    "\u00a0",
    "\t",
    "\n",
    ".",
    ",",
    "'",
    "-",
    "_",
    "$",
    "«",
    "é",
    "ж",
    "в",
    "Ж",
    "中",
    "。",
    "ぁ",
    "ア",
    "😀",
    "🇦",
    "\u2044",
    "\u202f",
    "\u2007",
    "\u3000",
    "\u200d",
    *COMBINING,
    " \u00a0",
    "\u00a0\u0332",
]
RAW = [
    b"\xe3\x80",
    b"\xe3",
    b"\x80",
    b"\xbf",
    b"\xc3",
    b"\xff",
    b"\xc0",
    b"\xf0\x9f",
    b"\xf0\x9f\x98",
    b"\xed\xa0",
    b"\xe0\x80",
    b"\xe3\x80\xc3",
]
SUBSTITUTES = [
    0x20,
    0x61,
    0x65,
    0x2E,
    0x0A,
    0x09,
    0x80,
    0xB2,
    0xA0,
    0xC2,
    0xCC,
    0xE3,
    0xE4,
    0xF0,
    0xFF,
    BOS_ID,
    EOS_ID,
]


def adversarial(rng: random.Random, n: int) -> list[int]:
    """``n`` ids: pieces of text, invalid and truncated UTF-8, size-cap runs, specials (seeded by ``rng``)."""
    out: list[int] = []
    while len(out) < n:
        r = rng.random()
        if r < 0.15:
            out += rng.choice(RAW)
        elif r < 0.22:
            out += b"e" * rng.randint(CAP - 2, CAP + 2)  # a word at, just below or just over the cap
        elif r < 0.27:
            out.append(rng.choice([BOS_ID, EOS_ID]))
        else:
            out += rng.choice(PIECES).encode()
    return out[:n]


def substitute(rng: random.Random, ids: list[int], t: int) -> list[int]:
    """``ids`` with the id at ``t`` replaced by another adversarial value."""
    var = list(ids)
    var[t] = rng.choice([v for v in SUBSTITUTES if v != ids[t]])
    return var


# Leaks an independent check found (the end of a word was decided by a later byte than the one that let it
# be read): the word before a U+00A0 that a combining mark turns into a word the space joins; an invalid
# sequence at the size cap whose bytes are only settled when a later byte breaks it.
REGRESSIONS = [
    ("中 \u00a0вв".encode(), "中 \u00a0\u0332в".encode(), 6),
    (b"eeeee\xe3\x80\x80", b"eeeee\xe3\x80\xc3", 7),
]


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(KINDS))
def test_changing_byte_t_changes_no_earlier_prediction(name: str) -> None:
    """For random adversarial rows (every other one packed: a document starts at each BOS), substituting the
    id at t leaves every logit at a position < t unchanged, and cutting the row after t leaves the logits up
    to t unchanged."""
    kind = KINDS[name]
    m = kind.build()
    rng = random.Random(f"causal-{name}")
    for row in range(8):
        ids, docs = adversarial(rng, rng.randint(18, 34)), row % 2 == 1
        base = logits_of(kind, m, ids, docs)
        lo = kind.first + 1  # substitutions earlier than this have no later-made prediction to test
        for t in sorted(rng.sample(range(lo, len(ids)), 5)):
            var = substitute(rng, ids, t)
            assert_same_before(base, logits_of(kind, m, var, docs), t, f"{name} {ids} id {t} -> {var[t]}")
        t = rng.randrange(lo + 2, len(ids))
        short = logits_of(kind, m, ids[:t], docs)
        assert_same_before(base, short, t, f"{name} {ids} cut at {t}")


@pytest.mark.parametrize("name", list(KINDS))
def test_cached_decoding_equals_full_forward(name: str) -> None:
    kind = KINDS[name]
    m = kind.build(seed=1)
    rng = random.Random(f"cache-{name}")
    for _ in range(3):
        ids = [BOS_ID, *adversarial(rng, 40)]
        full, cached = logits_of(kind, m, ids), cached_logits(kind, m, ids)
        assert_same_before(full, cached, len(ids), f"{name} cached vs full on {ids}", tol=CACHE_TOL)


@pytest.mark.parametrize("name", HIER_WORDS)
@pytest.mark.parametrize(("a", "b", "t"), REGRESSIONS)
def test_regression_word_end_decided_late(name: str, a: bytes, b: bytes, t: int) -> None:
    """The two leaks: rows that differ first at byte t get the same logits before t, and the cache agrees."""
    assert a[:t] == b[:t] and a[t] != b[t]
    kind = KINDS[name]
    m = kind.build()
    la, lb = logits_of(kind, m, list(a)), logits_of(kind, m, list(b))
    assert_same_before(la, lb, t, f"{name} {a!r} vs {b!r}")
    assert float((la[t:] - lb[t:]).abs().max()) > 1e-3  # the rows do differ from t on (the test can see)
    for row in (a, b):
        ids = [BOS_ID, *row]
        assert_same_before(
            logits_of(kind, m, ids), cached_logits(kind, m, ids), len(ids), f"cache {row!r}", tol=CACHE_TOL
        )


@pytest.mark.parametrize("name", HIER_WORDS)
def test_cache_splits_a_word_that_starts_with_a_mark_in_context(name: str) -> None:
    """After punctuation a combining mark starts a word (``a.`` | ``\u0332b``), but alone it is split off
    (``\u0332`` | ``b``): the cache re-splits such a word with the bytes before it, as the full forward
    does."""
    kind = KINDS[name]
    m = kind.build(seed=2)
    for row in ("a.\u0332b cd", "x'\u0301\u0301yz e", "eeeee'\u036fZ  q"):
        ids = [BOS_ID, *row.encode()]
        assert_same_before(logits_of(kind, m, ids), cached_logits(kind, m, ids), len(ids), row, tol=CACHE_TOL)


def _layout(row: list[int] | bytes, cap: int | None = CAP, decided: bool = True):
    ids = list(row)
    ws = torch.from_numpy(split_word_starts(ids, cap)).unsqueeze(0)
    return layout_words(torch.tensor([ids]), ws, decided=decided)


def _seen(lay, p: int) -> tuple[list[int], list[int]]:
    """The words (starts, ends) whose vectors position p may read."""
    k = int(lay.ctx_idx[0, p])
    return lay.start[0, :k].tolist(), lay.end[0, :k].tolist()


def test_regressions_ready_times() -> None:
    """The layout of the regression rows: before t both rows read the same words; the older lead-byte rule
    did not. In ``中 \u00a0вв`` the single space and U+00A0 are read only once ``в`` shows that no
    combining mark follows U+00A0; in ``eeeee\xe3\x80\xc3`` the capped word ``eeeee\xe3`` only once ``\xc3``
    breaks the sequence E3 80."""
    for a, b, t in REGRESSIONS:
        for decided, same in ((True, True), (False, False)):
            la, lb = _layout(a, decided=decided), _layout(b, decided=decided)
            assert ([_seen(la, p) for p in range(t)] == [_seen(lb, p) for p in range(t)]) == same, (
                a,
                decided,
            )
    # words 中 | " " | U+00A0 | вв (ctx k = the output of word k-1): 中 from the space on, U+00A0 from в's end
    assert _layout("中 \u00a0вв".encode()).ctx_idx[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 3, 3, 3]
    assert _layout(b"eeeee\xe3\x80\xc3").ctx_idx[0].tolist() == [0] * 7 + [1]


def _emit_reference(data: bytes) -> list[int]:
    """When Python's incremental UTF-8 decoder (surrogateescape) emits each byte, pushed one at a time."""
    dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    out: list[int] = []
    for t, b in enumerate(data):
        out += [t] * len(dec.decode(bytes([b])).encode("utf-8", "surrogateescape"))
    return out + [1 << 40] * (len(data) - len(out))


def test_char_emit_times_match_the_incremental_decoder() -> None:
    rng = random.Random(5)
    alphabet = [*range(0x80, 0x100), 0x41, 0x20, 0xE0, 0xED, 0xF0, 0xF4, 0xC2, 0xA0, 0x9F, 0x8F, 0x90] * 2
    rows = [bytes(rng.choice(alphabet) for _ in range(12)) for _ in range(1500)]
    got = char_emit_times(torch.tensor([list(r) for r in rows]))  # (N, 12), one batch
    for r, g in zip(rows, got.tolist(), strict=True):
        assert g == _emit_reference(r), r
    # a document start breaks a sequence: E4 is settled (invalid) where the next document starts
    docs = torch.tensor([[0, 0, 1, 1]])
    assert char_emit_times(torch.tensor([[0x61, 0xE4, 0xB8, 0xAD]]), docs != docs.roll(1, 1)).tolist() == [
        [0, 2, 2, 3]
    ]


def test_layout_reads_only_decided_words() -> None:
    """Layout-level causality over many rows (no model): rows that agree up to t let every position < t read
    the same words with the same extents. The older lead-byte rule fails this on the same rows."""
    rng = random.Random(7)
    leaks = {True: 0, False: 0}
    for _ in range(250):
        cap = rng.choice([None, CAP, 3, 100])
        x = adversarial(rng, rng.randint(6, 24))
        t = rng.randrange(1, len(x))
        y = substitute(rng, x, t)[: t + 1] + adversarial(rng, rng.randint(0, 6))  # same bytes before t
        for decided in (True, False):
            lx, ly = _layout(x, cap, decided), _layout(y, cap, decided)
            leaks[decided] += any(_seen(lx, p) != _seen(ly, p) for p in range(t))
    assert leaks[True] == 0
    assert leaks[False] > 0  # the adversarial rows do reach the cases the rule is for


def test_splitter_lookahead_is_where_decision_times_waits() -> None:
    """Every pair of character classes (one code point per class, plus the special cases): a word start
    before b that a single following character can remove or create is one that ``decision_times`` does not
    consider decided when b arrives: b in {U+0009, U+00A0, U+2007, U+202F} after a single space, or U+2044."""
    props = _tables().props
    reps = [int(i) for i in np.unique(props, return_index=True)[1]] + [0x3000, 0x00A0, 0x2007, 0x0332, 0xDCE3]
    chars = [chr(c) for c in reps]

    def start_before_last(text: str, k: int) -> bool:  # a word starts at character k
        words = split_words(text.encode("utf-8", "surrogateescape"), None)
        ends = np.cumsum([len(w.decode("utf-8", "surrogateescape")) for w in words])
        return k in ends[:-1]

    late = set()
    for a in chars:
        for b in chars:
            base = start_before_last(a + b, 1)
            if any(start_before_last(a + b + c, 1) != base for c in chars):
                late.add((a, b))
    waits = {(" ", chr(c)) for c in (0x09, 0xA0, 0x2007, 0x202F)}
    assert {p for p in late if p[1] != "\u2044"} <= waits, sorted(late)
    assert ("0", "\u2044") in late and (" ", "\u00a0") in late  # the search does see them
    for a, b in late:  # ... and decision_times waits past b for each of them
        ids = list((a + b).encode("utf-8", "surrogateescape")) + [0x78]
        ws = torch.from_numpy(split_word_starts(ids, None)).unsqueeze(0)
        s = len(a.encode("utf-8", "surrogateescape"))
        if ws[0, s]:
            assert decision_times(torch.tensor([ids]), ws)[0, s] == len(ids) - 1, (a, b)
