"""KV-cached generation: cached logits == full forward, greedy cached == uncached, sampling constraints,
stop bytes, streaming, seeds. Flat and hierarchical models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_model
from torch import nn

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from bytelm.models import ModelOutput
from bytelm.models.generate import generate, iter_generate, sample_next, stream
from bytelm.models.hierarchical import split_word_starts

pytestmark = pytest.mark.usefixtures("one_thread")


MODELS: dict[str, dict[str, Any]] = {
    "flat": dict(arch="flat"),
    "hier_query": dict(arch="hierarchical", pooling="query", encoder_window=24),
    "hier_last_all": dict(arch="hierarchical", pooling="last", decoder_cross="all"),
    "hier_cap8": dict(arch="hierarchical", max_word_bytes=8),  # many size-cap cuts
}

PROMPT = "Hi wörld, 中文字 «q» don't  stop\n".encode()
MULTI = (
    "The quick brown fox — «naïve café» 中文字符串 日本語のテキスト "
    "カタカナ 🙂👍🏽 x=1+2; HTTPServer camelCase\n"
    "\tsupercalifragilisticexpialidocious" * 2 + "a" * 130 + " 3.14 $5 (hello) "
).encode() + b"\xff\xfe bad \xe4\xb8 trunc \xc3"


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_logits_match_full_forward(name: str) -> None:
    """Sample ~300 bytes (crossing many words) with the cache; the logits each byte was sampled from equal a
    full forward over prompt + output (offline word split) to 1e-4."""
    m = tiny_model(**MODELS[name]).eval()
    prompt = list(PROMPT)
    n = 300 if name in ("flat", "hier_query") else 200
    steps = list(iter_generate(m, prompt, max_new_bytes=n, seed=3, min_new_bytes=n, top_k=64))
    gen = [b for b, _ in steps]
    assert len(gen) == n
    cached = torch.stack([lg for _, lg in steps])  # (n, V)
    full = m(torch.tensor([prompt + gen])).logits[0, len(prompt) - 1 : -1]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    if name != "flat":
        assert split_word_starts(prompt + gen)[len(prompt) :].sum() >= 20  # crossed many words


@pytest.mark.parametrize(
    ("name", "chunk"), [("hier_query", 1), ("hier_cap8", 1), ("hier_last_all", 7), ("flat", 7)]
)
def test_teacher_forced_cache(name: str, chunk: int) -> None:
    """Multilingual text (CJK one word per character, emoji, a word longer than the cap, invalid UTF-8) fed
    through the cache in chunks equals the full forward."""
    m = tiny_model(**MODELS[name]).eval()
    ids = [BOS_ID, *MULTI]
    full = m(torch.tensor([ids])).logits[0]
    cache = m.new_cache()  # type: ignore[operator]
    outs = [m(torch.tensor([ids[i : i + chunk]]), cache=cache).logits[0] for i in range(0, len(ids), chunk)]
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["flat", "hier_query"])
def test_greedy_cached_equals_uncached(name: str) -> None:
    m = tiny_model(**MODELS[name]).eval()
    a = generate(m, PROMPT, max_new_bytes=60, temperature=0, use_cache=True)
    b = generate(m, PROMPT, max_new_bytes=60, temperature=0, use_cache=False)
    assert a == b and len(a) > 0


def test_sampling_only_allowed_ids() -> None:
    logits = torch.zeros(320)
    logits[PAD_ID] = logits[BOS_ID] = 50.0
    logits[VOCAB_SIZE:] = 50.0
    logits[10:20] = torch.arange(10, dtype=torch.float) / 2  # 19 best, then 18, ...
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, temperature=1.5, generator=g) for _ in range(400)}
    assert seen and all(0 <= i < 256 or i == EOS_ID for i in seen)
    assert not seen & {PAD_ID, BOS_ID}
    top3 = {sample_next(logits, temperature=1.0, top_k=3, generator=g) for _ in range(200)}
    assert top3 == {17, 18, 19}
    nucleus = {sample_next(logits, temperature=1.0, top_p=1e-3, generator=g) for _ in range(50)}
    assert nucleus == {19}
    both = {sample_next(logits, temperature=2.0, top_k=5, top_p=0.5, generator=g) for _ in range(200)}
    assert both <= {15, 16, 17, 18, 19} and 19 in both
    assert sample_next(logits, temperature=0) == 19
    logits[EOS_ID] = 40.0
    assert sample_next(logits, temperature=0) == EOS_ID
    assert sample_next(logits, temperature=0, allow_eos=False) == 19


class ScriptLM(nn.Module):
    """Deterministic stand-in: always predicts the next id of a fixed script (then EOS)."""

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.script = script
        self.dummy = nn.Parameter(torch.zeros(1))

    def new_cache(self) -> list[int]:
        return [0]

    def forward(self, ids: torch.Tensor, *, cache: list[int] | None = None, **_: object) -> ModelOutput:
        n = ids.shape[1]
        start = cache[0] if cache is not None else 0
        if cache is not None:
            cache[0] += n
        logits = torch.zeros(1, n, 320)
        for j in range(n):
            p = start + j - (self.prompt_len - 1)  # index into the script predicted at this position
            logits[0, j, self.script[p] if 0 <= p < len(self.script) else EOS_ID] = 10.0
        return ModelOutput(logits=logits)

    prompt_len = 1


def test_stop_bytes_eos_and_streaming() -> None:
    text = "héllo 中文 🙂 end\nmore".encode() + b"\xff!"
    m = ScriptLM(list(text))
    m.prompt_len = 2
    for cache in (True, False):
        assert generate(m, b"ab", max_new_bytes=100, temperature=0, use_cache=cache) == text  # then EOS
        assert generate(m, b"ab", max_new_bytes=5, temperature=0, use_cache=cache) == text[:5]
        assert (
            generate(m, b"ab", temperature=0, stop_bytes=b"\n", use_cache=cache)
            == text[: text.index(b"\n") + 1]
        )
        assert (
            generate(m, b"ab", temperature=0, stop_bytes="文".encode(), use_cache=cache)
            == "héllo 中文".encode()
        )
    pieces = list(stream(m, b"ab", max_new_bytes=100, temperature=0))
    assert "".join(pieces) == text.decode("utf-8", errors="replace")
    assert "中" in pieces and "🙂" in pieces and "é" in pieces  # whole characters, never split
    for p in pieces:
        p.encode("utf-8")  # valid UTF-8 (no lone surrogates)


@pytest.mark.parametrize("name", ["flat", "hier_query"])
def test_seed_makes_sampling_deterministic(name: str) -> None:
    m = tiny_model(**MODELS[name]).eval()
    a = generate(m, PROMPT, max_new_bytes=40, temperature=1.0, seed=7, min_new_bytes=40)
    b = generate(m, PROMPT, max_new_bytes=40, temperature=1.0, seed=7, min_new_bytes=40)
    c = generate(m, PROMPT, max_new_bytes=40, temperature=1.0, seed=8, min_new_bytes=40)
    assert a == b and a != c
    s = "".join(stream(m, PROMPT, max_new_bytes=40, temperature=1.0, seed=7, min_new_bytes=40))
    assert s == a.decode("utf-8", errors="replace")


def test_empty_prompt_and_training_flag_restored() -> None:
    m = tiny_model(**MODELS["hier_query"])
    out = generate(m, b"", max_new_bytes=10, temperature=0)
    assert isinstance(out, bytes)
    assert m.training
