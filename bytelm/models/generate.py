"""KV-cached byte generation for every bytelm model.

A model takes part by offering ``new_cache()`` and ``forward(ids, cache=cache)`` that returns the logits of
the new positions only. Four caches, one per model kind:

- flat: a list of per-layer ``KVCache`` (``bytelm.models.layers``);
- hierarchical: a ``HierCache`` (``bytelm.models.hier_cache``) that also decides word boundaries online,
  exactly as the offline splitter would (or applies the learned chunker's gate byte by byte);
- MrT5: a ``DecoderCache`` (``bytelm.models.mrt5``): the first call encodes the prompt, later calls run the
  decoder with its self-attention and cross-attention caches;
- byteified: a ``ByteifiedCache`` (``bytelm.models.byteified_cache``) fed (byte, boundary-bit) symbols: a
  model with a fused head (``fused_head``) samples the bit with the byte (``sample_symbol``), and the prompt's
  patch ends come from its ``prompt_bits`` except the last byte's.

``use_cache=False`` reruns the full forward over everything so far at every step: slow, but the reference the
cached path is tested against.

Sampling never picks PAD or BOS nor the padded vocabulary columns (ids >= 259); EOS ends generation.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch
from torch import nn

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from bytelm.models.byteified import fused_marginal

# the defaults of generate(), stream() and the bytelm-generate command (one place: they cannot drift apart)
DEFAULT_MAX_NEW_BYTES = 256
DEFAULT_TEMPERATURE = 1.0  # sample from the model's distribution as it is; 0 = greedy


def _filter_logits(
    logits: torch.Tensor,  # (V,) raw model logits
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    allow_eos: bool = True,
) -> torch.Tensor:  # (VOCAB_SIZE,) fp32, -inf where an id may not be sampled
    x = logits[:VOCAB_SIZE].float().clone()
    x[PAD_ID] = -torch.inf
    x[BOS_ID] = -torch.inf
    if not allow_eos:
        x[EOS_ID] = -torch.inf
    if top_k > 0 and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = torch.where(x < kth, -torch.inf, x)
    if top_p < 1.0:
        srt, order = torch.sort(x, descending=True)
        probs = torch.softmax(srt, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this id already reaches top_p
        drop[0] = False
        x[order[drop]] = -torch.inf
    return x


def sample_next(
    logits: torch.Tensor,  # (V,)
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    allow_eos: bool = True,
) -> int:
    """One id from ``logits``; ``temperature == 0`` is greedy. Top-k then top-p (nucleus) filtering."""
    if temperature <= 0:
        return int(_filter_logits(logits, allow_eos=allow_eos).argmax())
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, allow_eos=allow_eos)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def sampling_probs(
    logits: torch.Tensor,  # (V,)
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    allow_eos: bool = True,
) -> torch.Tensor:  # (VOCAB_SIZE,)
    """The distribution ``sample_next`` draws from at ``temperature > 0`` (the drafted decoding's
    speculative sampling compares it with its draft's)."""
    x = _filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p, allow_eos=allow_eos)
    return torch.softmax(x, -1)


@torch.no_grad()
def iter_generate(
    model: nn.Module,
    prompt_ids: list[int],
    *,
    max_new_bytes: int = DEFAULT_MAX_NEW_BYTES,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
    min_new_bytes: int = 0,
    draft: bool | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(next_id, logits)`` per generated id, ``logits`` (V,) being the row it was sampled from.
    Stops after ``max_new_bytes`` or before EOS (EOS is masked for the first ``min_new_bytes``).

    ``draft`` (cached generation of a fused-head model, the byteified one): draft each patch from the model's
    prior and verify the draft in one pass (``bytelm.models.byteified_draft``). None (default): for greedy
    decoding only, where it gives the same bytes with fewer calls; True: for sampling too, by speculative
    sampling (exactly the model's distribution, but not the bytes that one-byte-per-call sampling draws for a
    seed); False: one byte per call."""
    if not prompt_ids:
        prompt_ids = [BOS_ID]
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if getattr(model, "fused_head", False):
        yield from _iter_generate_fused(
            model,
            list(prompt_ids),
            max_new_bytes=max_new_bytes,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            gen=gen,
            use_cache=use_cache,
            min_new_bytes=min_new_bytes,
            draft=draft,
        )
        return
    was_training = model.training
    model.eval()
    try:
        ids = list(prompt_ids)
        cache = model.new_cache() if use_cache else None  # type: ignore[operator]
        step = torch.tensor([ids], device=device)  # (1, P)
        for i in range(max_new_bytes):
            logits = model(step, cache=cache).logits[0, -1]  # (V,)
            nxt = sample_next(
                logits,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=gen,
                allow_eos=i >= min_new_bytes,
            )
            if nxt == EOS_ID:
                return
            yield nxt, logits
            ids.append(nxt)
            step = torch.tensor([[nxt]], device=device) if use_cache else torch.tensor([ids], device=device)
    finally:
        model.train(was_training)


def sample_symbol(
    logits: torch.Tensor,  # (2V,) fused logits: [:V] the byte continues its patch, [V:] it ends it
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    allow_eos: bool = True,
) -> tuple[int, bool]:
    """One (byte, ends-its-patch) symbol of a fused head: the byte sampled from the head's distribution with
    the bit summed out (``sample_next``'s filters), then the bit the head prefers for that byte. This is what
    ``transformers``' generation loop does with an exported model, so both give the same bytes for a seed."""
    V = logits.shape[-1] // 2
    marg = fused_marginal(logits)  # (V,)
    byte = sample_next(
        marg, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, allow_eos=allow_eos
    )
    return byte, bool(logits[V + byte] > logits[byte])


def _iter_generate_fused(
    model: nn.Module,
    ids: list[int],
    *,
    max_new_bytes: int,
    temperature: float,
    top_k: int,
    top_p: float,
    gen: torch.Generator | None,
    use_cache: bool,
    min_new_bytes: int,
    draft: bool | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Generation for models with a fused (byte, boundary) head (the byteified model): the prompt's patch ends
    come from the model's segmenter except the last byte's, which the head decides (``prompt_bits``); every
    generated byte is sampled together with its bit and fed with it. ``use_cache=False`` reruns the full
    forward with the same bits (the reference the cache is tested against). ``draft``: ``iter_generate``."""
    if use_cache and (draft or (draft is None and temperature <= 0)):
        from bytelm.models.byteified_draft import Sampling, iter_drafted

        how = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        yield from iter_drafted(model, ids, max_new_bytes=max_new_bytes, min_new_bytes=min_new_bytes, how=how)
        return
    device = next(model.parameters()).device
    cache = model.new_cache() if use_cache else None  # type: ignore[operator]
    step = torch.tensor([ids], device=device)
    # cached: the prompt goes in without bits and the cache applies prompt_bits' rules itself (one pass)
    bits: list[bool] = [] if use_cache else model.prompt_bits(ids)  # type: ignore[operator]
    step_bits = None if use_cache else torch.tensor([bits], device=device)
    for i in range(max_new_bytes):
        out = model(step, cache=cache, patch_end=step_bits)
        logits = out.logits[0, -1]  # (2V,)
        nxt, bit = sample_symbol(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=gen,
            allow_eos=i >= min_new_bytes,
        )
        if nxt == EOS_ID:
            return
        yield nxt, logits
        ids.append(nxt)
        if use_cache:
            step, step_bits = torch.tensor([[nxt]], device=device), torch.tensor([[bit]], device=device)
        else:
            bits.append(bit)
            step, step_bits = torch.tensor([ids], device=device), torch.tensor([bits], device=device)


def _iter_bytes(model: nn.Module, prompt: bytes, stop_bytes: bytes | None, bos: bool, **kw) -> Iterator[int]:
    out = bytearray()
    for b, _ in iter_generate(model, ([BOS_ID] if bos else []) + list(prompt), **kw):
        out.append(b)
        yield b
        if stop_bytes and out.endswith(stop_bytes):
            return


def generate(
    model: nn.Module,
    prompt: bytes,
    max_new_bytes: int = DEFAULT_MAX_NEW_BYTES,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_bytes: bytes | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    *,
    bos: bool = False,
    min_new_bytes: int = 0,
    draft: bool | None = None,
) -> bytes:
    """Continue ``prompt`` by up to ``max_new_bytes`` bytes; returns the new bytes only.

    ``temperature=0`` is greedy. ``stop_bytes``: a byte sequence that ends generation once the output ends
    with it (it is included in the output). ``seed`` makes sampling deterministic. ``bos`` prepends BOS to the
    prompt (an empty prompt always gets one). ``draft``: see ``iter_generate``."""
    return bytes(
        _iter_bytes(
            model,
            prompt,
            stop_bytes,
            bos,
            max_new_bytes=max_new_bytes,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            use_cache=use_cache,
            min_new_bytes=min_new_bytes,
            draft=draft,
        )
    )


def stream(
    model: nn.Module,
    prompt: bytes,
    max_new_bytes: int = DEFAULT_MAX_NEW_BYTES,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_bytes: bytes | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    *,
    bos: bool = False,
    min_new_bytes: int = 0,
    draft: bool | None = None,
) -> Iterator[str]:
    """Like ``generate`` but yields text as soon as whole UTF-8 characters exist. Invalid bytes come out as
    U+FFFD, so ``''.join(stream(...)) == generate(...).decode('utf-8', errors='replace')``."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for b in _iter_bytes(
        model,
        prompt,
        stop_bytes,
        bos,
        max_new_bytes=max_new_bytes,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        use_cache=use_cache,
        min_new_bytes=min_new_bytes,
        draft=draft,
    ):
        piece = dec.decode(bytes([b]))
        if piece:
            yield piece
    tail = dec.decode(b"", final=True)
    if tail:
        yield tail
