"""Real Slurm on two nodes: ``scripts/slurm_cluster.sh start2`` gives each slurmd a network namespace, address
and hostname of its own on this host (veth pairs on a bridge, slurmctld on the bridge), and
``slurm/train.sbatch`` runs one task per node (``make test-slurm``; marker ``slurm``).

- cleanup: stopping the cluster, even with a job step still running on both nodes, leaves no namespace, link,
  hosts folder, daemon or job process behind;
- DDP: ``sbatch --nodes=2 --ntasks-per-node=1``: world size 2 from Slurm's variables, rank r on node r (its
  hostname, ``SLURM_NODEID``), ``MASTER_ADDR`` = the first node's *name* (resolved through the namespace's
  hosts file); final val bpb and every (step, rank) batch and loss equal a local 2-process run's;
- ZeRO-3 and FSDP2 the same, each node holding about half the parameters (its shard);
- node failure: rank 1's process on node 2 is killed mid-run: the job fails within
  ``trainer.collective_timeout_s``, its log names the lost rank; requeued (``scontrol requeue``), it resumes
  from ``last.ckpt`` and ends with the uninterrupted run's val bpb and batches;
- network partition: node 2's link goes down mid-run: the collective times out, rank 0 names rank 1 (node 2)
  as lost, the job ends instead of hanging; with the link back, the requeued job resumes and matches;
- preemption (``scancel --signal=USR1 --full``) of a two-node FSDP2 job (the FSDP2 test): each rank saves its
  part once, at the same step, into one ``last.ckpt`` (shards from both nodes); the restart resumes from it
  and matches the DDP runs.

Every wait has a deadline; the cluster is stopped whatever happens (by pid and by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_slurm_cluster import (
    CLUSTER,
    CPU_JOB,
    DONE,
    ROOT,
    SBATCH,
    Cluster,
    _final,
    _why_no_cluster,
    beside_local_run,
)

pytestmark = pytest.mark.slurm

STEPS, VAL_EVERY, CKPT_EVERY = 12, 4, 4
TIMEOUT_S = 20  # trainer.collective_timeout_s of every run (it also bounds the start-up rendezvous)
SLEEP_S = 0.3  # trainer.step_sleep_s of the runs a fault hits mid-run (numerics unchanged)
# hat_tiny at the debug=cpu size (as tests/slurm/test_slurm_cluster.py), last.ckpt every 4 steps so a failed
# run has something to resume from (checkpointing changes no numerics)
TRAIN = [
    "experiment=hat_tiny",
    "debug=cpu",
    "trainer.accelerator=cpu",
    f"trainer.max_steps={STEPS}",
    f"trainer.val_every={VAL_EVERY}",
    f"trainer.ckpt_every={CKPT_EVERY}",
    f"trainer.collective_timeout_s={TIMEOUT_S}",
    "logger.kind=none",
]
ALL = [(s, r) for s in range(1, STEPS + 1) for r in range(2)]


def _why_no_two_nodes() -> str | None:
    reason = _why_no_cluster()
    if reason:
        return reason
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    missing = [b for b in ("ip", "nsenter", "unshare") if shutil.which(b, path=path) is None]
    if missing:
        return (
            f"iproute2/util-linux not installed ({', '.join(missing)} missing):"
            f" `scripts/slurm_cluster.sh install`"
        )
    return None


def _names() -> tuple[set[str], set[str], set[str]]:
    """The network namespaces, links and /etc/netns folders of this host that bytelm's clusters use."""
    ns = {ln.split()[0] for ln in _sh("ip", "netns", "list").splitlines() if ln.strip()}
    links = {m for m in re.findall(r"^\d+: ([^:@]+)", _sh("ip", "-o", "link", "show"), re.M)}
    etc = {p.name for p in Path("/etc/netns").iterdir()} if Path("/etc/netns").is_dir() else set()
    return ns, links, etc


def _sh(*cmd: str, timeout: float = 30) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr}"
    return out.stdout


class TwoNodes(Cluster):
    nodes: list[dict[str, str]]  # name, ns (network namespace), veth (host end), addr

    def train(
        self, out: Path, strategy: str, *extra: str, sbatch_args: tuple[str, ...] = ()
    ) -> tuple[str, Path]:
        out.mkdir(parents=True, exist_ok=True)
        log = out / "job.log"
        jobid = self.sbatch(
            log,
            "--nodes=2",
            "--ntasks-per-node=1",
            *CPU_JOB,
            "--time=15",
            *sbatch_args,
            str(SBATCH),
            *TRAIN,
            f"strategy={strategy}",
            f"trainer.out_dir={out / 'run'}",
            f"trainer.batch_log={out / 'batches.jsonl'}",
            *extra,
        )
        return jobid, log


def _start(folder: Path) -> TwoNodes:
    started = subprocess.run(
        ["bash", str(CLUSTER), "start2", str(folder)],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PY=sys.executable),
    )
    assert started.returncode == 0, f"the two-node cluster did not start:\n{started.stdout}\n{started.stderr}"
    print(started.stdout.strip())
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_")
        and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")
    }
    env.update(
        SLURM_CONF=str(folder / "slurm.conf"),
        PATH=f"{env.get('PATH', '')}:/usr/sbin:/sbin",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        BYTELM_VENV=str(Path(sys.executable).parent.parent),
    )
    c = TwoNodes(folder, env)
    keys = ("name", "ns", "veth", "addr")
    c.nodes = [dict(zip(keys, ln.split(), strict=True)) for ln in (folder / "nodes").read_text().splitlines()]
    return c


def _stop(folder: Path) -> str:
    stopped = subprocess.run(
        ["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, text=True, timeout=240
    )
    return stopped.stdout + stopped.stderr


def _made(folder: Path) -> list[tuple[str, str]]:
    net = folder / "net" if (folder / "net").exists() else folder / "net.removed"
    return [tuple(ln.split(maxsplit=1)) for ln in net.read_text().splitlines()]  # type: ignore[misc]


def _assert_gone(folder: Path, pids: list[int]) -> None:
    made = _made(folder)
    ns, links, etc = _names()
    assert {n for k, n in made if k == "netns"}.isdisjoint(ns), (made, ns)
    assert {n for k, n in made if k == "link"}.isdisjoint(links), (made, links)
    assert {Path(n).name for k, n in made if k == "etc"}.isdisjoint(etc), (made, etc)
    alive = [p for p in pids if _alive(p)]
    assert not alive, f"processes left behind: {alive}"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _ns_pids(ns: str) -> list[int]:
    return [int(p) for p in _sh("ip", "netns", "pids", ns).split()]


def test_stopping_the_cluster_leaves_no_namespace_link_or_process_behind(tmp_path_factory):
    """A cluster of its own with a job step on both nodes (sleep): stop removes the namespaces, veth pairs,
    bridge and /etc/netns folders it made and ends every daemon and job process, by pid and by name."""
    reason = _why_no_two_nodes()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("cleanup")  # a short path: slurmd's socket paths must fit 108 bytes
    t0 = time.monotonic()
    c = _start(folder)
    try:
        made = _made(folder)
        ns, links, etc = _names()
        assert {k for k, _ in made} >= {"netns", "link", "etc"}
        assert {n for k, n in made if k == "netns"} <= ns and {n for k, n in made if k == "link"} <= links
        assert len([k for k, _ in made if k == "link"]) == 3  # the bridge and one veth pair per node
        daemons = [int(ln.split()[1]) for ln in (folder / "pids").read_text().splitlines()]
        assert len(daemons) == 4  # munged, slurmctld, 2 slurmd
        c.sbatch(folder / "sleep.log", "--nodes=2", "--ntasks-per-node=1", "--wrap", "srun sleep 600")
        deadline = time.monotonic() + 60
        while not all(any("sleep 600" in _cmd(p) for p in _ns_pids(n["ns"])) for n in c.nodes):
            assert time.monotonic() < deadline, "the sleep step did not start on both nodes in 60 s"
            time.sleep(0.5)
        in_ns = [p for n in c.nodes for p in _ns_pids(n["ns"])]  # slurmd, slurmstepd, sleep on each node
        assert len(in_ns) >= 6, in_ns
    finally:
        out = _stop(folder)
    print(out)
    _assert_gone(folder, daemons + in_ns)
    print(
        f"cleanup: {len(daemons)} daemons + {len(in_ns)} processes in the namespaces ended, {made} removed "
        f"({time.monotonic() - t0:.0f} s with start-up)"
    )


def _cmd(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    reason = _why_no_two_nodes()
    if reason:
        pytest.skip(reason)
    base = os.environ.get("BYTELM_SLURM_DIR")
    folder = Path(base) / "two-nodes" if base else tmp_path_factory.mktemp("two_nodes")
    c = _start(folder)
    daemons = [int(ln.split()[1]) for ln in (folder / "pids").read_text().splitlines()]
    try:
        yield c
    finally:
        print(_stop(folder))
    _assert_gone(folder, daemons)


def _batches(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """(step, rank) -> the last record of that batch (a resumed run trains the steps after its checkpoint
    again: those must repeat the first try's batch exactly)."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        key = (r["step"], r["rank"])
        if key in out:
            assert out[key]["sha1"] == r["sha1"], f"step {key}: a different batch the second time"
        out[key] = r
    return out


def _same(got: dict[tuple[int, int], Any], ref: dict[tuple[int, int], Any], tol: float) -> float:
    assert sorted(got) == sorted(ref) == ALL
    worst = 0.0
    for key in ref:
        assert got[key]["sha1"] == ref[key]["sha1"], key
        worst = max(worst, abs(got[key]["loss"] - ref[key]["loss"]))
    assert worst <= tol, worst
    return worst


def _placement(c: TwoNodes, batches: dict[tuple[int, int], Any]) -> None:
    """Rank r ran on node r (its own hostname), world size 2 from Slurm, MASTER_ADDR = node 1's name."""
    for (_, rank), r in batches.items():
        assert r["world"] == 2 and r["env"] == "SLURMEnvironment", r
        assert r["node"] == rank and r["host"] == c.nodes[rank]["name"], r
        assert r["master"] == c.nodes[0]["name"], r


def _wait_step(c: TwoNodes, jobid: str, log: Path, batches: Path, step: int, timeout: float = 300) -> int:
    """Wait until both ranks logged ``step``; returns rank 1's pid."""
    deadline = time.monotonic() + timeout
    while True:
        recs = [json.loads(x) for x in batches.read_text().splitlines()] if batches.exists() else []
        done = {(r["step"], r["rank"]): r for r in recs}
        if (step, 0) in done and (step, 1) in done:
            return int(done[(step, 1)]["pid"])
        assert c.job(jobid)["JobState"] not in DONE, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ddp_ref(two, tmp_path_factory):
    """The uninterrupted two-node DDP job (the reference of the fault tests) and, alongside, a local 2-process
    run of the same config (no Slurm: Lightning launches the second process)."""
    out = tmp_path_factory.mktemp("ddp2")
    local_out = tmp_path_factory.mktemp("ddp_local")
    t0 = time.monotonic()

    def job() -> tuple[str, Path, dict[str, str], float]:
        jobid, log = two.train(out, "ddp")
        info = two.wait(jobid, lambda i: i.get("JobState") in DONE, 420, "finished", log)
        return jobid, log, info, time.monotonic() - t0

    (jobid, log, info, job_s), local_log = beside_local_run(
        [*TRAIN, "strategy=ddp", "trainer.devices=2"], local_out, two.env, job, 420
    )
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    print(f"two-node DDP job {jobid}: {job_s:.0f} s (a local 2-process run alongside)")
    return {
        "jobid": jobid,
        "info": info,
        "log": text,
        "batches": _batches(out / "batches.jsonl"),
        "local_log": local_log,
        "local_batches": _batches(local_out / "batches.jsonl"),
    }


def test_ddp_on_two_nodes_matches_a_local_two_process_run(two, ddp_ref):
    info, log = ddp_ref["info"], ddp_ref["log"]
    n1, n2 = (n["name"] for n in two.nodes)
    assert info["NumNodes"] == "2" and info["NumTasks"] == "2" and info["NodeList"] == f"{n1[:-1]}[1-2]", info
    assert f"[bytelm] job {ddp_ref['jobid']} restart 0: 2 node(s) x 1 task(s), master {n1}:" in log
    batches = ddp_ref["batches"]
    _placement(two, batches)
    step, bpb = _final(log)
    local_step, local_bpb = _final(ddp_ref["local_log"])
    assert step == local_step == STEPS
    assert abs(bpb - local_bpb) < 1e-6, (bpb, local_bpb)
    worst = _same(batches, ddp_ref["local_batches"], 1e-6)
    print(
        f"two nodes {n1}, {n2}: val bpb {bpb!r}, local 2-process run {local_bpb!r};"
        f" max |loss diff| {worst:.1e}"
    )


def _shards(batches: dict[tuple[int, int], Any]) -> str:
    """Each node holds about half the model's parameters (its ZeRO-3 / FSDP2 shard), not all of them."""
    stored = {r["rank"]: (r["stored"], r["full"]) for r in batches.values()}
    full = stored[0][1]
    for rank, (local, whole) in stored.items():
        assert whole == full and 0.3 * full < local <= 0.6 * full, (rank, local, whole)
    assert stored[0][0] + stored[1][0] >= full
    return f"shards {stored[0][0]} + {stored[1][0]} of {full} elements"


def test_deepspeed_zero3_on_two_nodes_holds_a_shard_per_node_and_matches(two, ddp_ref, tmp_path):
    """ZeRO-3 across the two nodes (FSDP2: the preemption test below) trains the local DDP run's batches to
    the same val bpb."""
    strategy = "deepspeed_zero3"
    t0 = time.monotonic()
    jobid, log = two.train(tmp_path, strategy)
    info = two.wait(jobid, lambda i: i.get("JobState") in DONE, 420, "finished", log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    batches = _batches(tmp_path / "batches.jsonl")
    _placement(two, batches)
    shards = _shards(batches)
    step, bpb = _final(text)
    ref_step, ref_bpb = _final(ddp_ref["local_log"])  # the same numbers as DDP (same init, same batches)
    assert step == ref_step == STEPS
    assert abs(bpb - ref_bpb) < 1e-5, (bpb, ref_bpb)
    worst = _same(batches, ddp_ref["local_batches"], 1e-4)
    print(
        f"{strategy} on two nodes ({time.monotonic() - t0:.0f} s): val bpb {bpb!r} vs local DDP {ref_bpb!r}; "
        f"{shards}; max |loss diff| {worst:.1e}"
    )


def _resumed(c: TwoNodes, jobid: str, log: Path, out: Path, ref: dict[str, Any], t0: float) -> str:
    """The failed job, requeued by hand if Slurm has not requeued it already, resumes from last.ckpt and ends
    with the uninterrupted job's val bpb and batches; returns its log."""
    info = c.job(jobid)
    if info.get("Restarts") == "0":
        c.run("scontrol", "requeue", jobid)
    info = c.wait(
        jobid,
        lambda i: i.get("Restarts") == "1" and i.get("JobState") in DONE,
        420,
        "requeued, finished",
        log,
    )
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    first, second = text.split(f"[bytelm] job {jobid} restart 1:", 1)
    assert "Restoring states" not in first
    ckpt = out / "run" / "checkpoints" / "last.ckpt"
    assert re.search(rf"Restoring states from the checkpoint path at {re.escape(str(ckpt))}", second), second[
        -4000:
    ]
    step, bpb = _final(second)
    ref_step, ref_bpb = _final(ref["log"])
    assert step == ref_step == STEPS
    assert abs(bpb - ref_bpb) < 1e-5, (bpb, ref_bpb)
    batches = _batches(out / "batches.jsonl")
    _placement(c, batches)
    worst = _same(batches, ref["batches"], 1e-4)
    print(
        f"  resumed from last.ckpt: val bpb {bpb!r} vs uninterrupted {ref_bpb!r},"
        f" max |loss diff| {worst:.1e}; "
        f"{time.monotonic() - t0:.0f} s in all"
    )
    return text


LOST = r"lost rank\(s\): 1 \(host {node}, node 1\)"


def test_node_failure_fails_the_job_fast_names_the_rank_and_resumes(two, ddp_ref, tmp_path):
    n2 = two.nodes[1]
    t0 = time.monotonic()
    jobid, log = two.train(tmp_path, "ddp", f"trainer.step_sleep_s={SLEEP_S}")
    pid = _wait_step(two, jobid, log, tmp_path / "batches.jsonl", CKPT_EVERY + 2)
    # rank 1 is a process in node 2's namespace: kill it as a dying node would
    assert _sh("ip", "netns", "identify", str(pid)).strip() == n2["ns"]
    os.kill(pid, 9)
    killed = time.monotonic()
    info = two.wait(
        jobid, lambda i: i.get("JobState") in DONE, TIMEOUT_S, "failed within the collective timeout", log
    )
    failed_s = time.monotonic() - killed
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    # Slurm names the killed task and its node; rank 0 names the rank it lost (unless srun ended it first)
    assert f"srun: error: {n2['name']}: task 1: Killed" in text, text[-4000:]
    ours = re.search(LOST.format(node=re.escape(n2["name"])), text)
    print(
        f"node failure: rank 1 (pid {pid}) killed; job FAILED {failed_s:.1f} s later "
        f"(collective timeout {TIMEOUT_S} s); rank 0 named the lost rank: {bool(ours)}"
    )
    _resumed(two, jobid, log, tmp_path, ddp_ref, t0)


def test_network_partition_times_out_names_the_rank_and_resumes(two, ddp_ref, tmp_path):
    n2 = two.nodes[1]
    t0 = time.monotonic()
    jobid, log = two.train(tmp_path, "ddp", f"trainer.step_sleep_s={SLEEP_S}")
    _wait_step(two, jobid, log, tmp_path / "batches.jsonl", CKPT_EVERY + 2)
    _sh("ip", "link", "set", n2["veth"], "down")  # node 2 is cut off from node 1 and from slurmctld
    cut = time.monotonic()
    try:
        lost = re.compile(LOST.format(node=re.escape(n2["name"])))
        while not lost.search(log.read_text()):
            assert time.monotonic() - cut < TIMEOUT_S + 20, (
                f"no lost-rank error {TIMEOUT_S + 20} s after the cut"
            )
            time.sleep(0.2)
        named_s = time.monotonic() - cut
    finally:
        _sh("ip", "link", "set", n2["veth"], "up")
    info = two.wait(
        jobid,
        lambda i: i.get("JobState") in DONE or i.get("Restarts") == "1",
        120,
        "ended after the partition",
        log,
    )
    ended_s = time.monotonic() - cut
    text = log.read_text()
    assert "Application timeout" in text or "timed out" in text.lower(), text[-4000:]
    assert re.search(r"LostRanksError: rank 0: lost rank\(s\): 1 ", text), text[-4000:]
    assert named_s < TIMEOUT_S + 10, named_s
    print(
        f"partition: {n2['veth']} down; rank 0 named rank 1 ({n2['name']}) lost {named_s:.1f} s later "
        f"(collective timeout {TIMEOUT_S} s); link back up, job {info['JobState']}"
        f" {ended_s:.1f} s after the cut"
    )
    _resumed(two, jobid, log, tmp_path, ddp_ref, t0)


def test_fsdp2_on_two_nodes_preempted_checkpoints_once_per_rank_into_one_last_ckpt(two, ddp_ref, tmp_path):
    """FSDP2 across the two nodes, preempted mid-run: each rank saves its shard once into one last.ckpt; the
    restart resumes from it and ends with the DDP runs' val bpb and batches (each node holding its shard)."""
    t0 = time.monotonic()
    jobid, log = two.train(tmp_path, "fsdp2", f"trainer.step_sleep_s={SLEEP_S}")
    _wait_step(two, jobid, log, tmp_path / "batches.jsonl", VAL_EVERY + 1)
    two.run("scancel", "--signal=USR1", "--full", jobid)
    two.wait(jobid, lambda i: i.get("Restarts") == "1", 300, "requeued", log)
    text = log.read_text()
    first = text.split(f"[bytelm] job {jobid} restart 1:", 1)[0]
    saved = re.findall(
        r"signal 10: rank (\d) \(host (\S+), node (\d)\) saved its part of (\S+) at step (\d+)", first
    )
    assert sorted((r, h, n) for r, h, n, _, _ in saved) == [
        ("0", two.nodes[0]["name"], "0"),
        ("1", two.nodes[1]["name"], "1"),
    ], saved  # each rank once, on its own node
    assert len({(p, s) for *_, p, s in saved}) == 1, saved  # the same checkpoint, the same step
    ckpt = tmp_path / "run" / "checkpoints"
    lasts = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("last"))
    assert lasts == ["last.ckpt"], lasts  # one last.ckpt, no last-v1 / .tmp
    shards = sorted(p.name for p in (ckpt / "last.ckpt").iterdir() if p.suffix == ".distcp")
    assert len(shards) == 2, shards  # FSDP2's distributed checkpoint: one shard file per rank
    at = int(saved[0][4])
    print(f"preemption: both ranks saved their shard of last.ckpt at step {at} ({shards}); Restarts=1")
    text = _resumed(two, jobid, log, tmp_path, ddp_ref, t0)
    assert text.count("] - signal 10: rank") == 2
    print(f"  {_shards(_batches(tmp_path / 'batches.jsonl'))}")
