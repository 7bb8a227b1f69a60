"""Byte vocabulary: ids 0-255 are the bytes themselves, a few specials sit above them.

Models embed ``VOCAB_SIZE`` ids; the table is padded to ``PADDED_VOCAB`` (a multiple of 64) for fast matmuls,
and the padded logits are never sampled (generation masks them).
"""

from __future__ import annotations

import torch

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
NUM_SPECIALS = 3
VOCAB_SIZE = 256 + NUM_SPECIALS  # 259
PADDED_VOCAB = 320  # next multiple of 64


def encode(text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
    """Text (or raw bytes, possibly invalid UTF-8) to byte ids. Never fails: raw bytes are kept as they
    are."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = list(data)
    if bos:
        ids.insert(0, BOS_ID)
    if eos:
        ids.append(EOS_ID)
    return ids


def decode_bytes(ids: list[int] | torch.Tensor) -> bytes:
    """Byte ids to raw bytes; specials (PAD/BOS/EOS) are dropped."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return bytes(i for i in ids if 0 <= i < 256)


def decode(ids: list[int] | torch.Tensor, errors: str = "replace") -> str:
    """Byte ids to text. Invalid UTF-8 becomes U+FFFD by default (``errors='strict'`` raises instead)."""
    return decode_bytes(ids).decode("utf-8", errors=errors)


def utf8_cut(data: bytes, n: int) -> int:
    """Largest cut ``<= n`` that does not split a UTF-8 character (``n`` itself if no lead byte is near)."""
    if n >= len(data):
        return len(data)
    for k in range(n, max(n - 3, 0) - 1, -1):
        if not 0x80 <= data[k] < 0xC0:  # not a continuation byte: a character starts here
            return k if k > 0 else n
    return n


def text_chunks(data: bytes, chunk_bytes: int) -> list[bytes]:
    """``data`` cut into consecutive pieces of at most ``chunk_bytes`` bytes at character boundaries (a piece
    is cut inside a character only where no boundary is near): how a long text is read in independent
    windows, by a subword teacher (``TeacherScorer``) and by ``DocumentRows`` alike."""
    out, i = [], 0
    while i < len(data):
        j = utf8_cut(data, i + chunk_bytes)
        j = j if j > i else min(len(data), i + chunk_bytes)
        out.append(data[i:j])
        i = j
    return out
