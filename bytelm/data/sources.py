"""What ``data.*`` selects, as documents, corpora or streams. The embedded Shakespeare corpus is the default.

``data.source`` names one source (``shakespeare | chatterbot | pysource | wordfreq | files | hub | prepared``)
configured by the other ``data.*`` keys, or ``mixture``: the weighted components listed in ``data.mixture``
(each a ``SourceConfig``). Every source is read through ``datasets`` (``hf_sources.doc_dataset``).

- ``load_documents(cfg, split)``: every document of a split, in memory (eval, small corpora).
- ``train_corpora(cfg, ...)``: in-memory / memory-mapped training corpora, one list of parts per component.
- ``train_stream(cfg, ...)``: the streaming training rows (``data.streaming: true``) for one rank.
- ``validation_groups(cfg, ...)``: validation documents per report group (language, source), capped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from bytelm.data.documents import Document, from_record
from bytelm.data.hf_sources import doc_dataset, source_label

log = logging.getLogger(__name__)


def components(data_cfg: Any) -> list[Any]:
    """The source configs of ``data_cfg``: itself, or the components of a mixture."""
    if data_cfg.source != "mixture":
        return [data_cfg]
    if not data_cfg.mixture:
        raise ValueError("data.source=mixture needs data.mixture: a list of sources with weights")
    return list(data_cfg.mixture)


def mixture_weights(data_cfg: Any) -> list[float]:
    comps = components(data_cfg)
    w = [float(c.weight) for c in comps]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"data.mixture weights must be >= 0 with a positive sum, got {w}")
    return [x / sum(w) for x in w]


def iter_documents(
    src: Any, split: str, *, on_error: str = "raise", streaming: bool = False
) -> Iterator[Document]:
    """Documents of one source config, in order (main process)."""
    for rec in doc_dataset(src, split, on_error=on_error, streaming=streaming):
        yield from_record(rec)


def load_documents(data_cfg: Any, split: str) -> list[Document]:
    """Documents of ``split`` ('train' | 'validation') for ``data_cfg`` (every component of a mixture)."""
    on_error = getattr(data_cfg, "on_error", "raise")
    streaming = bool(getattr(data_cfg, "streaming", False))
    return [
        d
        for src in components(data_cfg)
        for d in iter_documents(src, split, on_error=on_error, streaming=streaming)
    ]


def validation_groups(data_cfg: Any, max_bytes: int = 0) -> dict[str, list[Document]]:
    """Validation documents per report group, sorted by group name. With ``max_bytes`` > 0 a group stops
    growing once its packed ids exceed it (the rows evaluated are the same; a huge stream is not read to its
    end once every group it has shown is full)."""
    on_error = getattr(data_cfg, "on_error", "raise")
    streaming = bool(getattr(data_cfg, "streaming", False))
    groups: dict[str, list[Document]] = {}
    for src in components(data_cfg):
        label = source_label(src)
        size: dict[str, int] = {}
        for d in iter_documents(src, "validation", on_error=on_error, streaming=streaming):
            g = d.group or label
            if max_bytes > 0 and size.get(g, 0) > max_bytes:
                if all(v > max_bytes for v in size.values()) and src.source in ("files", "hub", "pysource"):
                    break  # single-group streams: nothing more will be evaluated
                continue
            groups.setdefault(g, []).append(d)
            size[g] = size.get(g, 0) + len(d.data) + 2
    if not groups:
        raise ValueError(f"no validation documents for data.source={data_cfg.source!r}")
    return dict(sorted(groups.items()))


def report_groups(groups: list[str]) -> dict[str, list[str]]:
    """Report name -> the validation groups it averages: every group itself plus per-script aggregates."""
    from bytelm.data.chatterbot import report_groups as scripts

    out = {g: [g] for g in groups}
    out.update(scripts(groups))
    return out


def train_corpora(data_cfg: Any, *, words: bool, max_word_bytes: int) -> list[list[Any]]:
    """Per component, the ``PackedCorpus`` parts to draw training windows from (prepared: memory-mapped)."""
    from bytelm.data.packed import PackedCorpus
    from bytelm.data.prepare import open_prepared

    out: list[list[Any]] = []
    for src in components(data_cfg):
        if src.source == "prepared":
            out.append(open_prepared(src.paths, "train", words=words, max_word_bytes=max_word_bytes))
            continue
        docs = iter_documents(src, "train", on_error=data_cfg.on_error, streaming=False)
        out.append(
            [
                PackedCorpus(
                    docs,
                    invalid_utf8=data_cfg.invalid_utf8,
                    words=words,
                    max_word_bytes=max_word_bytes,
                    context=data_cfg.seq_len,
                )
            ]
        )
    return out


def train_stream(
    data_cfg: Any,
    *,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
    words: bool = False,
    max_word_bytes: int = 100,
    epochs: int = 0,
    length: int | None = None,
):
    """The streaming training rows of one rank: each component split over ranks, then over workers."""
    from datasets.distributed import split_dataset_by_node

    from bytelm.data.stream import PackedStream

    need = world * max(1, num_workers)
    sources = []
    for src in components(data_cfg):
        ds = doc_dataset(src, "train", on_error=data_cfg.on_error, min_shards=need, streaming=True)
        if ds.num_shards < need:
            log.warning(
                "source %s has %d shards for %d ranks x %d workers: some workers idle (use more files, "
                "or line-based files that can be cut)",
                source_label(src),
                ds.num_shards,
                world,
                num_workers,
            )
        if world > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        sources.append(ds)
    return PackedStream(
        sources,
        data_cfg.seq_len,
        weights=mixture_weights(data_cfg),
        seed=data_cfg.seed,
        rank=rank,
        words=words,
        max_word_bytes=max_word_bytes,
        invalid_utf8=data_cfg.invalid_utf8,
        shuffle_docs=data_cfg.shuffle_docs,
        epochs=epochs,
        length=length,
    )
