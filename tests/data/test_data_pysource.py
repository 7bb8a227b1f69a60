"""The stdlib code corpus: documents through the datasets pipeline, never a pydoc_data / test / site-packages
file, a deterministic disjoint split by path hash, a byte cap; and the byteify mixture that uses it."""

from __future__ import annotations

import pytest

from bytelm.config import DataConfig, load_config
from bytelm.data.pysource import GROUP, VAL_FRACTION, excluded, path_score, pysource_documents, pysource_files
from bytelm.data.sources import load_documents, validation_groups


@pytest.fixture
def tree(tmp_path):
    """A fake stdlib: 60 kept modules and one file in each excluded kind of folder."""
    root = tmp_path / "lib"
    for i in range(60):
        p = root / f"pkg{i % 4}" / f"mod{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"x = {i}\n".encode() + b"# " + b"y" * i + b"\n")
    for bad in (
        "pydoc_data/topics.py",
        "test/test_x.py",
        "pkg1/tests/t.py",
        "idlelib/idle_test/t.py",
        "site-packages/foo/bar.py",
        "__pycache__/m.py",
    ):
        (root / bad).parent.mkdir(parents=True, exist_ok=True)
        (root / bad).write_text("DOCS = 'never train on this'\n")
    (root / "pkg0" / "notes.txt").write_text("not python\n")
    return root


def test_fake_tree_split_exclusions_and_cap(tree):
    every = pysource_files("all", [str(tree)])
    names = {n for _, n in every}
    assert len(names) == 60 and all(n.startswith("pkg") and n.endswith(".py") for n in names)
    train, val = pysource_files("train", [str(tree)]), pysource_files("validation", [str(tree)])
    assert {n for _, n in train} | {n for _, n in val} == names and not {n for _, n in train} & {
        n for _, n in val
    }
    assert all(path_score(n) < VAL_FRACTION for _, n in val)
    for path, _ in every:  # new content: the same split (it depends on the relative path alone)
        with open(path, "ab") as f:
            f.write(b"z = 1\n")
    assert pysource_files("train", [str(tree)]) == train  # deterministic (hash order)
    capped = pysource_documents("train", [str(tree)], max_bytes=300)
    assert 0 < sum(len(d.data) for d in capped) <= 300 and len(capped) < len(train)
    assert [d.name for d in capped] == [n for _, n in pysource_files("train", [str(tree)], 300)]
    assert excluded("a/pydoc_data/b.py") and excluded("test/x.py") and not excluded("pydoc.py")


def test_stdlib_through_the_pipeline():
    cfg = DataConfig(source="pysource", max_bytes=400_000)
    train, val = load_documents(cfg, "train"), load_documents(cfg, "validation")
    assert len(train) >= 20 and val and sum(len(d.data) for d in train) <= 400_000
    assert {d.group for d in train + val} == {GROUP}
    assert not {d.name for d in train} & {d.name for d in val}
    assert any(b"def " in d.data for d in train)
    everything = [n for _, n in pysource_files("all")]
    assert len(everything) > 200
    assert not [n for n in everything if "pydoc_data" in n or "site-packages" in n or "/test/" in f"/{n}"]
    assert [d.name for d in load_documents(cfg, "validation")] == [d.name for d in val]  # deterministic
    labelled = load_documents(DataConfig(source="pysource", max_bytes=20_000, label="code"), "train")
    assert {d.group for d in labelled} == {"code"}


def test_byteify_mixture_composes_with_every_group():
    cfg = load_config(["experiment=byteify_smollm2", "data=byteify_mixture"])
    assert [c.source for c in cfg.data.mixture] == ["shakespeare", "chatterbot", "pysource"]
    assert sum(c.weight for c in cfg.data.mixture) == pytest.approx(1.0)
    groups = validation_groups(cfg.data, max_bytes=1)
    langs = [g for g in groups if g.startswith("chatterbot/")]
    assert "shakespeare" in groups and GROUP in groups and len(langs) == 28
    with pytest.raises(
        Exception, match="pysource"
    ):  # a misspelt source lists the options, pysource among them
        load_config(["data.source=pysorce"])
