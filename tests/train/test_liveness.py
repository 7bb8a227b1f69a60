"""``RankHeartbeat`` (bytelm.lit.liveness) without a cluster: ranks tick counters in a real TCPStore; when a
collective fails, the failing rank names the ranks whose counter stopped, or says the store is unreachable.
(On a real two-node Slurm cluster: tests/slurm/test_slurm_two_nodes.py.)"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from bytelm.lit.liveness import PREFIX, RankHeartbeat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(monkeypatch):
    port = _free_port()
    server = dist.TCPStore(
        "127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return server


def _rank(rank: int) -> tuple[RankHeartbeat, SimpleNamespace]:
    beat = RankHeartbeat(interval=0.05, probe=0.4, store_timeout_s=1.0)
    trainer = SimpleNamespace(global_rank=rank, world_size=3, node_rank=rank)
    beat.on_fit_start(trainer, None)  # type: ignore[arg-type]
    return beat, trainer


def test_a_rank_whose_heartbeat_stopped_is_named_lost(store, capsys):
    ranks = [_rank(r) for r in range(3)]
    deadline = time.monotonic() + 10
    while not all(store.check([f"{PREFIX}{r}/who"]) for r in range(3)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ranks[2][0].on_fit_end(ranks[2][1], None)  # type: ignore[arg-type]  # rank 2 "dies": no more beats
    beat, trainer = ranks[0]
    beat.on_exception(trainer, None, RuntimeError("Application timeout caused pair closure"))  # type: ignore[arg-type]
    assert beat.lost == [2], beat.diagnosis
    assert f"lost rank(s): 2 (host {socket.gethostname()}, node 2)" in (beat.diagnosis or "")
    err = capsys.readouterr().err
    assert (
        "[bytelm] rank 0" in err
        and "Application timeout caused pair closure" in err
        and "lost rank(s): 2" in err
    )
    ranks[1][0].on_fit_end(ranks[1][1], None)  # type: ignore[arg-type]
    assert not any(t.name == "bytelm-heartbeat" and t.is_alive() for t in threading.enumerate())


def test_a_rank_that_cannot_reach_the_store_names_rank_0(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # nobody listens: the first node is gone
    beat, trainer = _rank(1)
    t0 = time.monotonic()
    beat.on_exception(trainer, None, RuntimeError("Connection closed by peer"))  # type: ignore[arg-type]
    assert beat.lost == [0] and "unreachable" in (beat.diagnosis or ""), beat.diagnosis
    assert time.monotonic() - t0 < 10


def test_other_errors_and_single_rank_runs_are_left_alone(store):
    beat, trainer = _rank(0)
    beat.on_exception(trainer, None, ValueError("a bug"))  # type: ignore[arg-type]
    assert beat.diagnosis is None and beat.lost is None
    single = RankHeartbeat()
    single.on_fit_start(SimpleNamespace(global_rank=0, world_size=1, node_rank=0), None)  # type: ignore[arg-type]
    assert single._thread is None
