"""Every strategy really trains with 2 CPU processes (gloo): losses match a single-process run on the same
global batch, checkpoints are written, resume gives the same next-step losses, ZeRO-3 / FSDP2 shards
consolidate to the single-process weights, and ZeRO-3 / FSDP2 never hold the full model on one rank.

Every run validates during training on a split that does not divide evenly over the ranks (37 rows: uneven
over 2 and 3 ranks, and in batches too), and its validation bpb matches the single process. A hang is a
failure: runs use a short collective timeout (``trainer.collective_timeout_s``), a rank that stalls makes the
run fail within it, SIGTERM ends a run within seconds (with ``last.ckpt``), also one stuck in a collective.

Each run is a subprocess (``python tests/train/test_distributed.py OUT overrides...``; Lightning starts the
other ranks by running the same command again) in a session of its own, killed as a whole on timeout, so the
test process stays free of process groups and no rank outlives its test.
Run alone: ``pytest -m distributed`` (all of them, slow ones included); the default suite runs ddp, ZeRO-3 and
FSDP2 (``-m "distributed and not slow"``).
"""

from __future__ import annotations

import contextlib
import json
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
STEPS, CKPT_AT, GLOBAL_BATCH, VAL_EVERY = 6, 3, 6, 2
# 37 validation rows of 64 bytes: 19/18 rows (7/6 batches of 3) on 2 ranks, 13/12/12 (7/6/6 batches of 2) on 3
VAL_BYTES = 2340
BASE = [
    "debug=cpu",
    f"trainer.max_steps={STEPS}",
    f"trainer.val_every={VAL_EVERY}",
    f"trainer.ckpt_every={CKPT_AT}",
    "trainer.keep_last=3",
    "logger.kind=none",
    f"data.val_max_bytes={VAL_BYTES}",
    "trainer.collective_timeout_s=60",
]
TIMEOUT = 600

pytestmark = pytest.mark.distributed


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), **extra)
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(k, None)
    return env


def _args(out: Path, overrides: list[str], devices: int, accelerator: str = "cpu") -> list[str]:
    args = [f"trainer.out_dir={out}", f"data.batch_size={GLOBAL_BATCH // devices}", *BASE, *overrides]
    if devices > 1 or accelerator != "cpu":
        args += [f"trainer.devices={devices}", f"trainer.accelerator={accelerator}"]
    return args


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A job in a session of its own (so every rank it launches can be killed with it)."""
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait for the job; a job still running after ``timeout`` is killed (all its ranks) and fails the
    test."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"job still running after {timeout:.0f} s (a hang): killed") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any rank left behind
        if proc.poll() is None:
            proc.communicate()


def launch(out: Path, overrides: list[str], devices: int, accelerator: str = "cpu") -> dict[str, Any]:
    """Run one training job (``devices`` processes); returns its per-rank records and wall time."""
    t0 = time.perf_counter()
    proc = start(
        [sys.executable, str(HERE), str(out / "record"), *_args(out, overrides, devices, accelerator)], _env()
    )
    stdout, stderr = finish(proc, TIMEOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    ranks = [json.loads((out / f"record.rank{r}.json").read_text()) for r in range(devices)]
    return {"ranks": ranks, "wall": wall}


def check_validation(got: dict[str, Any], ref: dict[str, Any], upto: int = STEPS) -> None:
    """Validation ran at every ``VAL_EVERY`` steps on rank 0 and its bpb matches the single process (same
    weights up to the reduction order, every validation byte once)."""
    want = {s: v for s, v in ref["ranks"][0]["val"].items() if int(s) <= upto}
    have = got["ranks"][0]["val"]
    assert sorted(have) == sorted(want) and len(want) == upto // VAL_EVERY, (have, want)
    for s in want:
        assert abs(have[s] - want[s]) < 1e-3, (s, have[s], want[s])


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


STRATEGIES = ["ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"]
# ZeRO-1/2 share DeepSpeed's code paths with ZeRO-3 (which also covers deferred init and consolidation): they
# run with `pytest -m distributed` / `make test-slow`, not in the default suite, to keep that under budget.
SLOW = ("deepspeed_zero1", "deepspeed_zero2")
DEFAULT_SUITE = [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in STRATEGIES]


@pytest.mark.parametrize("strategy", DEFAULT_SUITE)
def test_two_processes_match_single_and_resume_exactly(strategy, single, tmp_path):
    from bytelm.checkpoint import latest_valid_checkpoint, validate_checkpoint

    a = launch(tmp_path / "a", [f"strategy={strategy}"], devices=2)
    ref, got = global_losses(single), global_losses(a)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:  # same weights, same global batch: only the reduction order differs
        assert abs(got[s] - ref[s]) < 2e-4, (strategy, s, got[s], ref[s])
    check_validation(a, single)

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
    print(
        f"{strategy}: 2-proc run {a['wall']:.1f}s, resume {b['wall']:.1f}s, "
        f"max |loss - single| {max(abs(got[s] - ref[s]) for s in got):.2e}"
    )

    if strategy in ("deepspeed_zero3", "fsdp2"):
        check_consolidation(ck / "last.ckpt", single["out"] / "checkpoints" / "last.ckpt", tmp_path)


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param("ddp", marks=pytest.mark.slow),
        pytest.param("deepspeed_zero3", marks=pytest.mark.slow),
        "fsdp2",
    ],
)
def test_three_processes_validate_an_uneven_split(strategy, single, tmp_path):
    """3 ranks, 37 validation rows (13/12/12): the same number of validation batches on every rank (ZeRO-3 and
    FSDP2 forwards are collectives), the losses and the validation bpb of the single process."""
    steps = VAL_EVERY
    a = launch(
        tmp_path, [f"strategy={strategy}", f"trainer.max_steps={steps}", "trainer.ckpt_every=1000"], devices=3
    )
    ref, got = global_losses(single), global_losses(a)
    assert sorted(got) == list(range(1, steps + 1))
    for s in got:
        assert abs(got[s] - ref[s]) < 2e-4, (strategy, s, got[s], ref[s])
    check_validation(a, single, upto=steps)
    print(f"{strategy}: 3-proc run {a['wall']:.1f}s")


def test_cli_uneven_validation_prints_one_final_line(tmp_path):
    """The command of the bug report (FSDP2, 2 ranks, 2100 validation bytes: 33 rows), through the CLI: it
    validates, ends, and the final ``[bytelm] ... val bpb`` line appears once, not once per rank."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "bytelm.train",
        "experiment=hat_tiny",
        "debug=cpu",
        "strategy=fsdp2",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.val_max_bytes=2100",
        "trainer.max_steps=2",
        "trainer.val_every=2",
        "trainer.collective_timeout_s=60",
        f"trainer.out_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    proc = start(cmd, _env())
    stdout, stderr = finish(proc, TIMEOUT)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("[bytelm]") and "val bpb" in ln]
    assert len(lines) == 1, stdout
    assert "val bpb None" not in lines[0]


def _stalled_run(tmp_path: Path, strategy: str, extra: list[str]) -> subprocess.Popen:
    """A 2-rank run whose rank 1 stops responding (sleeps in Python) at the start of step 2."""
    args = _args(
        tmp_path,
        [
            f"strategy={strategy}",
            "trainer.max_steps=1000",
            "trainer.ckpt_every=1",
            "trainer.val_every=1000",
            *extra,
        ],
        devices=2,
    )
    return start([sys.executable, str(HERE), str(tmp_path / "record"), *args], _env(BYTELM_TEST_STALL="1:2"))


@pytest.mark.parametrize(
    "strategy", [pytest.param(s, marks=pytest.mark.slow) if s != "fsdp2" else s for s in STRATEGIES]
)
def test_a_stalled_rank_fails_the_run_within_the_collective_timeout(strategy, tmp_path):
    """Rank 1 stalls; rank 0 waits in a collective for ``trainer.collective_timeout_s`` (30 s: the same
    timeout bounds the start-up rendezvous, which a loaded 2-core machine needs), then raises and takes the
    ranks it launched along: the run fails in bounded time instead of hanging."""
    t0 = time.perf_counter()
    proc = _stalled_run(tmp_path, strategy, ["trainer.collective_timeout_s=30"])
    stdout, stderr = finish(proc, 300)
    wall = time.perf_counter() - t0
    assert proc.returncode != 0, stdout[-2000:]
    assert (tmp_path / "record.rank0.step2").exists(), stderr[-4000:]  # it trained up to the stall
    assert "timed out" in stderr.lower() or "timeout" in stderr.lower(), stderr[-4000:]
    print(f"{strategy}: stalled rank -> exit {proc.returncode} after {wall:.1f}s")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.perf_counter()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"job ended early ({proc.returncode}): {out[-2000:]}{err[-4000:]}")
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"{path} not written after {timeout} s")
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_stops_a_running_job_with_a_checkpoint(sig, tmp_path):
    """SIGTERM / SIGINT to rank 0 of a running 2-rank job: both ranks stop at the next step boundary, write
    ``last.ckpt`` and the job exits with 128 + signum within seconds."""
    from bytelm.checkpoint import validate_checkpoint

    args = _args(
        tmp_path,
        ["strategy=ddp", "trainer.max_steps=100000", "trainer.ckpt_every=1000", "trainer.val_every=1000"],
        devices=2,
    )
    proc = start([sys.executable, str(HERE), str(tmp_path / "record"), *args], _env())
    _wait_for(tmp_path / "record.rank0.step2", proc, 300)
    t0 = time.perf_counter()
    proc.send_signal(sig)
    stdout, stderr = finish(proc, 60)
    wall = time.perf_counter() - t0
    assert proc.returncode == 128 + sig, (proc.returncode, stdout[-2000:], stderr[-4000:])
    assert wall < 30, wall
    validate_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    print(f"signal {sig}: job ended {wall:.1f}s after it")


def test_sigterm_ends_a_job_stuck_in_a_collective(tmp_path):
    """Rank 1 stalls, the collective timeout is long (600 s): SIGTERM to rank 0 cannot wait for a step
    boundary, so the job ends ``trainer.stop_grace_s`` (3 s) after the signal, taking rank 1 along."""
    proc = _stalled_run(
        tmp_path, "deepspeed_zero3", ["trainer.collective_timeout_s=600", "trainer.stop_grace_s=3"]
    )
    _wait_for(tmp_path / "record.rank0.step2", proc, 300)
    time.sleep(1.0)  # rank 0 is now waiting in a collective of step 2
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = finish(proc, 60)
    wall = time.perf_counter() - t0
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stdout[-2000:], stderr[-4000:])
    assert wall < 20, wall
    assert "exiting now" in stderr
    print(f"stuck job: ended {wall:.1f}s after SIGTERM")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(strategy, tmp_path, monkeypatch):
    """Rank 1 alone gets a NaN loss at the second step: both ranks skip that step (no rank updates, none
    hangs in a collective), count it, and training goes on."""
    monkeypatch.setenv("BYTELM_TEST_NAN_STEP", "1:1")
    a = launch(
        tmp_path, [f"strategy={strategy}", "trainer.max_steps=3", "trainer.ckpt_every=1000"], devices=2
    )
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
    b = launch(
        tmp_path / "b", [*gpu, f"strategy={strategy}", f"ckpt_path={mid}"], devices=n, accelerator="gpu"
    )
    for r in range(n):
        for s, v in b["ranks"][r]["losses"].items():
            assert abs(v - a["ranks"][r]["losses"][s]) < 1e-2, (strategy, r, s)
    print(
        f"cuda {strategy} x{n}: max |loss - single| {max(abs(got[s] - want[s]) for s in got):.2e}, "
        f"run {a['wall']:.1f}s"
    )


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
            self.data: dict[str, Any] = {"losses": {}, "val": {}}

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
            stall = os.environ.get("BYTELM_TEST_STALL")  # "RANK:STEP": this rank stops responding at STEP
            if stall:
                rank, step = (int(v) for v in stall.split(":"))
                if trainer.global_rank == rank and trainer.global_step == step:
                    time.sleep(10**6)
            Path(f"{self.prefix}.rank{trainer.global_rank}.step{trainer.global_step}").touch()
            self.before = [t.detach().clone() for t in _local_tensors(pl_module.model)]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = _local_tensors(pl_module.model)
            changed = any(not a.equal(b) for a, b in zip(self.before, now, strict=True))
            self.data.setdefault("changed", []).append(changed)
            self.data["bad_steps"] = pl_module.bad_steps
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.data["losses"][str(trainer.global_step)] = float(loss) if loss is not None else None

        def on_validation_end(self, trainer, pl_module) -> None:
            bpb = trainer.callback_metrics.get("val/bpb")
            if bpb is not None:
                self.data["val"][str(trainer.global_step)] = float(bpb)

        def on_train_end(self, trainer, pl_module) -> None:
            Path(f"{self.prefix}.rank{trainer.global_rank}.json").write_text(json.dumps(self.data))

    res = run(load_config(argv[1:]), callbacks=[Record(argv[0])])
    if res["signal"] is not None:  # as the CLI (bytelm.train) does
        sys.exit(128 + int(res["signal"]))


if __name__ == "__main__":
    _main(sys.argv[1:])
