"""Pure-torch models. This package never imports lightning, deepspeed, hydra or wandb (a test checks it)."""

from __future__ import annotations

from torch import nn

from bytelm.models.config import GateConfig, ModelConfig, ModelOutput

__all__ = ["GateConfig", "ModelConfig", "ModelOutput", "build_model", "ARCHS"]

ARCHS = ("flat", "hierarchical", "mrt5", "byteified")


def build_model(cfg: ModelConfig, init: bool = True) -> nn.Module:
    """Construct the model named by ``cfg.arch``; ``init=False`` leaves weights for the caller to init
    (meta-device / sharded construction)."""
    if cfg.arch == "flat":
        from bytelm.models.flat import FlatByteLM

        model: nn.Module = FlatByteLM(cfg)
    elif cfg.arch == "hierarchical":
        from bytelm.models.hierarchical import HierarchicalByteLM

        model = HierarchicalByteLM(cfg)
    elif cfg.arch == "mrt5":
        from bytelm.models.mrt5 import MrT5

        model = MrT5(cfg)
    elif cfg.arch == "byteified":
        from bytelm.models.byteified import ByteifiedLM

        model = ByteifiedLM(cfg)
    else:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; choose one of {ARCHS}")
    if init:
        model.init_weights()  # type: ignore[operator]
    return model
