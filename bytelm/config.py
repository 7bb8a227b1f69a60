"""Typed configuration of a bytelm run. Hydra fills these dataclasses from ``conf/`` (``OmegaConf.structured``),
so every key is type-checked and a misspelt key fails with a message naming it.

``load_config(overrides)`` composes the same tree without ``@hydra.main`` (tests, CLIs, notebooks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bytelm.models.config import GateConfig, ModelConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class DataConfig:
    source: str = "shakespeare"  # shakespeare | files (see docs: bring your own data)
    seq_len: int = 512  # bytes per training row
    batch_size: int = 16  # rows per step per device
    num_workers: int = 0
    val_max_bytes: int = 262144  # validation bytes evaluated (0 = the whole split)
    invalid_utf8: str = "keep"  # keep (raw bytes) | replace (U+FFFD)
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: final fraction of steps that decays
    grad_clip: float = 1.0
    z_loss: float = 0.0  # weight of logsumexp(logits)^2 (1e-4 is the usual value)


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    flops_budget: float = 0.0  # > 0: max_steps derived from a training-FLOPs budget (fair comparisons)
    val_every: int = 250
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    precision: str = "auto"  # auto = bf16-mixed on CUDA, 32-true on CPU
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    accumulate: int = 1
    seed: int = 0
    out_dir: str = "runs/default"
    progress: bool = True
    max_time: str | None = None  # e.g. "00:03:00:00"


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb (offline without WANDB_API_KEY) | csv | tensorboard | none
    project: str = "bytelm"
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class StrategyConfig:
    name: str = "single"  # single | ddp | deepspeed_zero1|2|3 | fsdp2
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    ckpt_path: str | None = None  # resume from this checkpoint ("last" = newest valid one in out_dir)


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (called before composing)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> Config:
    """Compose ``conf/config.yaml`` with Hydra overrides and return a typed ``Config`` object."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    return to_config(cfg)


def to_config(cfg: Any) -> Config:
    """DictConfig (from Hydra) -> typed Config dataclass, validated against the schema."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    merged = OmegaConf.merge(OmegaConf.structured(Config), container)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return obj


def config_to_dict(cfg: Config) -> dict[str, Any]:
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def config_from_dict(d: dict[str, Any]) -> Config:
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))
    assert isinstance(obj, Config)
    return obj


def wandb_offline_default() -> None:
    """W&B works with no account: offline unless an API key is set (or the user chose a mode)."""
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"


__all__ = [
    "Config", "DataConfig", "GateConfig", "LoggerConfig", "ModelConfig", "OptimConfig", "StrategyConfig",
    "TrainerConfig", "load_config", "to_config", "config_to_dict", "config_from_dict", "CONF_DIR",
]
