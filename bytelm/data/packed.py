"""Packed corpora and the training / validation rows cut from them.

A ``PackedCorpus`` holds documents as one byte array plus document offsets (and, for the hierarchical model,
a bit per byte marking word starts). It reads as the virtual id stream ``BOS doc EOS BOS doc EOS ...`` with a
parallel document index, so every row carries ``doc_ids`` and attention never crosses documents. The arrays
may be in memory or memory-mapped (``bytelm-prepare`` shards): a row only touches its own bytes.

Word starts are computed once per document, in the data layer (here or in the loader workers), never in the
training step.

Training rows (``RandomWindows``) are random windows whose offsets are a pure function of (seed, sample
index): a resumed run asks for sample indices from where it stopped and gets byte-identical rows.
``MixtureWindows`` draws each sample's source by weight the same way. Validation rows (``TiledWindows``) tile
a split in order.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID, text_chunks
from bytelm.data.documents import Document, InputStats, clean_document

log = logging.getLogger(__name__)

IGNORE = -100  # target id that the loss skips

__all__ = [
    "IGNORE", "InputStats", "MixtureWindows", "PackedCorpus", "RandomWindows", "ResumableSampler",
    "TiledWindows", "GroupedTiles", "clean_document", "make_row", "word_start_bits", "word_start_bits_many",
    "word_start_mask",
]  # fmt: skip


def word_start_bits(data: bytes, max_word_bytes: int) -> np.ndarray:
    """(len(data),) bool: True at the first byte of every word of ``data`` (HAT's splitter,
    bytelm.data.words)."""
    from bytelm.data.words import word_ends

    mask = np.zeros(len(data), dtype=bool)
    if data:
        ends = np.asarray(word_ends(data, max_word_bytes), dtype=np.int64)
        mask[0] = True
        mask[ends[:-1]] = True  # a word starts where the previous one ended
    return mask


_BATCH_BYTES = 1 << 20


def word_start_bits_many(datas: Sequence[bytes], max_word_bytes: int) -> list[np.ndarray]:
    """``word_start_bits`` of many documents, split together (joined by newlines, in batches of ~1 MB).

    A newline always ends a word and starts another (UAX #29 WB3a/b; it is whitespace, which nothing joins),
    so each document gets exactly the words it gets alone (tests/data/test_data_stream.py checks it on the
    embedded corpora and on adversarial input), at a fraction of the per-call cost for short documents.
    """
    from bytelm.data.words import word_ends

    out: list[np.ndarray] = []
    i = 0
    while i < len(datas):
        j, size = i, 0
        while j < len(datas) and (j == i or size + len(datas[j]) < _BATCH_BYTES):
            size += len(datas[j]) + 1
            j += 1
        batch = datas[i:j]
        if len(batch) == 1:
            out.append(word_start_bits(batch[0], max_word_bytes))
        else:
            joined = b"\n".join(batch)
            mask = np.zeros(len(joined) + 1, dtype=bool)
            ends = np.asarray(word_ends(joined, max_word_bytes), dtype=np.int64)
            mask[0] = True
            mask[ends[:-1]] = True
            pos = 0
            for d in batch:
                out.append(mask[pos : pos + len(d)].copy())
                pos += len(d) + 1
        i = j
    return out


def word_start_mask(data: bytes, max_word_bytes: int) -> np.ndarray:
    """(len(data) + 2,) bool: True at BOS, at EOS and at the first byte of every word of ``data``."""
    return np.concatenate(([True], word_start_bits(data, max_word_bytes), [True]))


class PackedCorpus:
    """Documents as ``data`` (N,) uint8, ``offsets`` (D+1,) int64 and word-start bits (packed, N bits) or
    None.

    ``len(corpus)`` is the length of the virtual id stream, N + 2D (every document gets a BOS and an EOS).
    ``stats`` counts what cleaning skipped or flagged (``documents.InputStats``).
    """

    def __init__(
        self,
        docs: Iterable[Document] = (),
        *,
        invalid_utf8: str = "keep",
        words: bool = False,
        max_word_bytes: int = 100,
        context: int = 0,
        allow_empty: bool = False,
        quiet: bool = False,
    ) -> None:
        stats = InputStats()
        chunks: list[bytes] = []
        groups: list[str] = []
        for d in docs:
            data = clean_document(d.data, invalid_utf8, stats, error=d.error, context=context)
            if data is None:
                continue
            chunks.append(data)
            groups.append(d.group)
        bits = word_start_bits_many(chunks, max_word_bytes) if words else []
        if not chunks and not allow_empty:
            raise ValueError("no non-empty documents in this split")
        offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in chunks], out=offsets[1:])
        wbits = (
            np.packbits(np.concatenate(bits))
            if words and bits
            else (np.zeros(0, np.uint8) if words else None)
        )
        self._set(np.frombuffer(b"".join(chunks), dtype=np.uint8), offsets, wbits)
        self.doc_groups = groups
        self.stats = stats
        if stats.unusual() and not quiet:
            log.warning("input stats: %s", stats.as_dict())

    @classmethod
    def from_arrays(
        cls,
        data: np.ndarray,
        offsets: np.ndarray,
        wbits: np.ndarray | None = None,
        stats: InputStats | None = None,
    ) -> PackedCorpus:
        """A corpus over existing (e.g. memory-mapped) arrays; nothing is copied."""
        self = cls.__new__(cls)
        self._set(data, np.asarray(offsets, dtype=np.int64), wbits)
        self.doc_groups = []
        self.stats = stats or InputStats()
        return self

    def _set(self, data: np.ndarray, offsets: np.ndarray, wbits: np.ndarray | None) -> None:
        self.data, self.offsets, self.wbits = data, offsets, wbits
        n_docs = len(offsets) - 1
        self.lengths = np.diff(offsets)  # (D,)
        self.vstarts = offsets + 2 * np.arange(n_docs + 1, dtype=np.int64)  # (D+1,) virtual start of each BOS
        self._cache: dict[str, np.ndarray] = {}

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def words(self) -> bool:
        return self.wbits is not None

    def __len__(self) -> int:
        return int(self.vstarts[-1])

    def segment(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Virtual ids [start, stop): ids (L,) int64, doc index (L,) int64, word starts (L,) bool or None."""
        stop = min(stop, len(self))
        if stop <= start:
            e = np.zeros(0, dtype=np.int64)
            return e, e.copy(), (np.zeros(0, dtype=bool) if self.words else None)
        n = stop - start
        ids = np.empty(n, dtype=np.int64)
        doc = np.empty(n, dtype=np.int64)
        ws = np.ones(n, dtype=bool) if self.wbits is not None else None
        d = int(np.searchsorted(self.vstarts, start, side="right")) - 1
        lo = -1  # data index of the first byte in the segment
        p = start
        while p < stop:  # one document piece at a time (rows span few documents)
            vs, size, off = int(self.vstarts[d]), int(self.lengths[d]), int(self.offsets[d])
            a, b = (
                p - vs,
                min(stop, vs + size + 2) - vs,
            )  # local range; 0 = BOS, 1..size = bytes, size+1 = EOS
            o = p - start
            doc[o : o + b - a] = d
            if a == 0:
                ids[o] = BOS_ID
            ka, kb = max(a, 1), min(b, size + 1)
            if kb > ka:
                ids[o + ka - a : o + kb - a] = self.data[off + ka - 1 : off + kb - 1]
                if lo < 0:
                    lo = off + ka - 1
            if b == size + 2:
                ids[o + size + 1 - a] = EOS_ID
            p = vs + b
            d += 1
        if ws is not None and self.wbits is not None and lo >= 0:
            special = (ids == BOS_ID) | (ids == EOS_ID)
            hi = lo + int(n - special.sum())  # byte positions are consecutive in data
            b0 = lo // 8
            bits = np.unpackbits(np.asarray(self.wbits[b0 : (hi - 1) // 8 + 1]))[lo - 8 * b0 : hi - 8 * b0]
            ws[~special] = bits.astype(bool)
        return ids, doc, ws

    def row(self, start: int, length: int) -> dict[str, torch.Tensor]:
        """Row of ``length`` inputs starting at ``start`` (targets are the next ids), padded at the end."""
        ids, doc, ws = self.segment(start, start + length + 1)
        return make_row(ids, doc, ws, length)

    def document(self, i: int) -> bytes:
        return bytes(self.data[self.offsets[i] : self.offsets[i + 1]])

    # -- the whole virtual stream (small corpora, tests) ---------------------------------------------------
    def _full(self, key: str) -> np.ndarray:
        if key not in self._cache:
            ids, doc, ws = self.segment(0, len(self))
            self._cache["ids"], self._cache["doc"] = ids.astype(np.int16), doc.astype(np.int32)
            if ws is not None:
                self._cache["word_start"] = ws
        return self._cache[key]

    @property
    def ids(self) -> np.ndarray:
        """(len,) int16: the whole virtual id stream (materialised on first use)."""
        return self._full("ids")

    @property
    def doc(self) -> np.ndarray:
        return self._full("doc")

    @property
    def word_start(self) -> np.ndarray | None:
        return self._full("word_start") if self.words else None


def make_row(ids: np.ndarray, doc: np.ndarray, ws: np.ndarray | None, length: int) -> dict[str, torch.Tensor]:
    """One training row from ``length + 1`` (or fewer, then padded) consecutive ids of a packed stream.

    ``input_ids`` / ``targets`` (next id; -100 after an EOS and on padding) / ``doc_ids`` (renumbered from 0
    in the row, padding negative) / ``word_start`` (when ``ws`` is given; the row's first byte always starts
    a word, padding counts as words).
    """
    n = len(ids)
    full = np.full(length + 1, PAD_ID, dtype=np.int64)
    full[:n] = ids
    dfull = np.full(length + 1, -1, dtype=np.int64)
    dfull[:n] = doc
    inputs, targets = full[:-1].copy(), full[1:].copy()
    # the EOS -> next BOS transition is not a prediction; padding is not either
    targets[(inputs == EOS_ID) | (targets == PAD_ID)] = IGNORE
    doc_in = dfull[:-1] - dfull[0]  # renumber from 0 within the row (padding keeps its own negative id)
    out = {
        "input_ids": torch.from_numpy(inputs),
        "targets": torch.from_numpy(targets),
        "doc_ids": torch.from_numpy(doc_in),
    }
    if ws is not None:
        w = np.ones(length, dtype=bool)
        m = min(length, len(ws))
        w[:m] = ws[:m]
        w[0] = True  # a row always starts a word
        out["word_start"] = torch.from_numpy(w)
    return out


class RandomWindows(Dataset):
    """Sample i is a random window of the corpus whose offset depends only on (seed, i).

    ``corpus`` may be one corpus or several (memory-mapped shards): a window lies inside one of them, chosen
    in proportion to its number of possible windows.
    """

    def __init__(self, corpus: PackedCorpus | Sequence[PackedCorpus], seq_len: int, seed: int = 0) -> None:
        parts = [corpus] if isinstance(corpus, PackedCorpus) else list(corpus)
        self.parts = [p for p in parts if len(p) > seq_len + 1]
        if not self.parts:
            total = sum(len(p) for p in parts)
            raise ValueError(f"corpus of {total} ids is too short for seq_len={seq_len}")
        self.corpus = self.parts[0]
        self.seq_len, self.seed = seq_len, seed
        self.cum = np.cumsum([len(p) - seq_len - 1 for p in self.parts]).tolist()

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i)])
        start = int(rng.integers(0, self.cum[-1]))
        j = bisect.bisect_right(self.cum, start)
        if j > 0:
            start -= self.cum[j - 1]
        return self.parts[j].row(start, self.seq_len)


class MixtureWindows(Dataset):
    """A weighted mixture of ``RandomWindows``: sample i's source is drawn by weight from (seed, i)."""

    def __init__(self, components: Sequence[RandomWindows], weights: Sequence[float], seed: int = 0) -> None:
        if len(components) != len(weights) or not components:
            raise ValueError("MixtureWindows needs one weight per component")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
        self.components, self.seed = list(components), seed
        self.cum = np.cumsum(w / w.sum())

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        u = np.random.default_rng([self.seed, int(i), 7]).random()
        c = min(int(np.searchsorted(self.cum, u, side="right")), len(self.components) - 1)
        return self.components[c][i]


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


class DocumentRows(Dataset):
    """Evaluation rows that start at document starts: documents in order, as many whole ones per row as fit
    (``BOS doc EOS`` each). A document longer than a row is read as independent pieces of at most
    ``seq_len - 1`` bytes cut at character boundaries (``text_chunks``), each with its own BOS: exactly the
    windows a subword model with ``chunk_bytes = seq_len - 1`` reads (``TeacherScorer``). Every byte is
    scored once, and no text is cut at a place that depends on the texts before it (``TiledWindows`` cuts
    wherever a row ends). Rows are padded."""

    def __init__(self, docs: Sequence[Document], seq_len: int, **corpus_kw: Any) -> None:
        self.seq_len = seq_len
        pieces = [
            Document(d.name, c, d.group, d.error) for d in docs for c in text_chunks(d.data, seq_len - 1)
        ]
        bins: list[list[Document]] = []
        used = seq_len + 2  # ids in the open bin (starts "full": the first document opens one)
        for d in pieces:
            n = len(d.data) + 2
            if used + n > seq_len + 1:  # a row holds seq_len inputs = seq_len + 1 stream ids
                bins.append([])
                used = 0
            bins[-1].append(d)
            used += n
        self.tiles = [TiledWindows(PackedCorpus(b, quiet=True, **corpus_kw), seq_len) for b in bins]
        self.index = [(k, i) for k, t in enumerate(self.tiles) for i in range(len(t))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k, j = self.index[i]
        return self.tiles[k][j]


class GroupedTiles(Dataset):
    """Validation rows of several report groups, one after the other; each row carries ``group`` (its
    index)."""

    def __init__(self, tiles: Sequence[TiledWindows]) -> None:
        self.tiles = list(tiles)
        self.cum = np.cumsum([len(t) for t in self.tiles]).tolist()

    def __len__(self) -> int:
        return int(self.cum[-1]) if self.cum else 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = bisect.bisect_right(self.cum, i)
        row = self.tiles[g][i - (self.cum[g - 1] if g else 0)]
        row["group"] = torch.tensor(g, dtype=torch.long)
        return row


class RankShard(Dataset):
    """Rank ``rank``'s rows of ``ds`` (``rank, rank + world, ...``), padded to ``ceil(len(ds) / world)`` rows
    so that every rank runs the same number of batches: under ZeRO-3 and FSDP2 every forward is a collective,
    so uneven shards would hang or crash the ranks that finish first. A padding row repeats a real row with
    every target set to ``IGNORE`` (``padding`` True): it is computed and counts no byte, so the sums over
    ranks equal one process's sums over ``ds``."""

    def __init__(self, ds: Dataset, rank: int = 0, world: int = 1) -> None:
        n = len(ds)  # type: ignore[arg-type]
        self.ds, self.idx = ds, list(range(rank, n, world))
        self.n = -(-n // world)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < len(self.idx):
            row = self.ds[self.idx[i]]
            row["padding"] = torch.tensor(False)
            return row
        row = self.ds[self.idx[-1] if self.idx else 0]
        row["targets"] = torch.full_like(row["targets"], IGNORE)
        row["padding"] = torch.tensor(True)
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
