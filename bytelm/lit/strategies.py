"""Strategies by name (``conf/strategy/``) and the sharded model build they need.

``make_strategy(cfg)`` returns the Lightning strategy for ``deepspeed_zero1|2|3`` and ``fsdp2`` (``single``
and ``ddp`` are built in ``bytelm.lit.trainer``). ``build_model_for(cfg, strategy)`` is what
``ByteLMModule.configure_model`` calls: it builds the model the way the strategy needs it.

- ZeRO-3: Lightning calls ``configure_model`` inside ``deepspeed.zero.Init``, so every parameter is
  partitioned as soon as its module is built; ``init_weights`` then runs with each parameter gathered on its
  own while it is initialised (``sharded_init``): no rank ever holds the full model.
- FSDP2: the model is built on the meta device, ``fully_shard`` is applied to every ``Block`` and then to the
  root, the shards are materialised on the device and initialised one full parameter at a time.

The model's constructor draws its default inits from a forked RNG, so ``init_weights`` starts from the same
generator state in every strategy: single, DDP, ZeRO and FSDP2 runs start from identical weights.

Lightning's ``DeepSpeedStrategy`` refuses CPUs; ``CPUDeepSpeedStrategy`` runs it with gloo and DeepSpeed's CPU
accelerator (``DS_ACCELERATOR=cpu``), which is how the tests exercise ZeRO on a laptop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from torch import nn

from bytelm.config import STRATEGIES, Config

# AtomicCheckpointIO lives in bytelm.lit.checkpoint_io; imported here so imports of its old home keep working
from bytelm.lit.checkpoint_io import AtomicCheckpointIO  # noqa: F401
from bytelm.models import build_model
from bytelm.models.registry import get_spec, resolve

log = logging.getLogger(__name__)

# nn.init functions a model's init_weights may call; sharded_init gathers the parameter around each call
_INIT_FNS = (
    "normal_",
    "uniform_",
    "ones_",
    "zeros_",
    "constant_",
    "trunc_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "eye_",
    "dirac_",
    "sparse_",
)


def on_cuda(cfg: Config) -> bool:
    return torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")


def use_deepspeed_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator when first imported: make it the CPU one when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("DS_BUILD_OPS", "0")


def collective_timeout(cfg: Config) -> timedelta:
    """The process-group timeout of every strategy: ``trainer.collective_timeout_s`` (or the deprecated
    ``strategy.timeout_min`` when a config still sets it)."""
    if cfg.strategy.timeout_min is not None:
        log.warning("strategy.timeout_min is deprecated: use trainer.collective_timeout_s (seconds)")
        return timedelta(minutes=cfg.strategy.timeout_min)
    if cfg.trainer.collective_timeout_s <= 0:
        raise ValueError(f"trainer.collective_timeout_s must be > 0, got {cfg.trainer.collective_timeout_s}")
    return timedelta(seconds=cfg.trainer.collective_timeout_s)


# ---------------------------------------------------------------------------------------------- atomic saves


def swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` (file or folder) by ``tmp`` with renames, so a reader never sees half a
    checkpoint."""
    if tmp.is_file():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


class _AtomicFolderSave:
    """Mixin for strategies that write checkpoint folders themselves (DeepSpeed, FSDP2 distributed
    checkpoints): every rank writes into ``NAME.tmp``; rank 0 renames it to ``NAME`` once all are done."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        s: Any = self
        final = Path(s.broadcast(str(filepath)))
        tmp = final.with_name(final.name + ".tmp")
        if s.is_global_zero and tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        s.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)  # type: ignore[misc]
        s.barrier()
        if s.is_global_zero:
            swap_in(tmp, final)
        s.barrier()


# ------------------------------------------------------------------------------------------------ DeepSpeed


class BytelmDeepSpeedStrategy(_AtomicFolderSave, DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with atomic checkpoint folders."""

    strategy_name = "bytelm_deepspeed"


class CPUDeepSpeedStrategy(BytelmDeepSpeedStrategy):
    """DeepSpeed ZeRO on CPUs (gloo + DeepSpeed's CPU accelerator): the environment setup of ``DDPStrategy``,
    no CUDA check, no device-index validation, ``root_device`` = cpu."""

    strategy_name = "bytelm_deepspeed_cpu"

    def setup_environment(self) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        _skip_shm_comm_op()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        import argparse

        import deepspeed

        params = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),  # cpu has no device index
            config=self.config,
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (~25 s, more on a busy
    machine); gloo alone is enough for training, so mark the op unavailable."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def _deepspeed_strategy(cfg: Config, stage: int) -> DeepSpeedStrategy:
    use_deepspeed_cpu_accelerator()
    s = cfg.strategy
    gpu = on_cuda(cfg)
    cls = BytelmDeepSpeedStrategy if gpu else CPUDeepSpeedStrategy
    strategy = cls(
        **{
            "stage": stage,
            "offload_optimizer": s.offload_optimizer,
            "offload_parameters": s.offload_params and stage == 3,
            "allgather_bucket_size": s.allgather_bucket_size,
            "reduce_bucket_size": s.reduce_bucket_size,
            "overlap_comm": s.overlap_comm and gpu,
            "contiguous_gradients": gpu,
            "logging_batch_size_per_gpu": cfg.data.batch_size,
            "process_group_backend": "nccl" if gpu else "gloo",
            "timeout": collective_timeout(cfg),
            **dict(
                s.kwargs
            ),  # any other DeepSpeedStrategy argument (strategy.kwargs), winning over the above
        }
    )
    assert isinstance(strategy.config, dict)
    # bytelm passes a torch optimizer (configure_optimizers); with optimizer offload on CPU-only machines
    # DeepSpeed would otherwise insist on its compiled CPU Adam
    strategy.config["zero_force_ds_cpu_optimizer"] = False
    # NaN/inf gradients skip the step (bytelm's non-finite loss handling relies on it under DeepSpeed)
    strategy.config.setdefault("bf16", {})["check_grad_overflow"] = True
    return strategy


# ---------------------------------------------------------------------------------------------------- FSDP2


class FSDP2Strategy(_AtomicFolderSave, ModelParallelStrategy):
    """``ModelParallelStrategy`` used as pure FSDP2: one data-parallel mesh dimension over all ranks."""

    strategy_name = "bytelm_fsdp2"

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        self._data_parallel_size = self.world_size
        self._tensor_parallel_size = 1


def _fsdp2_strategy(cfg: Config) -> ModelParallelStrategy:
    return FSDP2Strategy(
        **{
            "data_parallel_size": "auto",
            "tensor_parallel_size": "auto",
            "save_distributed_checkpoint": True,
            "process_group_backend": "nccl" if on_cuda(cfg) else "gloo",
            "timeout": collective_timeout(cfg),
            **dict(cfg.strategy.kwargs),  # any other ModelParallelStrategy argument (strategy.kwargs)
        }
    )


def make_strategy(cfg: Config) -> Any:
    name = cfg.strategy.name
    if name.startswith("deepspeed_zero") and name[-1] in "123":
        return _deepspeed_strategy(cfg, int(name[-1]))
    if name == "fsdp2":
        return _fsdp2_strategy(cfg)
    raise ValueError(f"unknown strategy.name {name!r}; choose one of {', '.join(STRATEGIES)}")


# ---------------------------------------------------------------------------------------- sharded model build


def stored_numel(model: nn.Module) -> tuple[int, int]:
    """(parameter elements this rank stores, elements of the full model): a ZeRO-3 partition or an FSDP2
    ``DTensor`` shard counts its local part only."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
            local += p.ds_tensor.numel()
            full += int(getattr(p, "ds_numel"))  # noqa: B009
        elif hasattr(p, "to_local"):  # FSDP2 DTensor shard
            local += p.to_local().numel()
            full += p.numel()
        else:
            local += p.numel()
            full += p.numel()
    return local, full


def strategy_kind(strategy: Any) -> str:
    """'zero3', 'fsdp2' or 'plain' (everything that holds whole parameters on each rank)."""
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        return "zero3"
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    return "plain"


def _init_zero3_param(orig: Callable[..., Any], t: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    import deepspeed

    with deepspeed.zero.GatheredParameters([t], modifier_rank=0):
        return orig(t, *args, **kwargs)


def _init_dtensor_param(orig: Callable[..., Any], t: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    from torch.distributed.tensor import DTensor, distribute_tensor

    assert isinstance(t, DTensor)
    full = torch.empty(t.shape, dtype=t.dtype, device="cpu")  # one full parameter at a time, CPU generator
    orig(full, *args, **kwargs)
    shard = distribute_tensor(full.to(t.device), t.device_mesh, t.placements, src_data_rank=None)
    with torch.no_grad():
        t.copy_(shard)
    return t


@contextlib.contextmanager
def sharded_init(kind: str) -> Iterator[None]:
    """While active, ``torch.nn.init.*`` on a ZeRO-3-partitioned parameter gathers it (rank 0 initialises and
    broadcasts), and on an FSDP2 ``DTensor`` initialises the full tensor on CPU and keeps this rank's shard.
    Every rank draws the same numbers as a single-process init would."""
    if kind == "plain":
        yield
        return
    is_sharded: Callable[[torch.Tensor], bool]
    if kind == "zero3":
        init_one = _init_zero3_param

        def is_sharded(t: torch.Tensor) -> bool:
            return hasattr(t, "ds_id")
    else:
        from torch.distributed.tensor import DTensor

        init_one = _init_dtensor_param

        def is_sharded(t: torch.Tensor) -> bool:
            return isinstance(t, DTensor)

    saved = {n: getattr(nn.init, n) for n in _INIT_FNS if hasattr(nn.init, n)}
    depth = [0]

    def wrap(orig: Callable[..., Any]) -> Callable[..., Any]:
        def fn(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if depth[0] or not is_sharded(t):
                return orig(t, *args, **kwargs)
            depth[0] += 1
            try:
                return init_one(orig, t, args, kwargs)
            finally:
                depth[0] -= 1

        return fn

    for n, f in saved.items():
        setattr(nn.init, n, wrap(f))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def shard_blocks(
    model: nn.Module, mesh: Any, mp_policy: Any = None, reshard_after_forward: bool = True
) -> int:
    """``fully_shard`` every transformer ``Block`` (flat ``blocks``; hierarchical encoder/backbone/decoder),
    then the root. Returns the number of blocks sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from bytelm.models.layers import Block

    mp = mp_policy or MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return len(blocks)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fsdp2_mp_policy(cfg: Config, precision: str) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    s = cfg.strategy
    if s.mp_param_dtype == "auto":
        param = torch.bfloat16 if precision.startswith("bf16") else None
    else:
        param = _DTYPES[s.mp_param_dtype]
    reduce = _DTYPES[s.mp_reduce_dtype] if param is not None else None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def build_model_for(cfg: Config, strategy: Any = None) -> nn.Module:
    """The model, built and initialised as ``strategy`` needs it (see the module docstring)."""
    kind = strategy_kind(strategy)
    spec = get_spec(cfg.model.arch)
    if spec.complete_config is not None:  # e.g. byteified: shapes come from the source model: fill them
        resolve(spec.complete_config)(cfg)
    deferred = kind == "zero3" or (kind == "fsdp2" and cfg.strategy.deferred_init)
    # import its module outside the meta-device context below: module-level tensors need data
    spec.model_class()
    with torch.random.fork_rng(devices=[]):  # constructor's default inits: not part of the seeded stream
        if kind == "fsdp2" and deferred:
            with torch.device("meta"):
                model = build_model(cfg.model, init=False)
        else:
            model = build_model(cfg.model, init=False)
    if kind == "fsdp2":
        precision = str(strategy.precision_plugin.precision) if strategy.precision_plugin else "32-true"
        n = shard_blocks(
            model,
            strategy.device_mesh["data_parallel"],
            fsdp2_mp_policy(cfg, precision),
            cfg.strategy.reshard_after_forward,
        )
        log.info("fsdp2: sharded %d blocks + root", n)
        if deferred:
            model.to_empty(device=strategy.root_device)
    with sharded_init(kind):
        model.init_weights()  # type: ignore[operator]
    if spec.load_pretrained is not None:  # e.g. byteified: the source's blocks, embeddings and vocabulary
        resolve(spec.load_pretrained)(model, cfg, kind)
    return model
