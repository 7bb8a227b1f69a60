"""Online word splitting for generation: one byte at a time, the same words as ``bytelm.data.words``.

HAT decides words while generating: bytes wait until they complete a UTF-8 character, then the current word
plus the new character is re-split with the offline splitter; a boundary before the character ends the word.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

import numpy as np

from bytelm.data.word_tables import _F_IGN, _tables
from bytelm.data.words import DEFAULT_MAX_WORD_BYTES, _check_cap, _to_bytes, _word_starts

__all__ = ["OnlineWordSplitter", "split_online"]

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
    (``" \t\u0301"`` is one word, ``" \t"`` two). Real text is not affected (``tests/data/test_words.py``
    checks the embedded corpora byte by byte).
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
        """Bytes pushed so far that belong to no finished word (the unfinished word, pending bytes
        included)."""
        return bytes(self._word[self._emitted :]) + self._pending

    def push(self, byte: int) -> list[bytes]:
        """Add one byte (0-255); return the words that ended before the character it completes (usually 0 or
        1)."""
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
        """Whether re-splitting the current word + ``char`` (no size cap) puts a word boundary before
        ``char``.

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
