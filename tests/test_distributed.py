"""Every strategy really trains with 2 CPU processes (gloo): losses match a single-process run on the same
global batch, checkpoints are written, resume gives the same next-step losses, ZeRO-3 / FSDP2 shards
consolidate to the single-process weights, and ZeRO-3 / FSDP2 never hold the full model on one rank.

Each run is a subprocess (``python tests/test_distributed.py OUT overrides...``; Lightning starts rank 1 by
running the same command again), so the test process stays free of process groups.
Run alone: ``pytest -m distributed`` (all of them, slow ones included); the default suite runs ddp, ZeRO-3 and
FSDP2 (``-m "distributed and not slow"``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
STEPS, CKPT_AT, GLOBAL_BATCH = 6, 3, 4
BASE = ["debug=cpu", f"trainer.max_steps={STEPS}", "trainer.val_every=1000", f"trainer.ckpt_every={CKPT_AT}",
        "trainer.keep_last=3", "logger.kind=none"]
TIMEOUT = 600

pytestmark = pytest.mark.distributed


def launch(out: Path, overrides: list[str], devices: int, accelerator: str = "cpu") -> dict[str, Any]:
    """Run one training job (``devices`` processes); returns its per-rank records and wall time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(k, None)
    args = [f"trainer.out_dir={out}", f"data.batch_size={GLOBAL_BATCH // devices}", *BASE, *overrides]
    if devices > 1 or accelerator != "cpu":
        args += [f"trainer.devices={devices}", f"trainer.accelerator={accelerator}"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE), str(out / "record"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    ranks = [json.loads((out / f"record.rank{r}.json").read_text()) for r in range(devices)]
    return {"ranks": ranks, "wall": wall}


def global_losses(run: dict[str, Any]) -> dict[int, float]:
    """Mean over ranks of each step's loss = the loss of the global batch (equal-sized rows, no padding)."""
    ranks = run["ranks"]
    steps = sorted(int(s) for s in ranks[0]["losses"])
    return {s: sum(r["losses"][str(s)] for r in ranks) / len(ranks) for s in steps}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("single")
    run = launch(out, [], devices=1)
    run["out"] = out
    return run


STRATEGIES = ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"]
# ZeRO-2 shares DeepSpeed's code paths with ZeRO-3 (which also covers deferred init and consolidation): it
# runs with `pytest -m distributed` / `make test-slow`, not in the default suite, to keep that under budget.
DEFAULT_SUITE = [pytest.param(s, marks=pytest.mark.slow) if s == "deepspeed_zero2" else s for s in STRATEGIES]


@pytest.mark.parametrize("strategy", DEFAULT_SUITE)
def test_two_processes_match_single_and_resume_exactly(strategy, single, tmp_path):
    from bytelm.checkpoint import latest_valid_checkpoint, validate_checkpoint

    a = launch(tmp_path / "a", [f"strategy={strategy}"], devices=2)
    ref, got = global_losses(single), global_losses(a)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:  # same weights, same global batch: only the reduction order differs
        assert abs(got[s] - ref[s]) < 2e-4, (strategy, s, got[s], ref[s])
    assert got[STEPS] < got[1]  # it learns

    ck = tmp_path / "a" / "checkpoints"
    mid = ck / f"step{CKPT_AT:07d}.ckpt"
    validate_checkpoint(mid)
    assert latest_valid_checkpoint(ck) is not None
    if strategy in ("deepspeed_zero2", "deepspeed_zero3", "fsdp2"):
        assert mid.is_dir()  # sharded folder

    # resume from the mid-run checkpoint: the next steps see the same data and give the same losses
    b = launch(tmp_path / "b", [f"strategy={strategy}", f"ckpt_path={mid}"], devices=2)
    for r in range(2):
        resumed = b["ranks"][r]["losses"]
        assert sorted(int(s) for s in resumed) == list(range(CKPT_AT + 1, STEPS + 1))
        for s, v in resumed.items():
            assert abs(v - a["ranks"][r]["losses"][s]) < 1e-6, (strategy, r, s, v, a["ranks"][r]["losses"][s])

    full = a["ranks"][0]["full_numel"]
    for r in range(2):  # ZeRO-3 / FSDP2: each rank holds about half the parameters
        local = a["ranks"][r]["local_numel"]
        if strategy in ("deepspeed_zero3", "fsdp2"):
            assert local <= full * 0.6, (strategy, r, local, full)
        else:
            assert local == full
    print(f"{strategy}: 2-proc run {a['wall']:.1f}s, resume {b['wall']:.1f}s, "
          f"max |loss - single| {max(abs(got[s] - ref[s]) for s in got):.2e}")

    if strategy in ("deepspeed_zero3", "fsdp2"):
        check_consolidation(ck / "last.ckpt", single["out"] / "checkpoints" / "last.ckpt", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(strategy, tmp_path, monkeypatch):
    """Rank 1 alone gets a NaN loss at the second step: both ranks skip that step (no rank updates, none
    hangs in a collective), count it, and training goes on."""
    monkeypatch.setenv("BYTELM_TEST_NAN_STEP", "1:1")
    a = launch(tmp_path, [f"strategy={strategy}", "trainer.max_steps=3", "trainer.ckpt_every=1000"], devices=2)
    for r in range(2):
        assert a["ranks"][r]["changed"] == [True, False, True], (strategy, r, a["ranks"][r])
        assert a["ranks"][r]["bad_steps"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "fsdp2"])
def test_hierarchical_model_shards_every_block(strategy, tmp_path):
    """The hierarchical model (encoder / backbone / decoder block lists) under ZeRO-3 and FSDP2 matches one
    process on the same global batch."""
    hat = ["experiment=hat_tiny", "trainer.max_steps=3", "trainer.ckpt_every=1000"]
    ref = global_losses(launch(tmp_path / "single", hat, devices=1))
    a = launch(tmp_path / "a", [*hat, f"strategy={strategy}"], devices=2)
    got = global_losses(a)
    assert all(abs(got[s] - ref[s]) < 2e-4 for s in got), (got, ref)
    assert a["ranks"][0]["local_numel"] <= 0.6 * a["ranks"][0]["full_numel"]


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_cuda_bf16_matches_single_gpu(strategy, tmp_path):
    """scripts/gpu_check.sh: the same check on CUDA in bf16 (NCCL); 2 GPUs when there are, else 1."""
    n = min(2, _cuda_devices())
    if n == 0:
        pytest.skip("needs CUDA")
    gpu = ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"]
    ref = launch(tmp_path / "single", [*gpu, "trainer.devices=1"], devices=1)
    a = launch(tmp_path / "a", [*gpu, f"strategy={strategy}"], devices=n, accelerator="gpu")
    want, got = global_losses(ref), global_losses(a)
    for s in got:  # bf16: agreement to bf16 rounding, not to the last bit
        assert abs(got[s] - want[s]) < 3e-2, (strategy, s, got[s], want[s])
    mid = tmp_path / "a" / "checkpoints" / f"step{CKPT_AT:07d}.ckpt"
    b = launch(tmp_path / "b", [*gpu, f"strategy={strategy}", f"ckpt_path={mid}"], devices=n, accelerator="gpu")
    for r in range(n):
        for s, v in b["ranks"][r]["losses"].items():
            assert abs(v - a["ranks"][r]["losses"][s]) < 1e-2, (strategy, r, s)
    print(f"cuda {strategy} x{n}: max |loss - single| {max(abs(got[s] - want[s]) for s in got):.2e}, "
          f"run {a['wall']:.1f}s")


def check_consolidation(sharded: Path, reference: Path, tmp_path: Path) -> None:
    """bytelm-consolidate -> one fp32 safetensors; it and the folder itself load to the reference weights."""
    import torch

    from bytelm.checkpoint import load_model
    from bytelm.cli.consolidate import main as consolidate_main

    out = tmp_path / "model.safetensors"
    assert consolidate_main([str(sharded), str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    from safetensors.torch import load_file

    sd = load_file(str(out))
    assert all(v.dtype == torch.float32 for v in sd.values())
    ref, _ = load_model(reference)
    x = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        want = ref(x).logits
        for src in (out, sharded):
            model, cfg = load_model(src)
            assert (model(x).logits - want).abs().max() < 1e-4, src


# --------------------------------------------------------------------------------- the subprocess side


def _local_numel(model: Any) -> tuple[int, int]:
    """(elements this rank stores, elements of the full model)."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
            local += p.ds_tensor.numel()
            full += p.ds_numel
        elif hasattr(p, "to_local"):  # FSDP2 DTensor shard
            local += p.to_local().numel()
            full += p.numel()
        else:
            local += p.numel()
            full += p.numel()
    return local, full


def _local_tensors(model: Any) -> list[Any]:
    """The parameter data this rank stores (ZeRO-3 partition, FSDP2 local shard, or the whole tensor)."""
    out = []
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            out.append(p.ds_tensor)
        elif hasattr(p, "to_local"):
            out.append(p.to_local())
        else:
            out.append(p)
    return out


def _main(argv: list[str]) -> None:
    import lightning as L

    from bytelm.config import load_config
    from bytelm.train import run

    class Record(L.Callback):
        def __init__(self, prefix: str) -> None:
            self.prefix = prefix
            self.data: dict[str, Any] = {"losses": {}}

        def on_train_start(self, trainer, pl_module) -> None:
            self.data["local_numel"], self.data["full_numel"] = _local_numel(pl_module.model)
            nan_at = os.environ.get("BYTELM_TEST_NAN_STEP")  # "STEP:RANK": NaN loss on one rank only
            if nan_at:
                step, rank = (int(v) for v in nan_at.split(":"))
                import torch

                def poison(batch, out):
                    bad = trainer.global_step == step and trainer.global_rank == rank
                    return torch.tensor(float("nan") if bad else 0.0), {}

                pl_module.extra_loss = poison

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.before = [t.detach().clone() for t in _local_tensors(pl_module.model)]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = _local_tensors(pl_module.model)
            changed = any(not a.equal(b) for a, b in zip(self.before, now, strict=True))
            self.data.setdefault("changed", []).append(changed)
            self.data["bad_steps"] = pl_module.bad_steps
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.data["losses"][str(trainer.global_step)] = float(loss) if loss is not None else None

        def on_train_end(self, trainer, pl_module) -> None:
            Path(f"{self.prefix}.rank{trainer.global_rank}.json").write_text(json.dumps(self.data))

    run(load_config(argv[1:]), callbacks=[Record(argv[0])])


if __name__ == "__main__":
    _main(sys.argv[1:])
