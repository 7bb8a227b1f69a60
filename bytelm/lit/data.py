"""LightningDataModule over bytelm's data layer (docs/data.md).

Training rows come from one of two paths, both resumable exactly: the training loader is torchdata's
``StatefulDataLoader`` and Lightning stores its ``state_dict()`` in the checkpoint.

- in memory / memory-mapped (default): the split's documents packed once (``PackedCorpus``; prepared shards
  are memory-mapped), random windows drawn from (seed, sample index), a mixture draws each window's source
  by weight; the sampler's position is the state.
- streaming (``data.streaming: true``): every rank reads its own shards through ``datasets``, every worker its
  own part of those, packs them in the worker (word starts included) and keeps a small exact state
  (``bytelm.data.stream.PackedStream``).

Validation rows tile each report group (Shakespeare, a chatterbot language, a file source, ...) up to
``data.val_max_bytes``; each row carries ``group`` (index into ``val_group_names``). Rank ``r`` of ``N`` takes
rows ``r, r + N, ...``, padded to ``ceil(rows / N)`` with rows whose targets are all ignored (``RankShard``),
so every rank runs the same number of validation batches (ZeRO-3 / FSDP2 forwards are collectives) and the
summed bpb equals one process's. ``stats`` counts unusual
input (empty documents, invalid UTF-8, skipped records, ...) for logging (``DataStatsCallback``).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from bytelm.config import Config
from bytelm.data.documents import InputStats
from bytelm.data.packed import (
    GroupedTiles,
    MixtureWindows,
    PackedCorpus,
    RandomWindows,
    RankShard,
    ResumableSampler,
    TiledWindows,
)
from bytelm.data.sources import mixture_weights, report_groups, train_corpora, train_stream, validation_groups
from bytelm.models.registry import get_spec

log = logging.getLogger(__name__)


class ByteDataModule(L.LightningDataModule):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_parts: list[list[PackedCorpus]] | None = None  # per mixture component (in-memory path)
        self.val_groups: dict[str, PackedCorpus] | None = None
        self._train_loader: StatefulDataLoader | None = None

    @property
    def needs_words(self) -> bool:
        m = self.cfg.model
        return get_spec(m.arch).needs_words(m)

    @property
    def train_corpus(self) -> PackedCorpus | None:
        """The (first) training corpus of the in-memory path."""
        return self.train_parts[0][0] if self.train_parts else None

    @property
    def val_corpus(self) -> PackedCorpus | None:
        """The first validation group's corpus (the only one for single-group sources such as Shakespeare)."""
        return next(iter(self.val_groups.values())) if self.val_groups else None

    @property
    def val_group_names(self) -> list[str]:
        return list(self.val_groups or {})

    @property
    def val_report_groups(self) -> dict[str, list[int]]:
        """Report name -> indices of the validation groups it averages (each group, and per-script sets)."""
        names = self.val_group_names
        return {k: [names.index(g) for g in v] for k, v in report_groups(names).items()}

    def setup(self, stage: str | None = None) -> None:
        d, m = self.cfg.data, self.cfg.model
        if self.train_parts is None and stage in (None, "fit") and not d.streaming:
            self.train_parts = train_corpora(d, words=self.needs_words, max_word_bytes=m.max_word_bytes)
        if self.val_groups is None:
            docs = validation_groups(d, d.val_max_bytes)
            self.val_groups = {
                g: PackedCorpus(
                    ds,
                    invalid_utf8=d.invalid_utf8,
                    words=self.needs_words,
                    max_word_bytes=m.max_word_bytes,
                    context=d.seq_len,
                )
                for g, ds in docs.items()
            }
        if self.stats:
            log.info("data stats: %s", self.stats)

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def samples_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.trainer.accumulate

    def train_dataloader(self) -> DataLoader:
        d = self.cfg.data
        rank, world = self._world()
        total = (self.cfg.trainer.max_steps + 1) * self.samples_per_step()  # rows this rank will ask for
        if d.streaming:
            ds = train_stream(
                d,
                rank=rank,
                world=world,
                num_workers=d.num_workers,
                words=self.needs_words,
                max_word_bytes=self.cfg.model.max_word_bytes,
                length=total,
            )
            self._train_loader = StatefulDataLoader(ds, batch_size=d.batch_size, num_workers=d.num_workers)
            return self._train_loader
        assert self.train_parts is not None, "call setup('fit') first"
        comps = [
            RandomWindows(parts, d.seq_len, seed=d.seed + 1000 * i)
            for i, parts in enumerate(self.train_parts)
        ]
        windows: Any = comps[0] if len(comps) == 1 else MixtureWindows(comps, mixture_weights(d), seed=d.seed)
        sampler = ResumableSampler(0, total, rank, world)
        self._train_loader = StatefulDataLoader(
            windows, batch_size=d.batch_size, sampler=sampler, num_workers=d.num_workers
        )
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        assert self.val_groups is not None, "call setup() first"
        d = self.cfg.data
        ds = GroupedTiles([TiledWindows(c, d.seq_len, d.val_max_bytes) for c in self.val_groups.values()])
        rank, world = self._world()  # every rank the same number of rows (padding rows count no byte)
        return DataLoader(RankShard(ds, rank, world), batch_size=d.batch_size, num_workers=0)

    @property
    def stats(self) -> dict[str, int]:
        """Counts of this rank's input: ``train/<key>`` (so far, for streaming) and ``val/<key>``
        (``documents``, ``bytes``, ``empty_skipped``, ``errors_skipped``, ``invalid_utf8_docs``,
        ``control_byte_docs``, ``replaced``, ``long_docs_split``)."""
        train, val = InputStats(), InputStats()
        for parts in self.train_parts or []:
            for p in parts:
                train.add(p.stats)
        if self.cfg.data.streaming and self._train_loader is not None:
            for s in _stream_stats(self._train_loader.state_dict()):
                train.add(s)
        for c in (self.val_groups or {}).values():
            val.add(c.stats)
        out = {f"train/{k}": v for k, v in train.as_dict().items()}
        out.update({f"val/{k}": v for k, v in val.as_dict().items()})
        return out if (train.documents or val.documents) else {}


def _stream_stats(state: Any) -> list[dict[str, int]]:
    """The ``stats`` of every worker's ``PackedStream`` state inside a StatefulDataLoader state."""
    found: list[dict[str, int]] = []
    if isinstance(state, dict):
        ds = state.get("dataset_state")
        if isinstance(ds, dict) and isinstance(ds.get("stats"), dict):
            found.append(ds["stats"])
            return found
        for v in state.values():
            found.extend(_stream_stats(v))
    return found


class DataStatsCallback(L.Callback):
    """Logs ``data/<split>/<key>`` counts of unusual input every ``every`` steps (summed over ranks)."""

    def __init__(self, every: int = 50) -> None:
        self.every = max(1, every)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        dm = getattr(trainer, "datamodule", None)
        if not isinstance(dm, ByteDataModule) or trainer.global_step % self.every:
            return
        stats = {f"data/{k}": float(v) for k, v in dm.stats.items()}
        if stats:
            pl_module.log_dict(
                stats, on_step=True, on_epoch=False, sync_dist=trainer.world_size > 1, reduce_fx="sum"
            )
