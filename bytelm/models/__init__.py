"""Pure-torch models. This package never imports lightning, deepspeed, hydra or wandb (a test checks it)."""

from __future__ import annotations

from bytelm.models.build import build_model
from bytelm.models.config import ARCHS, GateConfig, ModelConfig, ModelOutput

__all__ = ["GateConfig", "ModelConfig", "ModelOutput", "build_model", "ARCHS"]
