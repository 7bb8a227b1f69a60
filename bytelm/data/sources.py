"""Named document sources for a split. The embedded Shakespeare corpus is the default."""

from __future__ import annotations

from typing import Any

from bytelm.data.shakespeare import Document, shakespeare_documents


def load_documents(data_cfg: Any, split: str) -> list[Document]:
    """Documents of ``split`` ('train' | 'validation') for ``data_cfg.source``."""
    source = data_cfg.source
    if source == "shakespeare":
        return shakespeare_documents(split)
    raise ValueError(f"unknown data.source {source!r}; available: 'shakespeare'")
