"""Training throughput and MFU: Lightning's ``ThroughputMonitor`` fed with bytelm's FLOPs formula.

Lightning measures (windowed, validation time excluded, rank 0) and logs ``train/device/items_per_sec``
(items = bytes), ``train/device/samples_per_sec`` (rows), ``train/device/batches_per_sec``, ``train/time``
(training seconds so far) and, when the module has ``flops_per_batch`` and the device's peak is known,
``train/device/flops_per_sec`` and ``train/device/mfu``; with several devices also the totals without
``device/``. ``flops_per_batch`` is ``bytelm.models.flops.flops_per_byte`` times the bytes of one device's
batch (the formula is checked against torch's FLOP counter in tests/models/test_flops.py). The peak FLOP/s per
device come from Lightning's table (``get_available_flops``: H100/H200/A100/L4/... by name and dtype; None on
CPUs), so bytelm keeps no GPU table of its own. Words per second are ``items_per_sec`` over the logged
``train/bytes_per_word``.

Like bytelm's earlier monitor, Lightning's synchronises CUDA once per logged step on rank 0, so the rate is
that of finished work; that costs one host sync per step on one rank, below 1% of a step at bytelm's sizes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)

WINDOW = 10  # steps averaged per logged rate (Lightning's default is 100: no rate at all in short runs)


def rows(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])


def bytes_in(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].numel())


class TrainThroughputMonitor(ThroughputMonitor):
    """Lightning's monitor without its validation rows. Lightning logs validation throughput at step = the
    number of validation batches so far, which lands on the training-step axis of the CSV log that
    ``bytelm.eval.curves`` reads; validation is still timed, so its time stays out of ``train/time``."""

    @rank_zero_only
    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *args: Any, **kwargs: Any
    ) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)


def throughput_monitor(window: int = WINDOW) -> ThroughputMonitor:
    """Lightning's monitor counting rows as samples and bytes as items (training steps only)."""
    return TrainThroughputMonitor(batch_size_fn=rows, length_fn=bytes_in, window_size=max(2, window))


def compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype a Lightning precision string runs at (what the peak FLOP/s depend on)."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float64 if p.startswith("64") else torch.float32


def device_peak_flops(device: torch.device | str, precision: str = "bf16-mixed") -> float | None:
    """Peak FLOP/s of one device at ``precision`` (Lightning's table); None on CPUs and unknown GPUs."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    peak = get_available_flops(device, compute_dtype(precision))
    return None if peak is None else float(peak)


def flops_per_batch(cfg: Any) -> float | None:
    """Training FLOPs of one device's batch by bytelm's formula (None: an architecture it does not cover)."""
    from bytelm.models.flops import flops_per_byte

    try:
        return flops_per_byte(cfg.model, cfg.data.seq_len) * cfg.data.batch_size * cfg.data.seq_len
    except ValueError as e:
        log.info("MFU not reported: %s", e)
        return None
