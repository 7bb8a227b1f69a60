"""bytelm's first-GPU measurements (issue 16, docs/gpu.md), in one run of at most ~8 minutes on one H100/H200.

Sections (each runs even if an earlier one failed; results and errors go to one JSON file and a markdown table
that can be pasted into docs/gpu.md):
1. ``auto``: the backend ``model.attn_backend=auto`` picks for each stack in bf16 training (flash-attn varlen
   expected for the byte and word stacks when flash-attn is installed; MrT5's gate-biased stacks: sdpa/flex);
2. ``agreement``: flash, flex and SDPA on packed documents in bf16, one attention call (outputs and gradients)
   and the whole hat_small model (loss and logits);
3. ``throughput``: training bytes/s, MFU and peak memory of hat_small and of the flat model with the same
   backbone, each eager and compiled (``torch.compile``, as ``trainer.compile=true``), side by side;
4. ``strategies``: hat_small through ``bytelm.train`` with single, deepspeed_zero2, deepspeed_zero3 and fsdp2
   on one GPU (one subprocess each): bytes/s, MFU, peak memory.

MFU = model training FLOPs per byte (``bytelm.models.flops.flops_per_byte``) x bytes/s / the card's dense bf16
peak (``PEAK_BF16`` below, from the vendors' spec sheets; ``--peak-flops`` overrides).

    python scripts/gpu_check.py --out out/gpu           # on a CUDA machine (scripts/gpu_check.sh runs it)
    python scripts/gpu_check.py --cpu-dry-run --out DIR  # the same logic on CPU: tiny sizes, short steps,
                                                          # flash through the pure-torch reference kernel;
                                                          # GPU-only parts are skipped with the reason printed
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bytelm.models import ModelConfig, attention, build_model  # noqa: E402
from bytelm.models.attention import Needs, attend, auto_backend  # noqa: E402
from bytelm.models.compile import CompiledForward  # noqa: E402
from bytelm.models.flops import flops_per_byte  # noqa: E402
from bytelm.models.hierarchical import split_word_starts  # noqa: E402

PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12}  # dense bf16 FLOP/s per GPU
STRATEGIES = ("single", "deepspeed_zero2", "deepspeed_zero3", "fsdp2")


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def skip(what: str, why: str) -> dict[str, Any]:
    log(f"skipped {what}: {why}")
    return {"skipped": why}


def corpus() -> bytes:
    """Real English text that ships with the repository (no download on a fresh GPU machine)."""
    files = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    return b"\n\n".join(p.read_bytes() for p in files if p.exists())


def make_batch(B: int, T: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Training rows of packed documents: windows of the corpus cut into documents of 100-900 bytes."""
    text, rng = corpus(), np.random.default_rng(seed)
    offs = rng.integers(0, len(text) - T - 1, size=B)
    rows = np.stack([np.frombuffer(text[o : o + T + 1], dtype=np.uint8) for o in offs]).astype(np.int64)
    docs = np.zeros((B, T), dtype=np.int64)
    for b in range(B):
        cuts = np.cumsum(rng.integers(max(2, T // 20), max(3, T // 2), size=T))
        docs[b] = np.searchsorted(cuts[cuts < T], np.arange(T), side="right")
    ws = np.stack([split_word_starts(r[:-1], 100, d) for r, d in zip(rows, docs, strict=True)])
    t = {"input_ids": rows[:, :-1], "targets": rows[:, 1:], "doc_ids": docs, "word_start": ws}
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in t.items()}


def model_configs(dry: bool) -> dict[str, ModelConfig]:
    """hat_small (conf/model/hat_small.yaml) and the flat model with its backbone; tiny widths for the dry
    run."""
    from bytelm.config import load_config

    hat = load_config(["experiment=hat_small"] + (["debug=cpu"] if dry else [])).model
    flat = ModelConfig(
        arch="flat",
        d_model=hat.d_model,
        n_layers=hat.n_layers,
        n_heads=hat.n_heads,
        max_seq_len=hat.max_seq_len,
    )
    return {"hat_small": hat, "flat_same_backbone": flat}


# ----------------------------------------------------------------------------------------------- sections


def check_auto(a: argparse.Namespace, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    T, W = a.seq_len, a.seq_len // 4
    stacks = {
        "byte stacks (packed documents)": Needs(dev.type, dtype, True, True, T, T, docs=True),
        "word backbone (packed documents)": Needs(dev.type, dtype, True, True, W, W, docs=True),
        "mrt5 encoder (gate bias, softmax1)": Needs(
            dev.type, dtype, True, False, T, T, key_bias=True, key_mask=True, null_key=True
        ),
        "mrt5 decoder (causal)": Needs(dev.type, dtype, True, True, T, T),
    }
    out: dict[str, Any] = {}
    for name, n in stacks.items():
        b, why = auto_backend(n)
        out[name] = {"backend": b.value, "why": why}
        log(f"auto -> {b.value} for the {name} ({why})")
    if dev.type != "cuda":
        out["flash_expected"] = skip("the 'auto picks flash' assertion", "needs CUDA (auto is sdpa on CPU)")
    elif attention.flash_available():
        out["ok"] = out["byte stacks (packed documents)"]["backend"] == "flash"
    else:
        out["ok"] = False
        out["flash_expected"] = "flash-attn is not installed: auto picks flex"
    return out


def check_agreement(a: argparse.Namespace, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """flash and flex vs SDPA with the dense mask: one attention call (outputs and input gradients) and the
    whole model (loss, logits)."""
    g = torch.Generator(device=dev).manual_seed(0)
    B, H, T, hd = 2, a.heads, a.seq_len, a.head_dim
    docs = make_batch(B, T, dev)["doc_ids"]
    q, k, v = (torch.randn(B, H, T, hd, device=dev, dtype=dtype, generator=g) for _ in range(3))
    grad = dev.type == "cuda"  # flex has no backward on CPU
    res: dict[str, Any] = {"tolerance": a.tol}

    def run(backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        qq = q.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            o = attend(qq, k, v, backend=backend, doc_ids=docs)
            if grad:
                o.float().square().sum().backward()
        return o.detach().float(), (qq.grad.float() if grad else None)

    ref_o, ref_g = run("sdpa")
    for backend in ("flash", "flex"):
        try:
            o, gq = run(backend)
        except attention.AttentionBackendError as e:
            res[f"attention_{backend}"] = skip(f"{backend} attention", str(e))
            continue
        r: dict[str, Any] = {"max_abs_diff_out": float((o - ref_o).abs().max())}
        if gq is not None and ref_g is not None:
            r["max_abs_diff_grad_q"] = float((gq - ref_g).abs().max() / ref_g.abs().max().clamp_min(1e-6))
        r["ok"] = all(v_ <= a.tol for v_ in r.values())
        res[f"attention_{backend}"] = r
        log(f"attention {backend} vs sdpa: {r}")
    cfg = model_configs(a.cpu_dry_run)["hat_small"]
    batch = make_batch(a.batch, a.seq_len, dev)
    losses: dict[str, Any] = {}
    logits: dict[str, torch.Tensor] = {}
    for backend in ("sdpa", "flash", "flex"):
        torch.manual_seed(0)
        m = build_model(_with_backend(cfg, backend)).to(dev).eval()
        try:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = m(batch["input_ids"], doc_ids=batch["doc_ids"], word_start=batch["word_start"])
        except attention.AttentionBackendError as e:
            losses[backend] = skip(f"hat_small with {backend}", str(e))
            continue
        logits[backend] = out.logits.float()
        losses[backend] = float(F.cross_entropy(out.logits.float().flatten(0, 1), batch["targets"].flatten()))
    for backend in ("flash", "flex"):
        if backend in logits:
            d = float((logits[backend] - logits["sdpa"]).abs().max())
            res[f"model_{backend}"] = {
                "loss": losses[backend],
                "loss_sdpa": losses["sdpa"],
                "max_abs_diff_logits": d,
                "ok": d <= 10 * a.tol,
            }
            log(f"hat_small {backend} vs sdpa: {res[f'model_{backend}']}")
        else:
            res[f"model_{backend}"] = losses[backend]
    return res


def _with_backend(cfg: ModelConfig, backend: str) -> ModelConfig:
    c = copy.deepcopy(cfg)
    c.attn_backend = backend
    return c


def _train_steps(model, fn, opt, batch, n: int, dev: torch.device) -> float:
    """Seconds per training step (AdamW, bf16 autocast on CUDA) over ``n`` steps."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = fn(batch["input_ids"], doc_ids=batch["doc_ids"], word_start=batch["word_start"])
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch["targets"].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def check_throughput(
    a: argparse.Namespace, dev: torch.device, peak: float | None, deadline: float
) -> dict[str, Any]:
    batch = make_batch(a.batch, a.seq_len, dev)
    bpw = float(batch["word_start"].numel() / batch["word_start"].sum())
    res: dict[str, Any] = {
        "batch": a.batch,
        "seq_len": a.seq_len,
        "bytes_per_word": bpw,
        "compile_backend": a.compile_backend,
    }
    for name, cfg in model_configs(a.cpu_dry_run).items():
        fpb = flops_per_byte(cfg, a.seq_len, bpw)
        for variant in ("eager", "compiled"):
            key = f"{name} {variant}"
            if time.monotonic() > deadline:
                res[key] = skip(key, "time budget spent")
                continue
            if a.cpu_dry_run and variant == "compiled" and name != "hat_small":
                res[key] = skip(key, "CPU dry run: the compiled path is checked on hat_small")
                continue
            try:
                res[key] = _measure(a, cfg, variant, batch, dev, fpb, peak)
            except Exception as e:  # noqa: BLE001 - one failed variant (a compile error, OOM) is reported
                res[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            log(f"{key}: {res[key]}")
        e, c = res.get(f"{name} eager", {}), res.get(f"{name} compiled", {})
        if "bytes_per_s" in e and "bytes_per_s" in c:
            res[f"{name} compiled/eager"] = c["bytes_per_s"] / e["bytes_per_s"]
    return res


def _measure(
    a: argparse.Namespace,
    cfg: ModelConfig,
    variant: str,
    batch: dict[str, torch.Tensor],
    dev: torch.device,
    fpb: float,
    peak: float | None,
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(cfg).to(dev).train()
    fn = CompiledForward(model, backend=a.compile_backend) if variant == "compiled" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _train_steps(model, fn, opt, batch, a.warmup, dev)  # compiles the compiled variant
    warm_s = time.perf_counter() - t0
    step = _train_steps(model, fn, opt, batch, a.steps, dev)
    bps = a.batch * a.seq_len / step
    return {
        "step_s": step,
        "bytes_per_s": bps,
        "flops_per_byte": fpb,
        "warmup_s": warm_s,
        "mfu": fpb * bps / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
    }


def check_strategies(a: argparse.Namespace, dev: torch.device, deadline: float, out: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    corpus_file = out / "corpus.txt"
    corpus_file.write_bytes(corpus())
    for name in STRATEGIES:
        if dev.type != "cuda" and name != "single":
            res[name] = skip(
                name, "ZeRO / FSDP2 on one GPU need CUDA (their CPU runs: tests/train/test_distributed.py)"
            )
            continue
        left = deadline - time.monotonic()
        if left < 30:
            res[name] = skip(name, "time budget spent")
            continue
        result = out / f"strategy_{name}.json"
        cmd = [
            sys.executable,
            __file__,
            "--strategy-run",
            name,
            "--result",
            str(result),
            "--corpus",
            str(corpus_file),
            "--steps",
            str(a.steps),
            "--warmup",
            str(a.warmup),
        ] + (["--cpu-dry-run"] if a.cpu_dry_run else [])
        log(f"strategy {name}: {' '.join(cmd[1:])}")
        if a.cpu_dry_run:  # in this process: the same function, without a second interpreter's start-up
            strategy_run(
                argparse.Namespace(
                    **{**vars(a), "strategy_run": name, "result": str(result), "corpus": str(corpus_file)}
                )
            )
            res[name] = json.loads(result.read_text())
            continue
        try:
            p = subprocess.run(cmd, timeout=min(a.strategy_timeout, left), capture_output=True, text=True)
            (out / f"strategy_{name}.log").write_text(p.stdout[-20000:] + p.stderr[-20000:])
            res[name] = (
                json.loads(result.read_text())
                if p.returncode == 0 and result.exists()
                else {
                    "error": (
                        f"exit {p.returncode}: "
                        f"{p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else ''}"
                    )
                }
            )
        except subprocess.TimeoutExpired:
            res[name] = {"error": f"timed out after {min(a.strategy_timeout, left):.0f} s"}
        log(f"strategy {name}: {res[name]}")
    return res


def strategy_run(a: argparse.Namespace) -> None:
    """One ``bytelm.train`` run (a subprocess of check_strategies): hat_small on one device with
    ``strategy``."""
    import lightning as L

    from bytelm.config import load_config
    from bytelm.train import run

    dry = a.cpu_dry_run
    steps = a.warmup + a.steps
    over = [
        "experiment=hat_tiny" if dry else "experiment=hat_small",
        f"strategy={a.strategy_run}",
        "logger=none",
        "trainer.devices=1",
        f"trainer.max_steps={steps}",
        f"trainer.val_every={10 * steps}",
        f"trainer.ckpt_every={10 * steps}",
        "trainer.save_last=false",
        "trainer.progress=false",
        f"trainer.out_dir={Path(a.result).parent / ('run_' + a.strategy_run)}",
        "data.source=files",
        f"data.paths=[{a.corpus}]",
        f"data.val_paths=[{a.corpus}]",
        "data.txt_unit=paragraph",
        "data.val_max_bytes=4096",
    ] + (["debug=cpu", "trainer.max_steps=" + str(steps)] if dry else [])
    cfg = load_config(over)
    times: list[float] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    res = run(cfg, callbacks=[StepTimer()])
    step = float(np.median(times[a.warmup :] or times))
    bps = cfg.data.batch_size * cfg.data.seq_len / step
    fpb = flops_per_byte(cfg.model, cfg.data.seq_len)
    peak = peak_flops() if torch.cuda.is_available() else None
    Path(a.result).write_text(
        json.dumps(
            {
                "strategy": a.strategy_run,
                "steps": res["global_step"],
                "step_s": step,
                "bytes_per_s": bps,
                "mfu": fpb * bps / peak if peak else None,
                "loss": res["metrics"].get("train/loss"),
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30
                if torch.cuda.is_available()
                else None,
            }
        )
    )


# ----------------------------------------------------------------------------------------------- report


def peak_flops(override: float = 0.0) -> float | None:
    if override > 0:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _f(v: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        f"GPU check {rep['date']}: {rep['device']}, torch {rep['torch']}, flash-attn {rep['flash_attn']}"
        + (" (CPU dry run)" if rep["cpu_dry_run"] else ""),
        "",
        "| configuration | bytes/s | MFU | peak memory (GiB) | note |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    rows = {
        **{k: v for k, v in rep.get("throughput", {}).items() if isinstance(v, dict)},
        **{f"hat_small, {k}": v for k, v in rep.get("strategies", {}).items() if isinstance(v, dict)},
    }
    for name, r in rows.items():
        note = r.get("skipped") or r.get("error") or ""
        lines.append(
            f"| {name} | {_f(r.get('bytes_per_s'))} | {_f(r.get('mfu'), '{:.1%}')} | "
            f"{_f(r.get('peak_mem_gib'), '{:.2f}')} | {note} |"
        )
    lines += [
        "",
        "| agreement with SDPA (packed documents) | max abs difference | ok |",
        "| --- | ---: | --- |",
    ]
    for name, r in rep.get("agreement", {}).items():
        if isinstance(r, dict):
            d = r.get("max_abs_diff_out", r.get("max_abs_diff_logits"))
            lines.append(
                f"| {name} | {_f(d, '{:.2e}')} | {r.get('ok', r.get('skipped') or r.get('error'))} |"
            )
    auto = rep.get("auto", {})
    lines += [
        "",
        "auto: "
        + "; ".join(
            f"{k} -> {v['backend']}" for k, v in auto.items() if isinstance(v, dict) and "backend" in v
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/gpu")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same logic on CPU with tiny sizes")
    p.add_argument("--budget-s", type=float, default=360.0, help="time budget of the measuring sections")
    p.add_argument("--peak-flops", type=float, default=0.0, help="bf16 peak FLOP/s of the GPU (0: by name)")
    p.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor; dry run eager)"
    )
    p.add_argument("--strategy-timeout", type=float, default=150.0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument(
        "--strategy-run", default=None, help=argparse.SUPPRESS
    )  # internal: one strategy subprocess
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    dry = a.cpu_dry_run
    a.steps = a.steps or (1 if dry else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if dry else 3)
    if a.strategy_run:
        strategy_run(a)
        return 0
    if not dry and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device; use --cpu-dry-run to check the script on CPU", file=sys.stderr)
        return 2
    a.compile_backend = a.compile_backend or ("eager" if dry else "inductor")  # inductor on CPU takes minutes
    a.seq_len, a.batch, a.heads, a.head_dim = (64, 2, 2, 16) if dry else (2048, 16, 8, 64)
    a.tol = 1e-4 if dry else 2e-2
    dev = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    if dry:  # flash through the pure-torch reference kernel (flash-attn has no CPU build)
        from bytelm.models.attention_ref import REFERENCE

        attention.load_flash = lambda: REFERENCE  # type: ignore[assignment]
        log(
            "CPU dry run: tiny sizes, fp32, flash = pure-torch reference kernel, compile backend "
            f"{a.compile_backend} (inductor on CPU takes minutes)"
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    deadline = t_start + a.budget_s
    fa = attention.load_flash()
    rep: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_dry_run": dry,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "flash_attn": "reference kernel" if dry else ("installed" if fa else "not installed"),
        "peak_flops_bf16": peak_flops(a.peak_flops) if not dry else None,
    }
    sections = {
        "auto": lambda: check_auto(a, dev, dtype),
        "agreement": lambda: check_agreement(a, dev, dtype),
        "throughput": lambda: check_throughput(a, dev, rep["peak_flops_bf16"], deadline - 0.45 * a.budget_s),
        "strategies": lambda: check_strategies(a, dev, deadline, out),
    }
    failed = False
    for name, fn in sections.items():
        t0 = time.monotonic()
        try:
            rep[name] = fn()
        except Exception as e:  # noqa: BLE001 - a failed section is reported, the others still run
            rep[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            log(f"{name} failed: {e}")
            failed = True
        rep[f"{name}_s"] = time.monotonic() - t0
    rep["total_s"] = time.monotonic() - t_start
    (out / "gpu_check.json").write_text(json.dumps(rep, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(rep))
    print(markdown(rep))
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {rep['total_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
