"""Load bytelm models from checkpoints without Lightning's machinery, and find the newest valid one.

A Lightning checkpoint from bytelm carries ``bytelm_config`` (the full typed config) and a ``state_dict``
whose keys start with ``model.``. A corrupt file (truncated write, wrong format) raises
``CorruptCheckpointError`` naming the file, so callers can report it and fall back to an older one.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bytelm.config import Config, config_from_dict
from bytelm.models import build_model

log = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    pass


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(
            f"{str(path)!r} is a folder: sharded (DeepSpeed/FSDP2) checkpoints must be consolidated first "
            "(bytelm-consolidate)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} has no state_dict: not a bytelm checkpoint")
    return ckpt


def config_of(ckpt: dict[str, Any]) -> Config:
    raw = ckpt.get("bytelm_config") or ckpt.get("hyper_parameters", {}).get("cfg")
    if raw is None:
        raise CorruptCheckpointError("checkpoint has no bytelm_config: was it written by bytelm?")
    return config_from_dict(raw)


def model_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    sd = ckpt["state_dict"]
    return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Model (eval mode) and config from a bytelm Lightning checkpoint."""
    ckpt = read_checkpoint(path)
    cfg = config_of(ckpt)
    model = build_model(cfg.model, init=False)
    missing, unexpected = model.load_state_dict(model_state_dict(ckpt), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not cfg.model.tie_embeddings]
    if missing or unexpected:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} does not match its model config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.to(device).eval(), cfg


def _step_of(p: Path) -> int:
    m = re.search(r"step(\d+)", p.name)
    return int(m.group(1)) if m else -1


def latest_valid_checkpoint(folder: str | Path) -> Path | None:
    """Newest checkpoint in ``folder`` that loads; corrupt ones are reported and skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    cands = sorted(folder.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, _step_of(p)), reverse=True)
    for p in cands:
        try:
            read_checkpoint(p)
            return p
        except CorruptCheckpointError as e:
            log.warning("skipping corrupt checkpoint: %s", e)
    return None
