"""``ByteScorer(packing="documents")`` (bytelm.data.packed.DocumentRows, docs/eval.md): rows start at
text starts, every byte is scored once, no text shorter than a row is cut, a long text is read in the windows
a subword teacher reads; so a document-masked model's corpus NLL is the sum of its texts' NLLs in any order,
which the default tiling (cuts wherever a row ends) does not give."""

from __future__ import annotations

import random

import pytest
from conftest import tiny_model

from bytelm.data.bytes import BOS_ID, EOS_ID, text_chunks
from bytelm.data.packed import IGNORE, DocumentRows
from bytelm.data.shakespeare import Document
from bytelm.errors import OptionError
from bytelm.eval.scoring import ByteScorer

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 64


def texts(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = [bytes(rng.choice(b"abc de\n") for _ in range(rng.randint(1, 50))) for _ in range(9)]
    out.insert(3, b"x" * 150)  # longer than a row: tiled from its own start
    return out


def test_document_rows_read_each_text_in_the_teachers_windows():
    """Every row starts with a BOS; the texts between BOS and EOS are, in order, the windows a subword
    teacher reads (``text_chunks`` of ``seq_len - 1`` bytes at character boundaries); every byte is scored
    once."""
    data = texts(0)
    data.append("é".encode() * 40)  # 80 bytes: its window ends before a split character
    rows = DocumentRows([Document(f"t{i}", t) for i, t in enumerate(data)], SEQ)
    scored, read = 0, []
    for k in range(len(rows)):
        ids, tgt = rows[k]["input_ids"].tolist(), rows[k]["targets"]
        assert len(ids) == SEQ and ids[0] == BOS_ID
        scored += int(((tgt != IGNORE) & (tgt < 256)).sum())
        cur: list[int] = []
        for i in [*ids, EOS_ID]:
            if i >= 256:
                if cur:
                    read.append(bytes(cur))
                cur = []
            else:
                cur.append(i)
    assert scored == sum(len(t) for t in data)
    assert read == [c for t in data for c in text_chunks(t, SEQ - 1)]
    assert [len(c) for c in text_chunks(b"x" * 150, SEQ - 1)] == [63, 63, 24]
    assert text_chunks("é".encode() * 40, SEQ - 1)[0] == "é".encode() * 31  # 62 bytes: no split character


@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
def test_document_packing_makes_corpus_nll_a_sum_over_texts(kind):
    model = tiny_model(kind, max_seq_len=256, max_word_bytes=8, init_std=0.5).eval()
    words = kind == "hierarchical"
    data = texts(1)
    docs_sc = ByteScorer(model, arch=kind, seq_len=SEQ, words=words, max_word_bytes=8, packing="documents")
    tile_sc = ByteScorer(model, arch=kind, seq_len=SEQ, words=words, max_word_bytes=8)
    whole = docs_sc.corpus_nll(data)
    alone = [docs_sc.corpus_nll([t]) for t in data]
    assert whole.n_bytes == sum(a.n_bytes for a in alone) == sum(len(t) for t in data)
    assert whole.nll == pytest.approx(sum(a.nll for a in alone), rel=1e-5)
    shuffled = docs_sc.corpus_nll(data[::-1])
    assert shuffled.nll == pytest.approx(whole.nll, rel=1e-5)
    tiled = tile_sc.corpus_nll(data)  # same bytes, but texts cut where 64-id rows happen to end
    assert tiled.n_bytes == whole.n_bytes
    assert abs(tiled.nll - whole.nll) > 1e-3 * whole.nll


def test_bad_packing_is_named():
    model = tiny_model("flat").eval()
    with pytest.raises(OptionError, match="'rows'"):
        ByteScorer(model, packing="rows")
    with pytest.raises(OptionError, match="max_ids"):
        ByteScorer(model, seq_len=SEQ, packing="documents").corpus_nll([b"abc"], max_ids=10)
