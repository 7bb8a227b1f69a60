"""The embedded multilingual corpus: ``chatterbot-corpus==1.3.3`` YAML dialogs in 28 languages
(docs/design.md#embedded-corpora).

The wheel is fetched once with ``pip download`` into the bytelm cache and read straight from the archive
(``chatterbot_corpus/data/<language>/<topic>.yml``). A document is one dialog: its turns, one per line. The
YAML is read with the *base* loader, so every scalar stays the text that was written (``yes`` is not a bool,
``22`` not an int).

Validation split (canonical, like Shakespeare's): in every language, the 10% of dialogs (at least one) with
the smallest content-independent hash of ``<language>/<file>#<index>`` are held out. Each document's group is
``chatterbot/<language>``; ``SCRIPTS`` maps languages to writing systems, so bits-per-byte can be reported per
language and per script (``report_groups``).
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from bytelm.data.cache import fetch_package
from bytelm.data.documents import DataError, Document

PACKAGE = ("chatterbot-corpus", "1.3.3")
DATA_DIR = "chatterbot_corpus/data/"
VAL_FRACTION = 0.1
GROUP_PREFIX = "chatterbot/"

SCRIPTS = {
    "bengali": "Bengali", "chinese": "Han", "dutch": "Latin", "english": "Latin", "french": "Latin",
    "german": "Latin", "hebrew": "Hebrew", "hindi": "Devanagari", "hinglish": "Latin", "indonesian": "Latin",
    "italian": "Latin", "japanese": "Japanese", "korean": "Hangul", "marathi": "Devanagari", "oriya": "Oriya",
    "persian": "Arabic", "portuguese": "Latin", "russian": "Cyrillic", "spanish": "Latin", "swedish": "Latin",
    "tamil": "Tamil", "telugu": "Telugu", "thai": "Thai", "traditionalchinese": "Han", "turkish": "Latin",
    "ukrainian": "Cyrillic", "urdu": "Arabic", "yoruba": "Latin",
}  # fmt: skip

_Loader = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


def _turns(node: object) -> list[str]:
    """The strings of a (possibly nested, possibly malformed) conversation, in order."""
    if isinstance(node, list | tuple):
        out: list[str] = []
        for x in node:
            out.extend(_turns(x))
        return out
    if node is None or isinstance(node, dict):
        return []
    text = str(node).strip()
    return [text] if text else []


def archive_path(archive: str | Path | None = None) -> str:
    return str(archive) if archive is not None else str(fetch_package(*PACKAGE))


@functools.lru_cache(maxsize=2)
def _read_wheel(path: str) -> dict[str, dict[str, tuple[bytes, ...]]]:
    """language -> file -> dialogs (UTF-8 bytes, turns joined by newlines), all sorted by name."""
    out: dict[str, dict[str, tuple[bytes, ...]]] = {}
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            if not name.startswith(DATA_DIR) or not name.endswith((".yml", ".yaml")):
                continue
            rel = name[len(DATA_DIR) :]
            if rel.count("/") != 1:
                continue
            lang, fname = rel.split("/")
            try:
                doc = yaml.load(zf.read(name), Loader=_Loader)  # noqa: S506 - base loader: strings only
            except yaml.YAMLError as e:
                raise DataError(f"{path}!{name}: unreadable YAML: {e}") from None
            convs = doc.get("conversations") if isinstance(doc, dict) else None
            dialogs = tuple("\n".join(_turns(c)).encode("utf-8") for c in (convs or []))
            out.setdefault(lang, {})[fname] = tuple(d for d in dialogs if d)
    if not out:
        raise RuntimeError(
            f"no dialogs under {DATA_DIR} in {path}: is this the chatterbot-corpus==1.3.3 wheel?"
        )
    return out


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=2)
def _validation_keys(path: str) -> frozenset[tuple[str, str, int]]:
    held: set[tuple[str, str, int]] = set()
    for lang, files in _read_wheel(path).items():
        keys = [(lang, f, i) for f, ds in files.items() for i in range(len(ds))]
        n_val = max(1, round(VAL_FRACTION * len(keys))) if keys else 0
        keys.sort(key=lambda k: _key_hash(f"{k[0]}/{k[1]}#{k[2]}"))
        held.update(keys[:n_val])
    return frozenset(held)


def languages(archive: str | Path | None = None) -> list[str]:
    return sorted(_read_wheel(archive_path(archive)))


def _check_languages(path: str, langs: Sequence[str]) -> list[str]:
    known = sorted(_read_wheel(path))
    if not langs:
        return known
    bad = [x for x in langs if x not in known]
    if bad:
        raise ValueError(f"data.languages: unknown chatterbot language(s) {bad}; available: {known}")
    return sorted(set(langs))


def chatterbot_shards(split: str, langs: Sequence[str] = (), archive: str | Path | None = None) -> list[str]:
    """One shard per (language, topic file): ``"<language>/<file>"``."""
    path = archive_path(archive)
    wheel = _read_wheel(path)
    return [f"{lang}/{f}" for lang in _check_languages(path, langs) for f in wheel[lang]]


def chatterbot_generator(
    shards: list[str], split: str, archive: str | None = None
) -> Iterator[dict[str, object]]:
    """``datasets`` generator: the dialogs of ``split`` (train | validation | all) in the given files."""
    if split not in ("train", "validation", "all"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'validation' or 'all'")
    path = archive_path(archive)
    wheel, held = _read_wheel(path), _validation_keys(path)
    for shard in shards:
        lang, fname = shard.split("/")
        for i, data in enumerate(wheel[lang][fname]):
            if split != "all" and ((lang, fname, i) in held) != (split == "validation"):
                continue
            yield {"name": f"{lang}/{fname}#{i}", "group": GROUP_PREFIX + lang, "data": data, "error": ""}


def chatterbot_documents(
    split: str = "train", langs: Sequence[str] = (), archive: str | Path | None = None
) -> list[Document]:
    """Dialogs of ``split`` as documents (group ``chatterbot/<language>``)."""
    path = archive_path(archive)
    recs = chatterbot_generator(chatterbot_shards(split, langs, path), split, path)
    return [Document(str(r["name"]), r["data"], str(r["group"])) for r in recs]  # type: ignore[arg-type]


def report_groups(groups: Sequence[str]) -> dict[str, list[str]]:
    """Script aggregates of the chatterbot language groups present: ``chatterbot/script/<Script>`` ->
    groups."""
    out: dict[str, list[str]] = {}
    for g in groups:
        if g.startswith(GROUP_PREFIX) and g[len(GROUP_PREFIX) :] in SCRIPTS:
            out.setdefault(f"{GROUP_PREFIX}script/{SCRIPTS[g[len(GROUP_PREFIX) :]]}", []).append(g)
    return dict(sorted(out.items()))
