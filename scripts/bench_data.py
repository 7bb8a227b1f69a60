"""Data pipeline throughput vs what training consumes, side by side in one run (docs/design.md#speed-claims).

Measures the training loader of an experiment (default ``hat_tiny`` on the embedded Shakespeare corpus: the
rows, doc ids and word starts the hierarchical model trains on) in bytes/s with 0, 1 and 2 workers, on both
paths: in-memory random windows (the default) and streaming (``data.streaming=true``: documents read, cleaned,
word-split and packed inside the workers). Then it times training steps of the experiment's model (forward +
backward + AdamW step, plain torch, the same batch shape) and prints the ratio loader / training: the target
is >= 10x, so data never stalls the accelerator. Prints a table and writes JSON.

    python scripts/bench_data.py                                # hat_tiny, Shakespeare
    python scripts/bench_data.py --experiment hat_small data=chatterbot --batches 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[-1],
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides (e.g. data=chatterbot data.seq_len=512)")
    p.add_argument(
        "--experiment", default="hat_tiny", help="conf/experiment/ file whose model and data are used"
    )
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="dataloader workers to measure")
    p.add_argument("--batches", type=int, default=100, help="timed batches per loader (after the first)")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the training steps run (default: cuda if available; bf16 autocast there)",
    )
    p.add_argument("--paths", nargs="+", default=["memory", "streaming"], choices=["memory", "streaming"])
    p.add_argument("--out", default="out/bench_data.json", help="JSON result (default out/bench_data.json)")
    return p.parse_args(argv)


def bench_loader(cfg: Any, streaming: bool, workers: int, batches: int) -> dict[str, float]:
    from bytelm.lit.data import ByteDataModule

    cfg.data.streaming, cfg.data.num_workers = streaming, workers
    dm = ByteDataModule(cfg)
    t0 = time.perf_counter()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    first = next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["input_ids"].numel()
    t2 = time.perf_counter()
    del it
    return {"bytes_per_s": n / (t2 - t1), "first_batch_s": t1 - t0, "bytes": n, "keys": sorted(first)}  # type: ignore[dict-item]


def bench_training(cfg: Any, steps: int, device: str = "cpu") -> dict[str, Any]:
    from bytelm.lit.data import ByteDataModule
    from bytelm.models import build_model

    cfg.data.streaming, cfg.data.num_workers = False, 0
    arch = cfg.model.arch
    note = ""
    if arch == "hierarchical":
        try:
            import bytelm.models.hierarchical  # noqa: F401
        except ImportError as e:  # the flat model stands in, and the result says so
            note = f"bytelm.models.hierarchical not importable ({e}); measured the flat model instead"
            cfg.model.arch = "flat"
    dm = ByteDataModule(cfg)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(steps + 1)]  # prepared before timing: training alone is measured
    model = build_model(cfg.model).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cuda = device.startswith("cuda")
    times = []
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model(
                b["input_ids"], targets=b["targets"], doc_ids=b["doc_ids"], word_start=b.get("word_start")
            )
            loss = (
                out.loss
                if out.loss is not None
                else torch.nn.functional.cross_entropy(
                    out.logits.float().flatten(0, 1), b["targets"].flatten(), ignore_index=-100
                )
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step = sum(times[1:]) / max(1, len(times) - 1)
    n = batches[0]["input_ids"].numel()
    return {
        "arch": cfg.model.arch,
        "device": device,
        "bytes_per_step": n,
        "step_s": step,
        "bytes_per_s": n / step,
        "note": note,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    import datasets.config

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    from bytelm.config import load_config

    overrides = [f"experiment={args.experiment}", *args.overrides]
    base = load_config(overrides)
    d, m = base.data, base.model
    print(
        f"experiment {args.experiment}: model {m.arch} (chunker {m.chunker}), data.source={d.source}, "
        f"batch {d.batch_size} x {d.seq_len} bytes; torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs"
    )
    train = bench_training(load_config(overrides), args.train_steps, args.device)
    if train["note"]:
        print("note:", train["note"])
    rows = []
    for path in args.paths:
        for w in args.workers:
            r = bench_loader(load_config(overrides), path == "streaming", w, args.batches)
            r.update(path=path, workers=w, ratio=r["bytes_per_s"] / train["bytes_per_s"])
            rows.append(r)
            print(f"  measured {path:9s} workers={w}: {r['bytes_per_s'] / 1e6:8.2f} MB/s", flush=True)
    print()
    print(f"{'pipeline':12s} {'workers':>7s} {'loader MB/s':>12s} {'first batch s':>14s} {'x training':>11s}")
    for r in rows:
        print(
            f"{r['path']:12s} {r['workers']:7d} {r['bytes_per_s'] / 1e6:12.2f} {r['first_batch_s']:14.2f} "
            f"{r['ratio']:11.1f}"
        )
    print(
        f"{'training':12s} {'':7s} {train['bytes_per_s'] / 1e6:12.4f}   ({train['arch']} model on "
        f"{train['device']}, {train['step_s'] * 1e3:.0f} ms/step of {train['bytes_per_step']} bytes)"
    )
    worst = min(r["ratio"] for r in rows)
    print(
        f"\nslowest loader is {worst:.1f}x what training consumes (target >= 10x): "
        f"{'OK' if worst >= 10 else 'BELOW TARGET'}"
    )
    result = {
        "experiment": args.experiment,
        "overrides": args.overrides,
        "source": d.source,
        "batch_size": d.batch_size,
        "seq_len": d.seq_len,
        "training": train,
        "loaders": rows,
        "min_ratio": worst,
        "target_ratio": 10.0,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "loadavg": os.getloadavg(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
