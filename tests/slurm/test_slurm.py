"""Slurm without a cluster (fast): the sbatch template for 1 and 4 nodes (bash -n, and executed with fake
srun/scontrol), rank and world size from faked Slurm variables, SIGUSR1 -> checkpoint + requeue -> the
requeued run resumes from it with the next batches, a SIGUSR1 before training is not fatal, and the
hydra/launcher=slurm config composes. tests/slurm/test_slurm_cluster.py runs the same against a real one-node
Slurm (``make test-slurm``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "slurm" / "train.sbatch"


def _fake_bin(folder: Path) -> Path:
    """scontrol / srun stand-ins: scontrol expands 'gpu[001-004]', records requeues; srun prints its argv."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scontrol").write_text(
        "#!/bin/bash\n"
        'if [[ "$1 $2" == "show hostnames" ]]; then\n'
        "  python3 - \"$3\" <<'EOF'\n"
        "import re, sys\n"
        "m = re.fullmatch(r'(\\w+)\\[(\\d+)-(\\d+)\\]', sys.argv[1])\n"
        "if m:\n"
        "    w = len(m.group(2))\n"
        "    for i in range(int(m.group(2)), int(m.group(3)) + 1):\n"
        "        print(f'{m.group(1)}{i:0{w}d}')\n"
        "else:\n"
        "    print(sys.argv[1])\n"
        "EOF\n"
        "  exit 0\n"
        "fi\n"
        'echo "$@" >> "$FAKE_SCONTROL_LOG"\n'
    )
    (folder / "srun").write_text(
        '#!/bin/bash\necho "SRUN MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT ARGS: $*"\n'
    )
    for f in ("scontrol", "srun"):
        (folder / f).chmod(0o755)
    return folder


def render(nodes: int, gpus: int = 8) -> str:
    """The template as `sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G` would run it."""
    text = SBATCH.read_text()
    text = re.sub(r"#SBATCH --nodes=\d+", f"#SBATCH --nodes={nodes}", text)
    text = re.sub(r"#SBATCH --ntasks-per-node=\d+", f"#SBATCH --ntasks-per-node={gpus}", text)
    return re.sub(r"#SBATCH --gpus-per-node=\d+", f"#SBATCH --gpus-per-node={gpus}", text)


def test_sbatch_template_is_valid_bash_with_the_right_directives():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    for directive in ("--signal=SIGUSR1@90", "--requeue", "--ntasks-per-node=", "--gpus-per-node="):
        assert f"#SBATCH {directive}" in text
    tasks = re.search(r"#SBATCH --ntasks-per-node=(\d+)", text)
    gpus = re.search(r"#SBATCH --gpus-per-node=(\d+)", text)
    assert tasks and gpus and tasks.group(1) == gpus.group(1)  # one task per GPU
    assert "srun" in text and "python -m bytelm.train" in text and "ckpt_path=last" in text
    assert "scontrol show hostnames" in text


@pytest.mark.parametrize("nodes", [1, 4])
def test_sbatch_renders_and_launches(nodes, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render(nodes))
    subprocess.run(["bash", "-n", str(script)], check=True)
    fake = _fake_bin(tmp_path / "bin")
    nodelist = "gpu[001-004]" if nodes == 4 else "gpu001"
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "31337",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }
    out = subprocess.run(
        ["bash", str(script), "experiment=hat_small", "strategy=deepspeed_zero2"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("SRUN"))
    assert "MASTER_ADDR=gpu001 " in line and "MASTER_PORT=31337" in line
    assert f"trainer.num_nodes={nodes}" in line and "trainer.devices=8" in line
    assert "ckpt_path=last" in line and line.endswith("experiment=hat_small strategy=deepspeed_zero2")
    assert f"{nodes} node(s) x 8 task(s)" in out


@pytest.mark.parametrize("srun_exit", [0, 3])
def test_sbatch_shell_forwards_sigusr1_to_srun_and_keeps_its_exit_status(srun_exit, tmp_path):
    """`scancel --signal=USR1 --full` / `--batch` signal the batch shell too: it must pass the signal on to
    srun (which signals the tasks) instead of dying of it, and still exit with srun's status."""
    script = tmp_path / "job.sbatch"
    script.write_text(render(1))
    fake = _fake_bin(tmp_path / "bin")
    (fake / "srun").write_text(
        "#!/bin/bash\n"
        f"trap 'echo USR1 >> {tmp_path}/srun.signals; exit {srun_exit}' USR1\n"
        f"touch {tmp_path}/srun.started\n"
        "for _ in $(seq 1 600); do sleep 0.05; done\n"
        "exit 99\n"
    )
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "5",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_JOB_NODELIST": "gpu001",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }
    proc = subprocess.Popen(
        ["bash", str(script), "experiment=hat_tiny"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 30
        while not (tmp_path / "srun.started").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "srun.signals").read_text().split() == ["USR1"]
    assert "[bytelm] batch shell: SIGUSR1, forwarded to the tasks" in out
    assert proc.returncode == srun_exit, out


def test_fake_slurm_environment_gives_rank_and_world_size(tmp_path):
    """Rank 5 of 8 (2 nodes x 4 tasks), as srun would start it; the Trainer is built, not run."""
    code = (
        "from bytelm.config import load_config\n"
        "from bytelm.lit.trainer import build_trainer\n"
        "from bytelm.lit.callbacks import RequeueOnSignal\n"
        f"cfg = load_config(['debug=cpu', 'strategy=ddp', 'trainer.accelerator=cpu', 'trainer.devices=4',"
        f" 'trainer.num_nodes=2', 'trainer.out_dir={tmp_path}'])\n"
        "t = build_trainer(cfg)\n"
        "env = t.strategy.cluster_environment\n"
        "import json\n"
        "print(json.dumps(dict(env=type(env).__name__, requeue=env.auto_requeue, rank=t.global_rank,"
        " world=t.world_size, local=t.local_rank, node=t.node_rank, addr=env.main_address,"
        " cb=any(isinstance(c, RequeueOnSignal) for c in t.callbacks))))\n"
    )
    env = dict(
        os.environ,
        SLURM_NTASKS="8",
        SLURM_NTASKS_PER_NODE="4",
        SLURM_PROCID="5",
        SLURM_LOCALID="1",
        SLURM_NODEID="1",
        SLURM_JOB_NAME="bytelm",
        SLURM_JOB_ID="77",
        SLURM_NODELIST="node[1-2]",
        SLURM_JOB_NUM_NODES="2",
        PYTHONPATH=str(ROOT),
    )
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info == {
        "env": "SLURMEnvironment",
        "requeue": False,
        "rank": 5,
        "world": 8,
        "local": 1,
        "node": 1,
        "addr": "node1",
        "cb": True,
    }


def _train_cmd(out_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bytelm.train",
        "debug=cpu",
        f"trainer.out_dir={out_dir}",
        "trainer.val_every=100000",
        "trainer.ckpt_every=2",
        "trainer.keep_last=1",
        "ckpt_path=last",
        *extra,
    ]


def test_sigusr1_checkpoints_requeues_and_the_requeued_run_resumes(tmp_path):
    import torch

    fake = _fake_bin(tmp_path / "bin")
    env = dict(
        os.environ,
        PATH=f"{fake}:{os.environ['PATH']}",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_JOB_NAME="bytelm",
        SLURM_JOB_ID="4242",
        SLURM_NODELIST="localhost",
        SLURM_JOB_NUM_NODES="1",
        FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    out_dir = tmp_path / "run"
    ck = out_dir / "checkpoints"
    batch_log = f"trainer.batch_log={tmp_path / 'batches.jsonl'}"
    proc = subprocess.Popen(
        _train_cmd(out_dir, "trainer.max_steps=100000", batch_log),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        # training is under way once a step checkpoint exists (keep_last=1 replaces step 2 by step 4 quickly,
        # so waiting for one particular file can miss it on a fast machine)
        while not any(ck.glob("step*.ckpt")):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-3000:]
    assert "[bytelm] signal" in log
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    saved = torch.load(ck / "last.ckpt", weights_only=False)["global_step"]
    assert 2 <= saved < 1000

    # the requeued job: same command, resumes from last.ckpt and continues to its end
    again = subprocess.run(
        _train_cmd(out_dir, f"trainer.max_steps={saved + 2}", batch_log),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {ck / 'last.ckpt'}" in again.stdout + again.stderr
    assert torch.load(ck / "last.ckpt", weights_only=False)["global_step"] == saved + 2
    assert sorted(p.name for p in ck.glob("last*")) == ["last.ckpt"]  # overwritten, never last-v1.ckpt
    # trainer.batch_log: every step once, the requeued run's continuing where the first stopped
    recs = [json.loads(line) for line in (tmp_path / "batches.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, saved + 3))
    assert {r["rank"] for r in recs} == {0} and len({r["sha1"] for r in recs}) == len(recs)


def test_sigusr1_before_training_is_remembered_not_fatal(monkeypatch):
    """In a Slurm job step a SIGUSR1 during start-up (before RequeueOnSignal is installed) does not kill the
    process (SIGUSR1's default action): it is remembered and acted on at the first step boundary."""
    from bytelm.lit import callbacks as cb

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        monkeypatch.delenv("SLURM_STEP_ID", raising=False)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        assert not cb.catch_requeue_signal_early()  # not a job step (e.g. the batch script, or no Slurm)
        monkeypatch.setenv("SLURM_JOB_ID", "7")
        monkeypatch.setenv("SLURM_STEP_ID", "0")
        assert cb.catch_requeue_signal_early()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread
        assert signal.SIGUSR1 in cb._PENDING
        requeue = cb.RequeueOnSignal(Path("unused"))
        requeue.on_fit_start(None, None)  # type: ignore[arg-type]
        assert requeue._flag and signal.SIGUSR1 not in cb._PENDING
        requeue._restore()
        assert signal.getsignal(signal.SIGUSR1) == cb._remember_signal  # after training: remembered again
    finally:
        cb._PENDING.discard(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, previous if previous is not None else signal.SIG_DFL)


def test_hydra_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bytelm.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["hydra/launcher=slurm", "name=sweep"], return_hydra_config=True
        )
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node and launcher.signal_delay_s == 90
    assert launcher.name == "sweep"
