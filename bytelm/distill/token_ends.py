"""Token-end labels from the tokenizer alone: where the source tokenizer's tokens end in raw bytes.

The boundary predictor of a byteified model learns these ends (docs/byteify.md). They need no teacher forward,
so they can label far more text than teacher targets can. The spans are the teacher's own
(``bytelm.distill.tokens.byte_spans``: the same text preparation, the same rules for invalid UTF-8 and split
characters), so a label made here is the label stage 1 trains on for the same document:

- valid UTF-8: the ends are the cumulative byte lengths of the tokens' vocabulary bytes;
- invalid UTF-8: each invalid byte is given to the tokenizer as U+FFFD and the spans come from character
  offsets, so the invalid byte ends the token that covers its replacement character;
- ``<|endoftext|>`` and other special-token text inside a document is tokenized as text.

A token end may fall inside a multi-byte character (byte-level BPE splits Thai or CJK characters into pieces);
the label is then True on that inner byte.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from bytelm.distill.tokens import byte_spans, has_dummy_prefix, prepare_text, token_bytes_table

__all__ = ["batch_token_ends", "token_end_mask", "token_end_masks", "token_ends_from_spans"]

# tokenizer -> (vocabulary bytes, dummy prefix): building the table reads the whole vocabulary (~0.1 s)
_VOCAB: weakref.WeakKeyDictionary[Any, tuple[list[bytes | None], bool]] = weakref.WeakKeyDictionary()


def _vocab(tokenizer: Any) -> tuple[list[bytes | None], bool]:
    with contextlib.suppress(KeyError, TypeError):  # TypeError: not weak-referenceable (then never cached)
        return _VOCAB[tokenizer]
    table = token_bytes_table(tokenizer)
    got = (table, has_dummy_prefix(tokenizer, table))
    with contextlib.suppress(TypeError):
        _VOCAB[tokenizer] = got
    return got


def token_ends_from_spans(spans: np.ndarray, n_bytes: int) -> np.ndarray:
    """(n_bytes,) bool: True at the last byte of every non-empty span (spans (n, 2) byte [start, end))."""
    mask = np.zeros(n_bytes, dtype=bool)
    spans = np.asarray(spans).reshape(-1, 2)
    ends = spans[spans[:, 1] > spans[:, 0], 1]
    mask[ends - 1] = True
    return mask


def token_end_masks(tokenizer: Any, texts: Sequence[bytes], batch_size: int = 256) -> list[np.ndarray]:
    """One (len(text),) bool array per text: True at the last byte of every source token.

    The tokenizer sees ``batch_size`` texts per call (the fast tokenizer's batch path); no special tokens are
    added, and special-token text inside a document stays text (as in ``Teacher.encode``).
    """
    table, dummy = _vocab(tokenizer)
    out: list[np.ndarray] = []
    for i in range(0, len(texts), batch_size):
        raw = [bytes(t) for t in texts[i : i + batch_size]]
        prepared = [prepare_text(t) for t in raw]
        enc = tokenizer(
            [p[0] for p in prepared],
            add_special_tokens=False,
            return_offsets_mapping=True,
            split_special_tokens=True,
        )
        for data, (_, c2b), ids, offs in zip(
            raw, prepared, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            spans, _ = byte_spans(data, ids, [tuple(o) for o in offs], c2b, table, dummy)
            text_token = np.array([0 <= t < len(table) and table[t] is not None for t in ids], dtype=bool)
            out.append(token_ends_from_spans(spans[text_token], len(data)))
    return out


def token_end_mask(tokenizer: Any, data: bytes) -> np.ndarray:
    """(len(data),) bool: True at the last byte of every token of ``data`` under ``tokenizer``."""
    return token_end_masks(tokenizer, [data])[0]


def batch_token_ends(tokenizer: Any, ids: Any, doc_ids: Any = None) -> Any:
    """(B, T) bool torch tensor: the tokenizer's token ends on every run of bytes of a batch of byte ids, each
    run (bytes between specials, within one document) tokenized on its own (the ``tokenizer`` segmenter of a
    byteified model; the same runs stage 1's teacher reads)."""
    import torch

    from bytelm.distill.byteify import byte_segments

    B, T = ids.shape
    segs = byte_segments(ids, doc_ids)
    a = ids.cpu()
    masks = token_end_masks(tokenizer, [bytes(a[r, s:e].to(torch.uint8).tolist()) for r, s, e in segs])
    out = torch.zeros(B, T, dtype=torch.bool)
    for (r, s, e), m in zip(segs, masks, strict=True):
        out[r, s:e] = torch.from_numpy(m)
    return out.to(ids.device)
