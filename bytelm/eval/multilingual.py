"""The multilingual evaluation set: ``chatterbot-corpus==1.3.3`` dialogs (``bytelm.data.chatterbot``) by
language.

Which dialogs: ``split='validation'`` is the corpus's canonical held-out 10% of dialogs per language (safe for
a model trained on chatterbot, but small: some languages have under 100 bytes); ``split='all'`` is every
dialog (about 1 MB; right for models that never saw the corpus, e.g. everything trained on Shakespeare).
``resolve_split('auto', configs)`` picks ``validation`` as soon as one of the compared models trained on the
corpus, else ``all``, so a row is never scored on its own training data and all rows use the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bytelm.data.chatterbot import GROUP_PREFIX, SCRIPTS, chatterbot_documents
from bytelm.data.documents import Document

SPLITS = ("auto", "validation", "all")


def multilingual_documents(
    split: str = "all", archive: str | Path | None = None
) -> dict[str, list[Document]]:
    """``{language: [dialog, ...]}`` of ``split`` ('validation' | 'all'), languages sorted."""
    if split not in ("validation", "all"):
        raise ValueError(f"multilingual split must be 'validation' or 'all', got {split!r}")
    out: dict[str, list[Document]] = {}
    for d in chatterbot_documents(split, (), archive):
        out.setdefault(
            d.group[len(GROUP_PREFIX) :] if d.group.startswith(GROUP_PREFIX) else d.group, []
        ).append(d)
    return dict(sorted(out.items()))


def script_of(language: str) -> str:
    return SCRIPTS.get(language, "other")


def trained_on_chatterbot(cfg: Any) -> bool:
    """Whether a bytelm ``Config`` (None: unknown, e.g. an exported model or the teacher) trained on the
    corpus."""
    if cfg is None:
        return False
    from bytelm.config import config_to_dict

    return "chatterbot" in json.dumps(config_to_dict(cfg).get("data", {})).lower()


def resolve_split(split: str, configs: Iterable[Any]) -> str:
    if split not in SPLITS:
        raise ValueError(f"multilingual split must be one of {SPLITS}, got {split!r}")
    if split != "auto":
        return split
    return "validation" if any(trained_on_chatterbot(c) for c in configs) else "all"
