"""MrT5 hard deletion vs no deletion: encoder+decoder forward time, side by side in one run
(docs/design.md#speed-claims).

Forces the deletion ratio by setting the gate's bias so that exactly the wanted share of prefix bytes falls
below ``tau_del`` (the real gate and hard-deletion code paths run; with ``--batch 1`` the share is exact),
and, given ``--ckpt``, also times the checkpoint's learned gate. Rows are timed round-robin (one repeat of
every row, then the next repeat) so machine noise hits them alike; the table reports median and min times and
speed-ups against the same model with the gate on and nothing deleted ("no gate" = the same weights without
the gate, i.e. a plain ByT5-style encoder-decoder, for reference).

    python scripts/bench_mrt5.py                       # d_byte 512, 12 encoder (gate at 2) + 4 decoder layers
    python scripts/bench_mrt5.py --ckpt ckpt.pt --text corpus.txt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bytelm.models import ModelConfig, build_model
from bytelm.models.config import GateConfig
from bytelm.models.mrt5 import MrT5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-byte", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--encoder-layers", type=int, default=12)
    p.add_argument("--decoder-layers", type=int, default=4)
    p.add_argument("--gate-layer", type=int, default=2)
    p.add_argument("--enc-len", type=int, default=1024, help="encoder input bytes (the prefix)")
    p.add_argument("--dec-len", type=int, default=128, help="decoder positions (continuation bytes)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ratios", default="0.5,0.75", help="forced deletion ratios, comma separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--ckpt", default=None, help="checkpoint with a trained MrT5 (times its learned ratio too)"
    )
    p.add_argument("--text", default=None, help="text file for the input bytes (default: synthetic English)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench_mrt5.json")
    return p.parse_args(argv)


def load_checkpoint(path: str) -> MrT5:
    """A trained MrT5 from a bytelm checkpoint (Lightning ``.ckpt``, run folder's ``last.ckpt``, sharded
    folder or consolidated ``.safetensors``) via :func:`bytelm.checkpoint.load_model`: weights, config (gate,
    softmax1) and the controller state come from the checkpoint, the CLI model flags are ignored."""
    from bytelm.checkpoint import load_model

    p = Path(path)
    if p.is_dir() and (p / "checkpoints" / "last.ckpt").exists():
        p = p / "checkpoints" / "last.ckpt"
    model, _ = load_model(p)
    if not isinstance(model, MrT5):
        raise SystemExit(f"{path} holds a {type(model).__name__}, not an MrT5")
    return model


def make_input(args: argparse.Namespace, vocab_bytes: int = 256) -> torch.Tensor:
    n = args.enc_len + args.dec_len - 1  # forward builds [BOS] + row[s:] for the decoder
    if args.text:
        data = Path(args.text).read_bytes()
    else:
        data = (
            b"It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
            b"of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
            b"season of Light. "
        )
    data = (data * math.ceil(n * args.batch / len(data) + 1))[: n * args.batch + args.batch * 7]
    rows = [list(data[i * 7 + i * n : i * 7 + (i + 1) * n]) for i in range(args.batch)]
    return torch.tensor(rows, dtype=torch.long).clamp(max=vocab_bytes - 1)


@torch.inference_mode()
def gate_raw_scores(model: MrT5, x: torch.Tensor, enc_len: int) -> torch.Tensor:
    """``RMSNorm(h) @ w`` (no bias) on the real gate input, (B, enc_len)."""
    assert model.gate is not None
    seen: dict[str, tuple] = {}
    hook = model.gate.register_forward_pre_hook(lambda _m, a: seen.setdefault("args", a))
    try:
        model.encode(x[:, :enc_len], hard_delete=False)
    finally:
        hook.remove()
    h, pad_mask = seen["args"][0], (seen["args"][1] if len(seen["args"]) > 1 else None)
    return model.gate.scores(h, pad_mask) - model.gate.proj.bias


def bias_for_ratio(raw: torch.Tensor, ratio: float, k: float, tau: float) -> float:
    """Gate bias that deletes the ``ratio`` share of positions with the lowest raw score.

    Deleted iff ``G < tau`` iff ``raw + b < -logit(tau / k)``."""
    c = -math.log((tau / k) / (1 - tau / k))
    flat = raw.flatten().sort().values
    n = round(ratio * flat.numel())
    if n <= 0:
        return c - float(flat[0]) + 10.0
    if n >= flat.numel():
        return c - float(flat[-1]) - 10.0
    return c - 0.5 * float(flat[n - 1] + flat[n])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.ckpt:
        model = load_checkpoint(args.ckpt)
        cfg = model.cfg
        print(
            f"loaded {args.ckpt}: d_byte={cfg.d_byte}, encoder {cfg.encoder_layers} (gate at "
            f"{cfg.gate.layer}), decoder {cfg.decoder_layers}, softmax1={cfg.gate.softmax1}"
        )
    else:
        cfg = ModelConfig(
            arch="mrt5",
            d_byte=args.d_byte,
            n_heads_byte=args.heads,
            encoder_layers=args.encoder_layers,
            decoder_layers=args.decoder_layers,
            gate=GateConfig(layer=args.gate_layer),
        )
        built = build_model(cfg)
        assert isinstance(built, MrT5)
        model = built
    model.eval()
    x = make_input(args)
    enc_len = args.enc_len
    gate = model.gate
    assert gate is not None, "bench needs gate_enabled=True"
    learned_bias = float(gate.proj.bias.detach())
    raw = gate_raw_scores(model, x, enc_len)
    k, tau = cfg.gate.k, cfg.gate.tau_del

    # (name, forced ratio or None, gate bias: float, None = learned, or "off" = model without the gate)
    rows: list[tuple[str, float | None, float | str | None]] = [
        ("no gate", None, "off"),
        ("no deletion", 0.0, bias_for_ratio(raw, 0.0, k, tau)),
    ]
    for r in (float(v) for v in args.ratios.split(",") if v.strip()):
        rows.append((f"forced {r:.0%}", r, bias_for_ratio(raw, r, k, tau)))
    if args.ckpt:
        rows.append(("learned (ckpt)", None, None))

    def run(bias: float | str | None) -> tuple[float, float, dict[str, float]]:
        model.gate = None if bias == "off" else gate
        with torch.no_grad():
            gate.proj.bias.fill_(bias if isinstance(bias, float) else learned_bias)
        with torch.inference_mode():
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(x, prefix_len=enc_len, hard_delete=True)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        model.gate = gate
        return dt, dc, {m: float(out.metrics.get(m, float("nan"))) for m in ("deletion_ratio", "encoder_len")}

    times: dict[str, list[float]] = {r[0]: [] for r in rows}
    cpu: dict[str, list[float]] = {r[0]: [] for r in rows}
    stats: dict[str, dict[str, float]] = {}
    for rep in range(args.warmup + args.repeats):
        for name, _, bias in rows:
            dt, dc, st = run(bias)
            stats[name] = st
            if rep >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)

    base, base_cpu = statistics.median(times["no deletion"]), statistics.median(cpu["no deletion"])
    results = []
    print(
        f"\nMrT5 forward (hard deletion), d_byte={cfg.d_byte}, encoder {cfg.encoder_layers} layers (gate at "
        f"{cfg.gate.layer}), decoder {cfg.decoder_layers} layers, batch {args.batch} x ({enc_len} enc + "
        f"{args.dec_len} dec) bytes, {torch.get_num_threads()} threads, median of {args.repeats} round-robin "
        f"repeats; wall clock and process CPU time (the latter resists load from other processes)"
    )
    print(
        f"{'setting':<14} {'deleted':>8} {'enc len':>8} {'wall ms':>9} {'cpu ms':>9} {'speed-up wall':>14} "
        f"{'cpu':>6}"
    )
    for name, target, _ in rows:
        med, mc = statistics.median(times[name]), statistics.median(cpu[name])
        st = stats[name]
        res = {
            "setting": name,
            "target_ratio": target,
            "deletion_ratio": st["deletion_ratio"],
            "encoder_len_after": st["encoder_len"],
            "wall_median_s": med,
            "cpu_median_s": mc,
            "wall_s": times[name],
            "cpu_s": cpu[name],
            "speedup_wall": base / med,
            "speedup_cpu": base_cpu / mc,
        }
        results.append(res)
        dr = "-" if math.isnan(st["deletion_ratio"]) else f"{st['deletion_ratio']:.1%}"
        print(
            f"{name:<14} {dr:>8} {int(st['encoder_len']):>8d} {med * 1e3:>9.0f} {mc * 1e3:>9.0f} "
            f"{base / med:>13.2f}x {base_cpu / mc:>5.2f}x"
        )
    report = {
        "config": {
            "d_byte": cfg.d_byte,
            "n_heads_byte": cfg.n_heads_byte,
            "encoder_layers": cfg.encoder_layers,
            "decoder_layers": cfg.decoder_layers,
            "gate_layer": cfg.gate.layer,
            "enc_len": enc_len,
            "dec_len": args.dec_len,
            "batch": args.batch,
            "repeats": args.repeats,
            "ckpt": args.ckpt,
        },
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
