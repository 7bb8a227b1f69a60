"""Packed corpus: specials, targets, bad input counted not crashing, deterministic windows, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID, decode, encode
from bytelm.data.packed import IGNORE, PackedCorpus, RandomWindows, ResumableSampler, TiledWindows
from bytelm.data.shakespeare import Document


def docs(*items: bytes) -> list[Document]:
    return [Document(f"d{i}", b) for i, b in enumerate(items)]


def test_encode_decode_roundtrip_and_invalid_utf8():
    s = "héllo 世界 🙂"
    assert decode(encode(s)) == s
    raw = b"ok\xff\xfe"
    assert bytes(encode(raw)) == raw
    assert encode("a", bos=True, eos=True) == [BOS_ID, 97, EOS_ID]


def test_bad_input_is_counted_not_fatal():
    c = PackedCorpus(docs(b"", b"valid", b"bad\xff\xc3", b"nul\x00ctl\x01", b""))
    assert c.stats.empty_skipped == 2
    assert c.stats.invalid_utf8_docs == 1
    assert c.stats.control_byte_docs == 1
    assert c.stats.documents == 3
    # raw invalid bytes are kept, nothing lost
    assert bytes(int(i) for i in c.ids if i < 256) == b"validbad\xff\xc3nul\x00ctl\x01"


def test_replace_mode_repairs_invalid_utf8():
    c = PackedCorpus(docs(b"bad\xff"), invalid_utf8="replace")
    assert bytes(int(i) for i in c.ids if i < 256) == "bad\ufffd".encode()
    with pytest.raises(ValueError, match="sometimes"):
        PackedCorpus(docs(b"x"), invalid_utf8="sometimes")


def test_all_empty_split_is_an_error():
    with pytest.raises(ValueError, match="no non-empty"):
        PackedCorpus(docs(b"", b""))


def test_row_targets_and_doc_ids():
    c = PackedCorpus(docs(b"ab", b"cd"))
    # ids: BOS a b EOS BOS c d EOS
    row = c.row(0, 7)
    assert row["input_ids"].tolist() == [BOS_ID, 97, 98, EOS_ID, BOS_ID, 99, 100]
    assert row["targets"].tolist() == [97, 98, EOS_ID, IGNORE, 99, 100, EOS_ID]
    assert row["doc_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    tail = c.row(5, 4)  # runs past the end: padded, padding never a target
    assert tail["input_ids"].tolist() == [99, 100, EOS_ID, PAD_ID]
    assert tail["targets"].tolist() == [100, EOS_ID, IGNORE, IGNORE]


def test_random_windows_are_a_function_of_seed_and_index():
    c = PackedCorpus(docs(bytes(range(200)) * 3))
    a, b = RandomWindows(c, 16, seed=1), RandomWindows(c, 16, seed=1)
    assert torch.equal(a[5]["input_ids"], b[5]["input_ids"])
    assert not torch.equal(a[5]["input_ids"], RandomWindows(c, 16, seed=2)[5]["input_ids"])


def test_tiled_windows_cover_each_byte_once():
    c = PackedCorpus(docs(b"x" * 100, b"y" * 50))
    t = TiledWindows(c, 16)
    n = sum(int((t[i]["targets"] >= 0).sum()) for i in range(len(t)))
    assert n == len(c) - 1 - 1  # every next-id prediction except EOS->BOS


def test_sampler_resume_and_rank_disjointness():
    full = list(ResumableSampler(0, 10))
    assert list(ResumableSampler(4, 10)) == full[4:]
    r0, r1 = list(ResumableSampler(0, 5, 0, 2)), list(ResumableSampler(0, 5, 1, 2))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == list(range(10))


def test_word_start_mask_marks_specials_and_words():
    pytest.importorskip("bytelm.data.words")
    c = PackedCorpus(docs(b"hello world"), words=True)
    ws = c.word_start
    assert ws is not None and ws[0] and ws[1] and ws[-1]
    text_ws = np.flatnonzero(ws[1:-1])
    assert list(text_ws) == [0, 5]  # "hello" | " world"


def test_mixture_windows_follow_the_weights_and_resume():
    from bytelm.data.packed import MixtureWindows

    a = RandomWindows(PackedCorpus(docs(b"a" * 500)), 8, seed=1)
    b = RandomWindows(PackedCorpus(docs(b"b" * 500)), 8, seed=2)
    mix = MixtureWindows([a, b], [0.9, 0.1], seed=3)
    rows = [mix[i]["input_ids"] for i in range(2000)]
    share_b = sum(int((r == ord("b")).any()) for r in rows) / len(rows)
    assert 0.07 < share_b < 0.13
    again = MixtureWindows([a, b], [0.9, 0.1], seed=3)
    assert all(torch.equal(again[i]["input_ids"], rows[i]) for i in (0, 17, 1999))  # a function of (seed, i)


def test_random_windows_over_shards_stay_inside_one_shard():
    parts = [PackedCorpus(docs(b"x" * 40)), PackedCorpus(docs(b"y" * 400))]
    w = RandomWindows(parts, 16, seed=0)
    rows = [w[i]["input_ids"] for i in range(300)]
    assert all(not ((r == ord("x")).any() and (r == ord("y")).any()) for r in rows)
    n_x = sum(int((r == ord("x")).any()) for r in rows)
    assert 0 < n_x < 60  # in proportion to each shard's windows (25 vs 385)


def test_grouped_tiles_label_rows():
    from bytelm.data.packed import GroupedTiles

    g = GroupedTiles(
        [TiledWindows(PackedCorpus(docs(b"a" * 30)), 8), TiledWindows(PackedCorpus(docs(b"b" * 9)), 8)]
    )
    labels = [int(g[i]["group"]) for i in range(len(g))]
    assert labels == [0] * 4 + [1] * 2
