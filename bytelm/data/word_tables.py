"""Character classes and look-up tables of the word splitter (``bytelm.data.words``).

Every code point gets a UAX #29 class, a "raw" class and a few flags (built once, ~0.5 s, from the ``regex``
module's Unicode 16 database); the rule tables turn neighbouring classes into "a word starts here" bits.
"""

from __future__ import annotations

import numpy as np
import regex

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
    """HAT's grouping in the fast path, from ``quad`` of chars t-1 and t (3 bits each): 1 = a word starts at
    t.

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
