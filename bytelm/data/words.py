"""Split raw bytes into words with HAT's rule: exactly as the reference, much faster, never failing.

The hierarchical models pool bytes into one vector per *word*, so the splitter decides what the backbone
sees. The default rule is HAT's ("Hierarchical Autoregressive Transformers"), whose reference implementation
is the Rust package ``hat-splitter`` 0.1.10 (docs/design.md#word-splitting):

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

Files: the character classes and look-up tables are in ``word_tables.py``; online use (generation) is
``bytelm.data.words_online.OnlineWordSplitter``, which re-splits the current word plus each new character and
reports a word as finished when that yields a second word, at the size cap, or at the end of the stream.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

__all__ = ["DEFAULT_MAX_WORD_BYTES", "split_words", "word_ends"]

from bytelm.data.word_tables import (  # noqa: F401 - the tables' private names are this module's vocabulary
    _ESCAPE_HI,
    _ESCAPE_LO,
    _F_EXTPICT,
    _F_IGN,
    _F_NL,
    _F_WS,
    _F_ZWJ,
    _J_PUNCT,
    _J_SPACE,
    _J_WORD,
    _J_WS,
    _JOINED,
    _NCLS,
    _OTHER,
    _R_PUNCT,
    _RI,
    _final_table,
    _raw,
    _Tables,
    _tables,
)

DEFAULT_MAX_WORD_BYTES = 100  # what HAT's released models use

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
    # the reference appends a lone " " piece to a preceding
    # all-" " piece (a no-op after WB3d, kept for parity)
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
