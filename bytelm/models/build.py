"""``build_model``: the model ``cfg.arch`` names. A module file of its own (not the package ``__init__``) so the
Hugging Face export ships it with the modelling code and both build models the same way."""

from __future__ import annotations

from torch import nn

# imported here, not inside build_model: transformers builds models under ``torch.device("meta")``, and a
# module imported inside that context would create its import-time tensors (lookup tables) on meta
from bytelm.models.byteified import ByteifiedLM
from bytelm.models.config import ARCHS, ModelConfig
from bytelm.models.flat import FlatByteLM
from bytelm.models.hierarchical import HierarchicalByteLM
from bytelm.models.mrt5 import MrT5


def build_model(cfg: ModelConfig, init: bool = True) -> nn.Module:
    """Construct the model named by ``cfg.arch``; ``init=False`` leaves weights for the caller to init
    (meta-device / sharded construction)."""
    classes: dict[str, type[nn.Module]] = {
        "flat": FlatByteLM,
        "hierarchical": HierarchicalByteLM,
        "mrt5": MrT5,
        "byteified": ByteifiedLM,
    }
    if cfg.arch not in classes:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; choose one of {ARCHS}")
    model = classes[cfg.arch](cfg)
    if init:
        model.init_weights()  # type: ignore[operator]
    return model
