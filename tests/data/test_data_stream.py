"""Streaming pipeline: packing keeps document boundaries (doc ids, BOS/EOS, word starts from the workers),
ranks x workers read disjoint parts that cover the corpus once per epoch, and resuming is byte-exact."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from bytelm.config import DataConfig, SourceConfig
from bytelm.data.bytes import BOS_ID, EOS_ID, PAD_ID
from bytelm.data.packed import IGNORE, word_start_bits, word_start_bits_many
from bytelm.data.sources import train_stream
from bytelm.data.stream import PackedStream

pytestmark = pytest.mark.filterwarnings("ignore:.*set_vital")


def records_dataset(docs: list[bytes], n_shards: int = 1):
    from datasets import IterableDataset

    from bytelm.data.documents import features

    def gen(shards):
        for shard in shards:
            for i in shard:
                yield {"name": f"d{i}", "group": "t", "data": docs[i], "error": ""}

    shards = [list(range(k, len(docs), n_shards)) for k in range(n_shards)]
    return IterableDataset.from_generator(gen, features=features(), gen_kwargs={"shards": shards})


def write_jsonl(path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_packed_rows_follow_document_boundaries():
    rng = random.Random(0)
    docs = [bytes(rng.choice(b"ab c.\n") for _ in range(rng.randint(1, 40))) for _ in range(30)]
    docs[3] = b"x" * 70  # longer than a row: continues in the next rows
    docs[5] = b"bad\xff\xfe utf8 \x00nul\x01"
    docs[7] = b""  # skipped, counted
    T = 16
    ds = PackedStream([records_dataset(docs)], T, words=True, shuffle_docs=1, epochs=1)
    rows = list(ds)
    assert all(r["input_ids"].shape == (T,) for r in rows)
    stream = torch.cat([r["input_ids"] for r in rows]).tolist()
    kept = [d for d in docs if d]
    expect = [i for d in kept for i in (BOS_ID, *d, EOS_ID)]
    assert stream[: len(expect)] == expect and set(stream[len(expect) :]) <= {PAD_ID}
    want_ws = np.concatenate([np.concatenate(([True], word_start_bits(d, 100), [True])) for d in kept])
    for n, r in enumerate(rows):
        x, y, doc, ws = r["input_ids"], r["targets"], r["doc_ids"], r["word_start"]
        real = x != PAD_ID
        # doc ids: 0 at the start of the row, +1 exactly at each BOS, negative on padding
        steps = (doc[1:] - doc[:-1])[real[1:]]
        assert doc[0] == 0 and torch.equal(steps, (x[1:] == BOS_ID)[real[1:]].long())
        assert (doc[~real] < 0).all()
        # targets: the next id, except after EOS (next document) and on padding
        nxt = torch.tensor(stream[n * T + 1 : n * T + T + 1] + [PAD_ID] * (T + 1))[:T]
        ignore = (x == EOS_ID) | (nxt == PAD_ID)
        assert torch.equal(y[~ignore], nxt[~ignore]) and (y[ignore] == IGNORE).all()
        # word starts computed in the data layer, per document; a row starts a word
        got = ws.numpy()[real.numpy()]
        exp = want_ws[n * T : n * T + int(real.sum())].copy()
        exp[0] = True
        assert np.array_equal(got, exp)
    assert ds.stats()["empty_skipped"] == 1 and ds.stats()["long_docs_split"] == sum(
        len(d) + 2 > T for d in kept
    )
    assert ds.stats()["invalid_utf8_docs"] == 1 and ds.stats()["control_byte_docs"] == 1


def test_batched_word_starts_equal_per_document():
    rng = random.Random(1)
    alphabet = [
        b"a",
        b"B",
        b" ",
        b"\n",
        b"\r",
        b"\t",
        b".",
        b"'",
        b"\xcc\x81",
        b"\xe2\x80\x8d",
        b"\xf0\x9f\x99\x82",
        b"\xff",
        b"\xe3\x81",
        b"1",
        b",",
        b"\xe4\xb8\x96",
        b"\x00",
        b"\xef\xbb\xbf",
        b"\xf0\x9f\x87\xa6",
    ]
    docs = [b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(600)]
    docs += [b"w" * rng.randint(90, 250) for _ in range(10)]  # the size cap
    for cap, some in ((100, docs), (7, docs[::5])):
        many = word_start_bits_many(some, cap)
        assert all(np.array_equal(m, word_start_bits(d, cap)) for m, d in zip(many, some, strict=True))


def _cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(source="files", paths=[str(tmp_path / "*.jsonl")], val_fraction=0.0, **kw)


def test_two_ranks_two_workers_read_every_document_once_per_epoch(tmp_path):
    T = 24
    texts = [f"document {i:04d} ".ljust(T - 2, "~") for i in range(48)]  # BOS + 22 bytes + EOS = one row
    for f in range(8):
        write_jsonl(tmp_path / f"part{f}.jsonl", texts[f::8])
    for epochs in (1, 2):
        per_rank: list[Counter] = []
        for rank in range(2):
            ds = train_stream(
                _cfg(tmp_path, seq_len=T, shuffle_docs=3), rank=rank, world=2, num_workers=2, epochs=epochs
            )
            seen: Counter = Counter()
            for batch in StatefulDataLoader(ds, batch_size=2, num_workers=2):
                for row in batch["input_ids"]:
                    assert row[0] == BOS_ID and row[-1] == EOS_ID
                    seen[bytes(row[1:-1].tolist()).decode()] += 1
            per_rank.append(seen)
        if epochs == 1:  # disjoint parts
            assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
        # every document exactly once per epoch (ranks get other shards in another epoch)
        assert per_rank[0] + per_rank[1] == Counter({t: epochs for t in texts})


def test_streaming_resume_is_byte_exact(tmp_path):
    rng = random.Random(2)
    for f in range(4):
        write_jsonl(
            tmp_path / f"a{f}.jsonl",
            ["".join(rng.choice("abc de.") for _ in range(rng.randint(0, 60))) for _ in range(12)],
        )
        (tmp_path / f"b{f}.txt").write_bytes(
            b"\n".join(bytes(rng.choice(b"xyz \xff") for _ in range(rng.randint(1, 50))) for _ in range(10))
        )
    mix = [
        SourceConfig(source="files", paths=[str(tmp_path / "a*.jsonl")], val_fraction=0.0, weight=0.7),
        SourceConfig(
            source="files", paths=[str(tmp_path / "b*.txt")], txt_unit="line", val_fraction=0.0, weight=0.3
        ),
    ]
    cfg = DataConfig(source="mixture", mixture=mix, seq_len=32, shuffle_docs=4, seed=5)

    def loader():
        ds = train_stream(cfg, num_workers=2, words=True)
        return StatefulDataLoader(ds, batch_size=3, num_workers=2)

    n, cuts = 26, (5, 17)  # crosses blocks and epochs (each worker's share is ~10 rows per epoch)
    full, states = [], {}
    dl = loader()
    for i, b in enumerate(dl):
        full.append(b)
        if i in cuts:
            states[i] = dl.state_dict()
        if i + 1 == n:
            break
    for cut, state in states.items():
        dl = loader()
        dl.load_state_dict(state)
        for i, b in zip(range(cut + 1, n), dl, strict=False):
            for k in full[i]:
                assert torch.equal(b[k], full[i][k]), (cut, i, k)
    stats = [s for s in json.dumps(states[17]).split('"stats"')]
    assert len(stats) > 1  # the input counts travel with the loader state


def test_empty_worker_share_does_not_hang(tmp_path):
    write_jsonl(tmp_path / "only.jsonl", ["one document"])  # one shard, two workers: worker 1 reads nothing
    ds = train_stream(_cfg(tmp_path, seq_len=8), num_workers=2)
    it = iter(StatefulDataLoader(ds, batch_size=1, num_workers=2))
    rows = [next(it)["input_ids"] for _ in range(4)]  # the epoch repeats forever on worker 0
    assert all(r.shape == (1, 8) for r in rows)


@pytest.mark.parametrize("bad", [[-1.0, 2.0], [0.0, 0.0]])
def test_bad_mixture_weights(bad):
    with pytest.raises(ValueError, match="weights"):
        PackedStream([records_dataset([b"a"]), records_dataset([b"b"])], 8, weights=bad)
