"""The one LightningModule: wires a bytelm model, its loss, the optimizer and logging. Nothing else.

Model-specific behaviour lives in the model: a model returns ``ModelOutput`` with logits (and optionally its
own ``loss``, an ``aux_loss`` and ``metrics``), so the flat, hierarchical and MrT5 models train here alike.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from bytelm.config import Config, config_from_dict, config_to_dict
from bytelm.data.packed import IGNORE
from bytelm.lit.metrics import bits_per_byte, byte_nll_sum, z_loss
from bytelm.lit.schedule import lr_multiplier
from bytelm.lit.throughput import flops_per_batch
from bytelm.models.registry import ModelSpec, get_spec, resolve

log = logging.getLogger(__name__)


class NonFiniteLossWarning(RuntimeWarning):
    """A training step produced a NaN/inf loss and was skipped."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices of linear layers only; none on norms, embeddings and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions hold a flat slice: use the full shape
        if ndim < 2 or "embed" in name or name.endswith(".bias") or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def backbone_lr_groups(
    model: torch.nn.Module, groups: list[dict[str, Any]], lr: float, mult: float
) -> list[dict[str, Any]]:
    """Split each group into local-model and backbone parameters; the backbone's get ``lr * mult``."""
    backbone = {id(p) for n, p in model.named_parameters() if n.startswith(("backbone.", "backbone_norm."))}
    out = []
    for g in groups:
        local = [p for p in g["params"] if id(p) not in backbone]
        bb = [p for p in g["params"] if id(p) in backbone]
        out.append({**g, "params": local, "lr": lr})
        if bb:
            out.append({**g, "params": bb, "lr": lr * mult})
    return out


class ByteLMModule(L.LightningModule):
    def __init__(self, cfg: Config | dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, Config) else config_from_dict(cfg)
        self.save_hyperparameters({"cfg": config_to_dict(self.cfg)})
        self.model: torch.nn.Module | None = None
        self.extra_loss: Any = None  # optional callable(batch, out) -> (loss, metrics): distillation hooks in
        self._val_sums: dict[int, list[float]] = {}  # validation group -> [nll nats, bytes]
        self.bad_steps = 0
        self._drop_grads = False
        # read by Lightning's ThroughputMonitor for flops/s and MFU (bytelm.lit.throughput)
        self.flops_per_batch = flops_per_batch(self.cfg)
        self._compiled: Any = (
            None  # trainer.compile: the compiled training forward (False: arch not compiled)
        )
        self._eager_train_steps = 0

    @property
    def spec(self) -> ModelSpec:
        """The registry's spec of ``cfg.model.arch`` (bytelm.models.registry)."""
        return get_spec(self.cfg.model.arch)

    def configure_model(self) -> None:
        """Built here (not in __init__) so sharded strategies can construct it under their init context:
        ZeRO-3 partitions it as it is built, FSDP2 shards every Block then the root
        (bytelm.lit.strategies)."""
        if self.model is None:
            from bytelm.lit.strategies import build_model_for

            strategy = self._trainer.strategy if self._trainer is not None else None
            self.model = build_model_for(self.cfg, strategy)

    def forward(self, batch: dict[str, torch.Tensor], model: Any = None):
        assert self.model is not None, "configure_model() was not called"
        extra = {k: batch[k] for k in self.spec.batch_keys if k in batch}  # the kind's own batch keys
        return (model or self.model)(
            batch["input_ids"],
            targets=batch.get("targets"),
            doc_ids=batch.get("doc_ids"),
            word_start=batch.get("word_start"),
            **extra,
        )

    def _train_forward(self, batch: dict[str, torch.Tensor]):
        """The training forward. ``trainer.compile`` compiles it (``bytelm.models.compile``) from the second
        step on: the first runs eagerly, so it logs the attention backends it chose and an error in the model
        shows a plain traceback. Validation always runs eagerly."""
        if self.cfg.trainer.compile and self._eager_train_steps > 0:
            if self._compiled is None:
                from bytelm.models.compile import compile_forward

                assert self.model is not None
                self._compiled = compile_forward(
                    self.model, self.cfg.model.arch, self.cfg.trainer.compile_backend
                )
                self._compiled = self._compiled or False
            if self._compiled:
                return self(batch, model=self._compiled)
        self._eager_train_steps += 1
        return self(batch)

    def _loss(self, batch: dict[str, torch.Tensor], out) -> torch.Tensor:
        if out.loss is not None:
            return out.loss
        return F.cross_entropy(
            out.logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if hasattr(self.extra_loss, "prepare"):  # objectives that feed the forward (byteify stage 1)
            batch = dict(batch)
            self.extra_loss.prepare(batch)
        out = self._train_forward(batch)
        ce = self._loss(batch, out)
        loss = ce
        logs: dict[str, Any] = {"train/loss": ce, "train/bpb": ce / math.log(2)}
        if self.cfg.optim.z_loss > 0:
            zl = z_loss(out.logits, batch["targets"])
            loss = loss + self.cfg.optim.z_loss * zl
            logs["train/z_loss"] = zl
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
            logs["train/aux_loss"] = out.aux_loss
        if self.extra_loss is not None:
            el, em = self.extra_loss(batch, out)
            loss = loss + el
            logs.update({f"train/{k}": v for k, v in em.items()})
        for k, v in out.metrics.items():
            logs[f"train/{k}"] = v
        if self.cfg.trainer.skip_nonfinite and self._nonfinite(loss):
            return self._skip_step(loss)
        logs["train/lr"] = (
            self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0
        )
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", ce, prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        # per validation group (Shakespeare, each chatterbot language, ...): [nll nats, bytes]
        self._val_sums = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch)
        groups = batch.get("group")
        gids = [0] if groups is None else sorted({int(g) for g in groups.tolist()})
        lp = out.hidden.get(
            "target_logprobs"
        )  # models that score their own targets (byteified: joint symbols)
        if lp is not None:
            for g in gids:
                keep = (batch["targets"] >= 0) & (batch["targets"] < 256)
                if groups is not None:
                    keep = keep & (groups == g).unsqueeze(1)
                acc = self._val_sums.setdefault(g, [0.0, 0.0])
                acc[0] -= float((lp.double() * keep).sum())
                acc[1] += float(keep.sum())
            return
        if out.loss is not None and "nll_sum" in out.metrics:  # models with their own objective (MrT5)
            # one sum per batch: a batch that mixes groups counts towards the total only (key -1)
            acc = self._val_sums.setdefault(gids[0] if len(gids) == 1 else -1, [0.0, 0.0])
            acc[0] += float(out.metrics["nll_sum"])
            acc[1] += float(out.metrics["n_bytes"])
            return
        for g in gids:
            targets = batch["targets"]
            if groups is not None:  # only this group's rows count towards its sums
                targets = targets.masked_fill((groups != g).unsqueeze(1), IGNORE)
            s, n = byte_nll_sum(out.logits, targets)
            acc = self._val_sums.setdefault(g, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)

    def _group_names(self) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None)
        return list(getattr(dm, "val_group_names", []) or [])

    def on_validation_epoch_end(self) -> None:
        names = self._group_names()
        n_groups = max(len(names), 1 + max(self._val_sums, default=0))
        t = torch.zeros(n_groups + 1, 2, device=self.device, dtype=torch.float64)  # last row: mixed batches
        for g, (s, n) in self._val_sums.items():
            t[g, 0], t[g, 1] = s, n
        if self.trainer.world_size > 1:
            gathered = self.all_gather(t)
            assert isinstance(gathered, torch.Tensor)
            t = gathered.sum(0)
        total = t.sum(0)
        self.log(
            "val/bpb",
            bits_per_byte(float(total[0]), int(total[1])),
            prog_bar=True,
            sync_dist=False,
            rank_zero_only=True,
        )
        if len(names) > 1:  # per group and per report set (e.g. per script), averaged over bytes
            dm = getattr(self.trainer, "datamodule", None)
            reports: dict[str, list[int]] = dict(getattr(dm, "val_report_groups", {}) or {})
            for i, name in enumerate(names):
                reports.setdefault(name, [i])
            for name, idx in reports.items():
                group_sum = t[idx].sum(0)  # (2,) nats, bytes
                if group_sum[1] > 0:
                    bpb = bits_per_byte(float(group_sum[0]), int(group_sum[1]))
                    self.log(f"val/bpb/{name}", bpb, sync_dist=False, rank_zero_only=True)

    def _nonfinite(self, loss: torch.Tensor) -> bool:
        """True on every rank when the loss is NaN/inf on any rank (all ranks must skip together)."""
        bad = not bool(torch.isfinite(loss.detach()))
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))
        return bad

    def _skip_step(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Count and report a non-finite loss and skip its optimizer step.

        One process: return None; Lightning then skips backward, every gradient stays None and the optimizer
        changes nothing. Several processes: Lightning refuses None (the ranks' collectives must match), so
        every rank backpropagates ``loss * NaN`` and ``on_before_optimizer_step`` drops the gradients
        (DeepSpeed keeps its own gradient buffers: there its check for NaN/inf gradients skips the step).
        """
        self.bad_steps += 1
        msg = f"non-finite loss at step {self.global_step}; optimizer step skipped ({self.bad_steps} so far)"
        log.warning(msg)
        if self.trainer.is_global_zero:
            warnings.warn(msg, NonFiniteLossWarning, stacklevel=2)
        self.log("train/bad_steps", float(self.bad_steps), on_step=True, on_epoch=False)
        limit = self.cfg.trainer.max_bad_steps
        if limit > 0 and self.bad_steps >= limit:
            raise FloatingPointError(
                f"{self.bad_steps} non-finite losses (trainer.max_bad_steps={limit}): stopping"
            )
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if self.trainer.world_size == 1 and not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return None
        self._drop_grads = True
        return loss * float("nan")  # NaN gradients everywhere: DeepSpeed's overflow check then skips the step

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._drop_grads:  # a skipped step (see _skip_step): no gradient, so no update
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._drop_grads = False

    def configure_optimizers(self):
        assert self.model is not None
        o = self.cfg.optim
        groups = param_groups(self.model, o.weight_decay)
        if isinstance(self.extra_loss, torch.nn.Module):  # e.g. distillation's latent projection trains too
            for g, extra in zip(groups, param_groups(self.extra_loss, o.weight_decay), strict=True):
                g["params"] = g["params"] + extra["params"]
        if self.spec.param_groups is not None:  # e.g. byteified: the transplanted backbone's own rate
            # after the merge above: the split makes 2-4 groups, and the extra loss's params are local ones
            groups = resolve(self.spec.param_groups)(self.model, groups, self.cfg)
        opt: torch.optim.Optimizer
        if self._cpu_adam_wanted():  # ZeRO-Offload on GPU machines: DeepSpeed's vectorised CPU Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
        else:
            opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.cfg.trainer.max_steps

        def fn(step: int) -> float:
            return lr_multiplier(
                step,
                schedule=o.schedule,
                warmup=o.warmup_steps,
                total=total,
                min_ratio=o.min_lr_ratio,
                decay_fraction=o.decay_fraction,
            )

        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _cpu_adam_wanted(self) -> bool:
        if not (
            self.cfg.strategy.offload_optimizer and torch.cuda.is_available() and self._trainer is not None
        ):
            return False
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bytelm_config"] = config_to_dict(self.cfg)
        checkpoint["bytelm_bad_steps"] = self.bad_steps
        if self._trainer is not None:  # latest logged metrics (val/bpb, ...) for model cards and reports
            checkpoint["bytelm_metrics"] = {
                k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.bad_steps = int(checkpoint.get("bytelm_bad_steps", 0))
        self.configure_model()
