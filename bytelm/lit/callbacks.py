"""Training callbacks: throughput and MFU, and checkpoint-and-requeue on Slurm's warning signal.

- throughput and MFU: Lightning's ``ThroughputMonitor`` (``bytelm.lit.throughput``).
- ``SaveLastOnEnd``: the run's final state is in ``checkpoints/last.ckpt`` even when ``max_steps`` is not a
  multiple of ``ckpt_every``.
- ``RequeueOnSignal``: Slurm sends SIGUSR1 90 s before the time limit (``--signal=SIGUSR1@90``). The handler
  only sets a flag; at the next step boundary all ranks agree on it, write ``checkpoints/last.ckpt``, rank 0
  runs ``scontrol requeue`` and the run stops cleanly. The requeued job resumes with ``ckpt_path=last``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class SaveLastOnEnd(L.Callback):
    """At the end of training, write ``last.ckpt`` unless the ModelCheckpoint already saved this step."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.ckpt_dir = Path(ckpt_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        if trainer.global_step == 0 or trainer.interrupted:
            return
        callbacks: list[Any] = list(getattr(trainer, "callbacks", []))
        done = {getattr(c, "_last_global_step_saved", -1) for c in callbacks if isinstance(c, ModelCheckpoint)}
        done |= {c.saved_step for c in callbacks if isinstance(c, RequeueOnSignal)}
        if trainer.global_step in done:
            return
        trainer.save_checkpoint(str(self.ckpt_dir / "last.ckpt"))


def slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class RequeueOnSignal(L.Callback):
    """SIGUSR1 (Slurm's time-limit warning) -> checkpoint at the next step boundary, requeue, stop."""

    def __init__(self, ckpt_dir: str | Path, signum: int = signal.SIGUSR1, requeue: bool = True) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.signum = signum
        self.requeue = requeue
        self._flag = False
        self._previous: Any = None
        self.saved: Path | None = None
        self.saved_step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        self._flag = True  # act at the step boundary: never checkpoint from inside a step or a collective

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous = signal.signal(self.signum, self._handler)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        flag = self._flag
        if trainer.world_size > 1:
            flag = bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
        if not flag:
            return
        path = self.ckpt_dir / "last.ckpt"
        trainer.save_checkpoint(str(path))
        self.saved, self.saved_step = path, trainer.global_step
        log.warning("signal %d: checkpoint %s at step %d", self.signum, path, trainer.global_step)
        if trainer.is_global_zero:
            print(f"[bytelm] signal {self.signum}: saved {path} at step {trainer.global_step}", flush=True)
            if self.requeue:
                self._requeue()
        trainer.should_stop = True
        self._flag = False

    @staticmethod
    def _requeue() -> None:
        job = slurm_job_id()
        if job is None:
            log.warning("no SLURM_JOB_ID: not requeueing")
            return
        try:
            rc = subprocess.call(["scontrol", "requeue", job])
        except FileNotFoundError:
            log.warning("scontrol not found: cannot requeue job %s", job)
            return
        if rc == 0:
            log.warning("requeued Slurm job %s", job)
        else:
            log.warning("scontrol requeue %s failed with exit code %d", job, rc)


class StopOnSignal(L.Callback):
    """SIGTERM / SIGINT end a run within seconds, never waiting on a collective.

    The handler only records the signal; at the next step boundary the ranks agree on it (any rank that got it
    stops all), and training stops, so ``SaveLastOnEnd`` writes ``checkpoints/last.ckpt`` as at a normal end.
    A run that cannot reach a step boundary (stuck in a collective, a rank gone) is ended by a watchdog thread
    ``grace_s`` seconds after the signal, or at once on a second signal: it kills the ranks this process
    launched and exits with ``128 + signum``. Python runs signal handlers only between bytecodes, and a rank
    blocked in a collective is inside one C call, so the watchdog learns of the signal from the interpreter's
    wakeup fd, which the C-level handler writes at once.

    Installed at ``on_train_start``, after Lightning's own SIGTERM handler (which broadcasts from inside the
    handler: a collective that hangs when the ranks are not all there), and restored at the end of fit.
    """

    def __init__(self, grace_s: float = 60.0, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.grace_s = grace_s
        self.signals = tuple(int(s) for s in signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._old_wakeup = -1
        self._sock: tuple[Any, Any] | None = None
        self._launcher: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import socket
        import threading

        if threading.current_thread() is not threading.main_thread() or self._sock is not None:
            return
        self._launcher = trainer.strategy.launcher
        r, w = socket.socketpair()
        w.setblocking(False)
        self._sock = (r, w)
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        self._old_wakeup = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watchdog, args=(r,), name="bytelm-stop-watchdog", daemon=True).start()

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            log.warning("signal %d: stopping at the next step boundary (checkpoint last.ckpt)", signum)

    def _watchdog(self, r: Any) -> None:
        import select

        first: float | None = None
        signum = 0
        while True:
            wait = None if first is None else max(0.0, first + self.grace_s - time.monotonic())
            if not select.select([r], [], [], wait)[0]:
                return self._force_exit(signum, f"still running {self.grace_s:g} s after signal {signum}")
            try:
                data = r.recv(64)
            except OSError:
                return
            if not data:  # closed: the run ended normally
                return
            got = [b for b in data if b in self.signals]
            if not got:
                continue
            if first is not None or len(got) > 1:
                return self._force_exit(got[-1], f"second signal {got[-1]}")
            first, signum = time.monotonic(), got[0]

    def _force_exit(self, signum: int, why: str) -> None:
        msg = f"[bytelm] {why}: exiting now (no step boundary reached; ranks stuck in a collective?)"
        try:
            print(msg, file=sys.stderr, flush=True)
        finally:
            self._kill_launched()
            os._exit(128 + signum)

    def _kill_launched(self) -> None:
        """Kill the rank processes this process launched (Lightning's subprocess launcher), if any."""
        for proc in list(getattr(self._launcher, "procs", []) or []):
            with contextlib.suppress(OSError):
                proc.kill()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        flag = self.received is not None
        if trainer.world_size > 1:
            flag = bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
        if flag:
            if self.received is None:
                self.received = int(signal.SIGTERM)  # another rank got it
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # a failed rank 0 (e.g. a collective timeout) takes the ranks it launched along instead of leaving them
        # waiting in a collective
        self._kill_launched()
        self._restore()

    def _restore(self) -> None:
        if self._sock is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}
        r, w = self._sock
        self._sock = None
        w.close()  # the watchdog sees EOF and ends
        r.close()
