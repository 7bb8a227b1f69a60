"""Training callbacks: throughput and MFU, and checkpoint-and-requeue on Slurm's warning signal.

- throughput and MFU: Lightning's ``ThroughputMonitor`` (``bytelm.lit.throughput``).
- ``SaveLastOnEnd``: the run's final state is in ``checkpoints/last.ckpt`` even when ``max_steps`` is not a
  multiple of ``ckpt_every``.
- ``RequeueOnSignal``: Slurm sends SIGUSR1 90 s before the time limit (``--signal=SIGUSR1@90``). The handler
  only sets a flag; at the next step boundary all ranks agree on it, write ``checkpoints/last.ckpt``, rank 0
  runs ``scontrol requeue`` and the run stops cleanly. The requeued job resumes with ``ckpt_path=last``.
  ``catch_requeue_signal_early`` (called by ``bytelm.train.main`` in a Slurm job step) makes a SIGUSR1 that
  comes before training starts or after it ends harmless: it is remembered, not fatal (SIGUSR1's default
  action ends the process), and one that came before training is acted on at the first step boundary.
- ``BatchLog`` / ``StepSleep`` (``trainer.batch_log`` / ``trainer.step_sleep_s``): debug aids for tests
  that compare the batches of two runs, and that need a run to last long enough to be signalled mid-run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
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
        done = {
            getattr(c, "_last_global_step_saved", -1) for c in callbacks if isinstance(c, ModelCheckpoint)
        }
        done |= {c.saved_step for c in callbacks if isinstance(c, RequeueOnSignal)}
        if trainer.global_step in done:
            return
        trainer.save_checkpoint(str(self.ckpt_dir / "last.ckpt"))


# SIGUSR1 that arrived while no RequeueOnSignal was installed (before fit, or after it)
_PENDING: set[int] = set()


def _remember_signal(signum: int, frame: Any) -> None:
    _PENDING.add(signum)


def catch_requeue_signal_early(signum: int = signal.SIGUSR1) -> bool:
    """In a Slurm job step, remember ``signum`` from now on instead of dying of it (its default action).

    Slurm's time-limit warning (``--signal=USR1@N``) or ``scancel --signal=USR1`` can reach a task during
    start-up (imports, data preparation) or after training, where no ``RequeueOnSignal`` is installed. Early
    signals are acted on at the first step boundary; late ones are moot (the run is complete). Returns whether
    the handler was installed (only in a Slurm job step, in the main thread, when the signal is not handled
    already).
    """
    import threading

    if "SLURM_JOB_ID" not in os.environ or "SLURM_STEP_ID" not in os.environ:
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signum) not in (signal.SIG_DFL, None):
        return False
    signal.signal(signum, _remember_signal)
    return True


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
        if self.signum in _PENDING:  # it came during start-up: act on it at the first step boundary
            _PENDING.discard(self.signum)
            self._flag = True
            log.warning(
                "signal %d arrived before training: checkpoint and requeue after the first step", self.signum
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
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
        log.warning(
            "signal %d: rank %d (host %s, node %d) saved its part of %s at step %d",
            self.signum,
            trainer.global_rank,
            socket.gethostname(),
            trainer.node_rank,
            path,
            trainer.global_step,
        )
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


class BatchLog(L.Callback):
    """``trainer.batch_log``: one JSON line per training batch and rank, appended (a requeued run continues
    the file): ``step`` (global step after it), ``batch_idx``, ``rank``, ``world``, ``env`` (the cluster
    environment, e.g. SLURMEnvironment), ``sha1`` of the batch's ``input_ids`` and the ``loss``; where it ran:
    ``node`` (node rank), ``host``, ``pid``, ``master`` (``MASTER_ADDR``); and ``stored`` / ``full``, the
    parameter elements this rank holds (its ZeRO-3 / FSDP2 shard) and the whole model's."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._numel: tuple[int, int] | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        import hashlib
        import json

        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        rec = {
            "step": trainer.global_step,
            "batch_idx": batch_idx,
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "env": type(
                getattr(trainer.strategy, "cluster_environment", None)
            ).__name__,  # None: single device
            "sha1": hashlib.sha1(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
            "loss": None if loss is None else float(loss),
            "node": trainer.node_rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "master": os.environ.get("MASTER_ADDR"),
        }
        if self._numel is None:
            from bytelm.lit.strategies import stored_numel

            self._numel = stored_numel(pl_module)
        rec["stored"], rec["full"] = self._numel
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one short line per write: appends from several ranks do not mix
            f.write(json.dumps(rec) + "\n")


class StepSleep(L.Callback):
    """``trainer.step_sleep_s``: sleep after every training step (a debug aid; numerics are unchanged)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        time.sleep(self.seconds)


def debug_callbacks(batch_log: str | None, step_sleep_s: float) -> list[L.Callback]:
    """The callbacks of the ``trainer.batch_log`` / ``trainer.step_sleep_s`` debug options (none by
    default)."""
    cbs: list[L.Callback] = []
    if batch_log:
        cbs.append(BatchLog(batch_log))
    if step_sleep_s > 0:
        cbs.append(StepSleep(step_sleep_s))
    return cbs


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

    def __init__(
        self, grace_s: float = 60.0, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
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

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # a failed rank 0 (e.g. a collective timeout) takes the ranks it launched along instead of leaving
        # them waiting in a collective
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
