"""The wordfreq word-sampled corpus: the cBpack frequencies decoded as wordfreq defines them, sampling that
follows them, deterministic documents per (language, split, index), clear errors, the datasets pipeline, and
the real wheel's word lists."""

from __future__ import annotations

import gzip
import zipfile
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest

from bytelm.data import wordfreq as wf


def _pack(buckets: dict[int, list[str]], n: int = 300) -> bytes:
    pack: list[object] = [{"format": "cB", "version": 1}] + [buckets.get(j, []) for j in range(n)]
    return gzip.compress(msgpack.packb(pack))


@pytest.fixture
def wheel(tmp_path):
    """A fake wordfreq wheel: 'xx' (spaced; 'a' 100x as frequent as 'b', a digit word), 'zh' (no spaces)."""
    path = tmp_path / "wordfreq-3.1.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("wordfreq/data/small_xx.msgpack.gz", _pack({0: ["a"], 200: ["b", "c00"], 250: ["dd"]}))
        z.writestr("wordfreq/data/small_zh.msgpack.gz", _pack({10: ["中"], 20: ["文"]}))
        z.writestr("wordfreq/data/large_xx.msgpack.gz", _pack({0: ["zzz"]}))
        z.writestr("wordfreq/__init__.py", "")
    wf.available_languages.cache_clear()
    wf.word_list.cache_clear()
    return str(path)


def test_cbpack_decoding_and_digit_filter(wheel):
    assert wf.available_languages(wheel) == ("xx", "zh")  # small_* only
    words, freqs = wf.word_list(wheel, "xx")
    assert words == ("a", "b", "dd")  # 'c00' dropped: wordfreq writes digits as 0
    np.testing.assert_allclose(freqs, [1.0, 10.0**-2, 10.0**-2.5])  # bucket j: 10 ** (-j / 100)
    with pytest.raises(ValueError, match="'qq'.*available: xx, zh"):
        wf.word_list(wheel, "qq")


def test_sampling_follows_tempered_frequencies(wheel):
    words, freqs = wf.word_list(wheel, "xx")
    cdf = np.cumsum(freqs**0.5)  # a : b : dd = 1 : 0.1 : 10**-1.25
    counts: Counter[str] = Counter()
    for i in range(40):
        text = wf.sample_document(words, cdf, "xx", "train", i, capital_p=0.0)
        counts.update(w.strip(".?!,").lower() for w in text.split())
    total = sum(counts.values())
    expect = freqs**0.5 / (freqs**0.5).sum()
    for w, p in zip(words, expect, strict=True):
        assert abs(counts[w] / total - p) < 0.03, (w, counts[w] / total, p)


def test_documents_deterministic_split_dependent_and_unspaced_cjk(wheel):
    a = wf.wordfreq_documents("train", ["xx", "zh"], docs=3, archive=wheel)
    b = wf.wordfreq_documents("train", ["xx", "zh"], docs=3, archive=wheel)
    v = wf.wordfreq_documents("validation", ["xx", "zh"], docs=3, archive=wheel)
    assert [d.data for d in a] == [d.data for d in b]
    assert [d.data for d in a] != [d.data for d in v]
    assert [d.group for d in a] == ["wordfreq/xx"] * 3 + ["wordfreq/zh"] * 3
    assert a[0].data[:1].isupper()  # a sentence starts capitalised
    zh = a[3].data.decode()
    assert " " not in zh.rstrip().replace(". ", "").replace("? ", "").replace("! ", "").replace(", ", "")
    assert set(zh) <= set("中文.?!, \n")
    with pytest.raises(ValueError, match=r"\['qq'\] have no wordfreq word list"):
        wf.wordfreq_shards("train", ["xx", "qq"], archive=wheel)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        wf.wordfreq_shards("test", [], archive=wheel)


def test_datasets_pipeline_and_config_errors(wheel, tmp_path, monkeypatch):
    from bytelm.config import DataConfig
    from bytelm.data.sources import load_documents, validation_groups

    cache = tmp_path / "cache"
    (cache / "packages").mkdir(parents=True)
    (cache / "packages" / "wordfreq-3.1.1-py3-none-any.whl").write_bytes(Path(wheel).read_bytes())
    monkeypatch.setenv("BYTELM_CACHE", str(cache))
    cfg = DataConfig(source="wordfreq", languages=["xx"], docs=5)
    docs = load_documents(cfg, "train")
    assert len(docs) == 5 and all(d.group == "wordfreq/xx" for d in docs)
    assert [d.data for d in docs] == [
        d.data for d in wf.wordfreq_documents("train", ["xx"], 5, archive=wheel)
    ]
    assert list(validation_groups(cfg)) == ["wordfreq/xx"]
    with pytest.raises(ValueError, match="docs >= 1 and temperature > 0, got docs=0"):
        load_documents(DataConfig(source="wordfreq", docs=0), "train")


def test_real_wheel_word_lists():
    """The wheel pip downloads once (57 MB): German and Chinese lists load and sample valid UTF-8 text."""
    from bytelm.data.cache import fetch_package

    path = str(fetch_package(*wf.WHEEL))
    langs = wf.available_languages(path)
    assert {"de", "fr", "ru", "zh", "ja", "ar"} <= set(langs) and len(langs) >= 40
    docs = wf.wordfreq_documents("train", ["de", "zh"], docs=2, archive=path)
    assert all(len(d.data) > 500 for d in docs)
    de = docs[0].data.decode("utf-8")
    assert any(ch in de for ch in "äöü") and not any(ch.isdigit() for ch in de)
    words, _ = wf.word_list(path, "de")
    assert len(words) > 20000 and "nicht" in words[:50]
    zh = docs[2].data.decode("utf-8")
    assert sum(ord(ch) > 0x4E00 for ch in zh) > 100
