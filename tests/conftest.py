"""Shared fixtures: offline W&B, quiet datasets, tiny configs."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

try:  # datasets waits 5 s at exit otherwise
    import datasets.config

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make any experiment a seconds-long CPU run writing under tmp_path."""
    return ["debug=cpu", f"trainer.out_dir={tmp_path / 'run'}"]
