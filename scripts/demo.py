"""``make demo``: train a hierarchical byte model and the flat baseline at equal training FLOPs on the embedded
Shakespeare corpus (CPU, a few minutes), compare validation bits-per-byte, generate a sample, export the
hierarchical model to a Hugging Face folder and generate from that folder through ``transformers``.

Every number printed is measured in this run. ``--steps`` scales the whole demo (default 400 steps of the
hierarchical model; the flat model gets the same training FLOPs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


def train(experiment: str, out: Path, extra: list[str]) -> dict:
    from bytelm.config import load_config
    from bytelm.train import run

    overrides = [f"experiment={experiment}", f"trainer.out_dir={out / experiment}", "logger=csv", *extra]
    cfg = load_config(overrides)
    (out / experiment).mkdir(parents=True, exist_ok=True)
    # the same run from the command line (scripts/report.py prints it next to the run's results)
    (out / experiment / "command.txt").write_text(shlex.join(["python", "-m", "bytelm.train", *overrides]) + "\n")
    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    step = res["global_step"]
    seen = step * cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.accumulate
    return {"cfg": cfg, "module": res["module"], "wall_s": wall, "bytes_seen": seen, "steps": step,
            "ckpt": out / experiment / "checkpoints" / "last.ckpt"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps of the hierarchical model")
    p.add_argument("--out", default="runs/demo", help="output folder (checkpoints, HF export, results.json)")
    p.add_argument("--val-bytes", type=int, default=131072, help="validation bytes evaluated per model")
    p.add_argument("--skip-export", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import lightning.pytorch  # noqa: F401 - sets its loggers to INFO on import: quiet them after it

    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)
    from bytelm.cli.eval import evaluate_bpb
    from bytelm.models.flops import flops_per_byte
    from bytelm.models.generate import generate

    out = Path(args.out)
    common = [f"data.val_max_bytes={args.val_bytes}"]
    print(f"== 1/4 training the hierarchical model (hat_tiny, {args.steps} steps) on CPU", flush=True)
    hat = train("hat_tiny", out, [f"trainer.max_steps={args.steps}", *common])
    hat_fpb = flops_per_byte(hat["cfg"].model, hat["cfg"].data.seq_len)
    budget = hat_fpb * hat["bytes_seen"]
    print(f"== 2/4 training the flat baseline (flat_tiny, same backbone) for the same {budget:.3g} FLOPs", flush=True)
    flat = train("flat_tiny", out, [f"trainer.flops_budget={budget}", *common])
    flat_fpb = flops_per_byte(flat["cfg"].model, flat["cfg"].data.seq_len)

    print("== 3/4 evaluating validation bits-per-byte (Hamlet, Twelfth Night, Sonnets: held out)", flush=True)
    rows = []
    for name, r, fpb in (("hierarchical (hat_tiny)", hat, hat_fpb), ("flat (flat_tiny)", flat, flat_fpb)):
        model = r["module"].model.eval()
        ev = evaluate_bpb(model, r["cfg"], max_bytes=args.val_bytes, batch_size=16)
        n_params = sum(p.numel() for p in model.parameters())
        rows.append({
            "model": name, "params": n_params, "train_steps": r["steps"], "bytes_seen": r["bytes_seen"],
            "train_flops": fpb * r["bytes_seen"], "train_wall_s": round(r["wall_s"], 1),
            "train_bytes_per_s": round(r["bytes_seen"] / r["wall_s"]), "val_bpb": round(ev["bpb"], 4),
        })
    hdr = f"{'model':<26}{'params':>9}{'steps':>7}{'bytes seen':>12}{'FLOPs':>10}{'bytes/s':>9}{'val bpb':>9}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['model']:<26}{r['params']:>9,}{r['train_steps']:>7}{r['bytes_seen']:>12,}"
              f"{r['train_flops']:>10.3g}{r['train_bytes_per_s']:>9,}{r['val_bpb']:>9.3f}")
    print("(uniform over bytes = 8.000 bpb; equal training FLOPs; bpb over the first "
          f"{args.val_bytes:,} validation bytes)\n")

    prompt = "ROMEO:\nBut soft, what light"
    sample = generate(hat["module"].model.eval(), prompt.encode(), max_new_bytes=200, temperature=0.7,
                      top_k=40, seed=0).decode("utf-8", errors="replace")
    print("== sample (hierarchical, KV-cached, T=0.7):\n" + prompt + sample + "\n")
    result = {"rows": rows, "sample": prompt + sample}

    if not args.skip_export:
        print("== 4/4 exporting to a Hugging Face folder and generating through transformers", flush=True)
        from bytelm.hf.export import export_checkpoint, generate_from_folder

        folder = export_checkpoint(hat["ckpt"], out / "hf_hat_tiny")
        # sampled like the bytelm sample above (greedy decoding of a tiny model loops on "the the the")
        text = generate_from_folder(folder, "ROMEO:\n", max_new_tokens=120, temperature=0.7, top_k=40, seed=0)
        print(f"exported to {folder}\n"
              f"AutoModelForCausalLM.from_pretrained('{folder}', trust_remote_code=True).generate(do_sample=True, "
              f"temperature=0.7, top_k=40):\nROMEO:\n{text}\n")
        result["export"] = str(folder)
        result["hf_sample"] = text
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"results written to {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
