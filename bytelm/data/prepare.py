"""Prepared corpora: documents pre-cleaned into uint8 shards with a document index and a word-boundary index,
read memory-mapped (``bytelm-prepare`` writes them; ``data.source=prepared`` reads them).

Layout of ``OUT/<split>/`` (``train``, ``validation``):

- ``NNNNN.bin``        the documents' bytes, back to back (uint8; raw, invalid UTF-8 kept unless replaced)
- ``NNNNN.idx.npy``    (D+1,) int64 document offsets into the .bin
- ``NNNNN.words.npy``  packed bits, one per byte: 1 where a word starts (HAT splitter, ``max_word_bytes``)
- ``NNNNN.groups.npy`` (D,) int32 report group of each document (names in meta.json)
- ``meta.json``        written last: format version, shards, groups, counts (``InputStats``), settings

Training windows read only the bytes they need (``PackedCorpus.from_arrays`` over ``np.memmap``), so a corpus
far larger than memory trains at random access speed, and the word starts are never recomputed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from bytelm.data.documents import Document, InputStats, clean_document

log = logging.getLogger(__name__)

FORMAT = "bytelm-prepared"
VERSION = 1


def _process(chunk: list[Document], invalid_utf8: str, words: bool, max_word_bytes: int):
    """Clean a chunk of documents and compute their word starts (runs in a worker process)."""
    from bytelm.data.packed import word_start_bits_many

    stats = InputStats()
    kept = []
    for d in chunk:
        data = clean_document(d.data, invalid_utf8, stats, error=d.error)
        if data is not None:
            kept.append((data, d.group))
    bits = word_start_bits_many([k[0] for k in kept], max_word_bytes) if words else [None] * len(kept)
    return [(data, group, b) for (data, group), b in zip(kept, bits, strict=True)], stats.as_dict()


def _chunks(docs: Iterable[Document], n: int) -> Iterator[list[Document]]:
    buf: list[Document] = []
    for d in docs:
        buf.append(d)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


class _ShardWriter:
    def __init__(self, folder: Path, words: bool, shard_bytes: int) -> None:
        self.folder, self.words, self.shard_bytes = folder, words, shard_bytes
        self.shards: list[dict[str, int | str]] = []
        self.groups: dict[str, int] = {}
        self._open()

    def _open(self) -> None:
        self.name = f"{len(self.shards):05d}"
        self.f = open(self.folder / f"{self.name}.bin", "wb")  # noqa: SIM115 - closed in _close
        self.offsets: list[int] = [0]
        self.bits: list[np.ndarray] = []
        self.gids: list[int] = []
        self.size = 0

    def add(self, data: bytes, group: str, bits: np.ndarray | None) -> None:
        self.f.write(data)
        self.size += len(data)
        self.offsets.append(self.size)
        self.gids.append(self.groups.setdefault(group, len(self.groups)))
        if bits is not None:
            self.bits.append(bits)
        if self.size >= self.shard_bytes:
            self._close()
            self._open()

    def _close(self) -> None:
        self.f.close()
        if len(self.offsets) == 1:  # nothing written
            os.remove(self.folder / f"{self.name}.bin")
            return
        np.save(self.folder / f"{self.name}.idx.npy", np.asarray(self.offsets, dtype=np.int64))
        np.save(self.folder / f"{self.name}.groups.npy", np.asarray(self.gids, dtype=np.int32))
        if self.words:
            bits = np.concatenate(self.bits) if self.bits else np.zeros(0, dtype=bool)
            np.save(self.folder / f"{self.name}.words.npy", np.packbits(bits))
        self.shards.append({"name": self.name, "docs": len(self.offsets) - 1, "bytes": self.size})

    def finish(self) -> None:
        self._close()


def write_prepared(
    docs: Iterable[Document],
    folder: str | Path,
    *,
    words: bool = True,
    max_word_bytes: int = 100,
    invalid_utf8: str = "keep",
    shard_bytes: int = 256 << 20,
    workers: int = 0,
    progress: Any = None,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``docs`` as a prepared split into ``folder``; returns the meta (also ``folder/meta.json``).

    ``progress``: an object with ``update(n_bytes)`` (a tqdm bar). ``workers`` > 0 cleans documents and
    computes word starts in that many processes (order is kept).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npy"):
        old.unlink()
    for old in folder.glob("*.bin"):
        old.unlink()
    (folder / "meta.json").unlink(missing_ok=True)
    writer = _ShardWriter(folder, words, shard_bytes)
    stats = InputStats()
    args = (invalid_utf8, words, max_word_bytes)
    if workers > 0:
        with get_context("fork").Pool(workers) as pool:
            results: Iterable = pool.imap(_Call(args), _chunks(docs, 256))
            _consume(results, writer, stats, progress)
    else:
        _consume((_process(c, *args) for c in _chunks(docs, 256)), writer, stats, progress)
    writer.finish()
    if not writer.shards:
        raise ValueError(f"no non-empty documents to prepare into {folder}")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "shards": writer.shards,
        "groups": sorted(writer.groups, key=writer.groups.__getitem__),
        "words": words,
        "max_word_bytes": max_word_bytes,
        "invalid_utf8": invalid_utf8,
        "stats": stats.as_dict(),
        **(extra_meta or {}),
    }
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")  # a folder with meta.json is complete
    return meta


class _Call:
    def __init__(self, args: tuple) -> None:
        self.args = args

    def __call__(self, chunk: list[Document]):
        return _process(chunk, *self.args)


def _consume(results: Iterable, writer: _ShardWriter, stats: InputStats, progress: Any) -> None:
    for out, st in results:
        stats.add(st)
        for data, group, bits in out:
            writer.add(data, group, bits)
            if progress is not None:
                progress.update(len(data))


# ------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder}: not a prepared split (no meta.json); run bytelm-prepare first")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} folder")
    return meta


def split_folders(paths: list[str], split: str) -> list[Path]:
    """``paths`` are prepared roots (holding ``train/`` and ``validation/``) or split folders themselves."""
    if not paths:
        raise ValueError("data.source=prepared needs data.paths: folders written by bytelm-prepare")
    out = []
    for p in paths:
        root = Path(os.path.expanduser(p))
        if (root / split / "meta.json").exists():
            out.append(root / split)
        elif (root / "meta.json").exists() and split == "train":
            out.append(root)
        else:
            raise FileNotFoundError(
                f"data.paths: {p!r} has no prepared {split!r} split ({root / split}/meta.json)"
            )
    return out


def prepared_shards(paths: list[str], split: str) -> list[str]:
    """Shard base paths (``folder/NNNNN``) of a prepared split, for ``prepared_generator``."""
    return [str(f / s["name"]) for f in split_folders(paths, split) for s in read_meta(f)["shards"]]


def prepared_generator(shards: list[str]) -> Iterator[dict[str, object]]:
    """``datasets`` generator: the documents of prepared shards (memory-mapped)."""
    for base in shards:
        meta = read_meta(Path(base).parent)
        data = np.memmap(base + ".bin", dtype=np.uint8, mode="r")
        offsets = np.load(base + ".idx.npy")
        gids = np.load(base + ".groups.npy")
        for i in range(len(offsets) - 1):
            yield {
                "name": f"{base}#{i}",
                "group": meta["groups"][int(gids[i])],
                "data": bytes(data[offsets[i] : offsets[i + 1]]),
                "error": "",
            }


def open_prepared(paths: list[str], split: str, *, words: bool, max_word_bytes: int) -> list[Any]:
    """Memory-mapped ``PackedCorpus`` per shard. Needs a word index built with the model's ``max_word_bytes``
    when ``words``."""
    from bytelm.data.packed import PackedCorpus

    parts = []
    for folder in split_folders(paths, split):
        meta = read_meta(folder)
        if words and (not meta["words"] or meta["max_word_bytes"] != max_word_bytes):
            have = f"max_word_bytes={meta['max_word_bytes']}" if meta["words"] else "no word index"
            raise ValueError(
                f"{folder}: prepared with {have}, the model needs words with "
                f"max_word_bytes={max_word_bytes}; rerun bytelm-prepare with model.max_word_bytes="
                f"{max_word_bytes}"
            )
        for s in meta["shards"]:
            base = str(folder / s["name"])
            data = np.memmap(base + ".bin", dtype=np.uint8, mode="r")
            wbits = np.load(base + ".words.npy", mmap_mode="r") if words else None
            parts.append(
                PackedCorpus.from_arrays(
                    data,
                    np.load(base + ".idx.npy"),
                    wbits,
                    InputStats.from_dict(meta["stats"]) if s is meta["shards"][0] else None,
                )
            )
    return parts
