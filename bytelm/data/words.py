"""Split raw bytes into words with HAT's rule: exactly as the reference, much faster, never failing.

The hierarchical models pool bytes into one vector per *word*, so the splitter decides what the backbone
sees. The default rule is HAT's ("Hierarchical Autoregressive Transformers"), whose reference implementation
is the Rust package ``hat-splitter`` 0.1.10 (DESIGN.md §2 item 1):

1. Unicode word-bound segments (UAX #29 as the Rust crate ``unicode-segmentation`` 1.12 computes them);
2. every punctuation character (``\\p{P}``) ends its piece (``don't`` -> ``don'`` ``t``); camelCase is cut
   between a lowercase and an uppercase letter (``HTTPServer`` stays whole);
3. pieces are typed: a single U+0020 is a *space*, an all-whitespace piece is *whitespace*, a single
   punctuation character is *punctuation*, anything else is a *word*. A word joins a preceding space, and
   punctuation joins a preceding space, word or punctuation; everything else starts a new word;
4. words longer than ``max_word_bytes`` are cut into pieces of at most that many bytes, at UTF-8 character
   boundaries where possible.

The reference takes ``str`` only and runs at about 2 MB/s from Python. Here every rule is a table look-up
over neighbouring characters, evaluated for all characters at once with numpy, on chunks of the input that
stay in the CPU cache; ordinary text needs two look-ups per character (``_fast_word_starts``), text with
combining marks, ZWJ sequences or flags takes a general path (``_general_word_starts``). Both agree with the
reference on every code point (Unicode 16.0 properties, as the reference's crates use).

Invalid UTF-8: the input is decoded with ``errors="surrogateescape"``, so every byte of an invalid sequence
becomes one character of its own (U+DC80..U+DCFF). Such a byte is treated as a *letter* (UAX #29
``ALetter``, no case, not punctuation, not space): it stays inside the word it touches (``caf\\xe9`` is one
word, as ``café`` would be) and runs of garbage bytes form words that the size cap cuts. No byte is ever lost:
the words always concatenate back to the input.

Online use (generation) is ``OnlineWordSplitter``: it re-splits the current word plus each new character and
reports a word as finished when that yields a second word, at the size cap, or at the end of the stream.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from itertools import pairwise

import numpy as np
import regex

__all__ = ["OnlineWordSplitter", "split_online", "split_words", "word_ends"]

DEFAULT_MAX_WORD_BYTES = 100  # what HAT's released models use

# ---------------------------------------------------------------------------------------------------------
# Character classes.
#
# Every code point gets a UAX #29 class (the rules that look past ignorable characters: WB5-WB13b), a "raw"
# class (the rules about direct neighbours: WB3-WB3d and HAT's cuts after punctuation and inside camelCase;
# these seven properties never overlap) and a few flags.
# ---------------------------------------------------------------------------------------------------------
_OTHER, _ALETTER, _HEBREW, _NUMERIC, _KATAKANA, _EXTNUMLET = 0, 1, 2, 3, 4, 5
_MIDLETTER, _MIDNUM, _MIDNUMLET, _SQUOTE, _DQUOTE, _RI = 6, 7, 8, 9, 10, 11
_JOINED = 12  # an Extended_Pictographic character glued to a preceding ZWJ (WB3c); set per position
_NCLS = 13

_R_OTHER, _R_CR, _R_LF, _R_NEWLINE, _R_WSEG, _R_PUNCT, _R_LOWER, _R_UPPER = range(8)

# uint16 property layout: bits 0-3 UAX class, bits 4-6 raw class, then flags
_RAW_SHIFT = 4
_F_IGN = 1 << 7  # Extend, Format, ZWJ: glued to what precedes (WB4)
_F_ZWJ = 1 << 8
_F_EXTPICT = 1 << 9  # Extended_Pictographic: joins a preceding ZWJ (WB3c)
_F_WS = 1 << 10  # White_Space (Rust regex's \s): HAT's whitespace pieces
_F_SLOW = 1 << 11  # needs the general path (see _fast_word_starts)
_F_NL = 1 << 12  # CR, LF, Newline (the raw classes, as a flag)

_WB_VALUES = {  # Word_Break value -> (UAX class, raw class, flags)
    "ALetter": (_ALETTER, _R_OTHER, 0),
    "Hebrew_Letter": (_HEBREW, _R_OTHER, 0),
    "Numeric": (_NUMERIC, _R_OTHER, 0),
    "Katakana": (_KATAKANA, _R_OTHER, 0),
    "ExtendNumLet": (_EXTNUMLET, _R_OTHER, 0),
    "MidLetter": (_MIDLETTER, _R_OTHER, 0),
    "MidNum": (_MIDNUM, _R_OTHER, 0),
    "MidNumLet": (_MIDNUMLET, _R_OTHER, 0),
    "Single_Quote": (_SQUOTE, _R_OTHER, 0),
    "Double_Quote": (_DQUOTE, _R_OTHER, 0),
    "Regional_Indicator": (_RI, _R_OTHER, 0),
    "CR": (_OTHER, _R_CR, _F_NL),
    "LF": (_OTHER, _R_LF, _F_NL),
    "Newline": (_OTHER, _R_NEWLINE, _F_NL),
    "WSegSpace": (_OTHER, _R_WSEG, 0),
    "Extend": (_OTHER, _R_OTHER, _F_IGN),
    "Format": (_OTHER, _R_OTHER, _F_IGN),
    "ZWJ": (_OTHER, _R_OTHER, _F_IGN | _F_ZWJ),
}
# Extended_Pictographic (Unicode emoji-data.txt, 16.0; the ``regex`` module's own property misses ~700 of
# these code points, e.g. U+1F6E8, so the ranges are spelled out).
# fmt: off
_EXTENDED_PICTOGRAPHIC = (
    (0xA9, 0xA9), (0xAE, 0xAE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122), (0x2139, 0x2139),
    (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B), (0x2328, 0x2328), (0x2388, 0x2388),
    (0x23CF, 0x23CF), (0x23E9, 0x23F3), (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB),
    (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE), (0x2600, 0x2605), (0x2607, 0x2612),
    (0x2614, 0x2685), (0x2690, 0x2705), (0x2708, 0x2712), (0x2714, 0x2714), (0x2716, 0x2716),
    (0x271D, 0x271D), (0x2721, 0x2721), (0x2728, 0x2728), (0x2733, 0x2734), (0x2744, 0x2744),
    (0x2747, 0x2747), (0x274C, 0x274C), (0x274E, 0x274E), (0x2753, 0x2755), (0x2757, 0x2757),
    (0x2763, 0x2767), (0x2795, 0x2797), (0x27A1, 0x27A1), (0x27B0, 0x27B0), (0x27BF, 0x27BF),
    (0x2934, 0x2935), (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55),
    (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299), (0x1F000, 0x1F0FF),
    (0x1F10D, 0x1F10F), (0x1F12F, 0x1F12F), (0x1F16C, 0x1F171), (0x1F17E, 0x1F17F), (0x1F18E, 0x1F18E),
    (0x1F191, 0x1F19A), (0x1F1AD, 0x1F1E5), (0x1F201, 0x1F20F), (0x1F21A, 0x1F21A), (0x1F22F, 0x1F22F),
    (0x1F232, 0x1F23A), (0x1F23C, 0x1F23F), (0x1F249, 0x1F3FA), (0x1F400, 0x1F53D), (0x1F546, 0x1F64F),
    (0x1F680, 0x1F6FF), (0x1F774, 0x1F77F), (0x1F7D5, 0x1F7FF), (0x1F80C, 0x1F80F), (0x1F848, 0x1F84F),
    (0x1F85A, 0x1F85F), (0x1F888, 0x1F88F), (0x1F8AE, 0x1F8FF), (0x1F90C, 0x1F93A), (0x1F93C, 0x1F945),
    (0x1F947, 0x1FAFF), (0x1FC00, 0x1FFFD),
)
# Code points whose properties changed in Unicode 17.0 (mostly new characters). The ``regex`` module
# follows 17.0, the reference (Rust crates ``unicode-segmentation`` 1.12 and ``regex`` 1.11) follows 16.0,
# where these have no property that matters here; they are reset so that both split alike. U+0295 is
# Lowercase_Letter in 16.0 and Other_Letter in 17.0, and gets the former back.
_NOT_IN_UNICODE_16 = (
    (0xB8, 0xB8), (0x558, 0x558), (0x58B, 0x58C), (0x5C8, 0x5C9), (0x88F, 0x88F),
    (0xB53, 0xB54), (0xC5C, 0xC5C), (0xCDC, 0xCDC), (0x1ACF, 0x1AF0), (0x208F, 0x208F), (0x209D, 0x209F),
    (0x2E60, 0x2E63), (0xA7CE, 0xA7CF), (0xA7D2, 0xA7D2), (0xA7D4, 0xA7D4), (0xA7DD, 0xA7DD),
    (0xA7E2, 0xA7E2), (0xA7F1, 0xA7F1), (0xAB6C, 0xAB6D), (0x107BB, 0x107BF), (0x10940, 0x10959),
    (0x10EC5, 0x10EC7), (0x10ECB, 0x10ED0), (0x10ED9, 0x10EEE), (0x10EF0, 0x10EFB), (0x11B0A, 0x11B0A),
    (0x11B60, 0x11B67), (0x11DB0, 0x11DDB), (0x11DE0, 0x11DE9), (0x11DF0, 0x11DF1), (0x1246F, 0x1246F),
    (0x12475, 0x1247F), (0x12550, 0x12686), (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3), (0x1B124, 0x1B128),
    (0x1B168, 0x1B168), (0x1D127, 0x1D128), (0x1D250, 0x1D252), (0x1D25B, 0x1D25C), (0x1D25F, 0x1D25F),
    (0x1D280, 0x1D281), (0x1D6A6, 0x1D6A6), (0x1DF1F, 0x1DF24), (0x1DF2B, 0x1DF81), (0x1DF90, 0x1DF96),
    (0x1DFCD, 0x1DFFF), (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6F5), (0x1E6FE, 0x1E6FF),
)
# fmt: on
_GC_RAW = {"P": _R_PUNCT, "Ll": _R_LOWER, "Lu": _R_UPPER}  # general categories, disjoint from the above
_ESCAPE_LO, _ESCAPE_HI = 0xDC80, 0xDCFF  # where surrogateescape puts invalid bytes

# "join" class of a character, for grouping pieces in the fast path
_J_WORD, _J_SPACE, _J_WS, _J_PUNCT = 0, 1, 2, 3


class _Tables:
    """Look-up tables, built once on first use (~0.5 s) from the ``regex`` module's Unicode database."""

    def __init__(self) -> None:
        every_char = "".join(map(chr, range(0x110000)))
        props = np.zeros(0x110000, dtype=np.uint16)
        for value, (cls, raw, flags) in _WB_VALUES.items():
            for m in regex.finditer(rf"\p{{Word_Break={value}}}+", every_char):
                props[m.start() : m.end()] = cls | (raw << _RAW_SHIFT) | flags
        for gc, raw in _GC_RAW.items():
            for m in regex.finditer(rf"\p{{{gc}}}+", every_char):
                props[m.start() : m.end()] |= raw << _RAW_SHIFT
        for lo, hi in _NOT_IN_UNICODE_16:
            props[lo : hi + 1] = 0
        props[0x295] |= _R_LOWER << _RAW_SHIFT
        for m in regex.finditer(r"\p{White_Space}+", every_char):
            props[m.start() : m.end()] |= _F_WS
        for lo, hi in _EXTENDED_PICTOGRAPHIC:
            props[lo : hi + 1] |= _F_EXTPICT
        props[_ESCAPE_LO : _ESCAPE_HI + 1] = _ALETTER  # an invalid byte is a letter (module docstring)
        uax = props & 0xF
        # the fast path cannot see ignorables, regional-indicator parity, or a space inside a word (U+202F)
        slow = ((props & _F_IGN) != 0) | (uax == _RI) | (((props & _F_WS) != 0) & (uax != _OTHER))
        props[slow] |= _F_SLOW
        self.props = props  # (0x110000,) uint16
        self.tri = _uax_rule_table()  # (_NCLS**3,) uint8
        self.raw_pair = _raw_pair_table()  # (64,) uint8
        self._build_fast(props)

    def _build_fast(self, props: np.ndarray) -> None:
        """Dense classes for the fast path and its two tables (see ``_fast_word_starts``)."""
        cp = np.arange(0x110000)
        join = np.select(
            [cp == 0x20, (props & _F_WS) != 0, _raw(props) == _R_PUNCT], [_J_SPACE, _J_WS, _J_PUNCT], _J_WORD
        )
        key = (props & 0x7F).astype(np.int32) | (join << 7)  # UAX class, raw class, join class
        key[(props & _F_SLOW) != 0] = 1 << 9  # one class for all the rest, sorted last
        keys, dense = np.unique(key, return_inverse=True)
        k = int((keys < 1 << 9).sum())  # 24 with Unicode 16
        self.n_fast = k
        self.dense = dense.astype(np.uint8)  # (0x110000,) dense class of each code point; >= k: slow
        self.dense_bytes = self.dense.tobytes()  # the same, for cheap one-at-a-time reads
        self.sentinel = int(self.dense[0])  # U+0000's class: no rule keeps it, so it stands for sot/eot
        uax, raw, jc = keys[:k] & 0xF, (keys[:k] >> _RAW_SHIFT) & 7, keys[:k] >> 7
        a, b, c, d = np.ix_(range(k), range(k), range(k), range(k))  # chars t-2, t-1, t, t+1
        tri = self.tri.reshape(_NCLS, _NCLS, _NCLS)
        pair = self.raw_pair.reshape(8, 8)[raw[b], raw[c]]
        keep = ((tri[uax[b], uax[c], uax[d]] & 1) | (tri[uax[a], uax[b], uax[c]] & 2) | (pair & 2)) != 0
        cut = ((pair & 1) != 0) | ~keep
        # quad[a, b, c, d], bit 0: a piece starts at t; bits 1-2: join class of char t
        self.quad = (cut | (jc[c] << 1)).astype(np.uint8).reshape(-1)  # (k**4,)
        self.quad_bytes = self.quad.tobytes()
        self.final = _final_table()  # (64,) bool


def _raw(props: np.ndarray) -> np.ndarray:
    return (props >> _RAW_SHIFT) & 7


def _uax_rule_table() -> np.ndarray:
    """UAX #29 rules WB5-WB13b as a look-up over three consecutive (non-ignorable) classes ``(a, b, c)``.

    Bit 0: no break between ``a`` and ``b`` (pair rules, and the look-ahead rules WB6, WB7b, WB12).
    Bit 1: no break between ``b`` and ``c`` (the look-behind rules WB7, WB7c, WB11).
    The reference segmenter (a state machine) keeps a separator that is followed by a ZWJ-joined emoji inside
    the segment, and lets nothing but another ZWJ-joined emoji follow such an emoji: a JOINED character
    satisfies the look-ahead of WB6/WB7b/WB12 and is OTHER for every other rule.
    """
    ahl = {_ALETTER, _HEBREW}
    midlet = {_MIDLETTER, _MIDNUMLET, _SQUOTE}
    midnum = {_MIDNUM, _MIDNUMLET, _SQUOTE}
    anum = ahl | {_NUMERIC}
    out = np.zeros((_NCLS, _NCLS, _NCLS), dtype=np.uint8)
    for a in range(_NCLS):
        for b in range(_NCLS):
            pair = (
                (a in ahl and b in anum)  # WB5, WB9
                or (a == _NUMERIC and b in anum)  # WB8, WB10
                or (a == _HEBREW and b == _SQUOTE)  # WB7a
                or (a == _KATAKANA and b == _KATAKANA)  # WB13
                or (a in anum | {_KATAKANA, _EXTNUMLET} and b == _EXTNUMLET)  # WB13a
                or (a == _EXTNUMLET and b in anum | {_KATAKANA})  # WB13b
            )
            for c in range(_NCLS):
                ahead = (
                    (a in ahl and b in midlet and c in ahl | {_JOINED})  # WB6
                    or (a == _HEBREW and b == _DQUOTE and c in {_HEBREW, _JOINED})  # WB7b
                    or (a == _NUMERIC and b in midnum and c in {_NUMERIC, _JOINED})  # WB12
                )
                behind = (
                    (a in ahl and b in midlet and c in ahl)  # WB7
                    or (a == _HEBREW and b == _DQUOTE and c == _HEBREW)  # WB7c
                    or (a == _NUMERIC and b in midnum and c == _NUMERIC)  # WB11
                )
                out[a, b, c] = (1 if pair or ahead else 0) | (2 if behind else 0)
    return out.reshape(-1)


def _raw_pair_table() -> np.ndarray:
    """Rules about two adjacent characters, by raw class ``(x, y)``: bit 0 cut between them, bit 1 keep.

    Cut: around line breaks except inside CR LF (WB3a/b), after punctuation, lowercase->uppercase (HAT).
    Keep: CR LF (WB3), runs of WSegSpace (WB3d).
    """
    out = np.zeros((8, 8), dtype=np.uint8)
    lines = {_R_CR, _R_LF, _R_NEWLINE}
    for x in range(8):
        for y in range(8):
            crlf = x == _R_CR and y == _R_LF
            cut = (
                ((x in lines or y in lines) and not crlf)
                or x == _R_PUNCT
                or (x == _R_LOWER and y == _R_UPPER)
            )
            keep = crlf or (x == _R_WSEG and y == _R_WSEG)
            out[x, y] = int(cut) | (2 * int(keep))
    return out.reshape(-1)


def _final_table() -> np.ndarray:
    """HAT's grouping in the fast path, from ``quad`` of chars t-1 and t (3 bits each): 1 = a word starts at t.

    Without ignorables, RI or U+202F, a piece starting with punctuation is that single character, a piece
    whose first or last character is whitespace is all whitespace, and any other piece is a word. A word joins
    a preceding single space, punctuation joins a preceding space, word or punctuation.
    """
    out = np.zeros(64, dtype=bool)
    for prev in range(8):
        for cur in range(8):
            prev_cut, prev_j, cur_cut, cur_j = prev & 1, prev >> 1, cur & 1, cur >> 1
            prev_space = prev_j == _J_SPACE and prev_cut  # a lone " " piece (a piece starts at t too)
            prev_not_ws = prev_j not in (_J_SPACE, _J_WS) or prev_space
            joins = (prev_space and cur_j == _J_WORD) or (prev_not_ws and cur_j == _J_PUNCT)
            out[prev * 8 + cur] = bool(cur_cut and not joins)
    return out


_TABLES: _Tables | None = None


def _tables() -> _Tables:
    global _TABLES
    if _TABLES is None:
        _TABLES = _Tables()
    return _TABLES


# ---------------------------------------------------------------------------------------------------------
# Offline splitting
# ---------------------------------------------------------------------------------------------------------


def _to_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(data, str):
        try:
            return data.encode("utf-8", "surrogateescape")  # round-trips text decoded with surrogateescape
        except UnicodeEncodeError:
            return data.encode("utf-8", "surrogatepass")  # other lone surrogates: keep their 3 bytes
    return bytes(data)


def _code_points(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """Code points of ``data`` (N,) and the byte offset where each character starts, plus the end (N+1,).

    The offsets are None for ASCII input, where characters and bytes coincide.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if data.isascii():
        return raw, None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", "surrogateescape")
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        nbytes = (
            1
            + (cp >= 0x80).astype(np.int32)
            + (cp >= 0x800)
            + (cp >= 0x10000)
            - 2 * ((cp >= _ESCAPE_LO) & (cp <= _ESCAPE_HI))  # an escaped invalid byte is one byte
        )
        offsets = np.zeros(len(cp) + 1, dtype=np.int64)
        np.cumsum(nbytes, out=offsets[1:])
        return cp, offsets
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    # valid UTF-8: a character starts at every byte that is not a continuation byte (10xxxxxx)
    offsets = np.flatnonzero(np.append((raw & 0xC0) != 0x80, True))
    return cp, offsets


def _word_starts(cp: np.ndarray, force_general: bool = False) -> np.ndarray:
    """Character indices (excluding 0) where HAT words start, before the size cap. ``cp``: (N,), N >= 1."""
    tables = _tables()
    dense = np.take(tables.dense, cp)  # (N,) uint8
    if not force_general and dense.max() < tables.n_fast:
        return _fast_word_starts(dense, tables)
    return _general_word_starts(cp, tables)


def _fast_word_starts(dense: np.ndarray, tables: _Tables) -> np.ndarray:
    """All rules as two table look-ups, for text without ignorables, regional indicators or U+202F.

    Whether a piece starts at ``t`` depends on characters ``t-2 .. t+1`` only (UAX #29 looks at most one
    character back and one ahead of a boundary; HAT's cuts look at the two characters around it), so one
    look-up in a table over four dense classes gives it; whether that piece joins the previous one then
    depends on this bit and the characters at ``t-1`` and ``t`` (``_final_table``).
    """
    k = tables.n_fast
    n = len(dense)
    padded = np.empty(n + 3, dtype=np.int32)  # two sentinels before, one after
    padded[:2] = padded[-1] = tables.sentinel
    padded[2:-1] = dense
    idx = padded[:-3] * k  # (N,) index of (t-2, t-1, t, t+1); int32 is enough for k**4
    idx += padded[1:-2]
    idx *= k
    idx += padded[2:-1]
    idx *= k
    idx += padded[3:]
    quad = np.take(tables.quad, idx)  # (N,) uint8, 3 bits of char t
    pair = quad[:-1] << 3  # (N-1,) uint8, bits of t-1 and t
    pair |= quad[1:]
    return np.flatnonzero(np.take(tables.final, pair)) + 1  # flatnonzero is ~8x faster on bool


def _general_word_starts(cp: np.ndarray, tables: _Tables) -> np.ndarray:
    """The same rules for any text: UAX #29 is evaluated on the sequence with ignorables removed (WB4)."""
    props = np.take(tables.props, cp)  # (N,) uint16
    raw = _raw(props).astype(np.uint8)
    pair = np.take(tables.raw_pair, raw[:-1] * 8 + raw[1:])  # (N-1,)
    keep = _uax_keep(props, tables.tri) | ((pair & 2) != 0)
    cut = ((pair & 1) != 0) | ~keep  # (N-1,) a piece starts at i+1
    starts = np.flatnonzero(cut) + 1  # (P-1,) piece starts after the first
    bounds = np.concatenate(([0], starts, [len(cp)]))  # (P+1,)
    length = np.diff(bounds)  # (P,)
    first = cp[bounds[:-1]]
    non_ws = np.zeros(len(cp) + 1, dtype=np.int32)  # non_ws[i]: non-whitespace characters before i
    np.cumsum((props & _F_WS) == 0, out=non_ws[1:])
    all_ws = non_ws[bounds[1:]] == non_ws[bounds[:-1]]
    single_space = (length == 1) & (first == 0x20)
    # the reference appends a lone " " piece to a preceding all-" " piece (a no-op after WB3d, kept for parity)
    merge = single_space[1:] & (first[:-1] == 0x20) & all_ws[:-1]
    if merge.any():
        spaces = np.zeros(len(cp) + 1, dtype=np.int32)
        np.cumsum(cp == 0x20, out=spaces[1:])
        merge &= (spaces[bounds[1:-1]] - spaces[bounds[:-2]]) == length[:-1]
        if merge.any():
            bounds = np.concatenate(([0], starts[~merge], [len(cp)]))
            starts = bounds[1:-1]
            length = np.diff(bounds)
            first = cp[bounds[:-1]]
            all_ws = non_ws[bounds[1:]] == non_ws[bounds[:-1]]
            single_space = (length == 1) & (first == 0x20)
    punct = (length == 1) & (_raw(props[bounds[:-1]]) == _R_PUNCT)
    kind = np.full(len(length), _J_WORD, dtype=np.int8)  # piece kinds, named like the join classes
    kind[all_ws] = _J_WS
    kind[single_space] = _J_SPACE
    kind[punct] = _J_PUNCT
    prev_kind, cur_kind = kind[:-1], kind[1:]
    joins = ((prev_kind == _J_SPACE) & (cur_kind == _J_WORD)) | (
        (prev_kind != _J_WS) & (cur_kind == _J_PUNCT)
    )
    return starts[~joins]


def _uax_keep(props: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """(N-1,) bool: True where UAX #29 rules WB3c, WB4 and WB5-WB16 keep characters i and i+1 together."""
    prev, cur = props[:-1], props[1:]
    cls = (props & 0xF).astype(np.int32)  # (N,)
    absorbed = joined = kept = None
    if ((props & _F_IGN) != 0).any():
        # WB4: Extend/Format/ZWJ glue to what precedes, unless that is a line break (or the start of text)
        absorbed = ((cur & _F_IGN) != 0) & ((prev & _F_NL) == 0)
        joined = ((prev & _F_ZWJ) != 0) & ((cur & _F_EXTPICT) != 0)  # WB3c
        cls[1:][joined] = _JOINED
        # the rules WB5-WB13b look through absorbed characters: evaluate them on the compressed sequence
        kept = np.concatenate(([0], np.flatnonzero(~absorbed) + 1))  # non-absorbed characters
        cls = cls[kept]
    padded = np.empty(len(cls) + 2, dtype=np.int32)  # OTHER before and after: no rule keeps across them
    padded[0] = padded[-1] = _OTHER
    padded[1:-1] = cls
    # rule[t]: triple (t-1, t, t+1) of compressed characters
    rule = np.take(tri, (padded[:-2] * _NCLS + padded[1:-1]) * _NCLS + padded[2:])  # (n,)
    # boundary before compressed char j: triple (j-1, j, j+1) bit 0, or triple (j-2, j-1, j) bit 1
    keep = ((rule[1:] & 1) | (rule[:-1] & 2)) != 0  # (n-1,)
    is_ri = cls == _RI
    if is_ri.any():  # WB15/16: regional indicators pair up from the start of a run
        idx = np.arange(len(cls))
        run_start = np.maximum.accumulate(np.where(is_ri & ~np.r_[False, is_ri[:-1]], idx, 0))
        keep |= (is_ri & ((idx - run_start) % 2 == 1))[1:]
    if kept is not None and absorbed is not None and joined is not None:
        full = absorbed | joined
        full[kept[1:] - 1] |= keep
        keep = full
    return keep


def _check_cap(max_word_bytes: int | None) -> None:
    if max_word_bytes is not None and max_word_bytes < 1:
        raise ValueError(f"max_word_bytes must be >= 1 (or None for no cap), got {max_word_bytes}")


_CHUNK_BYTES = 1 << 16  # work on pieces that stay in the CPU cache; they are cut after a "\n"


def word_ends(
    data: bytes | bytearray | memoryview | str, max_word_bytes: int | None = DEFAULT_MAX_WORD_BYTES
) -> np.ndarray:
    """Exclusive byte end offsets of the words of ``data``: (W,) int64, increasing, last == len(bytes).

    ``data`` may be any bytes (invalid UTF-8 included) or a ``str`` (taken as its UTF-8 encoding). Word ``k``
    is ``data[ends[k-1]:ends[k]]`` (word 0 is ``data[:ends[0]]``). ``max_word_bytes=None`` disables the cap.
    Empty input gives an empty array.
    """
    _check_cap(max_word_bytes)
    raw = _to_bytes(data)
    # A word always ends after "\n" (a line break is a whitespace word, and nothing joins one), so the input
    # is split into independent chunks there.
    out: list[np.ndarray] = []
    pos = 0
    while pos < len(raw):
        cut = raw.find(b"\n", pos + _CHUNK_BYTES)
        end = len(raw) if cut < 0 else cut + 1
        ends = _chunk_word_ends(raw[pos:end], max_word_bytes)
        out.append(ends + pos if pos else ends)
        pos = end
    if not out:
        return np.zeros(0, dtype=np.int64)
    return out[0] if len(out) == 1 else np.concatenate(out)


def _chunk_word_ends(raw: bytes, max_word_bytes: int | None, force_general: bool = False) -> np.ndarray:
    """``word_ends`` of one chunk; ``force_general`` skips the fast path (tests compare the two)."""
    cp, offsets = _code_points(raw)
    ends_chars = np.append(_word_starts(cp, force_general), len(cp)).astype(np.int64)  # (W,) characters
    ends = ends_chars if offsets is None else offsets[ends_chars]
    if max_word_bytes is None:
        return ends
    too_long = np.flatnonzero(np.diff(ends, prepend=0) > max_word_bytes)
    if len(too_long) == 0:
        return ends
    return _apply_cap(ends, too_long, offsets, max_word_bytes)


def _apply_cap(ends: np.ndarray, too_long: np.ndarray, offsets: np.ndarray | None, cap: int) -> np.ndarray:
    """Cut each too long word greedily: as many whole characters as fit in ``cap`` bytes, or ``cap`` bytes
    in the middle of a character when not even one fits (only possible for ``cap < 4``), as the reference."""
    pieces: list[np.ndarray] = []
    done = 0
    for k in too_long.tolist():
        start = int(ends[k - 1]) if k > 0 else 0
        end = int(ends[k])
        pieces.append(ends[done:k])
        if offsets is None:  # ASCII: every byte is a character
            cuts = np.arange(start + cap, end, cap, dtype=np.int64)
        else:
            found = []
            pos = start
            while end - pos > cap:
                limit = pos + cap
                best = int(offsets[np.searchsorted(offsets, limit, side="right") - 1])
                pos = best if best > pos else limit
                found.append(pos)
            cuts = np.asarray(found, dtype=np.int64)
        pieces.append(cuts)
        done = k
    pieces.append(ends[done:])
    return np.concatenate(pieces)


def split_words(
    data: bytes | bytearray | memoryview | str, max_word_bytes: int | None = DEFAULT_MAX_WORD_BYTES
) -> list[bytes]:
    """The words of ``data`` as byte strings; ``b"".join(split_words(x)) == x`` (UTF-8 encoded for ``str``).

    On valid UTF-8 this equals ``hat_splitter.HATSplitter().split_with_limit(text, max_word_bytes)``.
    """
    raw = _to_bytes(data)
    ends = word_ends(raw, max_word_bytes).tolist()
    return [raw[a:b] for a, b in pairwise([0, *ends])]


# ---------------------------------------------------------------------------------------------------------
# Online splitting
# ---------------------------------------------------------------------------------------------------------

_ONLINE_WINDOW = 512  # bytes of the current word re-split per step; exact unless a single piece is longer
_ONLINE_CONTEXT = 16  # bytes before the current word kept for WB4 (see _starts_new_word)
_MEMO_LIMIT = 1 << 17
_MEMO: dict[bytes, bool] = {}  # context + word + char -> a word starts at char (pure, so shared)


class OnlineWordSplitter:
    r"""Split a byte stream into words one byte at a time, as HAT does while generating.

    Each byte goes to ``push``. Bytes wait (in ``current``) until they complete a UTF-8 character; invalid
    bytes count as characters of their own, exactly as in ``split_words``. For each new character ``c`` the
    splitter re-splits *current word + c* (the word before the size cap, plus a few bytes before it when it
    starts with a combining mark): if that puts a word boundary before ``c``, the current word has ended.
    A word also ends at the size cap (``max_word_bytes``), and at the end of the stream (``flush``).

    The end of a word is therefore known only once the first complete character of the next word exists:
    ``push`` returns the words that ended *before* the character that the pushed byte completed. That
    character may have started some bytes earlier; those bytes are already the start of ``current``, the
    unfinished next word. So after a push that returns words, the boundary lies ``len(self.current)`` bytes
    before the end of the stream pushed so far (0 bytes for ASCII).

    Feeding a text byte by byte and then calling ``flush`` reproduces ``split_words(text)`` exactly (also
    with the size cap and invalid UTF-8), except where the reference rule itself is not causal, i.e. splits a
    prefix of the text differently from the whole text. Two such cases exist: U+2044 FRACTION SLASH, the only
    UAX #29 separator that is not punctuation (``"1\u20442"`` is one word, ``"1\u2044"`` two), and a
    whitespace character other than U+0020 that carries a combining mark right after a single space
    (``" \t\u0301"`` is one word, ``" \t"`` two). Real text is not affected (``tests/test_words.py`` checks
    the embedded corpora byte by byte).
    """

    def __init__(self, max_word_bytes: int | None = DEFAULT_MAX_WORD_BYTES) -> None:
        _check_cap(max_word_bytes)
        self.max_word_bytes = max_word_bytes
        self.reset()

    def reset(self) -> None:
        """Forget the stream (start of a new document)."""
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._context = b""  # the stream's last bytes before the current HAT word
        self._word = bytearray()  # the current HAT word before the size cap (complete characters only)
        self._emitted = 0  # bytes of _word already returned as capped pieces
        self._trimmed = False  # _word lost its already returned front (a very long word)
        self._pending = b""  # bytes of an incomplete UTF-8 character

    @property
    def current(self) -> bytes:
        """Bytes pushed so far that belong to no finished word (the unfinished word, pending bytes included)."""
        return bytes(self._word[self._emitted :]) + self._pending

    def push(self, byte: int) -> list[bytes]:
        """Add one byte (0-255); return the words that ended before the character it completes (usually 0 or 1)."""
        out = self._add_chars(self._decoder.decode(bytes((byte,))))
        self._pending = self._decoder.getstate()[0]
        return out

    def push_bytes(self, data: bytes) -> list[bytes]:
        """Push several bytes; return all words they finished."""
        out: list[bytes] = []
        for b in data:
            out.extend(self.push(b))
        return out

    def flush(self) -> list[bytes]:
        """End of stream: an incomplete character becomes invalid bytes, and the last word ends. Resets."""
        out = self._add_chars(self._decoder.decode(b"", final=True))
        if len(self._word) > self._emitted:
            out.append(bytes(self._word[self._emitted :]))
        self.reset()
        return out

    def _add_chars(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        for ch in text:
            self._add_char(ch.encode("utf-8", "surrogateescape"), out)
        return out

    def _add_char(self, char: bytes, out: list[bytes]) -> None:
        word = self._word
        if word and self._starts_new_word(char):
            if len(word) > self._emitted:
                out.append(bytes(word[self._emitted :]))
            context = self._context + bytes(word[-_ONLINE_CONTEXT:])
            context = context[-_ONLINE_CONTEXT:]
            while context and 0x80 <= context[0] < 0xC0:  # start it at a character
                context = context[1:]
            self._context = context
            word.clear()
            self._emitted, self._trimmed = 0, False
        cap = self.max_word_bytes
        if cap is not None and len(word) - self._emitted + len(char) > cap:
            if len(word) > self._emitted:
                out.append(bytes(word[self._emitted :]))
            rest = char
            while len(rest) > cap:  # a character longer than the cap is cut (cap < 4 only)
                out.append(rest[:cap])
                rest = rest[cap:]
            word += char
            self._emitted = len(word) - len(rest)
            if self._emitted > 2 * _ONLINE_WINDOW:  # keep a capped long word from growing without end
                drop = min(self._emitted, len(word) - _ONLINE_WINDOW)
                del word[:drop]
                self._emitted -= drop
                self._trimmed = True
            return
        word += char

    def _starts_new_word(self, char: bytes) -> bool:
        """Whether re-splitting the current word + ``char`` (no size cap) puts a word boundary before ``char``.

        When the word starts with an ignorable character (Extend, Format, ZWJ), the bytes before it go along
        as context: whether that character is glued to what precedes it (WB4), and so which characters the
        later rules see, depends on them. Nothing else in the rules looks back past a word start (a word
        never starts inside a pair of regional indicators).
        """
        word = self._word
        if self._trimmed or len(word) > _ONLINE_WINDOW:
            key = bytes(word[-_ONLINE_WINDOW:]) + char
        elif _starts_with_ignorable(word):
            key = self._context + word + char
        else:
            key = bytes(word) + char
        hit = _MEMO.get(key)
        if hit is None:
            hit = _starts_word_at_last_char(key.decode("utf-8", "surrogateescape"))
            if len(_MEMO) >= _MEMO_LIMIT:
                _MEMO.clear()
            _MEMO[key] = hit
        return hit


def _starts_with_ignorable(word: bytes | bytearray) -> bool:
    return bool(_tables().props[ord(bytes(word[:4]).decode("utf-8", "surrogateescape")[0])] & _F_IGN)


def _starts_word_at_last_char(text: str) -> bool:
    """Whether a word starts at the last character of ``text`` (no size cap), as ``_word_starts`` says.

    Text without ignorables, regional indicators or U+202F (the fast path) needs only the last four characters
    and the fast path's tables, read here one entry at a time instead of through numpy (~50x less overhead).
    """
    tables = _tables()
    dense = tables.dense_bytes
    classes = [dense[ord(ch)] for ch in text]
    if len(classes) < 2:
        return False
    k = tables.n_fast
    if max(classes) >= k:
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        starts = _word_starts(cp)
        return len(starts) > 0 and int(starts[-1]) == len(cp) - 1
    a, b, c, d = ([tables.sentinel, tables.sentinel] + classes[-3:])[-4:]  # chars t-3 .. t, t = last
    prev = tables.quad_bytes[((a * k + b) * k + c) * k + d]  # bits of char t-1 (t+1 is past the end)
    last = tables.quad_bytes[((b * k + c) * k + d) * k + tables.sentinel]
    return bool(tables.final[(prev << 3) | last])


def split_online(
    data: bytes | str | Iterable[int], max_word_bytes: int | None = DEFAULT_MAX_WORD_BYTES
) -> list[bytes]:
    """Split by feeding ``data`` byte by byte to an ``OnlineWordSplitter`` (for tests and demos)."""
    raw = _to_bytes(data) if isinstance(data, str | bytes | bytearray | memoryview) else bytes(data)
    splitter = OnlineWordSplitter(max_word_bytes)
    return splitter.push_bytes(raw) + splitter.flush()
