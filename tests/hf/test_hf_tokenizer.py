"""Byte tokenizer of exported models: ids are the UTF-8 bytes, specials at 256/257/258, exact round trips."""

from __future__ import annotations

import pytest

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID, encode
from bytelm.hf.export import save_tokenizer, write_model_code
from bytelm.hf.tokenization_bytelm import ByteTokenizer, build_fast_tokenizer

TEXTS = [
    "hello world",
    "Grüße, 世界! こんにちは カタカナ 😀👋🏽 👨‍👩‍👧",
    "a  b\n\tc\r\n",
    "literal specials stay bytes: <s> </s> <pad>",
    "",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(out)
    write_model_code(out)  # tokenization_bytelm.py for trust_remote_code
    return out


@pytest.fixture(scope="module", params=["fast", "python"])
def tok(request):
    return build_fast_tokenizer() if request.param == "fast" else ByteTokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_bytes_and_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids == encode(text) == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_specials(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    ids = [BOS_ID, *b"hi", EOS_ID, PAD_ID]
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.decode(ids) == "<s>hi</s><pad>"


def test_invalid_utf8_decodes_to_replacement(tok):
    raw = b"caf\xe9 \xff\xfe ok \xe4\xb8"  # latin-1 byte, garbage, truncated CJK character
    assert tok.decode(list(raw)) == raw.decode("utf-8", errors="replace")


def test_split_character_decodes_whole(tok):
    ids = list("世界".encode())
    assert tok.decode(ids[:2]) + tok.decode(ids[2:]) != "世界"  # halves are not characters ...
    assert tok.decode(ids) == "世界"  # ... the whole sequence is


def test_left_padding_batch(tok):
    b = tok(["ab", "abcd"], padding=True)
    assert b["input_ids"] == [[PAD_ID, PAD_ID, 97, 98], [97, 98, 99, 100]]
    assert b["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_python_tokenizer_exact_invalid_utf8_round_trip():
    tok = ByteTokenizer()
    raw = b"caf\xe9 \xff\xfe ok \xe4\xb8"
    text = raw.decode("utf-8", errors="surrogateescape")  # raw bytes carried as lone surrogates
    ids = tok(text)["input_ids"]
    assert ids == list(raw) == tok.encode_bytes(raw)
    assert tok.decode(ids, errors="surrogateescape") == text
    assert tok.decode_bytes([BOS_ID, *ids, EOS_ID]) == raw
    assert tok.encode_bytes(raw, bos=True, eos=True) == [BOS_ID, *raw, EOS_ID]


def test_auto_tokenizer_loads_both(folder):
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(folder)  # no remote code: tokenizer.json
    slow = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # ByteTokenizer from the folder
    assert type(slow).__name__ == "ByteTokenizer"
    assert type(fast).__name__ != "ByteTokenizer"
    for t in (fast, slow):
        for text in TEXTS:
            assert t(text)["input_ids"] == list(text.encode())
            assert t.decode(t(text)["input_ids"]) == text
        assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
        assert t.padding_side == "left"
