"""Training entry point: ``python -m bytelm.train experiment=NAME key=value ...`` (or ``bytelm-train``).

Hydra composes ``conf/`` into the typed ``bytelm.config.Config``; ``--help`` lists the config groups.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from bytelm.config import CONF_DIR, Config, register_configs, to_config
from bytelm.models.registry import get_spec, resolve

log = logging.getLogger("bytelm.train")


def steps_for_flops(cfg: Config) -> int:
    """max_steps that spend ``trainer.flops_budget`` training FLOPs (equal-compute comparisons)."""
    from bytelm.models.flops import flops_per_byte

    per_byte = flops_per_byte(cfg.model, cfg.data.seq_len)
    bytes_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.accumulate
    return max(1, int(cfg.trainer.flops_budget / (per_byte * bytes_per_step)))


def resolve_ckpt_path(cfg: Config) -> str | None:
    """``ckpt_path=last`` resumes from the newest valid checkpoint in the run folder (None if there is
    none)."""
    if cfg.ckpt_path in (None, ""):
        return None
    if cfg.ckpt_path != "last":
        if not Path(cfg.ckpt_path).exists():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
        return cfg.ckpt_path
    from bytelm.checkpoint import latest_valid_checkpoint

    folder = Path(cfg.trainer.out_dir) / "checkpoints"
    found = latest_valid_checkpoint(folder)
    if found is None:
        log.warning("ckpt_path=last: no valid checkpoint in %s; training from scratch", folder)
        return None
    return str(found)


def run(cfg: Config, callbacks: list[Any] | None = None, **trainer_overrides: Any) -> dict[str, Any]:
    """Train (and validate) one run; returns final metrics and the checkpoint folder."""
    from bytelm.lit.data import ByteDataModule
    from bytelm.lit.module import ByteLMModule
    from bytelm.lit.trainer import build_trainer

    if cfg.trainer.flops_budget > 0:
        cfg.trainer.max_steps = steps_for_flops(cfg)
        log.info("flops_budget %.3g -> max_steps %d", cfg.trainer.flops_budget, cfg.trainer.max_steps)
    if cfg.strategy.name.startswith("deepspeed"):
        from bytelm.lit.strategies import use_deepspeed_cpu_accelerator

        use_deepspeed_cpu_accelerator()  # before anything imports deepspeed (e.g. unpickling its checkpoints)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = ByteLMModule(cfg)
    spec = get_spec(cfg.model.arch)
    if spec.objective is not None:  # the kind's own losses (byteified: the source model is the teacher)
        if cfg.distill.kind != "none":
            raise ValueError(
                f"model.arch={cfg.model.arch} brings its own teacher losses "
                "(byteified: byteify.*); set distill=none"
            )
        resolve(spec.objective)(module, cfg)
    elif (
        cfg.distill.kind != "none"
    ):  # a frozen teacher's losses join the CE (bytelm.distill, docs/distill.md)
        from bytelm.distill.objective import attach_objective

        attach_objective(module, cfg)
    data = ByteDataModule(cfg)
    from bytelm.lit.callbacks import debug_callbacks

    callbacks = [*(callbacks or []), *debug_callbacks(cfg.trainer.batch_log, cfg.trainer.step_sleep_s)]
    trainer = build_trainer(cfg, callbacks=callbacks, **trainer_overrides)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except RuntimeError as e:
        # a failed collective: name the ranks that were lost, if any (bytelm.lit.liveness)
        from bytelm.lit.liveness import LostRanksError, RankHeartbeat

        beat = next((c for c in trainer.callbacks if isinstance(c, RankHeartbeat)), None)  # type: ignore[attr-defined]
        if beat is not None and beat.lost:
            raise LostRanksError(f"rank {trainer.global_rank}: {beat.diagnosis}") from e
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    from bytelm.lit.callbacks import StopOnSignal

    stopped = next((c.received for c in trainer.callbacks if isinstance(c, StopOnSignal)), None)  # type: ignore[attr-defined]
    if stopped is not None:
        log.warning(
            "stopped by signal %d at step %d (checkpoints in %s)",
            stopped,
            trainer.global_step,
            Path(cfg.trainer.out_dir) / "checkpoints",
        )
    return {
        "metrics": metrics,
        "out_dir": cfg.trainer.out_dir,
        "global_step": trainer.global_step,
        "trainer": trainer,
        "module": module,
        "signal": stopped,
    }


register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> float | None:
    cfg = to_config(dcfg)
    sweep_dir = _sweep_point_dir()
    if sweep_dir is not None:  # each point of a sweep (-m) trains in its own folder, not all in runs/<name>
        cfg.trainer.out_dir = sweep_dir
    result = run(cfg)
    bpb = result["metrics"].get("val/bpb")
    if result["trainer"].is_global_zero:  # once per run (RANK is not set in every launcher's ranks)
        val = (
            f", val bpb {float(bpb)}" if bpb is not None and math.isfinite(float(bpb)) else ""
        )  # none: said by omission
        print(
            f"[bytelm] {cfg.name}: step {result['global_step']}{val}, checkpoints in "
            f"{Path(cfg.trainer.out_dir) / 'checkpoints'}",
            flush=True,
        )
    if result["signal"] is not None:  # stopped by SIGTERM / SIGINT: say so in the exit status
        sys.exit(128 + int(result["signal"]))
    return bpb


def _sweep_point_dir() -> str | None:
    """In a multirun (``-m``, any launcher) without an explicit ``trainer.out_dir``: the point's output folder
    (``hydra.sweep.dir/hydra.sweep.subdir``, e.g. ``runs/multirun/<name>/<n>``), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    if any(o.lstrip("+~").startswith("trainer.out_dir=") for o in hc.overrides.task):
        return None
    return str(hc.runtime.output_dir)


def main() -> None:
    from bytelm.lit.callbacks import catch_requeue_signal_early

    catch_requeue_signal_early()  # a Slurm job step: SIGUSR1 during start-up must not kill the task
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # datasets otherwise waits 5 s at exit for its threads
        import datasets.config

        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    except ImportError:  # pragma: no cover
        pass
    # again: model kinds registered after this module was imported are valid model.arch values
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
