"""The multilingual embedded corpus: dialogs through the datasets pipeline, a canonical per-language
validation split, and report groups per language and per script."""

from __future__ import annotations

from collections import Counter

import pytest

from bytelm.config import DataConfig
from bytelm.data.chatterbot import SCRIPTS, VAL_FRACTION, chatterbot_documents, report_groups
from bytelm.data.sources import load_documents


def test_per_language_validation_split_is_canonical_and_disjoint():
    train, val = chatterbot_documents("train"), chatterbot_documents("validation")
    tr, va = Counter(d.group for d in train), Counter(d.group for d in val)
    assert len(va) == 28 and set(tr) == set(va)  # every language has held-out dialogs
    for g, n in va.items():
        total = n + tr[g]
        assert n == max(1, round(VAL_FRACTION * total))
    assert not {d.name for d in train} & {d.name for d in val}
    assert [d.name for d in chatterbot_documents("validation")] == [d.name for d in val]  # deterministic
    assert all(d.data and not d.data.startswith(b"- ") for d in val)  # dialog text, not YAML


def test_chatterbot_through_the_pipeline_and_language_filter():
    cfg = DataConfig(source="chatterbot", languages=["japanese", "russian"])
    docs = load_documents(cfg, "validation")
    want = chatterbot_documents("validation", ["japanese", "russian"])
    assert [(d.name, d.data, d.group) for d in docs] == [(d.name, d.data, d.group) for d in want]
    assert {d.group for d in docs} == {"chatterbot/japanese", "chatterbot/russian"}
    with pytest.raises(ValueError, match="klingon"):
        load_documents(DataConfig(source="chatterbot", languages=["klingon"]), "train")


def test_report_groups_per_script():
    groups = sorted({d.group for d in chatterbot_documents("validation")})
    rep = report_groups(groups)
    assert rep["chatterbot/script/Cyrillic"] == ["chatterbot/russian", "chatterbot/ukrainian"]
    assert sorted(g for gs in rep.values() for g in gs) == groups  # each language in exactly one script
    assert set(SCRIPTS) == {g.split("/")[1] for g in groups}
