"""Token bytes and byte spans: how a subword tokenizer's tokens map onto the raw bytes they came from.

Helpers of ``bytelm.distill.teacher`` (its module docstring explains the span rules): each vocabulary entry's
bytes (byte-level BPE, SentencePiece byte fallback), which tokens start a new word, the text a tokenizer gets
for raw bytes (invalid UTF-8 as U+FFFD, with an exact character -> byte map), and the byte span of every
token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

SPACE_BYTES = (0x20, 0x0A, 0x09)  # bytes after which tokenkit assumes a token boundary (space, newline, tab)
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SURROGATES = {cp: "\ufffd" for cp in range(0xDC80, 0xDD00)}


# ------------------------------------------------------------------------------------------ vocabulary bytes
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (the ``Ġ`` = space mapping of byte-level BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of special tokens: the declared ones plus every added token marked ``special``."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def token_bytes_table(tokenizer: Any, vocab_size: int | None = None) -> list[bytes | None]:
    """Byte string of every token id; ``None`` for special tokens and ids the tokenizer does not know.

    Handles byte-level BPE (GPT-2 ``Ġ`` alphabet, SmolLM2), SentencePiece-style ``▁`` pieces, byte-fallback
    ``<0xNN>`` tokens and non-special added tokens (whose content is literal text).
    """
    n = max(len(tokenizer), vocab_size or 0)
    specials = special_token_ids(tokenizer)
    added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in repr(backend.decoder) + repr(backend.pre_tokenizer)
    dec = _byte_decoder()
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[bytes | None] = [None] * n
    for i, piece in enumerate(pieces):
        if piece is None or i in specials:
            continue
        if i in added:
            out[i] = added[i].encode("utf-8")
        elif m := _BYTE_FALLBACK.fullmatch(piece):
            out[i] = bytes([int(m.group(1), 16)])
        elif byte_level and all(c in dec for c in piece):
            out[i] = bytes(dec[c] for c in piece)
        else:
            out[i] = piece.replace("\u2581", " ").encode("utf-8")
    return out


def space_token_mask(table: Sequence[bytes | None], specials: set[int]) -> torch.Tensor:
    """(V,) bool: tokens that start a new word (first byte space/newline/tab) or are special (tokenkit's
    ``space+tab+newline+special``). Their total probability is the debiasing term of ALM."""
    flags = [
        i in specials or (tb is not None and len(tb) > 0 and tb[0] in SPACE_BYTES)
        for i, tb in enumerate(table)
    ]
    return torch.tensor(flags, dtype=torch.bool)


# ---------------------------------------------------------------------------------------- text -> str + map
def prepare_text(data: bytes) -> tuple[str, np.ndarray]:
    """Text for the tokenizer and the char -> byte offset table (``len(text) + 1`` entries).

    Every invalid UTF-8 byte becomes exactly one U+FFFD character, so ``offsets[c]`` is the position in
    ``data`` of character ``c`` of the returned text.
    """
    if data.isascii():
        return data.decode("ascii"), np.arange(len(data) + 1, dtype=np.int64)
    s = data.decode("utf-8", errors="surrogateescape")
    cp = np.frombuffer(s.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    n_bytes = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    escaped = (cp >= 0xDC80) & (cp < 0xDD00)  # one raw invalid byte each
    n_bytes[escaped] = 1
    offsets = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(n_bytes, out=offsets[1:])
    if escaped.any():
        s = s.translate(_SURROGATES)
    return s, offsets


def byte_spans(
    data: bytes,
    token_ids: Sequence[int],
    char_offsets: Sequence[tuple[int, int]],
    char_to_byte: np.ndarray,
    table: Sequence[bytes | None],
    dummy_prefix: bool = False,
    offsets_only: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans (n, 2) in ``data`` of the tokens and their exactness flags (n,).

    The tokens are matched against ``target = data`` (or ``b" " + data`` when the tokenizer adds a
    SentencePiece dummy prefix space; that space is then cut off the first token's span). When the tokens'
    vocabulary bytes concatenate to a prefix of the target (lossless tokenization: always the case for
    byte-level BPE on valid UTF-8), the spans are their cumulative lengths and every text token is exact.
    Otherwise (invalid UTF-8 shown as U+FFFD, lossy normalisers) the spans come from the character offsets:
    contiguous from byte 0, gaps absorbed by the following token, pieces of a split character sized by their
    vocabulary bytes; a token is exact when its bytes equal the target span. Special tokens
    (``table[id] is None``) get empty spans and are never exact. ``offsets_only`` skips the lossless shortcut
    (tests use it to check that both ways agree).
    """
    n = len(token_ids)
    shift = 1 if dummy_prefix else 0
    target = b" " * shift + data
    tbs = [table[i] if 0 <= i < len(table) else None for i in token_ids]
    spans = np.zeros((n, 2), dtype=np.int64)
    exact = np.zeros(n, dtype=bool)
    if (
        not offsets_only
        and target.startswith(b"".join(tb for tb in tbs if tb))
        and not any(tb is None and e > s for tb, (s, e) in zip(tbs, char_offsets, strict=True))
    ):
        lengths = np.array([len(tb) if tb is not None else 0 for tb in tbs], dtype=np.int64)
        spans[:, 1] = np.cumsum(lengths)
        spans[:, 0] = spans[:, 1] - lengths
        exact[:] = [tb is not None for tb in tbs]
    else:
        byte_off = [(int(char_to_byte[a]) + shift, int(char_to_byte[b]) + shift) for a, b in char_offsets]
        pos = 0
        for k in range(n):
            tb = tbs[k]
            bs, be = byte_off[k]
            start = pos
            if tb is None and be <= bs:  # special token added by us or the tokenizer: no bytes
                spans[k] = (start, start)
                continue
            # a piece of a split character: the next token overlaps this one's character span
            splits_char = k + 1 < n and byte_off[k + 1][0] < be and byte_off[k + 1][1] > byte_off[k + 1][0]
            end = min(be, start + len(tb)) if splits_char and tb is not None else be
            end = max(end, start)
            spans[k] = (start, end)
            pos = end
            exact[k] = tb is not None and tb == target[start:end]
    if shift:
        spans = np.maximum(spans - shift, 0)
    return spans, exact


def has_dummy_prefix(tokenizer: Any, table: Sequence[bytes | None]) -> bool:
    """True when the tokenizer prepends a space to the text (SentencePiece ``add_dummy_prefix``)."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return b"".join(table[i] or b"" for i in ids if 0 <= i < len(table)) == b" a"
