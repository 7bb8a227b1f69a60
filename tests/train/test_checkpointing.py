"""Checkpoints: atomic writes, keep-last-k, resume from the newest valid one when the newest is corrupt,
sharded-folder validation, and consolidation to one fp32 safetensors file (single process, no GPU)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from bytelm.checkpoint import (
    CorruptCheckpointError,
    consolidate,
    consolidated_state_dict,
    latest_valid_checkpoint,
    load_model,
    validate_checkpoint,
)
from bytelm.config import config_to_dict, load_config
from bytelm.lit.checkpoint_io import AtomicCheckpointIO
from bytelm.lit.strategies import swap_in
from bytelm.train import resolve_ckpt_path, run


class FirstStep(L.Callback):
    def __init__(self) -> None:
        self.first: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first is None:
            self.first = trainer.global_step


def test_atomic_checkpoint_io_keeps_old_file_on_crash(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    assert torch.load(path)["state_dict"]["w"].sum() == 2
    assert not (tmp_path / "last.ckpt.tmp").exists()

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    def crash(self, checkpoint, p, storage_options=None):
        Path(p).write_bytes(b"PK\x03\x04half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    assert torch.load(path)["state_dict"]["w"].sum() == 2  # the previous checkpoint is intact


def test_swap_in_replaces_folders(tmp_path):
    final, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    final.mkdir()
    (final / "a").write_text("old")
    tmp.mkdir()
    (tmp / "b").write_text("new")
    swap_in(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert not tmp.exists() and not (tmp_path / "last.ckpt.old").exists()


def test_keep_last_k_and_resume_past_corrupt_newest(tmp_path, caplog):
    base = [
        "debug=cpu",
        "trainer.val_every=1000",
        "trainer.ckpt_every=2",
        "trainer.keep_last=2",
        f"trainer.out_dir={tmp_path}",
    ]
    run(load_config([*base, "trainer.max_steps=8"]))
    ck = tmp_path / "checkpoints"
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["last.ckpt", "step0000006.ckpt", "step0000008.ckpt"], names  # keep-last-2 + last
    assert not list(ck.glob("*.tmp"))

    # a crash truncated the two newest files: resume goes back to step 6, reporting what it skipped
    for name in ("last.ckpt", "step0000008.ckpt"):
        p = ck / name
        p.write_bytes(p.read_bytes()[:100])
        os.utime(p, (time.time() + 5, time.time() + 5))
    with caplog.at_level(logging.WARNING, logger="bytelm.checkpoint"):
        cfg = load_config([*base, "trainer.max_steps=10", "ckpt_path=last"])
        assert resolve_ckpt_path(cfg) == str(ck / "step0000006.ckpt")
    assert "last.ckpt" in caplog.text and "step0000008" in caplog.text
    first = FirstStep()
    res = run(cfg, callbacks=[first])
    assert first.first == 6 and res["global_step"] == 10
    validate_checkpoint(ck / "last.ckpt")


def test_last_without_checkpoints_starts_fresh(tmp_path):
    cfg = load_config(["debug=cpu", f"trainer.out_dir={tmp_path}", "ckpt_path=last"])
    assert resolve_ckpt_path(cfg) is None


def _tiny_cfg(tmp_path, *extra):
    return load_config(["debug=cpu", f"trainer.out_dir={tmp_path}", *extra])


def test_consolidate_single_file_to_safetensors(tmp_path):
    cfg = _tiny_cfg(tmp_path, "model.tie_embeddings=true")
    from bytelm.models import build_model

    model = build_model(cfg.model)
    ckpt = tmp_path / "m.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "bytelm_config": config_to_dict(cfg),
        },
        ckpt,
    )
    out, side = consolidate(ckpt, tmp_path / "out" / "m.safetensors")
    assert side.name == "m.json" and '"tie_embeddings": true' in side.read_text()
    loaded, cfg2 = load_model(out)
    assert cfg2.model == cfg.model
    x = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model.eval()(x).logits)


def _write_dcp(folder: Path, cfg, model: torch.nn.Module) -> None:
    """A distributed checkpoint as FSDP2 writes it (written here in one process)."""
    import torch.distributed.checkpoint as dcp

    sd = {f"model.{k}": v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    dcp.save({"state_dict": sd}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"bytelm_config": config_to_dict(cfg), "global_step": 3}, folder / "meta.pt")


def test_dcp_folder_consolidates_to_fp32_and_truncation_is_detected(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    from bytelm.models import build_model

    model = build_model(cfg.model)
    folder = tmp_path / "checkpoints" / "step0000003.ckpt"
    folder.mkdir(parents=True)
    _write_dcp(folder, cfg, model)
    validate_checkpoint(folder)
    sd, cfg2 = consolidated_state_dict(folder)
    assert cfg2.model == cfg.model
    assert all(v.dtype == torch.float32 for v in sd.values())
    ref = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert latest_valid_checkpoint(folder.parent) == folder

    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(CorruptCheckpointError, match="short"):
        validate_checkpoint(folder)
    assert latest_valid_checkpoint(folder.parent) is None


def test_deepspeed_folder_missing_shard_is_corrupt(tmp_path):
    folder = tmp_path / "step0000004.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    torch.save(
        {"dp_world_size": 2, "bytelm_config": {}}, folder / "checkpoint" / "mp_rank_00_model_states.pt"
    )
    torch.save({}, folder / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CorruptCheckpointError, match="1 optimizer shards for 2 ranks"):
        validate_checkpoint(folder)
    torch.save({}, folder / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    validate_checkpoint(folder)
    (folder / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03")
    with pytest.raises(CorruptCheckpointError, match="zero_pp_rank_1"):
        validate_checkpoint(folder)


def test_consolidate_cli_on_run_folder(tmp_path, capsys):
    from bytelm.cli.consolidate import main

    cfg = _tiny_cfg(tmp_path)
    from bytelm.models import build_model

    model = build_model(cfg.model)
    (tmp_path / "checkpoints").mkdir()
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "bytelm_config": config_to_dict(cfg),
        },
        tmp_path / "checkpoints" / "last.ckpt",
    )
    out = tmp_path / "w.safetensors"
    assert main([str(tmp_path), str(out)]) == 0
    assert out.is_file() and (tmp_path / "w.json").is_file()
    for bad in ([str(tmp_path), str(tmp_path / "w.bin")], [str(tmp_path / "nope"), str(out)]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("bytelm-consolidate: error: "), err
        assert err.count("\n") == 1, err
