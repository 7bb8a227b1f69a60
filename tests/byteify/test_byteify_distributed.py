"""Byteification with 2 CPU processes (gloo) under FSDP2 and DeepSpeed ZeRO-3: stage 1 trains and validates on
a split that does not divide evenly over the ranks, resumes exactly, and stage 2 starts from the stage-1
checkpoint (sharded folder) and trains the backbone.

Each run is a subprocess (``python tests/byteify/test_byteify_distributed.py OUT overrides...``; Lightning
starts rank 1 by running the same command again) in its own session, killed with its children when it
overruns: a hang is a failure, never a wait. Collectives time out too (``trainer.collective_timeout_s``).
Default suite: FSDP2 (one representative case); ZeRO-3 runs with ``-m distributed`` / ``make test-slow``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
TIMEOUT = 300  # seconds per launch (2 processes); a tiny run takes well under a minute
SEQ_LEN, PER_RANK_BATCH = 64, 2
# validation rows = ceil(val_max_bytes / seq_len), dealt out as range(rank, n, world):
# 3 rows -> rank 0 gets 2, rank 1 gets 1: uneven rows, one batch on each rank
VAL_UNEVEN_ROWS = 3 * SEQ_LEN - 30
# 5 rows -> rank 0 gets 3 (2 batches), rank 1 gets 2 (1 batch): ranks run different numbers of validation
# batches, which hangs ZeRO-3 / FSDP2 (parameter all-gathers in the forward) until the uneven-validation fix
VAL_UNEVEN_BATCHES = 5 * SEQ_LEN - 30

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(4 * TIMEOUT)]


def launch(out: Path, overrides: list[str]) -> dict[str, Any]:
    """One 2-process training job; returns the per-rank records and its wall time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(k, None)
    args = [f"trainer.out_dir={out}", "trainer.devices=2", "trainer.accelerator=cpu", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(HERE), str(out / "record"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it started (same session)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"2-process run hung (> {TIMEOUT}s), killed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        ) from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    ranks = [json.loads((out / f"record.rank{r}.json").read_text()) for r in range(2)]
    return {"ranks": ranks, "wall": wall}


def byteify_args(source: Path, strategy: str, *extra: str) -> list[str]:
    return [
        "experiment=byteify_smollm2",
        "debug=cpu",
        f"byteify.source={source}",
        "byteify.encoder_blocks=1",
        "distill.cache_dir=null",
        f"strategy={strategy}",
        "trainer.collective_timeout_s=120",
        "logger.kind=none",
        f"data.seq_len={SEQ_LEN}",
        f"data.batch_size={PER_RANK_BATCH}",
        "trainer.keep_last=3",
        *extra,
    ]


def check_validated(run: dict[str, Any], times: int) -> None:
    for r, rec in enumerate(run["ranks"]):
        assert rec["val_runs"] >= times, (r, rec["val_runs"])
    assert math.isfinite(run["ranks"][0]["val_bpb"]) and 0 < run["ranks"][0]["val_bpb"] < 20


@pytest.mark.parametrize("strategy", ["fsdp2", pytest.param("deepspeed_zero3", marks=pytest.mark.slow)])
def test_stage1_validates_resumes_exactly_and_stage2_continues(strategy, tiny_source, tmp_path):
    steps = [
        "trainer.max_steps=4",
        "trainer.ckpt_every=2",
        "trainer.val_every=2",
        f"data.val_max_bytes={VAL_UNEVEN_ROWS}",
    ]
    a = launch(tmp_path / "a", byteify_args(tiny_source, strategy, *steps))
    for rec in a["ranks"]:
        assert sorted(int(s) for s in rec["losses"]) == [1, 2, 3, 4]
        assert all(math.isfinite(v) for v in rec["losses"].values())
        assert rec["local_numel"] <= 0.6 * rec["full_numel"]  # really sharded
        changed = rec["changed"]
        assert changed["boundary."] and changed["encoder."]
        assert not changed["backbone."] and not changed["source_embed."]  # stage 1: frozen
    check_validated(a, 2)
    ck = tmp_path / "a" / "checkpoints"
    mid = ck / "step0000002.ckpt"
    assert mid.is_dir()  # a sharded folder

    b = launch(tmp_path / "b", byteify_args(tiny_source, strategy, *steps, f"ckpt_path={mid}"))
    for r in range(2):
        resumed, full = b["ranks"][r]["losses"], a["ranks"][r]["losses"]
        assert sorted(int(s) for s in resumed) == [3, 4]
        for s, v in resumed.items():
            assert abs(v - full[s]) < 1e-6, (strategy, r, s, v, full[s])
        assert b["ranks"][r]["end_sums"] == pytest.approx(a["ranks"][r]["end_sums"], rel=1e-6, abs=1e-9)

    stage2 = [  # two stage-2 steps from the stage-1 checkpoint, validated on the uneven split
        "trainer.max_steps=2",
        "trainer.ckpt_every=1000",
        "trainer.val_every=2",
        f"data.val_max_bytes={VAL_UNEVEN_ROWS}",
        "byteify.stage=2",
        f"byteify.init_from={ck / 'last.ckpt'}",
    ]
    c = launch(tmp_path / "c", byteify_args(tiny_source, strategy, *stage2))
    for r in range(2):
        rec = c["ranks"][r]
        # stage 2 starts from the stage-1 weights (same sharding: the same local shards)
        assert rec["start_sums"] == pytest.approx(a["ranks"][r]["end_sums"], rel=1e-6, abs=1e-9)
        assert all(math.isfinite(v) for v in rec["losses"].values())
        assert rec["changed"]["backbone."] and rec["changed"]["boundary."]  # stage 2 keeps the boundary loss
    check_validated(c, 1)

    d = launch(  # make byteify's stage 2: only the patch projection trains, the rest frozen on every rank
        tmp_path / "d",
        byteify_args(
            tiny_source, strategy, *stage2, "byteify.freeze_backbone=true", "byteify.train_only=[pool.]"
        ),
    )
    for r in range(2):
        changed = d["ranks"][r]["changed"]
        assert all(math.isfinite(v) for v in d["ranks"][r]["losses"].values())
        assert changed["pool."] and not any(v for k, v in changed.items() if k != "pool."), changed
    check_validated(d, 1)
    print(
        f"{strategy}: stage 1 {a['wall']:.0f}s, resume {b['wall']:.0f}s, stage 2 {c['wall']:.0f}s, "
        f"stage 2 on the projection {d['wall']:.0f}s"
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_zero3"])
def test_validation_with_different_batch_counts_per_rank(strategy, tiny_source, tmp_path):
    run = launch(
        tmp_path,
        byteify_args(
            tiny_source,
            strategy,
            "trainer.max_steps=2",
            "trainer.val_every=2",
            "trainer.ckpt_every=1000",
            f"data.val_max_bytes={VAL_UNEVEN_BATCHES}",
        ),
    )
    check_validated(run, 1)


# --------------------------------------------------------------------------------- the subprocess side
PREFIXES = ("backbone.", "boundary.", "encoder.", "source_embed.", "decoder.", "pool.")


def _local(p: Any) -> Any:
    if hasattr(
        p, "ds_tensor"
    ):  # ZeRO-3 partition, without its padding (rank r holds [r * part, (r + 1) * part))
        import torch.distributed as dist

        part = p.ds_tensor.numel()
        return p.ds_tensor.flatten()[: max(0, min(part, p.ds_numel - dist.get_rank() * part))]
    if hasattr(p, "to_local"):  # FSDP2 DTensor shard
        return p.to_local()
    return p


def _sums(model: Any) -> dict[str, float]:
    return {n: float(_local(p).detach().double().sum()) for n, p in model.named_parameters()}


def _main(argv: list[str]) -> None:
    import lightning as L
    import torch

    from bytelm.config import load_config
    from bytelm.train import run

    class Record(L.Callback):
        def __init__(self, prefix: str) -> None:
            self.prefix = prefix
            self.data: dict[str, Any] = {"losses": {}, "val_runs": 0}

        def on_train_start(self, trainer, pl_module) -> None:
            m = pl_module.model
            self.data["start_sums"] = _sums(m)
            self.start = {n: _local(p).detach().clone() for n, p in m.named_parameters()}
            local = full = 0
            for p in m.parameters():
                local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else _local(p).numel()
                full += getattr(p, "ds_numel", p.numel())
            self.data["local_numel"], self.data["full_numel"] = local, full

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.data["losses"][str(trainer.global_step)] = float(loss)

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.data["val_runs"] += 1

        def on_train_end(self, trainer, pl_module) -> None:
            m = pl_module.model
            self.data["end_sums"] = _sums(m)
            changed = {k: False for k in PREFIXES}
            for n, p in m.named_parameters():
                for k in PREFIXES:
                    if n.startswith(k) and not torch.equal(_local(p).detach(), self.start[n]):
                        changed[k] = True
            self.data["changed"] = changed
            v = trainer.callback_metrics.get("val/bpb")
            self.data["val_bpb"] = float(v) if v is not None else float("nan")
            Path(f"{self.prefix}.rank{trainer.global_rank}.json").write_text(json.dumps(self.data))

    run(load_config(argv[1:]), callbacks=[Record(argv[0])])


if __name__ == "__main__":
    _main(sys.argv[1:])
