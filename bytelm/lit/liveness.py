"""Which rank was lost: heartbeats through the rendezvous store, read when a collective fails.

A collective that fails because a rank died or its node dropped off the network says little about who is
gone: gloo raises "Application timeout caused pair closure" or "Connection closed by peer" on every surviving
rank, and under Slurm the first task to exit is the one ``srun`` reports, which is usually a survivor.
``RankHeartbeat`` (installed whenever a run has more than one rank) makes the error name the lost ranks:

- every rank keeps a counter ``bytelm/alive/<rank>`` in the job's rendezvous store (the c10d TCPStore at
  ``MASTER_ADDR:MASTER_PORT``, on the first node) ticking every ``interval`` seconds from a daemon thread,
  over a store connection of its own with a short timeout, and records its host and node rank once;
- when training raises on a rank, that rank reads every counter twice, ``probe`` seconds apart: a rank whose
  counter did not move is lost (its process is gone, or its node cannot reach the store's node); the verdict
  is printed (``[bytelm] rank 0 (host n1, node 0): ... lost rank(s): 1 (host n2, node 1) ...``) and
  ``bytelm.train.run`` raises ``LostRanksError`` with it, chained to the collective's own error;
- a rank that cannot reach the store itself (cut off from the first node) says so: from its side rank 0 is
  the one lost.

The diagnosis runs only after the collective has already failed (``trainer.collective_timeout_s``), in a
thread with a deadline, so it adds at most a few seconds and never hangs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

PREFIX = "bytelm/alive/"


class LostRanksError(RuntimeError):
    """A collective failed and these ranks were found lost (no heartbeat); the collective's error is its
    cause."""


def _store(timeout_s: float) -> Any:
    """A client connection of our own to the job's rendezvous store (None if there is no TCP rendezvous)."""
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return dist.TCPStore(
        addr, int(port), is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


class RankHeartbeat(L.Callback):
    """Heartbeats of every rank in the rendezvous store; names the lost ranks when training raises."""

    def __init__(self, interval: float = 1.0, probe: float = 3.0, store_timeout_s: float = 5.0) -> None:
        self.interval = interval
        self.probe = probe
        self.store_timeout_s = store_timeout_s
        self.diagnosis: str | None = None
        self.lost: list[int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rank = 0
        self._world = 1
        self._me = ""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rank, self._world = trainer.global_rank, trainer.world_size
        # one store update per rank and interval: keep the first node's store under ~200 updates a second
        self.interval = max(self.interval, self._world / 200)
        self.probe = max(self.probe, 3 * self.interval)
        self._me = f"host {socket.gethostname()}, node {trainer.node_rank}"
        if self._world < 2 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="bytelm-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        store = None
        while not self._stop.is_set():
            try:
                if store is None:
                    store = _store(self.store_timeout_s)
                    if store is None:
                        return
                    store.set(f"{PREFIX}{self._rank}/who", self._me)
                store.add(f"{PREFIX}{self._rank}", 1)
            except Exception:  # unreachable for now (a partition): keep trying, the diagnosis reads the gap
                store = None
            self._stop.wait(self.interval)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end()

    def _end(self) -> None:
        """Stop beating; wait for the thread to leave any store call (a daemon thread still inside one when
        the interpreter exits aborts the process: "terminate called without an active exception")."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.store_timeout_s + 1)
            self._thread = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._world < 2 or not isinstance(exception, RuntimeError) or self._thread is None:
            self._end()
            return
        # srun ends the other tasks (SIGTERM) as soon as one fails: hold a SIGTERM back for the few seconds
        # the diagnosis takes (Lightning's handler would raise inside it); the run ends with an error anyway
        held: list[int] = []
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, lambda s, f: held.append(s)) if main else None
        try:
            result: list[str] = []
            worker = threading.Thread(target=lambda: result.append(self._diagnose()), daemon=True)
            worker.start()
            worker.join(self.probe + 2 * self.store_timeout_s + 2)
            self._end()
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        if result:
            self.diagnosis = result[0]
        else:
            self.diagnosis = self._unreachable("no answer")
        what = f"{type(exception).__name__} ({exception})"
        msg = f"[bytelm] rank {self._rank} ({self._me}): {what}; {self.diagnosis}"
        log.error(msg)
        print(msg, file=sys.stderr, flush=True)

    def _unreachable(self, why: str) -> str:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        self.lost = [0] if self._rank != 0 else []
        return (
            f"lost rank(s): 0 (the rendezvous store on {where}, rank 0's node, is unreachable from here: "
            f"{why}); "
            "this node is cut off from the first one"
        )

    def _diagnose(self) -> str:
        try:
            store = _store(self.store_timeout_s)
            if store is None:
                return "no rendezvous store to ask which ranks are alive"
            ranks = range(self._world)
            before = [store.add(f"{PREFIX}{r}", 0) for r in ranks]
            time.sleep(self.probe)
            after = [store.add(f"{PREFIX}{r}", 0) for r in ranks]
        except Exception as e:
            return self._unreachable(f"{type(e).__name__}: {e}".splitlines()[0])
        lost = [r for r in ranks if r != self._rank and after[r] == before[r]]
        self.lost = lost
        if not lost:
            return "every rank still beats (none lost: a rank is stalled or failed by itself)"

        def who(r: int) -> str:
            with contextlib.suppress(Exception):
                if store.check([f"{PREFIX}{r}/who"]):
                    return f"{r} ({store.get(f'{PREFIX}{r}/who').decode()})"
            return str(r)

        return (
            f"lost rank(s): {', '.join(who(r) for r in lost)}: no heartbeat in {self.probe:g} s "
            "(process gone, or its node cut off from the first node)"
        )
