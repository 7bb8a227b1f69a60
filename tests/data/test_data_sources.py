"""Sources through ``datasets``: txt / jsonl / parquet files and globs, Hub-style dataset folders, validation
hold-out, and bad input (kept, counted, or an error naming the file and line)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bytelm.config import DataConfig
from bytelm.data.documents import DataError, InputStats
from bytelm.data.packed import PackedCorpus
from bytelm.data.readers import plan_shards, resolve_paths
from bytelm.data.sources import load_documents, validation_groups


def files_cfg(*paths, **kw) -> DataConfig:
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(source="files", paths=[str(p) for p in paths], **kw)


def texts(docs) -> list[bytes]:
    return [d.data for d in docs]


def test_txt_jsonl_parquet_and_globs(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first file\n\nwith \xff raw \x00 bytes")
    (tmp_path / "b.txt").write_bytes(b"second file")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"meta": {"body": "caf\u00e9"}})
        + "\n\n"
        + json.dumps({"meta": {"body": "\u4e16\u754c \ud83d"}})
        + "\n"
    )
    pq.write_table(
        pa.table({"content": ["p1", None, "p3"], "n": [1, 2, 3]}), tmp_path / "d.parquet", row_group_size=2
    )
    docs = load_documents(files_cfg(tmp_path / "*.txt"), "train")
    assert texts(docs) == [
        b"first file\n\nwith \xff raw \x00 bytes",
        b"second file",
    ]  # raw bytes, in path order
    assert {d.group for d in docs} == {"files"}
    paras = load_documents(files_cfg(tmp_path / "a.txt", txt_unit="paragraph"), "train")
    assert texts(paras) == [b"first file", b"with \xff raw \x00 bytes"]
    lines = load_documents(files_cfg(tmp_path / "a.txt", txt_unit="line"), "train")
    assert texts(lines) == [b"first file", b"", b"with \xff raw \x00 bytes"]
    js = load_documents(files_cfg(tmp_path / "c.jsonl", text_field="meta.body"), "train")
    assert texts(js) == [
        "caf\u00e9".encode(),
        "\u4e16\u754c ".encode() + b"\xed\xa0\xbd",
    ]  # lone surrogate kept
    pdocs = load_documents(files_cfg(tmp_path / "d.parquet", text_field="content", label="pq"), "train")
    assert texts(pdocs) == [b"p1", b"", b"p3"] and pdocs[0].group == "pq"
    folder = load_documents(
        files_cfg(tmp_path, format="auto", text_field="content", on_error="skip"), "train"
    )
    assert len(folder) > 5  # a folder: every file below it, formats by extension


def test_large_line_files_are_cut_into_disjoint_shards(tmp_path):
    lines = [json.dumps({"text": f"line {i} " + "x" * (i % 13)}) for i in range(300)]
    p = tmp_path / "big.jsonl"
    p.write_text("\n".join(lines) + "\n")
    shards = plan_shards([str(p)], min_shards=7)
    assert len(shards) >= 7
    docs = load_documents(files_cfg(p), "train")
    from bytelm.data.readers import files_generator

    parts = [list(files_generator([s])) for s in shards]
    assert [r["data"] for part in parts for r in part] == [d.data for d in docs]  # each line once, in order
    assert len(docs) == 300


def test_malformed_jsonl_names_file_and_line_or_is_counted(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(
        '{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n{"other": 1}\n{"text": 5}\n{"text": "end"}\n'
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed jsonl line"):
        load_documents(files_cfg(p), "train")
    docs = load_documents(files_cfg(p, on_error="skip"), "train")
    assert [d.data for d in docs if not d.error] == [b"ok", b"fine", b"end"]
    errors = [d.error for d in docs if d.error]
    assert len(errors) == 3 and "bad.jsonl:4" in errors[1] and "no field 'text'" in errors[1]
    assert "bad.jsonl:5" in errors[2] and "int" in errors[2]
    c = PackedCorpus(docs)
    assert c.stats.errors_skipped == 3 and c.stats.documents == 3


def test_missing_file_is_an_error_naming_it_or_a_counted_skip(tmp_path):
    (tmp_path / "ok.txt").write_text("here")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_documents(files_cfg(tmp_path / "nope.txt"), "train")
    with pytest.raises(FileNotFoundError, match=r"no file matches .*\*\.jsonl"):
        resolve_paths([str(tmp_path / "*.jsonl")])
    docs = load_documents(files_cfg(tmp_path / "ok.txt", tmp_path / "nope.txt", on_error="skip"), "train")
    assert texts(docs) == [b"here", b""] and "nope.txt" in docs[1].error
    assert PackedCorpus(docs).stats.errors_skipped == 1


def test_bad_input_kept_replaced_or_counted():
    from bytelm.data.documents import Document

    docs = [
        Document("e", b""),
        Document("v", b"valid"),
        Document("b", b"bad\xff\xc3"),
        Document("n", b"nul\x00\x01"),
        Document("l", b"y" * 40),
    ]
    keep = PackedCorpus(docs, context=16)
    assert (
        keep.stats.as_dict() | {}
        == InputStats(
            documents=4,
            bytes=5 + 5 + 5 + 40,
            empty_skipped=1,
            invalid_utf8_docs=1,
            control_byte_docs=1,
            long_docs_split=1,
        ).as_dict()
    )
    assert keep.document(1) == b"bad\xff\xc3"
    rep = PackedCorpus(docs, invalid_utf8="replace")
    assert rep.document(1) == "bad\ufffd\ufffd".encode() and rep.stats.replaced == 1


def test_validation_holdout_and_val_paths(tmp_path):
    p = tmp_path / "all.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(400)))
    cfg = files_cfg(p, val_fraction=0.1)
    train, val = load_documents(cfg, "train"), load_documents(cfg, "validation")
    assert not set(texts(train)) & set(texts(val)) and len(train) + len(val) == 400
    assert 15 < len(val) < 70  # ~10%, decided by content (the same under any sharding)
    groups = validation_groups(cfg, max_bytes=40)
    assert list(groups) == ["files"] and sum(len(d.data) + 2 for d in groups["files"]) < 60
    (tmp_path / "v.txt").write_text("held out")
    cfg2 = files_cfg(p, val_paths=[str(tmp_path / "v.txt")])
    assert texts(load_documents(cfg2, "validation")) == [b"held out"]
    assert len(load_documents(cfg2, "train")) == 400
    with pytest.raises(ValueError, match="val_paths"):
        load_documents(files_cfg(p), "validation")


def test_hub_source_reads_a_dataset_folder(tmp_path):
    d = tmp_path / "my_dataset"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"body": f"t{i}"}) + "\n" for i in range(5)))
    (d / "validation.jsonl").write_text(json.dumps({"body": "v0"}) + "\n")
    cfg = DataConfig(source="hub", hub=str(d), text_field="body", streaming=True)
    assert texts(load_documents(cfg, "train")) == [f"t{i}".encode() for i in range(5)]
    val = load_documents(cfg, "validation")
    assert texts(val) == [b"v0"] and val[0].group == f"hub/{d}"
    with pytest.raises(DataError, match="no column 'text'"):
        load_documents(DataConfig(source="hub", hub=str(d), streaming=True), "train")
