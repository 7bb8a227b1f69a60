"""Python source code from the running interpreter's standard library: an offline code corpus
(``source: pysource``).

Every Python install carries a few MB of real, reviewed code, so a code corpus needs no download. Stage 1 of
byteification trains the boundary predictor on it (docs/byteify.md): code tokenizes very differently from
prose (indentation runs, operators, identifiers).

What is read: the ``.py`` files under ``sysconfig.get_paths()['stdlib']`` (or the roots in ``data.paths``),
one document per file, group ``pysource``, raw bytes. What is never read: ``pydoc_data`` (Python's
documentation, which bytelm keeps as outside evaluation text: it must never be trained on), test folders
(``test``, ``tests``, ``idle_test``: fixtures full of deliberately odd text), installed packages
(``site-packages``, ``dist-packages``), byte-code caches and empty files.

Split (canonical, like chatterbot's): a file is validation when a content-independent hash of its relative
path (``json/decoder.py``) falls in the lowest ``VAL_FRACTION``; a file's side never depends on its content,
on the Python version or on which other files exist. ``max_bytes`` caps the bytes of a split: files are taken
in hash order (a spread over the whole library, not the alphabetically first packages) and a file that would
pass the cap is left out.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence

from bytelm.data.documents import Document

GROUP = "pysource"
VAL_FRACTION = 0.05
EXCLUDED_DIRS = frozenset(
    {"pydoc_data", "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


def stdlib_root() -> str:
    """The running interpreter's standard library folder."""
    return sysconfig.get_paths()["stdlib"]


def path_score(rel: str) -> float:
    """A stable number in [0, 1) from a relative path (``/``-separated): below ``VAL_FRACTION`` =
    validation."""
    return int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "little") / 2.0**64


def excluded(rel: str) -> bool:
    """True for a file that must never be read (any folder of its relative path is in ``EXCLUDED_DIRS``)."""
    return any(part in EXCLUDED_DIRS for part in rel.split("/")[:-1])


def _walk(root: str) -> Iterator[tuple[str, str]]:
    """(absolute path, relative ``/`` path) of every ``.py`` file below ``root``, excluded folders pruned."""
    for folder, dirs, files in os.walk(root):  # does not follow symlinked folders
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("."))
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("."):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                if not excluded(rel) and os.path.isfile(path):
                    yield path, rel


def pysource_files(split: str, roots: Sequence[str] = (), max_bytes: int = 0) -> list[tuple[str, str]]:
    """(absolute path, name) of the files of ``split`` (train | validation | all), in hash order, capped.

    ``roots``: folders to read ([] = the stdlib); with several roots a name is ``<root folder name>/<rel>``.
    """
    if split not in ("train", "validation", "all"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'validation' or 'all'")
    folders = [str(r) for r in roots] or [stdlib_root()]
    for r in folders:
        if not os.path.isdir(r):
            raise FileNotFoundError(f"pysource: {r!r} is not a folder")
    found: list[tuple[float, str, str]] = []
    for r in folders:
        prefix = f"{os.path.basename(os.path.normpath(r))}/" if len(folders) > 1 else ""
        for path, rel in _walk(r):
            score = path_score(prefix + rel)
            if split == "all" or (score < VAL_FRACTION) == (split == "validation"):
                found.append((score, path, prefix + rel))
    found.sort()
    out: list[tuple[str, str]] = []
    total = 0
    for _, path, name in found:
        size = os.path.getsize(path)
        if size == 0 or (
            max_bytes > 0 and total + size > max_bytes
        ):  # empty: an ``__init__.py`` with nothing
            continue
        total += size
        out.append((path, name))
    return out


def pysource_generator(paths: list[str], names: list[str]) -> Iterator[dict[str, object]]:
    """``datasets`` generator: the files ``paths`` (one shard each) as document records."""
    for path, name in zip(paths, names, strict=True):
        with open(path, "rb") as f:
            yield {"name": name, "group": GROUP, "data": f.read(), "error": ""}


def pysource_documents(split: str = "train", roots: Sequence[str] = (), max_bytes: int = 0) -> list[Document]:
    """The files of ``split`` as documents (group ``pysource``), in hash order."""
    files = pysource_files(split, roots, max_bytes)
    recs = pysource_generator([p for p, _ in files], [n for _, n in files])
    return [Document(str(r["name"]), r["data"], GROUP) for r in recs]  # type: ignore[arg-type]
