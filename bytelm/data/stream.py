"""Streaming training rows: documents from ``datasets`` IterableDatasets packed into rows inside the loader
workers, with an exact, small loader state.

Each dataloader worker reads its own shards of each source (``datasets`` splits shards over ranks with
``split_dataset_by_node`` and over workers by itself), and packs them:

1. read a *block* of documents (``shuffle_docs`` documents, at most ``BLOCK_BYTES``), clean and count them,
   compute their word starts (hierarchical model), and shuffle them with a seed of
   (seed, source, rank, worker, epoch, block);
2. continue the packed stream ``... BOS doc EOS BOS doc EOS ...`` with them and cut rows of ``seq_len``
   inputs (a long document simply continues in the next row; the last ids that do not fill a row wait for
   the next block, the *carry*);
3. at the end of an epoch start the next one (``set_epoch``: ``datasets`` reshuffles the shard order).

The state of a source is (epoch, ``datasets`` state at the start of the block, block index, carry, rows
already given from the block): resuming re-reads that one block and skips the rows already given, so a resumed
run yields exactly the rows an uninterrupted run would have (``StatefulDataLoader`` stores it per worker).
Several sources are mixed row by row, each row's source drawn by weight from (seed, rank, worker, row index).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from bytelm.data.documents import Document, InputStats, from_record
from bytelm.data.packed import PackedCorpus, make_row

log = logging.getLogger(__name__)

BLOCK_BYTES = 16 << 20  # a block also ends after this many document bytes
_CHOICE_CHUNK = 4096


class _SourcePacker:
    """Rows of one source in one worker. ``state`` is what ``state_dict`` stores for it."""

    def __init__(self, owner: PackedStream, index: int, state: dict[str, Any] | None, worker: int) -> None:
        self.o, self.index, self.worker = owner, index, worker
        self.ds = owner.sources[index]
        # datasets keeps the epoch in shared memory (for persistent workers): every worker would move the
        # others' epoch. Each worker here runs its own epochs, so give it a private counter.
        self.ds._epoch = int(self.ds.epoch)
        self.state: dict[str, Any] = state or {
            "epoch": 0,
            "anchor": None,
            "block": 0,
            "carry": None,
            "rows": 0,
            "stats": {},
            "flushed": False,
            "done": False,
        }
        self.stats = InputStats.from_dict(
            self.state["stats"]
        )  # live counts (the state keeps the block's start)

    def rows(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rows of this source. ``state["done"]`` is set only when it is exhausted (never before a yield),
        so that the mixer sees the same sources alive in a resumed run as in an uninterrupted one."""
        o, st = self.o, self.state
        T = o.seq_len
        carry = _carry_from_state(st["carry"], o.words)
        while not st["done"] and (o.epochs <= 0 or st["epoch"] < o.epochs):
            self.ds.set_epoch(st["epoch"])
            fresh = st["anchor"] is None and st["block"] == 0  # this epoch starts from its first document
            if st["anchor"] is not None:
                self.ds.load_state_dict(st["anchor"])
            it = iter(self.ds)
            read_any, exhausted = False, False
            while not exhausted:
                docs, exhausted = self._read_block(it)
                read_any = read_any or bool(docs)
                next_anchor = None if exhausted else self.ds.state_dict()
                if o.shuffle_docs > 1 and len(docs) > 1:
                    rng = np.random.default_rng(
                        [o.seed, self.index, o.rank, self.worker, st["epoch"], st["block"]]
                    )
                    docs = [docs[i] for i in rng.permutation(len(docs))]
                block = PackedCorpus(
                    docs,
                    invalid_utf8=o.invalid_utf8,
                    words=o.words,
                    max_word_bytes=o.max_word_bytes,
                    context=T,
                    allow_empty=True,
                    quiet=True,
                )
                self.stats.add(block.stats)
                joined = _Joined(carry, block)
                pos, skip = 0, st["rows"]
                while pos + T + 1 <= len(joined):
                    row_no = pos // T + 1
                    if row_no > skip:
                        st["rows"] = row_no
                        yield make_row(*joined.piece(pos, pos + T + 1), T)
                    pos += T
                carry = joined.piece(pos, len(joined))
                carry = (carry[0], carry[1] - (carry[1][0] if len(carry[1]) else 0), carry[2])
                st.update(
                    anchor=next_anchor,
                    block=st["block"] + 1,
                    carry=_carry_to_state(carry),
                    rows=0,
                    stats=self.stats.as_dict(),
                )
            if fresh and not read_any:
                log.warning(
                    "source %d has no documents for rank %d worker %d; it is skipped there",
                    self.index,
                    o.rank,
                    self.worker,
                )
                st["done"] = True
                return
            st.update(epoch=st["epoch"] + 1, anchor=None, block=0)
        if o.epochs > 0 and not st["flushed"]:  # a finite pass: the last ids make one padded row
            st["flushed"] = True
            if len(carry[0]) > 1:
                yield make_row(carry[0], carry[1], carry[2], T)
        st["done"] = True

    def _read_block(self, it: Iterator[dict[str, Any]]) -> tuple[list[Document], bool]:
        docs: list[Document] = []
        size = 0
        while len(docs) < max(1, self.o.shuffle_docs) and size < BLOCK_BYTES:
            rec = next(it, None)
            if rec is None:
                return docs, True
            d = from_record(rec)
            docs.append(d)
            size += len(d.data)
        return docs, False


class _Joined:
    """The carry (ids left over from earlier blocks, fewer than a row) followed by a block's packed stream."""

    def __init__(self, carry, block: PackedCorpus) -> None:
        self.c_ids, self.c_doc, self.c_ws = carry
        self.block = block
        self.c = len(self.c_ids)
        self.base = int(self.c_doc[-1]) + 1 if self.c else 0  # block documents are numbered after the carry's

    def __len__(self) -> int:
        return self.c + len(self.block)

    def piece(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """ids, doc index and word starts of the joined stream's positions [a, b)."""
        ids, doc, ws = self.block.segment(max(0, a - self.c), max(0, b - self.c))
        doc = doc + self.base
        if a >= self.c:
            return ids, doc, ws
        ids = np.concatenate((self.c_ids[a:b], ids))
        doc = np.concatenate((self.c_doc[a:b], doc))
        if ws is not None:
            ws = np.concatenate((self.c_ws[a:b], ws))
        return ids, doc, ws


def _carry_from_state(c: dict[str, list] | None, words: bool):
    if not c:
        e = np.zeros(0, dtype=np.int64)
        return e, e.copy(), (np.zeros(0, dtype=bool) if words else None)
    ws = np.asarray(c["ws"], dtype=bool) if words else None
    return np.asarray(c["ids"], dtype=np.int64), np.asarray(c["doc"], dtype=np.int64), ws


def _carry_to_state(carry) -> dict[str, list]:
    ids, doc, ws = carry
    return {"ids": ids.tolist(), "doc": doc.tolist(), "ws": [] if ws is None else ws.tolist()}


class PackedStream(IterableDataset):
    """Rows packed from one or more document streams, mixed by weight; resumable exactly.

    ``sources``: ``datasets.IterableDataset`` s of document records, already split for this rank
    (``split_dataset_by_node``). ``epochs``: 0 = forever (training), n = n passes then a final padded row.
    ``length``: rows the consumer will take (reported by ``len``; the stream itself does not stop there).
    ``state_dict()`` also carries the input counts (``stats``) of this worker.
    """

    def __init__(
        self,
        sources: Sequence[Any],
        seq_len: int,
        *,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        rank: int = 0,
        words: bool = False,
        max_word_bytes: int = 100,
        invalid_utf8: str = "keep",
        shuffle_docs: int = 1024,
        epochs: int = 0,
        length: int | None = None,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("PackedStream needs at least one source")
        w = np.asarray(weights if weights is not None else [1.0] * len(sources), dtype=np.float64)
        if len(w) != len(sources) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"mixture weights must be one per source, >= 0, with a positive sum; got {list(w)}"
            )
        self.sources, self.weights = list(sources), w / w.sum()
        self.seq_len, self.seed, self.rank, self.epochs = seq_len, seed, rank, epochs
        self.words, self.max_word_bytes, self.invalid_utf8 = words, max_word_bytes, invalid_utf8
        self.shuffle_docs, self.length = shuffle_docs, length
        self._resume: dict[str, Any] | None = None
        self._live: dict[str, Any] | None = None
        self._packers: list[_SourcePacker] = []

    def __len__(self) -> int:
        """Rows this rank will ask for, when given (training): a sized loader is not read ahead by Lightning,
        whose one-batch prefetch would otherwise put the checkpointed loader state one batch past the step."""
        if self.length is None:
            raise TypeError("this PackedStream has no length")
        return self.length

    # -- Stateful protocol (torchdata calls these inside each worker) ----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._live is None:
            return dict(self._resume) if self._resume else {}
        return {
            "rows": self._live["rows"],
            "sources": [dict(p.state) for p in self._packers],
            "stats": self.stats(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state or None

    def stats(self) -> dict[str, int]:
        total = InputStats()
        for p in self._packers:
            total.add(p.stats)
        return total.as_dict()

    # -- iteration -----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        resume, self._resume = self._resume, None
        src_states = resume["sources"] if resume else [None] * len(self.sources)
        self._packers = [_SourcePacker(self, i, src_states[i], worker) for i in range(len(self.sources))]
        self._live = {"rows": resume["rows"] if resume else 0}
        gens = [p.rows() for p in self._packers]
        alive = [not p.state["done"] for p in self._packers]
        choices = np.zeros(0)
        chunk = -1
        while any(alive):
            k = self._live["rows"]
            if len(self.sources) == 1:
                c = 0
            else:
                if k // _CHOICE_CHUNK != chunk:
                    chunk = k // _CHOICE_CHUNK
                    choices = np.random.default_rng([self.seed, self.rank, worker, chunk, 11]).random(
                        _CHOICE_CHUNK
                    )
                w = self.weights * np.asarray(alive)
                c = min(
                    int(np.searchsorted(np.cumsum(w / w.sum()), choices[k % _CHOICE_CHUNK], side="right")),
                    len(w) - 1,
                )
            row = next(gens[c], None)
            if row is None:
                alive[c] = False
                continue
            self._live["rows"] = k + 1
            yield row
