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


LOGGER_CLASSES = {
    "wandb": "lightning.pytorch.loggers.WandbLogger",
    "csv": "lightning.pytorch.loggers.CSVLogger",
    "tensorboard": "lightning.pytorch.loggers.TensorBoardLogger",
}


def logger_arguments(cfg: Config) -> dict[str, Any]:
    """bytelm's arguments for the logger ``logger.kind`` names (the run folder, W&B's project/name/offline
    ...); ``logger.kwargs`` is added on top by ``build_logger``."""
    lc, out = cfg.logger, str(Path(cfg.trainer.out_dir))
    if lc.kind == "csv":
        return {"save_dir": out, "name": "csv"}
    if lc.kind == "tensorboard":
        return {"save_dir": out, "name": "tb"}
    if lc.kind == "wandb":
        if lc.offline is None:
            wandb_offline_default()
            offline = os.environ.get("WANDB_MODE") == "offline"
        else:
            offline = lc.offline
        # W&B logs from rank 0 only (Lightning loggers are rank-zero)
        return {
            "project": lc.project,
            "name": lc.run_name or cfg.name,
            "group": lc.group,
            "tags": list(lc.tags),
            "save_dir": out,
            "offline": offline,
        }
    return {}  # custom: everything comes from logger.kwargs


def build_logger(cfg: Config) -> Any:
    """The Lightning logger: ``hydra.utils.instantiate`` of ``logger._target_`` (or the kind's class) with
    bytelm's arguments and ``logger.kwargs``, so any argument of the class needs no code change here."""
    from hydra.utils import instantiate

    lc = cfg.logger
    if lc.kind == "none":
        return False
    target = lc._target_ or LOGGER_CLASSES.get(lc.kind, "")
    if not target:
        raise ValueError(
            "logger.kind=custom needs logger._target_ (a Lightning logger class, e.g. "
            "lightning.pytorch.loggers.MLFlowLogger) and its arguments in +logger.kwargs.*"
        )
    args = {**logger_arguments(cfg), **dict(lc.kwargs)}
    try:
        logger = instantiate({"_target_": target, "_convert_": "all", **args})
    except Exception as e:  # hydra wraps the class's own error (an unknown argument names it)
        raise ValueError(f"logger {target} could not be built from {sorted(args)}: {e}") from e
    if lc.kind == "wandb" and lc.log_config:
        logger.log_hyperparams(config_to_dict(cfg))  # the full resolved config (rank 0 only)
    return logger


def build_strategy(cfg: Config) -> Any:
    from bytelm.lit.strategies import collective_timeout

    name = cfg.strategy.name
    if name == "single":
        if cfg.strategy.kwargs:
            raise ValueError(
                f"strategy.kwargs {sorted(cfg.strategy.kwargs)} need a strategy class; strategy=single "
                "uses Lightning's default (pick ddp, deepspeed_zero1|2|3 or fsdp2)"
            )
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            **{
                "process_group_backend": "nccl" if torch.cuda.is_available() else "gloo",
                "find_unused_parameters": cfg.strategy.find_unused_parameters,
                "timeout": collective_timeout(cfg),
                **dict(cfg.strategy.kwargs),
            }
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
    from bytelm.lit.checkpoint_io import AtomicCheckpointIO
    from bytelm.lit.liveness import RankHeartbeat
    from bytelm.lit.throughput import throughput_monitor

    ckpt = ModelCheckpoint(  # keep-last-k by step; last.ckpt is what ckpt_path=last resumes from first
        dirpath=str(out / "checkpoints"),
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.ckpt_every,
        save_top_k=t.keep_last,
        monitor="step",
        mode="max",
        save_last=t.save_last,
        # last.ckpt is overwritten, never versioned: after RequeueOnSignal wrote it, Lightning's save of
        # "last" at the stop would otherwise go to last-v1.ckpt (and ckpt_path=last resume from that, not
        # last.ckpt)
        enable_version_counter=False,
    )
    from bytelm.lit.data import DataStatsCallback

    cbs: list[Any] = [
        # first: with several ranks, a failed collective names the lost ranks (bytelm.lit.liveness) before the
        # other callbacks' on_exception (StopOnSignal's gives SIGTERM back to Lightning's raising handler)
        RankHeartbeat(),
        ckpt,
        throughput_monitor(),
        DataStatsCallback(every=max(1, t.log_every)),
        StopOnSignal(grace_s=t.stop_grace_s),
    ]
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
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=resolve_precision(t.precision, t.accelerator),
        max_steps=t.max_steps,
        val_check_interval=t.val_every,
        check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every,
        gradient_clip_val=cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else None,
        accumulate_grad_batches=t.accumulate,
        logger=logger,
        callbacks=cbs,
        enable_progress_bar=t.progress,
        default_root_dir=str(out),
        use_distributed_sampler=False,
        strategy=build_strategy(cfg),
        num_sanity_val_steps=0,
        max_time=t.max_time,
        enable_model_summary=t.progress,
        plugins=plugins,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)
