"""Every evaluation metric against a value computed by hand on a tiny example with fake models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bytelm.data.bytes import PADDED_VOCAB, utf8_cut
from bytelm.eval.bpb import take_bytes
from bytelm.eval.cute import Item, score_items
from bytelm.eval.scoring import ByteScorer, TeacherScorer
from bytelm.models.config import ModelOutput

LN3, LN2 = math.log(3.0), math.log(2.0)


class NextByteModel(nn.Module):
    """Logit ``ln 2`` on ``(input + 1) % 256``, 0 elsewhere (320 columns): p(hit) = 2/321, p(miss) = 1/321.
    With ``prefix_lm`` it returns only the logits from ``prefix_len - 1`` on, like MrT5."""

    def __init__(self, prefix_lm: bool = False, metrics: dict | None = None) -> None:
        super().__init__()
        self.prefix_lm, self.metrics = prefix_lm, metrics or {}

    def forward(self, ids, targets=None, prefix_len=None, **_):
        B, T = ids.shape
        logits = torch.zeros(B, T, PADDED_VOCAB)
        logits.scatter_(-1, ((ids + 1) % 256).unsqueeze(-1), LN2)
        if self.prefix_lm:
            s = prefix_len if prefix_len is not None else T // 2
            logits = logits[:, s - 1 :]
        return ModelOutput(logits=logits, metrics=dict(self.metrics))


class FavourA(nn.Module):
    """Logit ``ln 3`` on byte ``a`` everywhere: p(a) = 3/322, p(other) = 1/322."""

    def forward(self, ids, **_):
        logits = torch.zeros(*ids.shape, PADDED_VOCAB)
        logits[..., ord("a")] = LN3
        return ModelOutput(logits=logits)


def test_corpus_bpb_hand_computed():
    # "abcd": targets a b c d EOS; 'a' follows BOS (a miss), b c d are hits; EOS is not a byte
    s = ByteScorer(NextByteModel(), seq_len=16)
    r = s.corpus_nll([b"abcd"])
    assert r.n_bytes == 4
    assert r.nll == pytest.approx(4 * math.log(321) - 3 * LN2, rel=1e-6)
    assert r.bpb == pytest.approx((4 * math.log2(321) - 3) / 4, rel=1e-6)
    assert r.bytes_per_s > 0


def test_corpus_bpb_uniform_over_tiles_and_documents():
    # zero logits: every byte costs ln(320), whatever the tiling; two documents, rows shorter than the text
    class Zero(nn.Module):
        def forward(self, ids, **_):
            return ModelOutput(logits=torch.zeros(*ids.shape, PADDED_VOCAB))

    texts = [b"hello world, " * 5, b"\xe4\xbd\xa0\xe5\xa5\xbd"]
    r = ByteScorer(Zero(), seq_len=7, batch_size=3).corpus_nll(texts)
    assert r.n_bytes == sum(len(t) for t in texts)
    assert r.bpb == pytest.approx(math.log2(PADDED_VOCAB), rel=1e-6)


def test_prefix_lm_scores_only_its_continuation_part():
    # rows of 8 inputs, prefix 4: the decoder scores targets 3..7 of each row (5 of the 8)
    s = ByteScorer(NextByteModel(prefix_lm=True), arch="mrt5", seq_len=8)
    r = s.corpus_nll([b"abcdefghijklmno"])  # 17 ids: BOS + 15 bytes + EOS -> rows [0:8], [8:16]
    assert r.n_bytes == 5 + 4  # second row: its last target is EOS, not a byte
    assert r.nll == pytest.approx(9 * math.log(321) - 9 * LN2, rel=1e-6)  # every scored byte is a hit


def test_model_metrics_are_byte_weighted_means():
    s = ByteScorer(NextByteModel(metrics={"bytes_per_word": torch.tensor(4.0), "kept_ratio": 0.5}), seq_len=4)
    r = s.corpus_nll([b"abcdefghij"])
    assert r.metrics["bytes_per_word"] == pytest.approx(4.0)
    assert r.metrics["kept_ratio"] == pytest.approx(0.5)


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_continuation_logprobs_hand_computed(prefix_lm):
    s = ByteScorer(FavourA(), seq_len=32)
    lp = s.continuation_logprobs(b"xy", [b"aa", b"ab", b"b"])
    hit, miss = math.log(3 / 322), math.log(1 / 322)
    assert lp == pytest.approx([2 * hit, hit + miss, miss], rel=1e-6)
    # a prefix-LM (MrT5) gets the context as its prefix and scores the same continuation bytes
    model = NextByteModel(prefix_lm=prefix_lm)
    lp2 = ByteScorer(model, arch="mrt5" if prefix_lm else "flat", seq_len=32).continuation_logprobs(
        b"ab", [b"cd", b"cx"]
    )
    h, m = math.log(2 / 321), math.log(1 / 321)
    assert lp2 == pytest.approx([2 * h, h + m], rel=1e-6)


def test_continuation_context_is_cut_from_the_left():
    s = ByteScorer(FavourA(), seq_len=4)
    assert s.continuation_logprobs(b"x" * 50, [b"aa"]) == pytest.approx([2 * math.log(3 / 322)])


# ------------------------------------------------------------------------------------------- teacher
class _Enc(SimpleNamespace):
    pass


class FakeTeacher:
    """Tokens of 2 bytes, each with log-prob ln(1/2); characters are tokens for continuation scoring, and the
    model favours 'a' (logit ln 3 among 256 columns)."""

    start_id = pad_id = 0
    vocab_size = 256
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.tokenizer = lambda text, add_special_tokens=False: {"input_ids": [ord(c) for c in text]}
        self.model = self._model

    def __call__(self, chunks):
        self.seen.extend(chunks)
        L = 1 + max((len(c) + 1) // 2 for c in chunks)
        content = torch.zeros(len(chunks), L, dtype=torch.bool)
        for i, c in enumerate(chunks):
            content[i, 1 : 1 + (len(c) + 1) // 2] = True
        enc = _Enc(
            content_mask=content,
            attention_mask=content.clone(),
            n_covered=torch.tensor([len(c) for c in chunks]),
        )
        return SimpleNamespace(encoding=enc, token_logprobs=torch.full((len(chunks), L), -LN2))

    def _model(self, input_ids, attention_mask=None, use_cache=False):
        logits = torch.zeros(*input_ids.shape, 300)
        logits[..., ord("a")] = LN3
        return SimpleNamespace(logits=logits)


def test_teacher_bpb_is_token_nll_over_bytes():
    t = FakeTeacher()
    s = TeacherScorer(t, chunk_bytes=4)
    r = s.corpus_nll([b"abcdefgh", b"xy"])  # chunks abcd efgh xy: 2 + 2 + 1 tokens of ln 2 over 10 bytes
    assert t.seen == [b"abcd", b"efgh", b"xy"]
    assert r.n_bytes == 10
    assert r.bpb == pytest.approx(5 / 10)


def test_teacher_chunks_do_not_split_characters():
    t = FakeTeacher()
    TeacherScorer(t, chunk_bytes=4).corpus_nll(["aé€b".encode()])  # a(1) é(2) €(3) b(1)
    assert t.seen == ["aé".encode(), "€b".encode()]


def test_teacher_continuation_logprobs_hand_computed():
    s = TeacherScorer(FakeTeacher())
    lp = s.continuation_logprobs(b"q:", [b" a", b"aa"])
    hit, miss = math.log(3 / 258), math.log(1 / 258)
    assert lp == pytest.approx([miss + hit, 2 * hit], rel=1e-6)


# ------------------------------------------------------------------------------------------- helpers
def test_take_bytes_equal_shares_and_char_boundaries():
    texts = [b"a" * 100, b"b" * 10, "é".encode() * 50]
    got = take_bytes(
        texts, 61, min_share=1
    )  # shares of 20, 5, 1; the short text is taken whole; é is not cut
    assert [len(t) for t in got] == [26, 10, 24]
    assert got[2].decode("utf-8")  # still valid UTF-8
    assert take_bytes(texts, 0) == texts


def test_take_bytes_many_short_texts_are_taken_whole():
    """2,000 dialogs of ~100 bytes and a 5,000-byte budget: shares would be 2-byte fragments, so whole texts
    are taken, spread evenly over the list, in order; only the last one is cut."""
    texts = [f"dialog {i:04d}: ".encode() + b"x" * (80 + i % 40) for i in range(2000)]
    got = take_bytes(texts, 5000)
    assert sum(len(t) for t in got) == 5000
    whole = [t for t in got if t in texts]
    assert len(whole) == len(got) - 1 and got[-1] == texts[int(got[-1][7:11])][: len(got[-1])]
    idx = [int(t[7:11]) for t in got]
    assert idx == sorted(idx) and idx[0] == 0 and idx[-1] > 1900  # spread over the whole list, in order
    assert set(range(0, 2000, 45)) <= set(idx) and len(idx) <= 47  # a stride of 45, then a gap or two filled
    # few long texts keep the equal-share rule
    long_texts = [b"a" * 10_000, b"b" * 10_000]
    assert [len(t) for t in take_bytes(long_texts, 4000)] == [2000, 2000]
    assert utf8_cut("aé".encode(), 2) == 1 and utf8_cut(b"abc", 2) == 2


def test_cute_accuracy_hand_computed():
    class Oracle:
        """Prefers the longest candidate."""

        def continuation_logprobs(self, context, conts):
            return [float(len(c)) for c in conts]

    items = [
        Item("spell", "q", (" ab\n", " abc\n"), 1, "w"),
        Item("spell", "q", (" ab\n", " abc\n"), 0, "w"),
        Item("count", "q", (" 1\n", " 22\n", " 3\n", " 4\n"), 1, "w"),
    ]
    r = score_items(Oracle(), items)
    assert r["tasks"]["spell"]["acc"] == pytest.approx(0.5)
    assert r["tasks"]["spell"]["chance"] == pytest.approx(0.5)
    assert r["tasks"]["count"]["acc"] == pytest.approx(1.0)
    assert r["acc"] == pytest.approx(0.75)  # mean over tasks
    # per-byte scores are all 1.0: ties go to the first candidate
    assert r["tasks"]["spell"]["acc_norm"] == pytest.approx(0.5)


@pytest.mark.slow
def test_real_teacher_agrees_with_its_own_forward():
    """SmolLM2 through TeacherScorer: continuation log-probs equal the teacher's token log-probs of the same
    tokens, and its English bpb is far better than a byte model at init."""
    from bytelm.distill.teacher import load_teacher

    try:
        teacher = load_teacher(device="cpu", dtype=torch.float32)
    except Exception as e:  # pragma: no cover - offline machine without the wheel
        pytest.skip(f"teacher unavailable: {e}")
    s = TeacherScorer(teacher, chunk_bytes=256)
    ctx, cont = b"To be, or not to be,", b" that is the question"
    out = teacher([ctx + cont])
    spans, lp = out.encoding.spans[0], out.token_logprobs[0]
    in_cont = (spans[:, 0] >= len(ctx)) & out.encoding.content_mask[0]
    assert int(spans[in_cont][0, 0]) == len(ctx)  # the tokenization splits at the boundary here
    assert s.continuation_logprobs(ctx, [cont])[0] == pytest.approx(float(lp[in_cont].sum()), abs=1e-3)
    r = s.corpus_nll([b"HAMLET. To be, or not to be, that is the question: Whether 'tis nobler in the mind"])
    assert 0.3 < r.bpb < 3.0
