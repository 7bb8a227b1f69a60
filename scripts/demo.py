"""``make demo``: train a hierarchical byte model and the flat baseline at equal training FLOPs on the
embedded Shakespeare corpus (CPU, a few minutes), compare validation bits-per-byte, generate a sample, export
the hierarchical model to a Hugging Face folder and generate from that folder through ``transformers``.

Every number printed is measured in this run. ``--steps`` scales the whole demo (default:
experiment=hat_tiny's 400 steps). The flat model's ``trainer.flops_budget`` is the hierarchical run's training
FLOPs by the rule of the results table (``bytelm.eval.curves.run_training_flops``: steps x bytes per step x
``flops_per_byte`` at the bytes per word logged in training); it trains the largest number of steps within
that budget. Extra Hydra overrides apply to both runs (``scripts/make_results.sh`` trains the data=mixture
pair this way).
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

    progress = [] if sys.stdout.isatty() else ["trainer.progress=false"]  # no progress bars in a log file
    overrides = [
        f"experiment={experiment}",
        *extra,
        "logger=csv",
        *progress,
        f"trainer.out_dir={out / experiment}",
    ]
    cfg = load_config(overrides)
    (out / experiment).mkdir(parents=True, exist_ok=True)
    # the same run from the command line (scripts/report.py prints it next to the run's results)
    (out / experiment / "command.txt").write_text(
        shlex.join(["python", "-m", "bytelm.train", *overrides]) + "\n"
    )
    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    step = res["global_step"]
    seen = step * cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.accumulate
    return {
        "cfg": cfg,
        "module": res["module"],
        "wall_s": wall,
        "bytes_seen": seen,
        "steps": step,
        "ckpt": out / experiment / "checkpoints" / "last.ckpt",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of the hierarchical model (default: experiment=hat_tiny's, 400)",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (checkpoints, HF export, results.json)")
    p.add_argument(
        "--val-bytes",
        type=int,
        default=None,
        help="validation bytes evaluated per model (default: the experiments' data.val_max_bytes)",
    )
    p.add_argument("--skip-export", action="store_true")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both runs, e.g. data=mixture")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import lightning.pytorch  # noqa: F401 - sets its loggers to INFO on import: quiet them after it

    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)
    from bytelm.cli.eval import evaluate_bpb
    from bytelm.eval.curves import run_training_flops, training_curve
    from bytelm.models.generate import generate

    out = Path(args.out)
    common = list(args.overrides)
    if args.val_bytes is not None:
        common.append(f"data.val_max_bytes={args.val_bytes}")
    steps = [] if args.steps is None else [f"trainer.max_steps={args.steps}"]
    print(
        f"== 1/4 training the hierarchical model (hat_tiny, {args.steps or 'its'} steps) on CPU", flush=True
    )
    hat = train("hat_tiny", out, [*common, *steps])
    budget = run_training_flops(out / "hat_tiny")
    print(
        f"== 2/4 training the flat baseline (flat_tiny, same backbone) for the same {budget:.3g} FLOPs",
        flush=True,
    )
    flat = train("flat_tiny", out, [*common, f"trainer.flops_budget={budget!r}"])

    val_bytes = hat["cfg"].data.val_max_bytes
    print(
        f"== 3/4 evaluating validation bits-per-byte (first {val_bytes:,} validation bytes: held out)",
        flush=True,
    )
    rows = []
    for name, r in (("hierarchical (hat_tiny)", hat), ("flat (flat_tiny)", flat)):
        model = r["module"].model.eval()
        ev = evaluate_bpb(model, r["cfg"], max_bytes=val_bytes, batch_size=16)
        n_params = sum(p.numel() for p in model.parameters())
        # training time as the results table counts it: the logged step times (no validation, no checkpoints)
        step_s = training_curve(r["ckpt"], r["cfg"]).total_wall_s or r["wall_s"]
        rows.append(
            {
                "model": name,
                "params": n_params,
                "train_steps": r["steps"],
                "bytes_seen": r["bytes_seen"],
                "train_flops": run_training_flops(r["ckpt"]),
                "run_wall_s": round(r["wall_s"], 1),
                "train_s": round(step_s, 1),
                "train_bytes_per_s": round(r["bytes_seen"] / step_s),
                "val_bpb": round(ev["bpb"], 4),
            }
        )
    hdr = f"{'model':<26}{'params':>9}{'steps':>7}{'bytes seen':>12}{'FLOPs':>10}{'bytes/s':>9}{'val bpb':>9}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(
            f"{r['model']:<26}{r['params']:>9,}{r['train_steps']:>7}{r['bytes_seen']:>12,}"
            f"{r['train_flops']:>10.3g}{r['train_bytes_per_s']:>9,}{r['val_bpb']:>9.3f}"
        )
    print(
        "(uniform over bytes = 8.000 bpb; equal training FLOPs: flat_tiny trains the most steps within "
        f"hat_tiny's; bytes/s over the logged training steps; bpb over the first {val_bytes:,} validation "
        "bytes)\n"
    )

    prompt = "ROMEO:\nBut soft, what light"
    sample = generate(
        hat["module"].model.eval(), prompt.encode(), max_new_bytes=200, temperature=0.7, top_k=40, seed=0
    ).decode("utf-8", errors="replace")
    print("== sample (hierarchical, KV-cached, T=0.7):\n" + prompt + sample + "\n")
    result = {"rows": rows, "sample": prompt + sample}

    if not args.skip_export:
        print("== 4/4 exporting to a Hugging Face folder and generating through transformers", flush=True)
        from bytelm.hf.export import export_checkpoint, generate_from_folder

        folder = export_checkpoint(hat["ckpt"], out / "hf_hat_tiny")
        # sampled like the bytelm sample above (greedy decoding of a tiny model loops on "the the the")
        text = generate_from_folder(folder, "ROMEO:\n", max_new_tokens=120, temperature=0.7, top_k=40, seed=0)
        print(
            f"exported to {folder}\nAutoModelForCausalLM.from_pretrained('{folder}', "
            f"trust_remote_code=True).generate(do_sample=True, temperature=0.7, top_k=40):\nROMEO:\n{text}\n"
        )
        result["export"] = str(folder)
        result["hf_sample"] = text
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"results written to {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
