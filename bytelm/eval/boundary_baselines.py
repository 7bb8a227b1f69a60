"""Token-end predictors that need no model: the floor a learned boundary predictor must clear.

Each is a ``predict(data: bytes) -> (len(data),) bool`` function, the interface ``scripts/boundary_report.py``
scores (a byteified model plugs in the same way). Both look only at character classes, never at a vocabulary:

- ``space_punct_rule``: a token ends before every whitespace or punctuation/symbol character and at the end of
  the text; the obvious rule for space-separated scripts, blind to ends inside words and after punctuation.
- ``pretokenizer_rule``: the ends of GPT-2's pre-tokenizer pieces (the regex that byte-level BPE tokenizers
  such as SmolLM2's split text with before merging). A BPE token never crosses a piece, so every piece end is
  a token end (precision ~1); what it misses are the cuts BPE makes inside pieces: rare words, and the
  characters of unspaced scripts (Chinese, Japanese, Thai), which byte-level BPE often cuts mid-character.

Invalid UTF-8 bytes count as one U+FFFD character each (``bytelm.distill.tokens.prepare_text``).
"""

from __future__ import annotations

import numpy as np
import regex

from bytelm.distill.tokens import prepare_text

__all__ = ["BASELINES", "pretokenizer_rule", "space_punct_rule"]

# GPT-2's pre-tokenizer pattern (what tokenizers' ByteLevel(use_regex=True) applies)
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_BEFORE = regex.compile(r"(?=[\s\p{P}\p{S}])")


def _ends_before(char_starts: list[int], offsets: np.ndarray, n_bytes: int) -> np.ndarray:
    """(n_bytes,) bool: True on the byte before each character start in ``char_starts`` and on the last
    byte."""
    mask = np.zeros(n_bytes, dtype=bool)
    if n_bytes:
        idx = offsets[np.asarray([c for c in char_starts if c > 0], dtype=np.int64)] - 1
        mask[idx] = True
        mask[-1] = True
    return mask


def space_punct_rule(data: bytes) -> np.ndarray:
    """Ends before every whitespace or punctuation/symbol character, and at the last byte."""
    text, offsets = prepare_text(data)
    return _ends_before([m.start() for m in _BEFORE.finditer(text)], offsets, len(data))


def pretokenizer_rule(data: bytes) -> np.ndarray:
    """Ends of GPT-2 pre-tokenizer pieces."""
    text, offsets = prepare_text(data)
    return _ends_before([m.end() for m in GPT2_PATTERN.finditer(text)], offsets, len(data))


BASELINES = {"space_punct": space_punct_rule, "pretokenizer": pretokenizer_rule}
