"""``build_model``: the model ``cfg.arch`` names. A module file of its own (not the package ``__init__``) so
the Hugging Face export ships it with the modelling code and both build models the same way."""

from __future__ import annotations

from torch import nn

# imported here, not inside build_model: transformers builds models under ``torch.device("meta")``, and a
# module imported inside that context would create its import-time tensors (lookup tables) on meta
from bytelm.models.byteified import ByteifiedLM  # noqa: F401
from bytelm.models.config import ModelConfig
from bytelm.models.flat import FlatByteLM  # noqa: F401
from bytelm.models.hierarchical import HierarchicalByteLM  # noqa: F401
from bytelm.models.mrt5 import MrT5  # noqa: F401
from bytelm.models.registry import get_spec


def build_model(cfg: ModelConfig, init: bool = True) -> nn.Module:
    """Construct the model named by ``cfg.arch`` (its ``bytelm.models.registry`` spec); ``init=False`` leaves
    weights for the caller to init (meta-device / sharded construction)."""
    model = get_spec(cfg.arch).model_class()(cfg)
    if init:
        model.init_weights()  # type: ignore[operator]
    return model
