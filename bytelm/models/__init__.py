"""Pure-torch models. This package never imports lightning, deepspeed, hydra or wandb (a test checks it).

``build_model`` is loaded on first access (PEP 562): importing ``bytelm.models.config`` (which every config
import does) then does not load every model class; ``bytelm.models.build`` itself imports them at module
level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bytelm.models.config import GateConfig, ModelConfig, ModelOutput
from bytelm.models.registry import (
    ARCHS,
    ModelSpec,
    get_spec,
    register_model,
    registered_archs,
    unregister_model,
)

if TYPE_CHECKING:
    from bytelm.models.build import build_model

__all__ = [
    "GateConfig",
    "ModelConfig",
    "ModelOutput",
    "build_model",
    "ARCHS",
    "ModelSpec",
    "get_spec",
    "register_model",
    "registered_archs",
    "unregister_model",
]


def __getattr__(name: str) -> Any:
    if name == "build_model":
        from bytelm.models.build import build_model

        return build_model
    raise AttributeError(f"module 'bytelm.models' has no attribute {name!r}")
