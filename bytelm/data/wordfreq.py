"""Word-sampled text in ~40 languages from the word lists the ``wordfreq`` wheel ships (``source: wordfreq``).

Why: a byteified model's boundary predictor learns where the source tokenizer cuts words, and for a BPE
vocabulary that is a property of each word's spelling. The dialog corpus holds only a few thousand words per
language, far too few to learn where an English-centred BPE cuts German, French or Turkish words (the
boundary phase stopped at ~92% there; docs/byteify.md). Token ends are a function of the text alone (no
teacher), so any text with the right words teaches them: ``wordfreq`` (Apache-2.0, data CC BY-SA 4.0) carries
the ~40k most frequent words of each of its languages, with frequencies, in ``wordfreq/data/small_<lang>``.

The wheel is fetched once with ``pip download`` (``bytelm.data.cache``) and read from the archive; nothing is
installed. A document is a run of sentences, each of ``SENTENCE_WORDS`` words drawn from one language with
probability proportional to ``frequency ** temperature`` (below 1: rarer words show up more than in running
text, which is what spelling coverage needs), the first word capitalised and some others too (German nouns,
names), joined by spaces (no spaces for Chinese and Japanese, which are written without them), ending with
punctuation. Document ``i`` of a language is a pure function of (language, split, i): train and validation use
different seeds, and the same words may appear in both (this is sampled text; evaluate models on real text).
Groups are ``wordfreq/<lang>``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bytelm.data.cache import fetch_package
from bytelm.data.documents import Document

WHEEL = ("wordfreq", "3.1.1")
GROUP = "wordfreq"
NO_SPACES = frozenset({"zh", "ja"})  # written without spaces between words
SENTENCE_WORDS = (4, 16)  # words per sentence, uniform in [lo, hi)
DOC_SENTENCES = 24
PUNCT = (". ", ". ", ". ", "? ", "! ", ", ")
CAPITAL_P = {"de": 0.45}  # share of words capitalised after the first (German capitalises its nouns)


def _archive(archive: str | Path | None) -> str:
    return str(archive) if archive is not None else str(fetch_package(*WHEEL))


@functools.lru_cache(maxsize=4)
def available_languages(archive: str) -> tuple[str, ...]:
    """Languages with a ``small_<lang>`` word list in the wheel, sorted."""
    with zipfile.ZipFile(archive) as z:
        names = [n.rsplit("/", 1)[-1] for n in z.namelist()]
    langs = [n[len("small_") : -len(".msgpack.gz")] for n in names if n.startswith("small_")]
    return tuple(sorted(langs))


@functools.lru_cache(maxsize=64)
def word_list(archive: str, lang: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(words, frequencies) of ``lang``: the cBpack format is [header, bucket_0, bucket_1, ...] where every
    word in bucket j has frequency 10 ** (-j / 100) (centibels)."""
    import msgpack

    if lang not in available_languages(archive):
        raise ValueError(
            f"wordfreq has no word list for language {lang!r}; available: "
            f"{', '.join(available_languages(archive))}"
        )
    with zipfile.ZipFile(archive) as z:
        pack = msgpack.unpackb(gzip.decompress(z.read(f"wordfreq/data/small_{lang}.msgpack.gz")), raw=False)
    header = pack[0]
    if not isinstance(header, dict) or header.get("format") != "cB":
        raise ValueError(f"wordfreq small_{lang}: not a cBpack file (header {header!r})")
    words: list[str] = []
    freqs: list[float] = []
    for j, bucket in enumerate(pack[1:]):
        kept = [w for w in bucket if not any(ch.isdigit() for ch in w)]  # wordfreq writes every digit as 0
        words.extend(kept)
        freqs.extend([10.0 ** (-j / 100.0)] * len(kept))
    if not words:
        raise ValueError(f"wordfreq small_{lang} holds no words")
    return tuple(words), np.asarray(freqs, dtype=np.float64)


def _seed(lang: str, split: str, index: int) -> int:
    return int.from_bytes(
        hashlib.blake2b(f"{lang}/{split}/{index}".encode(), digest_size=8).digest(), "little"
    )


def sample_document(
    words: Sequence[str], cdf: np.ndarray, lang: str, split: str, index: int, capital_p: float = 0.15
) -> str:
    """Document ``index`` of (``lang``, ``split``): ``DOC_SENTENCES`` sentences of words drawn from ``cdf``
    (the cumulative sampling weights of ``words``, not necessarily normalised)."""
    rng = np.random.default_rng(_seed(lang, split, index))
    sep = "" if lang in NO_SPACES else " "
    out: list[str] = []
    for _ in range(DOC_SENTENCES):
        n = int(rng.integers(*SENTENCE_WORDS))
        picks = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(max=len(words) - 1)
        ws = [words[i] for i in picks]
        caps = rng.random(n) < capital_p
        ws = [w[:1].upper() + w[1:] if (k == 0 or caps[k]) else w for k, w in enumerate(ws)]
        out.append(sep.join(ws) + PUNCT[int(rng.integers(len(PUNCT)))])
    return "".join(out).rstrip() + "\n"


def wordfreq_shards(split: str, languages: Sequence[str], archive: str | Path | None = None) -> list[str]:
    """The languages of a split (one shard each): ``languages`` or every language the wheel has."""
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'")
    have = available_languages(_archive(archive))
    langs = list(languages) or list(have)
    bad = [x for x in langs if x not in have]
    if bad:
        raise ValueError(f"data.languages {bad} have no wordfreq word list; available: {', '.join(have)}")
    return langs


def wordfreq_generator(
    shards: list[str],
    split: str,
    docs: int,
    temperature: float = 0.5,
    archive: str | None = None,
) -> Iterator[dict[str, object]]:
    """``datasets`` generator: ``docs`` sampled documents per language (a shard), as document records."""
    path = _archive(archive)
    for lang in shards:
        words, freqs = word_list(path, lang)
        cdf = np.cumsum(freqs**temperature)
        for i in range(docs):
            text = sample_document(words, cdf, lang, split, i, CAPITAL_P.get(lang, 0.15))
            yield {
                "name": f"{lang}/{split}/{i}",
                "group": f"{GROUP}/{lang}",
                "data": text.encode(),
                "error": "",
            }


def wordfreq_documents(
    split: str = "train",
    languages: Sequence[str] = (),
    docs: int = 8,
    temperature: float = 0.5,
    archive: str | Path | None = None,
) -> list[Document]:
    """The sampled documents of ``split`` as ``Document``s (group ``wordfreq/<lang>``)."""
    shards = wordfreq_shards(split, languages, archive)
    recs = wordfreq_generator(shards, split, docs, temperature, _archive(archive))
    return [Document(str(r["name"]), r["data"], str(r["group"])) for r in recs]  # type: ignore[arg-type]
