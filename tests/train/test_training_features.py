"""Training features: precision by device, gradient accumulation, activation checkpointing, z-loss, schedules,
NaN/inf step skipping, throughput / MFU metrics, loggers, memory formula (tiny CPU runs)."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch

from bytelm.cli.memory import GIB, activation_bytes, model_states_bytes
from bytelm.config import config_to_dict, load_config
from bytelm.lit.metrics import z_loss
from bytelm.lit.schedule import lr_multiplier
from bytelm.lit.throughput import compute_dtype, device_peak_flops
from bytelm.lit.trainer import build_logger, resolve_precision
from bytelm.models import build_model
from bytelm.train import run

QUICK = ["debug=cpu", "trainer.val_every=1000", "trainer.ckpt_every=1000"]


def test_precision_auto_by_device(monkeypatch):
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("16-mixed", "auto") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto", "auto") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"


def test_activation_checkpointing_gives_the_same_grads():
    cfg = load_config(["debug=cpu"]).model
    torch.manual_seed(0)
    plain = build_model(cfg)
    cfg.activation_checkpointing = True
    ckpt = build_model(cfg)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (2, 24))
    for m in (plain, ckpt):
        m.train()
        m(x).logits.float().pow(2).mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), n


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    res_big = run(
        load_config([*QUICK, "trainer.max_steps=2", "data.batch_size=4", f"trainer.out_dir={tmp_path / 'a'}"])
    )
    res_acc = run(
        load_config(
            [
                *QUICK,
                "trainer.max_steps=2",
                "data.batch_size=2",
                "trainer.accumulate=2",
                f"trainer.out_dir={tmp_path / 'b'}",
            ]
        )
    )
    assert res_acc["global_step"] == 2
    for (n, a), (_, b) in zip(
        res_big["module"].model.named_parameters(), res_acc["module"].model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5), n


def test_z_loss_formula_and_bf16_run_with_metrics(tmp_path):
    V = 7
    logits = torch.zeros(1, 3, V)
    targets = torch.tensor([[1, 2, -100]])
    assert torch.isclose(z_loss(logits, targets), torch.tensor(math.log(V) ** 2))
    res = run(
        load_config(
            [
                *QUICK,
                "trainer.max_steps=3",
                "optim.z_loss=1e-4",
                "trainer.precision=bf16-mixed",
                f"trainer.out_dir={tmp_path}",
            ]
        )
    )
    m = res["metrics"]
    assert m["train/z_loss"] > 0 and math.isfinite(m["train/loss"])
    assert "train/device/mfu" not in m  # no MFU on CPU


def test_wsd_and_cosine_schedules():
    kw = dict(warmup=10, total=100, min_ratio=0.1, decay_fraction=0.2)
    assert lr_multiplier(0, schedule="wsd", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="wsd", **kw) == pytest.approx(1.0)
    assert lr_multiplier(50, schedule="wsd", **kw) == 1.0  # stable
    assert lr_multiplier(79, schedule="wsd", **kw) == 1.0
    assert lr_multiplier(90, schedule="wsd", **kw) == pytest.approx(0.55)  # halfway down the decay
    assert lr_multiplier(100, schedule="wsd", **kw) == pytest.approx(0.1)
    assert lr_multiplier(55, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_multiplier(100, schedule="cosine", **kw) == pytest.approx(0.1)


def test_nonfinite_loss_skips_the_optimizer_step(tmp_path):
    from bytelm.lit.data import ByteDataModule
    from bytelm.lit.module import ByteLMModule, NonFiniteLossWarning
    from bytelm.lit.trainer import build_trainer

    cfg = load_config([*QUICK, "trainer.max_steps=4", f"trainer.out_dir={tmp_path}"])
    L.seed_everything(0)
    module = ByteLMModule(cfg)
    calls = [0]

    def poison(batch, out):  # the second training step's loss is NaN
        calls[0] += 1
        return torch.tensor(float("nan") if calls[0] == 2 else 0.0), {}

    module.extra_loss = poison
    changed: list[bool] = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = [p.detach().clone() for p in pl_module.model.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = list(pl_module.model.parameters())
            changed.append(any(not torch.equal(a, b) for a, b in zip(self.before, after, strict=True)))

    trainer = build_trainer(cfg, callbacks=[Watch()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=ByteDataModule(cfg))
    assert changed == [True, False, True, True]
    assert module.bad_steps == 1
    assert sum(issubclass(w.category, NonFiniteLossWarning) for w in caught) == 1
    opt = trainer.optimizers[0]
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {3}  # Adam took 3 steps, not 4


def test_nonfinite_losses_stop_the_run_after_the_limit(tmp_path):
    from bytelm.lit.data import ByteDataModule
    from bytelm.lit.module import ByteLMModule
    from bytelm.lit.trainer import build_trainer

    cfg = load_config(
        [*QUICK, "trainer.max_steps=5", "trainer.max_bad_steps=2", f"trainer.out_dir={tmp_path}"]
    )
    module = ByteLMModule(cfg)
    module.extra_loss = lambda batch, out: (torch.tensor(float("inf")), {})
    with pytest.raises(FloatingPointError, match="max_bad_steps=2"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_trainer(cfg).fit(module, datamodule=ByteDataModule(cfg))


def test_throughput_and_mfu_through_lightnings_monitor(tmp_path, monkeypatch):
    """Lightning's ThroughputMonitor counts bytes as items and rows as samples, and computes MFU from the
    module's ``flops_per_batch`` (bytelm's formula); a known peak is injected since CPUs have none."""
    import csv

    from lightning.pytorch.callbacks import throughput_monitor as tm

    from bytelm.models.flops import flops_per_byte

    peak = 1e12
    monkeypatch.setattr(tm, "get_available_flops", lambda device, dtype: peak)
    cfg = load_config(
        [
            *QUICK,
            "experiment=hat_tiny",
            "trainer.max_steps=14",
            "trainer.log_every=1",
            "logger.kind=csv",
            "trainer.val_every=7",
            f"trainer.out_dir={tmp_path}",
        ]
    )
    res = run(cfg)
    fpb = flops_per_byte(cfg.model, cfg.data.seq_len) * cfg.data.batch_size * cfg.data.seq_len
    assert res["module"].flops_per_batch == pytest.approx(fpb)
    (metrics,) = (tmp_path / "csv").glob("version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/device/items_per_sec")]
    assert rows, "no throughput rates logged"
    every = list(csv.DictReader(metrics.open()))
    assert max(int(r["step"]) for r in every) <= cfg.trainer.max_steps  # no validation rows off the step axis
    assert not any(k.startswith("validate/") and v for r in every for k, v in r.items())
    times = [float(r["train/time"]) for r in every if r.get("train/time")]
    assert len(times) >= 10 and times == sorted(times)
    for r in rows:
        items, samples = float(r["train/device/items_per_sec"]), float(r["train/device/samples_per_sec"])
        batches = float(r["train/device/batches_per_sec"])
        assert items == pytest.approx(samples * cfg.data.seq_len, rel=1e-6)
        assert samples == pytest.approx(batches * cfg.data.batch_size, rel=1e-6)
        assert float(r["train/device/flops_per_sec"]) == pytest.approx(batches * fpb, rel=1e-6)
        assert float(r["train/device/mfu"]) == pytest.approx(batches * fpb / peak, rel=1e-6)


def test_peak_flops_by_device_and_precision():
    assert device_peak_flops("cpu") is None
    assert compute_dtype("bf16-mixed") == torch.bfloat16 and compute_dtype("16-mixed") == torch.float16
    assert compute_dtype("32-true") == torch.float32
    from lightning.fabric.utilities.throughput import get_available_flops

    assert (
        get_available_flops(torch.device("cpu"), torch.float32) is None
    )  # Lightning's table: GPUs/TPUs only


def test_flops_formula_feeds_mfu():
    from bytelm.models.flops import flops_per_byte

    cfg = load_config(["debug=cpu"])
    f = flops_per_byte(cfg.model, cfg.data.seq_len)
    assert f > 6 * 1000  # at least the lm head's 6·d·V


def test_wandb_logger_from_config_offline(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    logged: list[dict] = []
    monkeypatch.setattr(WandbLogger, "log_hyperparams", lambda self, params: logged.append(params))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(
        [
            "debug=cpu",
            "logger=wandb",
            "logger.kind=wandb",
            "logger.group=sweep1",
            "logger.tags=[a,b]",
            "logger.run_name=hat-1",
            f"trainer.out_dir={tmp_path}",
        ]
    )
    lg = build_logger(cfg)
    assert isinstance(lg, WandbLogger)
    assert lg._wandb_init["name"] == "hat-1" and lg._wandb_init["group"] == "sweep1"
    assert lg._wandb_init["tags"] == ["a", "b"] and lg._offline
    assert logged == [config_to_dict(cfg)]  # the full resolved config
    cfg.logger.run_name = None
    cfg.logger.log_config = False
    assert build_logger(cfg)._wandb_init["name"] == cfg.name and len(logged) == 1


def test_csv_and_tensorboard_loggers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cfg = load_config(["debug=cpu", "logger.kind=csv", f"trainer.out_dir={tmp_path}"])
    assert isinstance(build_logger(cfg), CSVLogger)
    cfg.logger.kind = "none"
    assert build_logger(cfg) is False
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    cfg.logger.kind = "tensorboard"
    assert isinstance(build_logger(cfg), TensorBoardLogger)


def test_memory_formula_by_hand():
    P, N = 7e9, 8
    # ZeRO paper, 7.5B on 64 GPUs: DDP 120 GB, ZeRO-1 31.4 GB, ZeRO-2 16.6 GB, ZeRO-3 1.9 GB (decimal GB)
    p75 = 7.5e9
    assert model_states_bytes(p75, "ddp", 64).total / 1e9 == pytest.approx(120.0)
    assert model_states_bytes(p75, "deepspeed_zero1", 64).total / 1e9 == pytest.approx(31.41, abs=0.01)
    assert model_states_bytes(p75, "deepspeed_zero2", 64).total / 1e9 == pytest.approx(16.64, abs=0.01)
    assert model_states_bytes(p75, "deepspeed_zero3", 64).total / 1e9 == pytest.approx(1.875)
    # 7B on 8 GPUs by hand: ZeRO-2 = 2P + 14P/8 = 3.75P bytes
    assert model_states_bytes(P, "deepspeed_zero2", N).total == pytest.approx(3.75 * P)
    assert model_states_bytes(P, "fsdp2", N).total == pytest.approx(2 * P)
    off = model_states_bytes(P, "deepspeed_zero3", N, offload_optimizer=True, offload_params=True)
    assert off.total == pytest.approx(2 * P / N)
    assert model_states_bytes(P, "single", N).total / GIB == pytest.approx(16 * P / GIB)
    # activations: 2 layers, d=4, 10 tokens, 2 bytes: 17*4*2*10 per layer
    assert activation_bytes(4, 2, 10) == 2 * 17 * 4 * 2 * 10
    assert activation_bytes(4, 2, 10, checkpointing=True) == 2 * 4 * 2 * 10 + 17 * 4 * 2 * 10
    with pytest.raises(ValueError, match="zero4"):
        model_states_bytes(P, "zero4")


def test_only_rank_zero_logs_to_wandb(tmp_path, monkeypatch):
    from lightning.pytorch.loggers.logger import DummyExperiment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(["debug=cpu", "logger.kind=wandb", f"trainer.out_dir={tmp_path}"])
    lg = build_logger(cfg)  # logs the config: a no-op on rank 1, no wandb run is started
    assert isinstance(lg.experiment, DummyExperiment)
    lg.log_metrics({"x": 1.0}, step=0)
    assert not (tmp_path / "wandb").exists()


@pytest.mark.parametrize(
    "name", ["single", "ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"]
)
def test_strategy_configs_compose_and_build(name):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

    from bytelm.lit.trainer import build_strategy

    cfg = load_config(["debug=cpu", f"strategy={name}"])
    assert cfg.strategy.name == name
    s = build_strategy(cfg)
    want = {"single": str, "ddp": DDPStrategy, "fsdp2": ModelParallelStrategy}.get(name, DeepSpeedStrategy)
    assert isinstance(s, want)
    if isinstance(s, DeepSpeedStrategy):
        assert s.config["zero_optimization"]["stage"] == int(name[-1])
        assert s.config["zero_force_ds_cpu_optimizer"] is False
        assert type(s).__name__ == (
            "BytelmDeepSpeedStrategy" if torch.cuda.is_available() else "CPUDeepSpeedStrategy"
        )


def test_strategy_typos_fail_with_the_key():
    with pytest.raises(Exception, match="offload_optimzer"):
        load_config(["strategy=deepspeed_zero2", "strategy.offload_optimzer=true"])
    with pytest.raises(ValueError, match="deepspeed_zero4"):
        from bytelm.lit.strategies import make_strategy

        make_strategy(load_config(["strategy.name=deepspeed_zero4"]))


def test_wall_clock_per_step_from_lightnings_train_time():
    from bytelm.eval.curves import _seconds_from_train_time

    rows = {
        0: {"train/time": 1.0},
        4: {"train/time": 9.0},
        5: {"val/bpb": 3.0},
        10: {"train/time": 21.0},
        12: {"train/time": 0.5},
        14: {"train/time": 4.5},
    }  # step 12: a resumed run restarted the clock
    got = _seconds_from_train_time(rows)
    assert got == {4: 2.0, 10: 2.0, 14: 2.0}


def test_logger_and_strategy_arguments_pass_through(tmp_path):
    """logger.kwargs / strategy.kwargs reach the Lightning classes (no code change for a new argument);
    kind=custom instantiates any logger class; a wrong argument names the class."""
    from lightning.pytorch.loggers import CSVLogger

    from bytelm.lit.trainer import build_strategy

    cfg = load_config(
        [
            "debug=cpu",
            "logger.kind=csv",
            "+logger.kwargs.flush_logs_every_n_steps=7",
            f"trainer.out_dir={tmp_path}",
        ]
    )
    lg = build_logger(cfg)
    assert isinstance(lg, CSVLogger) and lg._flush_logs_every_n_steps == 7 and lg.save_dir == str(tmp_path)
    # kind=custom: the class and every argument from the config (CSVLogger stands in for any logger class)
    cfg = load_config(
        [
            "debug=cpu",
            "logger.kind=custom",
            "logger._target_=lightning.pytorch.loggers.CSVLogger",
            f"+logger.kwargs.save_dir={tmp_path / 'c'}",
            "+logger.kwargs.name=custom_csv",
        ]
    )
    lg = build_logger(cfg)
    assert isinstance(lg, CSVLogger) and lg.name == "custom_csv" and lg.save_dir == str(tmp_path / "c")
    cfg.logger._target_ = ""
    with pytest.raises(ValueError, match="logger._target_"):
        build_logger(cfg)
    cfg = load_config(
        ["debug=cpu", "logger.kind=csv", "+logger.kwargs.no_such_arg=1", f"trainer.out_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match="CSVLogger"):
        build_logger(cfg)

    cfg = load_config(
        [
            "debug=cpu",
            "strategy=ddp",
            "+strategy.kwargs.static_graph=true",
            "+strategy.kwargs.gradient_as_bucket_view=true",
        ]
    )
    st = build_strategy(cfg)
    assert st._ddp_kwargs["static_graph"] is True and st._ddp_kwargs["gradient_as_bucket_view"] is True
    cfg = load_config(["debug=cpu", "strategy=fsdp2", "+strategy.kwargs.save_distributed_checkpoint=false"])
    assert build_strategy(cfg)._save_distributed_checkpoint is False  # bytelm's default (True) overridden
    cfg = load_config(["debug=cpu", "+strategy.kwargs.static_graph=true"])
    with pytest.raises(ValueError, match="strategy=single"):
        build_strategy(cfg)
