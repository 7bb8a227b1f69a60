"""Real Slurm: a one-node cluster on this host (``scripts/slurm_cluster.sh``: munged, slurmctld, slurmd) runs
``slurm/train.sbatch`` and hydra-submitit-launcher sweeps (``make test-slurm``; marker ``slurm``).

- plain job: 2 tasks from ``srun`` train with world size 2 from Slurm's variables (SLURMEnvironment); the
  final val bpb and every step's batches equal a local 2-process run's;
- preemption: ``scancel --signal=USR1 --full`` mid-run -> ``last.ckpt``, ``scontrol requeue``, the same job id
  restarts (``Restarts=1``), resumes from ``last.ckpt`` and ends with the uninterrupted job's final val bpb,
  per-step losses and batch sequence;
- time limit: ``--time=2 --signal=USR1@60``: the job requeues itself before its limit, is never killed by it,
  and its restart resumes from ``last.ckpt``;
- Hydra sweep: ``-m hydra/launcher=slurm`` submits one job per point; each finishes with its checkpoints in
  its own sweep folder;
- a broken job (misspelt override) fails at once, names the key in its log and is not requeued.

The cluster is started once for the module and stopped (by pid) whatever the outcome. Where it cannot run
(not root, slurm-wlm/munge not installed) every test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "slurm" / "train.sbatch"
CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
DONE = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
STEPS, VAL_EVERY = 12, 4
# one config for the plain job, the local run and the preempted job: hat_tiny at the debug=cpu size, DDP on
# 2 CPU processes, validation every 4 steps, no step checkpoints (only last.ckpt)
TRAIN = [
    "experiment=hat_tiny",
    "debug=cpu",
    "strategy=ddp",
    "trainer.accelerator=cpu",
    f"trainer.max_steps={STEPS}",
    f"trainer.val_every={VAL_EVERY}",
    "trainer.ckpt_every=100000",
    "trainer.collective_timeout_s=120",
    "logger.kind=none",
]
# what a CPU cluster needs on top of the GPU template: no GPUs, one CPU per task
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]
FINAL = re.compile(r"^\[bytelm\] (\S+): step (\d+), val bpb (\S+), checkpoints in", re.M)

pytestmark = pytest.mark.slurm


def _why_no_cluster() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "a local Slurm cluster needs root (munged, slurmd); run `make test-slurm` as root"
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    missing = [
        b
        for b in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")
        if shutil.which(b, path=path) is None
    ]
    if missing:
        return (
            f"slurm-wlm/munge not installed ({', '.join(missing)} missing): `scripts/slurm_cluster.sh "
            "install` (apt-get, as root) or `make test-slurm`"
        )
    return None


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]

    def run(self, *cmd: str, timeout: float = 30) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        assert out.returncode == 0, f"{' '.join(cmd)}: {out.returncode}\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def sbatch(self, log: Path, *args: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", f"--output={log}", *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        return out.stdout.strip().split(";")[0]

    def job(self, jobid: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, RunTime, ...)."""
        text = self.run("scontrol", "show", "job", "-o", jobid)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(
        self,
        jobid: str,
        cond: Callable[[dict[str, str]], bool],
        timeout: float,
        what: str,
        log: Path | None = None,
    ) -> dict[str, str]:
        """Poll the job until ``cond`` holds; a timeout is an error showing the job and the end of its log."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(jobid)
            if cond(info):
                return info
            if time.monotonic() > deadline:
                tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
                raise AssertionError(f"job {jobid}: not {what} after {timeout:.0f} s: {info}\n{tail}")
            time.sleep(0.5)

    def cancel(self, jobid: str) -> None:
        subprocess.run(["scancel", jobid], env=self.env, capture_output=True, timeout=30)
        with contextlib.suppress(AssertionError):
            self.wait(jobid, lambda i: i.get("JobState") in DONE, 60, "ended")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _why_no_cluster()
    if reason:
        pytest.skip(reason)
    folder = Path(os.environ.get("BYTELM_SLURM_DIR") or tmp_path_factory.mktemp("slurm_cluster"))
    started = subprocess.run(
        ["bash", str(CLUSTER), "start", str(folder)],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PY=sys.executable),
    )
    try:
        assert started.returncode == 0, f"the cluster did not start:\n{started.stdout}\n{started.stderr}"
        print(started.stdout.strip())
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SLURM_")
            and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")
        }
        venv = Path(sys.executable).parent.parent  # the job activates the venv this test runs in
        env.update(
            SLURM_CONF=str(folder / "slurm.conf"),
            PATH=f"{env.get('PATH', '')}:/usr/sbin:/sbin",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
            OMP_NUM_THREADS="1",
            WANDB_MODE="offline",
            BYTELM_VENV=str(venv),
        )
        yield Cluster(folder, env)
    finally:
        stopped = subprocess.run(
            ["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, text=True, timeout=180
        )
        print(stopped.stdout + stopped.stderr)


def _final(log: str) -> tuple[int, float]:
    found = FINAL.findall(log)
    assert found, f"no final [bytelm] line:\n{log[-4000:]}"
    return int(found[-1][1]), float(found[-1][2])


def _batches(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """(step, rank) -> record of the batch log; every (step, rank) exactly once."""
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for r in recs:
        key = (r["step"], r["rank"])
        assert key not in out, f"step {r['step']} of rank {r['rank']} trained twice"
        out[key] = r
    return out


def beside_local_run(
    train: list[str], local_out: Path, env: dict[str, str], job: Any, timeout: float
) -> tuple[Any, str]:
    """Start a local 2-process run of ``train`` (no Slurm: Lightning launches the second process; batch log
    in ``local_out``), run ``job()`` meanwhile, then wait for the local run; returns (``job()``'s result, the
    local run's output). The local run is killed if ``job()`` raises, and must have exited 0."""
    local = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bytelm.train",
            *train,
            f"trainer.out_dir={local_out / 'run'}",
            f"trainer.batch_log={local_out / 'batches.jsonl'}",
        ],
        cwd=ROOT,
        env={k: v for k, v in env.items() if k != "SLURM_CONF"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        result = job()
        local_log, _ = local.communicate(timeout=timeout)
    finally:
        if local.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(local.pid, signal.SIGKILL)
            local.communicate()
    assert local.returncode == 0, local_log[-4000:]
    return result, local_log


def _same_batches(got: dict[tuple[int, int], Any], ref: dict[tuple[int, int], Any]) -> float:
    """Same steps, same batches (sha1 of input_ids) on every rank, same losses; returns max |loss diff|."""
    assert sorted(got) == sorted(ref)
    assert sorted(got) == [(s, r) for s in range(1, STEPS + 1) for r in range(2)]
    worst = 0.0
    for key in ref:
        assert got[key]["sha1"] == ref[key]["sha1"], key
        worst = max(worst, abs(got[key]["loss"] - ref[key]["loss"]))
    assert worst < 1e-6, worst
    return worst


def _train_job(
    cluster: Cluster, out: Path, *extra: str, sbatch_args: tuple[str, ...] = ()
) -> tuple[str, Path]:
    log = out / "job.log"
    out.mkdir(parents=True, exist_ok=True)
    jobid = cluster.sbatch(
        log,
        "--nodes=1",
        "--ntasks-per-node=2",
        *CPU_JOB,
        "--time=15",
        *sbatch_args,
        str(SBATCH),
        *TRAIN,
        f"trainer.out_dir={out / 'run'}",
        f"trainer.batch_log={out / 'batches.jsonl'}",
        *extra,
    )
    return jobid, log


@pytest.fixture(scope="module")
def plain_job(cluster, tmp_path_factory):
    """The uninterrupted 2-task job (the reference of the preemption test), and a local 2-process run of the
    same config started at the same time (no Slurm: Lightning launches the second process)."""
    out = tmp_path_factory.mktemp("plain")
    local_out = tmp_path_factory.mktemp("local")
    t0 = time.monotonic()

    def job() -> tuple[str, Path, dict[str, str], float]:
        jobid, log = _train_job(cluster, out)
        info = cluster.wait(jobid, lambda i: i.get("JobState") in DONE, 480, "finished", log)
        return jobid, log, info, time.monotonic() - t0

    (jobid, log, info, job_s), local_log = beside_local_run(
        [*TRAIN, "trainer.devices=2", "ckpt_path=last"], local_out, cluster.env, job, 480
    )
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    print(f"plain job {jobid}: {job_s:.0f} s (a local 2-process run alongside)")
    return {
        "jobid": jobid,
        "log": text,
        "info": info,
        "batches": _batches(out / "batches.jsonl"),
        "local_log": local_log,
        "local_batches": _batches(local_out / "batches.jsonl"),
    }


def test_plain_job_world_size_two_from_slurm_matches_a_local_run(plain_job):
    log, info = plain_job["log"], plain_job["info"]
    assert info["Restarts"] == "0" and info["NumTasks"] == "2", info
    assert f"[bytelm] job {plain_job['jobid']} restart 0: 1 node(s) x 2 task(s)" in log
    assert "MEMBER: 2/2" in log  # Lightning: world size 2
    batches = plain_job["batches"]
    # both ranks trained every step under Slurm's environment (SLURM_PROCID / SLURM_NTASKS), world size 2
    assert {(r["rank"], r["world"], r["env"]) for r in batches.values()} == {
        (0, 2, "SLURMEnvironment"),
        (1, 2, "SLURMEnvironment"),
    }
    assert {r["env"] for r in plain_job["local_batches"].values()} == {"LightningEnvironment"}
    step, bpb = _final(log)
    local_step, local_bpb = _final(plain_job["local_log"])
    assert step == local_step == STEPS
    assert abs(bpb - local_bpb) < 1e-6, (bpb, local_bpb)
    worst = _same_batches(batches, plain_job["local_batches"])
    print(f"val bpb: Slurm job {bpb!r}, local 2-process run {local_bpb!r}; max |loss diff| {worst:.1e}")


def test_preempted_job_requeues_resumes_and_matches_the_uninterrupted_job(cluster, plain_job, tmp_path):
    # a short sleep per step so the signal surely lands mid-run on any machine (numerics unchanged)
    jobid, log = _train_job(cluster, tmp_path, "trainer.step_sleep_s=0.5")
    batches = tmp_path / "batches.jsonl"
    t0 = time.monotonic()
    deadline = t0 + 300

    def steps_done() -> int:
        return (
            max((json.loads(x)["step"] for x in batches.read_text().splitlines()), default=0)
            if batches.exists()
            else 0
        )

    while steps_done() < VAL_EVERY + 1:  # past the first validation
        assert cluster.job(jobid)["JobState"] not in DONE, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no training progress within 300 s"
        time.sleep(0.2)
    # the job's every process: the tasks (as --signal=USR1@N does) and the batch shell, which forwards it
    # through srun (so the tasks get it twice) instead of dying of it
    cluster.run("scancel", "--signal=USR1", "--full", jobid)
    info = cluster.wait(
        jobid,
        lambda i: i.get("Restarts") == "1" and i.get("JobState") in DONE,
        420,
        "requeued once and finished",
        log,
    )
    print(f"preempted job {jobid}: {time.monotonic() - t0:.0f} s in all")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    saved = re.findall(r"^\[bytelm\] signal 10: saved (\S+) at step (\d+)", text, re.M)
    assert len(saved) == 1, text[-4000:]
    ckpt, at = saved[0][0], int(saved[0][1])
    assert ckpt.endswith("checkpoints/last.ckpt") and VAL_EVERY < at < STEPS, saved
    first, second = text.split(f"[bytelm] job {jobid} restart 1:", 1)  # the log is appended to
    assert f"[bytelm] job {jobid} restart 0:" in first and "Restoring states" not in first
    assert "[bytelm] batch shell: SIGUSR1, forwarded to the tasks" in first
    assert re.search(rf"Restoring states from the checkpoint path at \S*{re.escape(ckpt)}", second), second[
        -4000:
    ]
    step, bpb = _final(second)  # the restart trained on to the end
    ref_step, ref_bpb = _final(plain_job["log"])
    assert step == ref_step == STEPS
    assert abs(bpb - ref_bpb) < 1e-6, (bpb, ref_bpb)
    got = _batches(batches)
    worst = _same_batches(got, plain_job["batches"])
    print(
        f"signal at step {at}, Restarts=1; final val bpb {bpb!r} vs uninterrupted {ref_bpb!r}; "
        f"{len(got)} (step, rank) batches identical, max |loss diff| {worst:.1e}"
    )


def test_time_limit_requeues_before_the_limit(cluster, tmp_path):
    """--time=2 with --signal=USR1@60: Slurm sends the warning 60-90 s before the limit (its time-limit checks
    run every 30 s); the run checkpoints and requeues itself (Restarts=1) long before the limit: the job is
    never in TIMEOUT and never killed for it. Cancelled once requeued (the preemption test covers the
    resume)."""
    log = tmp_path / "job.log"
    jobid = cluster.sbatch(
        log,
        "--nodes=1",
        "--ntasks-per-node=1",
        *CPU_JOB,
        "--time=2",
        "--signal=USR1@60",
        str(SBATCH),
        "experiment=hat_tiny",
        "debug=cpu",
        "trainer.accelerator=cpu",
        "logger.kind=none",
        "trainer.max_steps=100000",
        "trainer.val_every=100000",
        "trainer.ckpt_every=100000",
        "trainer.step_sleep_s=0.2",
        f"trainer.out_dir={tmp_path / 'run'}",
    )
    states: list[str] = []

    def seen(info: dict[str, str]) -> dict[str, str]:
        if not states or states[-1] != info.get("JobState"):
            states.append(info.get("JobState", "?"))
        return info

    try:
        first = cluster.wait(jobid, lambda i: seen(i).get("JobState") == "RUNNING", 120, "running", log)
        t_start = time.monotonic()
        info = cluster.wait(jobid, lambda i: seen(i).get("Restarts") == "1", 150, "requeued", log)
        requeued_after = time.monotonic() - t_start
    finally:
        cluster.cancel(jobid)
    text = log.read_text()
    saved = re.findall(r"^\[bytelm\] signal 10: saved (\S+) at step (\d+)", text, re.M)
    assert len(saved) == 1 and saved[0][0].endswith("checkpoints/last.ckpt") and int(saved[0][1]) >= 1, text[
        -4000:
    ]
    assert "requeued Slurm job" in text
    assert first["TimeLimit"] == "00:02:00" and requeued_after < 120, (first, requeued_after)
    assert "TIMEOUT" not in states and "DUE TO TIME LIMIT" not in text, (states, text[-4000:])
    assert info["JobState"] in ("REQUEUED", "PENDING", "RUNNING", "COMPLETING"), info  # back in the queue
    print(
        f"time limit 2 min, signal @60: job {jobid} checkpointed at step {saved[0][1]} and requeued itself "
        f"{requeued_after:.0f} s after it started (Restarts=1, states {states}); cancelled then"
    )


def test_hydra_sweep_submits_one_job_per_point(cluster, tmp_path):
    sweep = tmp_path / "multirun"
    cmd = [
        sys.executable,
        "-m",
        "bytelm.train",
        "-m",
        "hydra/launcher=slurm",
        "experiment=hat_tiny",
        "debug=cpu",
        "optim.lr=1e-3,3e-3",
        "trainer.max_steps=4",
        "trainer.val_every=4",
        "trainer.ckpt_every=100000",
        "logger.kind=none",
        "trainer.accelerator=cpu",
        f"hydra.sweep.dir={sweep}",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ok = False
    try:
        out, _ = proc.communicate(timeout=420)
        ok = proc.returncode == 0
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"sweep still running after 420 s:\n{out[-4000:]}") from None
    finally:
        if not ok:  # jobs left behind by a failure (after a success they are only finishing: see below)
            for p in sweep.glob(".submitit/*"):
                if re.fullmatch(r"\d+_\d+", p.name):
                    cluster.cancel(p.name)
    assert proc.returncode == 0, out[-4000:]
    # submitit submits the points as one job array: JOBID_0, JOBID_1
    jobs = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(jobs) == 2, jobs
    for jid in jobs:
        # the launcher returns once submitit has read each job's result, which the job writes before its
        # process exits: a job may still be RUNNING/COMPLETING for a moment (cancelling it then was a flake)
        info = cluster.wait(jid, lambda i: i.get("JobState") in DONE, 120, "ended")
        assert info["JobState"] == "COMPLETED", info
    lrs = set()
    for n in ("0", "1"):
        point = sweep / n
        assert (point / "checkpoints" / "last.ckpt").is_file(), sorted(point.rglob("*"))
        overrides = (point / ".hydra" / "overrides.yaml").read_text()
        lrs |= {float(x) for x in re.findall(r"optim\.lr=(\S+)", overrides)}
    assert lrs == {1e-3, 3e-3}
    returned = set()
    for jid in jobs:  # submitit's record of each job: Hydra's JobReturn of our task, with its val bpb
        import pickle

        from hydra.core.utils import JobStatus

        status, ret = pickle.loads(next((sweep / ".submitit" / jid).glob("*_result.pkl")).read_bytes())
        assert status == "success" and ret.status == JobStatus.COMPLETED, (status, ret)
        assert isinstance(ret.return_value, float) and ret.return_value > 0, ret.return_value
        returned |= {float(o.split("=", 1)[1]) for o in ret.overrides if o.startswith("optim.lr=")}
    assert returned == {1e-3, 3e-3}
    print(f"sweep: jobs {jobs} COMPLETED in {time.monotonic() - t0:.0f} s; checkpoints in {sweep}/0 and /1")


def test_broken_job_fails_at_once_and_is_not_requeued(cluster, tmp_path):
    log = tmp_path / "job.log"
    t0 = time.monotonic()
    jobid = cluster.sbatch(
        log,
        "--nodes=1",
        "--ntasks-per-node=1",
        *CPU_JOB,
        "--time=5",
        str(SBATCH),
        "experiment=hat_tiny",
        "debug=cpu",
        "trainer.accelerator=cpu",
        "trainer.max_stepz=3",
        f"trainer.out_dir={tmp_path / 'run'}",
    )
    info = cluster.wait(jobid, lambda i: i.get("JobState") in DONE, 180, "finished", log)
    failed_after = time.monotonic() - t0
    time.sleep(3)  # a requeue would show by now (a requeued job is pending again at once)
    again = cluster.job(jobid)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert again["JobState"] == "FAILED" and again["Restarts"] == "0", again
    assert "max_stepz" in text, text[-3000:]
    assert text.count(f"[bytelm] job {jobid} restart") == 1
    print(
        f"broken job {jobid}: FAILED (ExitCode {info['ExitCode']}) {failed_after:.0f} s after submission, "
        f"Restarts=0; log names max_stepz"
    )
