"""The DataModule: the demo corpus goes through the pipeline, mixtures report per-group validation, stats are
exposed, and a streaming run stopped at step N resumes with exactly the batches of an uninterrupted run."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from bytelm.config import load_config
from bytelm.lit.data import ByteDataModule, DataStatsCallback

pytestmark = pytest.mark.filterwarnings("ignore:.*set_vital")


def test_default_shakespeare_goes_through_the_pipeline():
    cfg = load_config(["experiment=hat_tiny", "debug=cpu"])
    assert cfg.data.source == "shakespeare" and not cfg.data.streaming
    dm = ByteDataModule(cfg)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    T, B = cfg.data.seq_len, cfg.data.batch_size
    assert {k: tuple(v.shape) for k, v in b.items()} == {
        "input_ids": (B, T),
        "targets": (B, T),
        "doc_ids": (B, T),
        "word_start": (B, T),
    }
    assert b["word_start"].dtype == torch.bool and b["doc_ids"].dtype == torch.long
    assert dm.val_group_names == ["shakespeare"]
    v = next(iter(dm.val_dataloader()))
    assert (v["group"] == 0).all()
    assert (
        dm.stats["val/documents"] >= 1
        and dm.stats["train/documents"] > 30
        and dm.stats["train/empty_skipped"] == 0
    )


def test_mixture_reports_languages_and_scripts():
    cfg = load_config(["data=mixture", "debug=cpu", "data.val_max_bytes=512"])
    dm = ByteDataModule(cfg)
    dm.setup("validate")
    names = dm.val_group_names
    assert "shakespeare" in names and "chatterbot/japanese" in names and len(names) == 29
    rep = dm.val_report_groups
    assert [names[i] for i in rep["chatterbot/script/Han"]] == [
        "chatterbot/chinese",
        "chatterbot/traditionalchinese",
    ]
    groups = torch.cat([b["group"] for b in dm.val_dataloader()])
    assert set(groups.tolist()) == set(range(len(names)))


def test_streaming_training_resumes_byte_exact(tmp_path):
    from bytelm.train import run

    data = tmp_path / "corpus"
    data.mkdir()
    for f in range(4):
        (data / f"p{f}.jsonl").write_text(
            "".join(
                json.dumps({"text": f"file {f} document {i}: " + "lorem ipsum dolor " * (i % 5)}) + "\n"
                for i in range(30)
            )
        )
    base = [
        "experiment=flat_tiny",
        "debug=cpu",
        "trainer.val_every=1000",
        "trainer.ckpt_every=2",
        "data.source=files",
        f"data.paths=[{data}/*.jsonl]",
        "data.streaming=true",
        "data.num_workers=2",
        "data.shuffle_docs=8",
        "data.seq_len=48",
        "trainer.max_steps=5",
    ]
    seen: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    class Record(L.Callback):
        def __init__(self, key):
            self.key = key

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[self.key].append(batch["input_ids"].clone())

    res = run(
        load_config([*base, f"trainer.out_dir={tmp_path / 'a'}"]),
        callbacks=[Record("a"), DataStatsCallback(1)],
    )
    assert res["metrics"]["data/train/documents"] > 0  # input counts from the workers are logged
    ck = tmp_path / "a" / "checkpoints" / "step0000002.ckpt"
    run(load_config([*base, f"trainer.out_dir={tmp_path / 'b'}", f"ckpt_path={ck}"]), callbacks=[Record("b")])
    assert len(seen["a"]) == 5 and len(seen["b"]) == 3
    for x, y in zip(seen["a"][2:], seen["b"], strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("experiment", ["hat_tiny", "mrt5_tiny"])
def test_validation_split_is_even_over_ranks_and_sums_to_one_process(experiment, monkeypatch):
    """A validation split that does not divide over 2 or 3 ranks: every rank runs the same number of batches
    (padding rows carry no targets) and the ranks' summed bpb equals one process's to 1e-6."""
    from bytelm.lit.metrics import bits_per_byte
    from bytelm.lit.module import ByteLMModule

    torch.manual_seed(0)
    cfg = load_config(
        [f"experiment={experiment}", "debug=cpu", "data.val_max_bytes=2200", "data.batch_size=1"]
    )
    dm = ByteDataModule(cfg)
    dm.setup("validate")
    module = ByteLMModule(cfg)
    module.configure_model()
    module.eval()

    def sums(rank: int, world: int) -> tuple[float, float, int, int]:
        monkeypatch.setattr(dm, "_world", lambda: (rank, world))
        module.on_validation_epoch_start()
        batches = rows = 0
        with torch.no_grad():
            for i, b in enumerate(dm.val_dataloader()):
                module.validation_step(b, i)
                batches += 1
                rows += int((~b["padding"]).sum())
                assert (b["targets"][b["padding"]] == -100).all()
        s = sum(v[0] for v in module._val_sums.values())
        n = sum(v[1] for v in module._val_sums.values())
        return s, n, batches, rows

    s1, n1, _, rows1 = sums(0, 1)
    single = bits_per_byte(s1, int(n1))
    for world in (2, 3):
        assert rows1 % world, (rows1, world)  # the split really is uneven
        per_rank = [sums(r, world) for r in range(world)]
        assert len({p[2] for p in per_rank}) == 1, per_rank  # the same number of batches on every rank
        assert sum(p[3] for p in per_rank) == rows1  # every real row exactly once
        assert sum(p[1] for p in per_rank) == n1
        got = bits_per_byte(sum(p[0] for p in per_rank), int(sum(p[1] for p in per_rank)))
        assert abs(got - single) < 1e-6, (world, got, single)
