"""Token-end labels from the real SmolLM2 tokenizer, checked against an independent computation: the tokens'
vocabulary bytes concatenate to the text and the ends are their cumulative lengths (invalid UTF-8: each bad
byte is one U+FFFD, whose token end lands on that byte)."""

from __future__ import annotations

import numpy as np
import pytest

from bytelm.distill.token_ends import token_end_mask, token_end_masks, token_ends_from_spans
from bytelm.distill.tokens import token_bytes_table

TEXTS = {
    "english": (
        b"To be, or not to be, that is the question:\n"
        b"Whether 'tis nobler in the mind to suffer 1599 slings.\n"
    ),
    "chinese": (
        "\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff0c\u6211\u4eec\u53bb\u516c\u56ed\u6563\u6b65\u5427\u3002"
    ).encode(),
    "russian": (
        "\u041f\u0440\u0438\u0432\u0435\u0442, \u043a\u0430\u043a \u0434\u0435\u043b\u0430? "
        "\u0412\u0441\u0451 \u0445\u043e\u0440\u043e\u0448\u043e."
    ).encode(),
    "python": b'def f(x: int) -> int:\n    """Square."""\n    return x ** 2  # ok\n\n\nclass A:\n\tpass\n',
    "mixed": (
        "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35 \U0001f600 \u3053\u3093\u306b\u3061\u306f <|endoftext|> ok"
    ).encode(),
}
INVALID = b"caf\xc3\xa9 \xff\xfe ok\xe4\xb8 \xed\xa0\xbd end \x80\n\xc3"


@pytest.fixture(scope="module")
def tok():
    from bytelm.distill.teacher import load_tokenizer, smollm2_gguf_path

    return load_tokenizer(smollm2_gguf_path())


@pytest.fixture(scope="module")
def table(tok):
    return token_bytes_table(tok)


def ids_of(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def cumulative_ends(pieces: list[bytes], n: int) -> np.ndarray:
    want = np.zeros(n, dtype=bool)
    want[np.cumsum([len(p) for p in pieces]) - 1] = True
    return want


@pytest.mark.parametrize("name", list(TEXTS))
def test_ends_are_the_cumulative_token_lengths(tok, table, name):
    data = TEXTS[name]
    pieces = [table[i] for i in ids_of(tok, data.decode())]
    assert all(p for p in pieces) and b"".join(pieces) == data  # lossless: the labels can be trusted
    got = token_end_mask(tok, data)
    assert got.dtype == bool and got.shape == (len(data),)
    np.testing.assert_array_equal(got, cumulative_ends(pieces, len(data)))
    assert got[-1] and got.sum() == len(pieces)


def test_multibyte_scripts_have_ends_inside_characters(tok):
    """Byte-level BPE cuts Thai/CJK characters into pieces: the labels mark those inner bytes."""
    data = TEXTS["mixed"]
    char_ends = np.cumsum([len(c.encode()) for c in data.decode()]) - 1
    inner = np.setdiff1d(np.flatnonzero(token_end_mask(tok, data)), char_ends)
    assert len(inner) >= 3


def _as_replaced(data: bytes) -> tuple[bytes, list[int]]:
    """``data`` with each byte that starts no valid character as U+FFFD, and the source byte of every output
    byte (written without bytelm's helpers: try 1..4-byte strict decodes)."""
    out, src, i = bytearray(), [], 0
    while i < len(data):
        for k in (1, 2, 3, 4):
            try:
                ch = data[i : i + k].decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(ch) == 1:
                break
        else:
            ch, k = "\ufffd", 1
        enc = ch.encode()
        out += enc
        src += [i + k - 1] * len(enc)
        i += k
    return bytes(out), src


def test_invalid_utf8_as_replacement_characters(tok, table):
    replaced, src = _as_replaced(INVALID)
    assert replaced.count("\ufffd".encode()) == 9
    pieces = [table[i] for i in ids_of(tok, replaced.decode())]
    assert b"".join(pieces) == replaced
    ends = np.cumsum([len(p) for p in pieces]) - 1  # in the replaced bytes
    want = np.zeros(len(INVALID), dtype=bool)
    want[[src[e] for e in ends]] = True
    np.testing.assert_array_equal(token_end_mask(tok, INVALID), want)


def test_batched_equals_one_by_one_and_empty_input(tok):
    texts = [*TEXTS.values(), INVALID, b"", b"x"]
    got = token_end_masks(tok, texts, batch_size=3)
    assert len(got) == len(texts)
    for t, m in zip(texts, got, strict=True):
        np.testing.assert_array_equal(m, token_end_mask(tok, t))
    assert token_end_mask(tok, b"").shape == (0,)


def test_ends_from_spans_skips_empty_spans():
    spans = np.array([[0, 2], [2, 2], [2, 5], [5, 6]])
    np.testing.assert_array_equal(token_ends_from_spans(spans, 7), [0, 1, 0, 0, 1, 1, 0])
