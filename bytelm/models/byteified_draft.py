"""Generation of the byteified model with each patch drafted by its prior and verified in one pass.

A byte inside a patch costs the local stacks only (the backbone runs when a patch closes), and on a CPU that
cost is mostly per-call overhead: one position or eight through the two encoder and two decoder layers take
about the same time. The fused head's prior (``bytelm.models.byte_prior``) is a free draft model: from the
latest closed patch's prefix sums it gives, with no network at all, the source model's own next-byte
distribution inside the open patch. So greedy decoding runs in rounds:

1. the target symbol after everything fed so far comes from the cached logits (exact, as plain decoding);
2. if it continues its patch, the prior's greedy chain drafts the bytes after it and the byte it expects to
   end the patch (``draft_patch``);
3. the target byte and the drafted bytes that continue go through the cache in one call, every byte with the
   bit "continues", and the drafted end byte through the encoder only (``feed_open``); row i of the result
   is the model's prediction after byte i, so draft byte i + 1 is accepted while it is exactly the model's
   greedy symbol (byte *and* bit);
4. if the whole draft, end included, is accepted, the end byte closes the patch with its encoder state
   already computed (``close_with``: the backbone runs); at the first mismatch the cache is rewound to the
   accepted bytes (``rewind``: only local KV rows and the open patch's state change, since no patch closed
   inside the call) and the next round starts from the model's own symbol there.

The output is the model's greedy output (the verification compares against the same argmax that plain
decoding takes; chunked and single-position arithmetic may differ in the last float bit, which can only matter
at an exact tie). A round that accepts its whole draft costs one pass of the local stacks over the patch and
one backbone step, instead of one call per byte.

Sampling (``Sampling`` with a temperature) drafts by sampling the prior's chain under the same temperature and
filters, and verifies by speculative sampling: a drafted byte with draft probability q and model probability
p is kept with probability min(1, p / q), else replaced by a draw from the normalised max(0, p - q); the bit
is always the model's preferred bit for the byte. The bytes then follow exactly the model's distribution, but
are not those that one-byte-per-call sampling draws for the same seed. docs/byteify.md, "Speed".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bytelm.data.bytes import EOS_ID, VOCAB_SIZE
from bytelm.models.byteified import fused_marginal
from bytelm.models.byteified_cache import ByteifiedCache
from bytelm.models.generate import sample_symbol, sampling_probs

DEFAULT_MAX_DRAFT = 15  # draft bytes per round: longer than almost every source token


@dataclass(frozen=True)
class OpenMark:
    """What feeding bytes that all continue the open patch changes in a ``ByteifiedCache`` (``rewind``)."""

    length: int
    kv: tuple[int, ...]  # filled positions of the encoder's and the decoder's KV caches
    plen: int
    node: int
    n_words: int


def mark(cache: ByteifiedCache) -> OpenMark:
    return OpenMark(
        length=cache.length,
        kv=tuple(c.n for c in (*cache.enc, *cache.dec)),
        plen=cache.plen,
        node=cache.node,
        n_words=cache.n_words,
    )


def rewind(
    model: Any,
    cache: ByteifiedCache,
    at: OpenMark,
    keep: int,
    h: torch.Tensor,  # (1, n, d) encoder states of the bytes fed since ``at``
    logits: torch.Tensor,  # (n, 2V) their fused logits
) -> None:
    """Forget all but the first ``keep`` (>= 1) bytes fed since ``at``. Valid only when no patch closed in
    between (the backbone and the decoder's context are then untouched), which ``feed_open`` guarantees."""
    if cache.n_words != at.n_words:
        raise RuntimeError("rewind across a closed patch: the backbone cache cannot be rewound")
    if not 1 <= keep <= cache.length - at.length:
        raise ValueError(f"keep={keep} outside 1..{cache.length - at.length}")
    for c, n in zip((*cache.enc, *cache.dec), at.kv, strict=True):
        c.n = n + keep
    kept = cache.ids[at.length : at.length + keep]
    del cache.ids[at.length + keep :], cache.bits[at.length + keep :]
    node = at.node
    for b in kept:
        node = model.trie.open_step(node, b)
    cache.plen, cache.node = at.plen + keep, node
    cache.last_h, cache.last_logits = h[0, keep - 1], logits[keep - 1]


def feed_open(
    model: Any, cache: ByteifiedCache, data: list[int], then: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed bytes that all continue the open patch (none reaches the size cap); returns their encoder states
    (1, n, d) and fused logits (n, 2V). ``then``: also run the encoder (only) over one more byte, the one
    expected to close the patch: its state is the last row of the result (1, n + 1, d), ready for
    ``close_with``, and ``rewind`` drops it from the encoder's cache if it does not come."""
    cap = model.cfg.max_word_bytes or 0
    if any(b >= 256 for b in data) or (cap and cache.plen + len(data) >= cap):
        raise ValueError("feed_open takes bytes that continue the open patch below the size cap")
    if then is not None and not 0 <= then < 256:
        raise ValueError(f"then={then}: a byte (0..255) closes a patch here, not a special")
    dev = model.embed.weight.device
    p0 = cache.length
    both = data if then is None else [*data, then]
    h = model._encode_new(torch.tensor([both], device=dev), cache)
    logits = model._feed(cache, data, h[:, : len(data)], [False] * len(data), p0)[0]
    return h, logits


def close_with(model: Any, cache: ByteifiedCache, byte: int, h: torch.Tensor) -> torch.Tensor:
    """Feed ``byte`` as the end of the open patch, its encoder state ``h`` (1, 1, d) already computed and in
    the encoder's cache (``feed_open(..., then=byte)``): the patch goes through the backbone; returns the
    byte's fused logits (2V,)."""
    return model._feed(cache, [byte], h, [True], cache.length)[0, -1]


@dataclass(frozen=True)
class Sampling:
    """How symbols are picked (``sample_symbol``'s arguments): ``temperature <= 0`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def byte_probs(self, marginal: torch.Tensor, allow_eos: bool) -> torch.Tensor:
        """(VOCAB_SIZE,) the distribution ``sample_next`` samples from, given byte marginal logits."""
        return sampling_probs(
            marginal, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, allow_eos=allow_eos
        )

    def uniform(self) -> float:
        return float(torch.rand(1, generator=self.generator))

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


def draft_patch(
    model: Any, cache: ByteifiedCache, first: int, max_len: int, how: Sampling | None = None
) -> tuple[list[int], int | None, list[torch.Tensor]]:
    """The prior's bytes after ``first`` (a byte that continues the open patch), each one that it expects to
    continue the patch too, then the byte it expects to end the patch (None if the chain stopped first: at
    the size cap or after ``max_len`` bytes), and the distribution each drafted byte was drawn from (sampling
    only: (VOCAB_SIZE,) each). The prior reads the latest closed patch's prefix sums; no network runs. Greedy
    as ``sample_symbol`` is: the byte of highest marginal, then its more likely bit; sampling draws the byte
    from the prior's marginal under the same temperature and filters, then takes its more likely bit."""
    how = how or Sampling()
    cum = cache.ctx_cum
    cap = model.cfg.max_word_bytes or 0
    if cum is None or max_len < 0:
        return [], None, []
    if cap:  # every fed byte must stay below the cap: plen + 1 (first) + len(out) < cap
        max_len = min(max_len, cap - cache.plen - 2)
    trie = model.trie.to(cum.device)
    node = trie.open_step(cache.node, first)
    row = torch.zeros(1, dtype=torch.long, device=cum.device)
    out: list[int] = []
    qs: list[torch.Tensor] = []
    while len(out) <= max_len:
        end, cont, total = trie.fused_masses(cum, row, torch.tensor([node], device=cum.device))
        if float(total[0]) <= 0.0:
            break
        mass = end[0] + cont[0]  # (256,)
        if how.greedy:
            c = int(mass.argmax())
        else:
            marg = torch.full((VOCAB_SIZE,), -torch.inf)
            marg[:256] = mass.clamp(min=1e-300).log().float().cpu()
            q = how.byte_probs(marg, allow_eos=False)
            c = how.draw(q)
            qs.append(q)
        if end[0, c] > cont[0, c]:
            return out, c, qs
        if len(out) == max_len:
            break
        out.append(c)
        node = trie.open_step(node, c)
    return out, None, qs[: len(out)]


def _verify(
    row: torch.Tensor, byte: int, closes: bool, q: torch.Tensor | None, how: Sampling, allow_eos: bool
) -> tuple[bool, int, bool]:
    """Check the drafted symbol (``byte``, ``closes``) against the model's fused logits ``row`` (2V,):
    (accepted, the symbol to emit). Greedy: accepted iff it is the model's greedy symbol, else that symbol.
    Sampling (speculative sampling, exact): the byte is kept with probability min(1, p / q), else replaced by
    a draw from the normalised max(0, p - q); the bit is always the model's preferred bit for the byte, and
    the symbol counts as accepted only if that bit is the drafted one."""
    V = row.shape[-1] // 2
    if how.greedy:
        b, bit = sample_symbol(row, temperature=0, allow_eos=allow_eos)
        return (b == byte and bit == closes), b, bit
    assert q is not None
    p = how.byte_probs(fused_marginal(row), allow_eos=allow_eos).cpu()
    if how.uniform() * float(q[byte]) < float(p[byte]):
        b = byte
    else:
        rest = (p - q).clamp(min=0.0)
        b = how.draw(rest / rest.sum() if float(rest.sum()) > 0 else p)
    bit = bool(row[V + b] > row[b])
    return (b == byte and bit == closes), b, bit


@torch.no_grad()
def iter_drafted(
    model: Any,
    ids: list[int],
    *,
    max_new_bytes: int,
    min_new_bytes: int = 0,
    how: Sampling | None = None,
    max_draft: int = DEFAULT_MAX_DRAFT,
    stats: dict[str, int] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Generation of a fused-head model with drafted patches (module docstring); yields ``(byte, logits)``
    like ``iter_generate``. Greedy (the default ``how``) gives plain greedy decoding's bytes; sampling gives
    samples of exactly the model's distribution (speculative sampling), though not the bytes plain sampling
    draws for the same seed. ``stats`` (optional) counts ``calls``, ``drafted`` and ``accepted`` bytes."""
    how = how or Sampling()
    dev = model.embed.weight.device
    st = stats if stats is not None else {}
    for k in ("calls", "drafted", "accepted"):
        st.setdefault(k, 0)
    cache = model.new_cache()
    model(torch.tensor([ids], device=dev), cache=cache)  # the prompt: bits from prompt_bits' rules
    st["calls"] += 1

    def feed(byte: int, bit: bool) -> None:
        model(torch.tensor([[byte]], device=dev), cache=cache, patch_end=torch.tensor([[bit]], device=dev))
        st["calls"] += 1

    done = 0
    while done < max_new_bytes:
        logits = cache.last_logits
        assert logits is not None
        byte, bit = sample_symbol(
            logits,
            temperature=how.temperature,
            top_k=how.top_k,
            top_p=how.top_p,
            generator=how.generator,
            allow_eos=done >= min_new_bytes,
        )
        if byte == EOS_ID:
            return
        draft: list[int] = []
        end: int | None = None
        qs: list[torch.Tensor] = []
        if not bit and byte < 256 and max_new_bytes - done > 1:
            draft, end, qs = draft_patch(model, cache, byte, min(max_draft, max_new_bytes - done - 2), how)
        if not draft and end is None:
            yield byte, logits
            done += 1
            feed(byte, bit)
            continue
        at = mark(cache)
        chunk = [byte, *draft]
        # rows[i]: the prediction after chunk[i]; h has one more row, the encoder state of ``end``
        h, rows = feed_open(model, cache, chunk, then=end)
        st["calls"] += 1
        st["drafted"] += len(draft) + (end is not None)
        yield byte, logits
        done += 1
        keep = 1
        fix: tuple[int, bool] | None = None  # the model's own symbol where the draft failed
        closed = False
        proposed = [(d, False) for d in draft] + ([(end, True)] if end is not None else [])
        for i, (d, closes) in enumerate(proposed):
            q = qs[i] if qs else None
            ok, b, b_bit = _verify(rows[i], d, closes, q, how, allow_eos=done >= min_new_bytes)
            if not ok:
                fix = (b, b_bit)
                break
            yield d, rows[i]
            done += 1
            st["accepted"] += 1
            if closes:  # the drafted end: its encoder pass is done, the backbone runs now
                close_with(model, cache, d, h[:, -1:])
                st["calls"] += 1
                closed = True
            else:
                keep += 1
        if closed:
            continue
        if keep < len(chunk) or end is not None:
            rewind(model, cache, at, keep, h, rows)
        if fix is not None:
            if fix[0] == EOS_ID:
                return
            yield fix[0], rows[keep - 1]
            done += 1
            feed(*fix)


def iter_greedy_drafted(
    model: Any,
    ids: list[int],
    *,
    max_new_bytes: int,
    min_new_bytes: int = 0,
    max_draft: int = DEFAULT_MAX_DRAFT,
    stats: dict[str, int] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``iter_drafted`` with greedy picks: the bytes and logits of plain greedy decoding."""
    return iter_drafted(
        model, ids, max_new_bytes=max_new_bytes, min_new_bytes=min_new_bytes, max_draft=max_draft, stats=stats
    )
