"""End-to-end training on the embedded corpus (tiny, CPU): checkpoints reload to identical logits, resume
continues on exactly the data an uninterrupted run would see, bad checkpoints are detected."""

from __future__ import annotations

import torch

from bytelm.checkpoint import CorruptCheckpointError, latest_valid_checkpoint, load_model, read_checkpoint
from bytelm.config import load_config
from bytelm.train import run


def test_train_20_steps_checkpoint_reloads_identically(tmp_path, tiny_overrides):
    cfg = load_config(
        ["experiment=flat_tiny", *tiny_overrides, "trainer.max_steps=20", "trainer.ckpt_every=10"]
    )
    res = run(cfg)
    assert res["global_step"] == 20
    bpb = res["metrics"]["val/bpb"]
    assert 0 < bpb < 8.5  # finite, near or below uniform after 20 tiny steps
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    model, cfg2 = load_model(ckpt)
    live = res["module"].model.eval()
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(x).logits, live(x).logits)
    assert cfg2.model == cfg.model


def test_resume_sees_the_same_batches(tmp_path):
    base = ["experiment=flat_tiny", "debug=cpu", "trainer.val_every=1000", "trainer.ckpt_every=4"]
    cfg_a = load_config([*base, f"trainer.out_dir={tmp_path / 'a'}", "trainer.max_steps=8"])
    seen_a: list[torch.Tensor] = []
    seen_b: list[torch.Tensor] = []

    class Record(__import__("lightning").Callback):
        def __init__(self, store):
            self.store = store

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.store.append(batch["input_ids"].clone())

    run(cfg_a, callbacks=[Record(seen_a)])
    ck = tmp_path / "a" / "checkpoints" / "step0000004.ckpt"
    assert ck.exists()
    assert torch.load(ck, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    cfg_b = load_config(
        [*base, f"trainer.out_dir={tmp_path / 'b'}", "trainer.max_steps=8", f"ckpt_path={ck}"]
    )
    run(cfg_b, callbacks=[Record(seen_b)])
    assert len(seen_b) == 4
    for x, y in zip(seen_a[4:], seen_b, strict=True):
        assert torch.equal(x, y)


def test_corrupt_checkpoint_detected_and_skipped(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    good = folder / "step0000001.ckpt"
    torch.save({"state_dict": {}, "bytelm_config": {}}, good)
    bad = folder / "step0000002.ckpt"
    bad.write_bytes(b"\x00garbage")
    import os
    import time

    os.utime(bad, (time.time() + 5, time.time() + 5))  # newest
    try:
        read_checkpoint(bad)
        raise AssertionError("corrupt checkpoint was accepted")
    except CorruptCheckpointError as e:
        assert "step0000002" in str(e)
    assert latest_valid_checkpoint(folder) == good


def test_missing_checkpoint_path_is_clear(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_model(tmp_path / "nope.ckpt")


def test_validation_reports_bpb_per_language_group(tmp_path):
    """A mixture with the multilingual corpus logs val/bpb per validation group and their byte-weighted
    total."""
    cfg = load_config(
        [
            "experiment=flat_tiny",
            "debug=cpu",
            "data=mixture",
            f"trainer.out_dir={tmp_path}",
            "trainer.max_steps=2",
            "trainer.val_every=2",
            "data.val_max_bytes=512",
        ]
    )
    res = run(cfg)
    per_group = {k: v for k, v in res["metrics"].items() if k.startswith("val/bpb/")}
    assert len(per_group) >= 3, per_group  # Shakespeare + several chatterbot languages
    assert all(0 < v < 12 for v in per_group.values())
    assert 0 < res["metrics"]["val/bpb"] < 12
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert "val/bpb" in ckpt["bytelm_metrics"]


def test_ckpt_path_last_without_a_checkpoint_says_so(tmp_path, caplog):
    """``ckpt_path=last`` in a run folder with no checkpoint trains from scratch, with a warning naming the
    folder."""
    import logging

    from bytelm.train import resolve_ckpt_path

    cfg = load_config(["experiment=flat_tiny", "debug=cpu", f"trainer.out_dir={tmp_path}", "ckpt_path=last"])
    with caplog.at_level(logging.WARNING, logger="bytelm.train"):
        assert resolve_ckpt_path(cfg) is None
    assert "no valid checkpoint" in caplog.text and str(tmp_path / "checkpoints") in caplog.text
