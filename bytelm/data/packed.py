"""An in-memory packed corpus and the training / validation rows cut from it.

Documents are concatenated as ``BOS doc EOS BOS doc EOS ...`` into one id array with a parallel document
index, so every row carries ``doc_ids`` and attention never crosses documents. Word starts (for the
hierarchical model) are computed once per document here, in the data layer, not in the training step.

Training rows are random windows whose offsets are a pure function of (seed, sample index): a resumed run
asks for sample indices from where it stopped and gets byte-identical rows (exact resume without loader
state). Validation rows tile the split in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID
from bytelm.data.shakespeare import Document

log = logging.getLogger(__name__)

IGNORE = -100  # target id that the loss skips


@dataclass
class InputStats:
    """Counts of unusual input, reported instead of crashing (DESIGN.md §3)."""

    documents: int = 0
    bytes: int = 0
    empty_skipped: int = 0
    invalid_utf8_docs: int = 0
    control_byte_docs: int = 0
    replaced: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 13))


def clean_document(data: bytes, invalid_utf8: str, stats: InputStats) -> bytes | None:
    """Count and (optionally) repair one document. Returns None for a document to skip (empty)."""
    if invalid_utf8 not in ("keep", "replace"):
        raise ValueError(f"data.invalid_utf8 must be 'keep' or 'replace', got {invalid_utf8!r}")
    if not data:
        stats.empty_skipped += 1
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_docs += 1
        if invalid_utf8 == "replace":
            data = data.decode("utf-8", errors="replace").encode("utf-8")
            stats.replaced += 1
    if data.translate(None, _CONTROL) != data:
        stats.control_byte_docs += 1
    stats.documents += 1
    stats.bytes += len(data)
    return data


class PackedCorpus:
    """All documents of a split as one id array. ids: (N,) int16; doc: (N,) int32; word_start: (N,) bool."""

    def __init__(
        self,
        docs: Sequence[Document],
        *,
        invalid_utf8: str = "keep",
        words: bool = False,
        max_word_bytes: int = 100,
    ) -> None:
        self.stats = InputStats()
        ids, doc_index, starts = [], [], []
        for d in docs:
            data = clean_document(d.data, invalid_utf8, self.stats)
            if data is None:
                continue
            arr = np.empty(len(data) + 2, dtype=np.int16)
            arr[0], arr[-1] = BOS_ID, EOS_ID
            arr[1:-1] = np.frombuffer(data, dtype=np.uint8)
            ids.append(arr)
            doc_index.append(np.full(len(arr), len(doc_index), dtype=np.int32))
            if words:
                starts.append(word_start_mask(data, max_word_bytes))
        if not ids:
            raise ValueError("no non-empty documents in this split")
        self.ids = np.concatenate(ids)
        self.doc = np.concatenate(doc_index)
        self.word_start = np.concatenate(starts) if words else None
        if self.stats.empty_skipped or self.stats.invalid_utf8_docs:
            log.warning("input stats: %s", self.stats.as_dict())

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, start: int, length: int) -> dict[str, torch.Tensor]:
        """Row of ``length`` inputs starting at ``start`` (targets are the next ids), padded at the end."""
        stop = min(start + length + 1, len(self.ids))
        ids = np.full(length + 1, PAD_ID, dtype=np.int64)
        ids[: stop - start] = self.ids[start:stop]
        doc = np.full(length + 1, -1, dtype=np.int64)
        doc[: stop - start] = self.doc[start:stop]
        inputs, targets = ids[:-1].copy(), ids[1:].copy()
        # the EOS -> next BOS transition is not a prediction; padding is not either
        targets[(inputs == EOS_ID) | (targets == PAD_ID)] = IGNORE
        doc_in = doc[:-1]
        doc_in = doc_in - doc_in[0]  # renumber from 0 within the row (padding keeps its own negative id)
        out = {
            "input_ids": torch.from_numpy(inputs),
            "targets": torch.from_numpy(targets),
            "doc_ids": torch.from_numpy(doc_in),
        }
        if self.word_start is not None:
            ws = np.ones(length, dtype=bool)
            n = min(length, len(self.ids) - start)
            ws[:n] = self.word_start[start : start + n]
            ws[0] = True  # a row always starts a word
            out["word_start"] = torch.from_numpy(ws)
        return out


def word_start_mask(data: bytes, max_word_bytes: int) -> np.ndarray:
    """(len(data) + 2,) bool: True at BOS, at EOS and at the first byte of every word of ``data``."""
    from bytelm.data.words import word_ends

    ends = np.asarray(word_ends(data, max_word_bytes), dtype=np.int64)
    mask = np.zeros(len(data) + 2, dtype=bool)
    mask[0] = True  # BOS is a word of its own
    mask[1] = True  # first byte of the document
    mask[1 + ends[:-1]] = True  # a word starts where the previous one ended
    mask[-1] = True  # EOS is a word of its own
    return mask


class RandomWindows(Dataset):
    """Sample i is a random window of the corpus whose offset depends only on (seed, i)."""

    def __init__(self, corpus: PackedCorpus, seq_len: int, seed: int = 0) -> None:
        if len(corpus) <= seq_len + 1:
            raise ValueError(f"corpus of {len(corpus)} ids is too short for seq_len={seq_len}")
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i)])
        start = int(rng.integers(0, len(self.corpus) - self.seq_len - 1))
        return self.corpus.row(start, self.seq_len)


class TiledWindows(Dataset):
    """Consecutive non-overlapping windows over the first ``max_ids`` ids (validation: every byte once)."""

    def __init__(self, corpus: PackedCorpus, seq_len: int, max_ids: int = 0) -> None:
        n = len(corpus) - 1 if max_ids <= 0 else min(max_ids, len(corpus) - 1)
        self.corpus, self.seq_len = corpus, seq_len
        self.starts = list(range(0, n, seq_len))
        self.limit = n

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.corpus.row(self.starts[i], self.seq_len)
        over = self.starts[i] + self.seq_len - self.limit
        if over > 0:  # the tail past the limit is not evaluated
            row["targets"][self.seq_len - over :] = IGNORE
        return row


class ResumableSampler(Sampler[int]):
    """Yields sample indices ``start*world + rank, (start+1)*world + rank, ...``: disjoint across ranks and
    resumable from any position by giving ``start`` (samples already consumed by this rank)."""

    def __init__(self, start: int, total: int, rank: int = 0, world: int = 1) -> None:
        self.start, self.total, self.rank, self.world = start, total, rank, world

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[int]:
        for i in range(self.start, self.total):
            yield i * self.world + self.rank
