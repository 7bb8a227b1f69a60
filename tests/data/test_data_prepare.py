"""bytelm-prepare: uint8 shards + document and word-boundary indexes, memory-mapped, read back by the
``prepared`` source exactly as the in-memory pipeline would pack the same documents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bytelm.cli.prepare import main as prepare_main
from bytelm.config import DataConfig
from bytelm.data.packed import PackedCorpus, RandomWindows
from bytelm.data.prepare import open_prepared, read_meta
from bytelm.data.sources import load_documents, train_corpora, train_stream


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        prepare_main(["--help"])
    assert e.value.code == 0 and "bytelm-prepare" in capsys.readouterr().out


def test_prepare_then_train_from_memory_mapped_shards(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    lines = [f"line {i} \u00e9t\u00e9 " + "word " * (i % 7) for i in range(200)] + ["", "bad \udcff byte"]
    (src / "a.jsonl").write_text("".join(json.dumps({"t": x}) + "\n" for x in lines))
    out = tmp_path / "prep"
    over = ["data.source=files", f"data.paths=[{src}/a.jsonl]", "data.text_field=t", "data.val_fraction=0.1"]
    assert prepare_main([str(out), *over, "--shard-mb", "0.002", "--no-progress"]) == 0
    assert "train:" in capsys.readouterr().out
    meta = read_meta(out / "train")
    assert len(meta["shards"]) > 2 and meta["words"] and meta["max_word_bytes"] == 100
    assert meta["stats"]["empty_skipped"] == 1 and meta["stats"]["invalid_utf8_docs"] == 1
    parts = open_prepared([str(out)], "train", words=True, max_word_bytes=100)
    assert isinstance(parts[0].data, np.memmap)
    # the same documents packed in memory: identical bytes, document index and word starts
    files = DataConfig(source="files", paths=[f"{src}/a.jsonl"], text_field="t", val_fraction=0.1)
    mem = PackedCorpus(load_documents(files, "train"), words=True)
    assert b"".join(bytes(p.data) for p in parts) == bytes(mem.data)
    assert sum(p.n_docs for p in parts) == mem.n_docs
    assert np.array_equal(np.concatenate([p.word_start for p in parts]), mem.word_start)
    prepared = DataConfig(source="prepared", paths=[str(out)], seq_len=32)
    corpora = train_corpora(prepared, words=True, max_word_bytes=100)
    row = RandomWindows(corpora[0], 32, seed=0)[3]
    assert row["input_ids"].shape == (32,) and row["word_start"].dtype == torch.bool
    val = load_documents(prepared, "validation")
    assert [d.data for d in val] == [d.data for d in load_documents(files, "validation")]
    stream_rows = list(train_stream(prepared, words=True, epochs=1))  # the prepared source streams too
    assert sum(int((r["input_ids"] < 256).sum()) for r in stream_rows) == len(mem.data)
    with pytest.raises(ValueError, match="max_word_bytes=100"):
        open_prepared([str(out)], "train", words=True, max_word_bytes=64)
    with pytest.raises(FileNotFoundError, match="bytelm-prepare|prepared"):
        open_prepared([str(tmp_path / "nothing")], "train", words=False, max_word_bytes=100)
