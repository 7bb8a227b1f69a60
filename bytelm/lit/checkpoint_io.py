"""Single-file checkpoint IO: ``AtomicCheckpointIO``, the ``CheckpointIO`` plugin ``bytelm.lit.trainer`` gives
every Lightning trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes ``NAME.tmp``, fsyncs it and renames it over ``NAME``: a crash
    mid-write leaves the previous checkpoint intact (single device, DDP, and FSDP2 full-state saves)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
