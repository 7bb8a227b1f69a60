"""Build a Lightning Trainer from a typed Config: precision by device, logger, checkpoints, strategy."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

from bytelm.config import Config, config_to_dict, wandb_offline_default

log = logging.getLogger(__name__)

# Lightning gives its "lightning" logger a handler of its own and still lets records propagate, so with any
# root handler (every bytelm CLI configures one) each line printed twice; its own handler is enough.
if logging.getLogger("lightning").handlers:
    logging.getLogger("lightning").propagate = False


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` -> bf16-mixed on CUDA, 32-true elsewhere (these CPUs have no native bf16: ~5x slower)."""
    if precision != "auto":
        return precision
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu else "32-true"


def build_logger(cfg: Config) -> Any:
    kind = cfg.logger.kind
    out = Path(cfg.trainer.out_dir)
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out), name="csv")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(out), name="tb")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        lc = cfg.logger
        if lc.offline is None:
            wandb_offline_default()
            offline = os.environ.get("WANDB_MODE") == "offline"
        else:
            offline = lc.offline
        logger = WandbLogger(  # W&B logs from rank 0 only (Lightning loggers are rank-zero)
            project=lc.project, name=lc.run_name or cfg.name, group=lc.group, tags=list(lc.tags),
            save_dir=str(out), offline=offline,
        )
        if lc.log_config:
            logger.log_hyperparams(config_to_dict(cfg))  # the full resolved config (rank 0 only)
        return logger
    raise ValueError(f"unknown logger.kind {kind!r}; choose wandb, csv, tensorboard or none")


def build_strategy(cfg: Config) -> Any:
    from bytelm.lit.strategies import collective_timeout

    name = cfg.strategy.name
    if name == "single":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            process_group_backend="nccl" if torch.cuda.is_available() else "gloo",
            find_unused_parameters=cfg.strategy.find_unused_parameters,
            timeout=collective_timeout(cfg),
        )
    try:
        from bytelm.lit.strategies import make_strategy
    except ImportError as e:  # pragma: no cover - the module ships with bytelm
        raise ValueError(f"strategy {name!r} needs bytelm.lit.strategies: {e}") from e
    return make_strategy(cfg)


def on_slurm() -> bool:
    """A Slurm job step launched with srun (not an interactive allocation)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def build_trainer(cfg: Config, callbacks: list[Any] | None = None, **overrides: Any) -> L.Trainer:
    t = cfg.trainer
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from bytelm.lit.callbacks import RequeueOnSignal, SaveLastOnEnd, StopOnSignal
    from bytelm.lit.strategies import AtomicCheckpointIO
    from bytelm.lit.throughput import throughput_monitor

    ckpt = ModelCheckpoint(  # keep-last-k by step; last.ckpt is what ckpt_path=last resumes from first
        dirpath=str(out / "checkpoints"), filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=t.ckpt_every, save_top_k=t.keep_last, monitor="step", mode="max",
        save_last=t.save_last,
    )
    from bytelm.lit.data import DataStatsCallback

    cbs: list[Any] = [ckpt, throughput_monitor(), DataStatsCallback(every=max(1, t.log_every)),
                      StopOnSignal(grace_s=t.stop_grace_s)]
    if t.save_last:
        cbs.append(SaveLastOnEnd(out / "checkpoints"))
    plugins: list[Any] = [AtomicCheckpointIO()]
    if on_slurm():
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        # bytelm's RequeueOnSignal replaces Lightning's handler (which checkpoints inside the signal handler)
        plugins.append(SLURMEnvironment(auto_requeue=False))
        if t.requeue_on_signal:
            cbs.append(RequeueOnSignal(out / "checkpoints"))
    if t.progress:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, t.log_every // 2)))
    logger = build_logger(cfg)
    if logger:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    cbs.extend(callbacks or [])
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        precision=resolve_precision(t.precision, t.accelerator), max_steps=t.max_steps,
        val_check_interval=t.val_every, check_val_every_n_epoch=None, log_every_n_steps=t.log_every,
        gradient_clip_val=cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else None,
        accumulate_grad_batches=t.accumulate, logger=logger, callbacks=cbs,
        enable_progress_bar=t.progress, default_root_dir=str(out), use_distributed_sampler=False,
        strategy=build_strategy(cfg), num_sanity_val_steps=0, max_time=t.max_time,
        enable_model_summary=t.progress, plugins=plugins,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)

