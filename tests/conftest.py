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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module of tiny tensors: more threads only add spin-wait overhead when the
    2 cores are shared with other jobs. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make any experiment a seconds-long CPU run writing under tmp_path."""
    return ["debug=cpu", f"trainer.out_dir={tmp_path / 'run'}"]
