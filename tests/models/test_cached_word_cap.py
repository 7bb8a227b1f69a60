"""Cached decoding at the word size cap: words that reach ``max_word_bytes`` while a multi-byte UTF-8
character is still incomplete. The cached path splits complete characters only
(docs/design.md#word-splitting), so the cap never cuts inside a character that the full forward keeps whole;
cached logits equal the full forward's, in bytelm and through ``transformers`` on an exported folder (whose
model code is a copy of bytelm's)."""

from __future__ import annotations

import random
import sys

import pytest
import torch
from conftest import tiny_model

from bytelm.models.hierarchical import pending_utf8, split_word_starts

pytestmark = pytest.mark.usefixtures("one_thread")

# characters that join a word of Latin letters (2-, 3- and 4-byte letters) and ones that do not (CJK, emoji)
JOINING = ["é", "ب", "ж", "ṡ", "ꝏ", "𝐀", "𐐀"]
SEPARATE = ["中", "文", "😀", "€", "ヅ"]
ALPHA = "abcdefghijklmnopqrstuvwxyz"


SMALL = dict(n_layers=1, d_byte=16, encoder_layers=1)  # on conftest's TINY


def capped_text(rng: random.Random, cap: int, n_words: int = 5) -> bytes:
    """Words of ASCII letters at, just below and just over the cap, each followed by a 2-4 byte character."""
    parts: list[str] = []
    for _ in range(n_words):
        n = max(1, cap + rng.choice([-3, -2, -1, 0, 1]))
        parts.append("".join(rng.choice(ALPHA) for _ in range(n)))
        parts.append(rng.choice(JOINING + SEPARATE) * rng.choice([1, 1, 2]))
        parts.append(rng.choice(["", " ", "", "x"]))
    return "".join(parts).encode()


def cached_logits(m: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    cache = m.new_cache()  # type: ignore[operator]
    with torch.no_grad():
        return torch.cat([m(torch.tensor([[i]]), cache=cache).logits[0] for i in ids])


def test_pending_utf8() -> None:
    assert pending_utf8([]) == 0 and pending_utf8(list(b"ab")) == 0
    for ch in ("é", "中", "😀"):
        b = list(ch.encode())
        assert [pending_utf8(b[:k]) for k in range(1, len(b) + 1)] == [*range(1, len(b)), 0]
    assert pending_utf8(list(b"a\xe4\xb8")) == 2
    assert pending_utf8(list(b"\xe0\x80")) == 0  # invalid already: its bytes are final
    assert pending_utf8([0xE4, 257]) == 0 and pending_utf8([257, 0xE4]) == 1


def test_issue_example_99_byte_word_then_cjk() -> None:
    """The shipped cap of 100: a 99-byte word followed by a 3-byte character."""
    m = tiny_model("hierarchical", seed=100, **SMALL, max_word_bytes=100, chunker="words").eval()
    ids = list(b"a" * 99 + "中".encode() + b" xy")
    full = m(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(cached_logits(m, ids), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunker", ["words", "gate"])
def test_cached_equals_full_forward_at_the_cap(chunker: str) -> None:
    rng = random.Random(1234 if chunker == "words" else 4321)
    for case in range(8):
        cap = rng.choice([2, 3, 4, 5, 6, 7, 9, 12])
        m = tiny_model("hierarchical", seed=cap, **SMALL, max_word_bytes=cap, chunker=chunker).eval()
        text = capped_text(rng, cap)
        ids = list(text)
        full = m(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(
            cached_logits(m, ids),
            full,
            atol=1e-4,
            rtol=0,
            msg=lambda s, c=cap, t=text: f"cap {c}, text {t!r}: {s}",
        )
        if chunker == "words" and cap >= 4:  # the full forward's cap cuts at character boundaries
            starts = split_word_starts(ids, cap)
            assert not any(starts[i] and 0x80 <= ids[i] < 0xC0 for i in range(len(ids))), (case, text)


def test_exported_model_cached_equals_full_forward_at_the_cap(tmp_path) -> None:
    """The exported folder through ``transformers``: byte-by-byte cached forward = full forward."""
    from transformers import AutoModelForCausalLM

    from bytelm.hf.export import export_model

    rng = random.Random(7)
    for chunker, cap in (("words", 5), ("gate", 4)):
        m = tiny_model("hierarchical", seed=cap, **SMALL, max_word_bytes=cap, chunker=chunker).eval()
        folder = export_model(m, m.cfg, tmp_path / chunker)  # type: ignore[arg-type]
        hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
        cache_cls = sys.modules[type(hf).__module__].BytelmCache
        ids = list(
            "abcd中 wxyzé".encode() + capped_text(rng, cap, n_words=4)
        )  # a (cap-1)-byte word + a character
        with torch.no_grad():
            full = hf(torch.tensor([ids]), use_cache=False).logits[0]
            cache = cache_cls()
            steps = [hf(torch.tensor([[i]]), cache=cache, use_cache=True).logits[0] for i in ids]
        torch.testing.assert_close(torch.cat(steps), full, atol=1e-4, rtol=0)
        torch.testing.assert_close(full, m(torch.tensor([ids])).logits[0].detach(), atol=1e-5, rtol=0)
