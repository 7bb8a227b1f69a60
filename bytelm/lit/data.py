"""LightningDataModule over bytelm's data layer.

The training loader is torchdata's ``StatefulDataLoader``: Lightning stores its ``state_dict()`` in the
checkpoint, so a resumed run continues with exactly the rows an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from bytelm.config import Config
from bytelm.data.packed import PackedCorpus, RandomWindows, ResumableSampler, TiledWindows
from bytelm.data.sources import load_documents

log = logging.getLogger(__name__)


class ByteDataModule(L.LightningDataModule):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_corpus: PackedCorpus | None = None
        self.val_corpus: PackedCorpus | None = None

    @property
    def needs_words(self) -> bool:
        m = self.cfg.model
        return m.arch == "hierarchical" and m.chunker == "words"

    def setup(self, stage: str | None = None) -> None:
        d = self.cfg.data
        kw: dict[str, Any] = dict(
            invalid_utf8=d.invalid_utf8, words=self.needs_words, max_word_bytes=self.cfg.model.max_word_bytes
        )
        if self.train_corpus is None and stage in (None, "fit"):
            self.train_corpus = PackedCorpus(load_documents(self.cfg.data, "train"), **kw)
        if self.val_corpus is None:
            self.val_corpus = PackedCorpus(load_documents(self.cfg.data, "validation"), **kw)

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def samples_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.trainer.accumulate

    def train_dataloader(self) -> DataLoader:
        assert self.train_corpus is not None
        d = self.cfg.data
        rank, world = self._world()
        total = (self.cfg.trainer.max_steps + 1) * self.samples_per_step()
        sampler = ResumableSampler(0, total, rank, world)
        ds = RandomWindows(self.train_corpus, d.seq_len, seed=d.seed)
        return StatefulDataLoader(ds, batch_size=d.batch_size, sampler=sampler, num_workers=d.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.val_corpus is not None
        d = self.cfg.data
        ds = TiledWindows(self.val_corpus, d.seq_len, d.val_max_bytes)
        rank, world = self._world()
        idx = list(range(rank, len(ds), world))
        return DataLoader(ds, batch_size=d.batch_size, sampler=idx, num_workers=0)
