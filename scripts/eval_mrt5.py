"""MrT5 checkpoint on the validation rows of its own run: bpb of the continuation with soft vs hard deletion.

Soft deletion is the network the model trained as (``G`` as an attention bias, every byte still present);
hard deletion is the inference network (bytes with ``G < tau_del`` removed, later encoder blocks and the
cross-attention run on the shorter sequence). The difference is the quality cost of really deleting. Rows are
the run's own validation rows (same data config, ``ByteDataModule``), so the soft number is the run's
``val/bpb``.

    python scripts/eval_mrt5.py runs/mrt5_tiny/checkpoints/last.ckpt [--threads 1] [--out out/eval_mrt5.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from bytelm.checkpoint import load_model
from bytelm.models.mrt5 import MrT5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="bytelm checkpoint (.ckpt) or run folder of an MrT5 run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--max-bytes", type=int, default=0, help="validation bytes (0 = the run's data.val_max_bytes)"
    )
    p.add_argument("--out", default="out/eval_mrt5.json")
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model: MrT5, batches: list[dict[str, torch.Tensor]], hard: bool) -> dict[str, float]:
    nll, n, deleted, real, enc_len, t0 = 0.0, 0, 0.0, 0, 0.0, time.perf_counter()
    for b in batches:
        out = model(b["input_ids"], targets=b["targets"], hard_delete=hard)
        nll += float(out.metrics["nll_sum"])
        n += int(out.metrics["n_bytes"])
        if "deletion_ratio" in out.metrics:
            s = int(out.metrics["prefix_len"])
            rows_real = int((b["input_ids"][:, :s] != 256).sum())
            deleted += float(out.metrics["deletion_ratio"]) * rows_real
            real += rows_real
        enc_len += float(out.metrics["encoder_len"])
    return {
        "bpb": nll / max(n, 1) / math.log(2),
        "bytes": n,
        "deletion_ratio": deleted / real if real else float("nan"),
        "encoder_len_mean": enc_len / max(len(batches), 1),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    path = Path(args.ckpt)
    if path.is_dir() and (path / "checkpoints" / "last.ckpt").exists():
        path = path / "checkpoints" / "last.ckpt"
    model, cfg = load_model(path)
    if not isinstance(model, MrT5):
        raise SystemExit(f"{args.ckpt} holds a {type(model).__name__}, not an MrT5")
    if args.max_bytes > 0:
        cfg.data.val_max_bytes = args.max_bytes
    from bytelm.lit.data import ByteDataModule

    dm = ByteDataModule(cfg)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    res: dict[str, Any] = {"ckpt": str(path), "soft": evaluate(model, batches, hard=False)}
    if model.gate is not None:
        res["hard"] = evaluate(model, batches, hard=True)
        res["hard_minus_soft_bpb"] = res["hard"]["bpb"] - res["soft"]["bpb"]
    res["threads"] = torch.get_num_threads()
    print(json.dumps(res, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
